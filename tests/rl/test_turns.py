"""Turn-level batches: credit over turns by hand, the batch layout on a tiny policy, bad inputs."""

import numpy as np
import pytest

from persona_jax import nn as pnn
from persona_jax import rl
from persona_jax.rl import turns


def test_reinforce_and_gae_over_turns_by_hand():
  rewards = np.array([[0.0, 0.5, 1.0], [2.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
  values = np.array([[0.5, 0.25, 0.0], [1.0, 9.0, 9.0]])
  advantages, returns = turns.turn_advantages(rewards, values, mask, estimator="reinforce", gamma=0.9)
  expected_returns = [[0.5 * 0.9 + 0.81, 0.5 + 0.9, 1.0], [2.0, 0.0, 0.0]]
  np.testing.assert_allclose(returns, expected_returns, rtol=1e-6)
  np.testing.assert_allclose(advantages, (np.array(expected_returns) - values) * mask, rtol=1e-6)
  # GAE with lambda 1 is Monte Carlo minus the value; its returns add the value back.
  gae, gae_returns = turns.turn_advantages(rewards, values, mask, estimator="gae", gamma=0.9,
                                           gae_lambda=1.0)
  np.testing.assert_allclose(gae, advantages, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gae_returns, np.array(expected_returns) * mask, rtol=1e-6, atol=1e-6)
  # lambda 0: one-step TD, r_t + gamma V_{t+1} - V_t.
  td, _ = turns.turn_advantages(rewards, values, mask, estimator="gae", gamma=0.9, gae_lambda=0.0)
  np.testing.assert_allclose(td[0], [0.9 * 0.25 - 0.5, 0.5 - 0.25, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="estimator='ppo' is unknown"):
    turns.turn_advantages(rewards, values, mask, estimator="ppo")


# Two episodes, prompt of 2 ids. Row 0: turn 0 (2 ids), 2 environment ids, turn 1 (1 id), padding.
# Row 1: turn 0 (3 ids), then padding.
TOKENS = np.array([[1, 2, 5, 6, 7, 8, 9, 0], [1, 2, 5, 5, 6, 0, 0, 0]], np.int32)
INPUT_MASK = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]], bool)
TOKEN_TURN = np.array([[-1, -1, 0, 0, -1, -1, 1, -1], [-1, -1, 0, 0, 0, -1, -1, -1]])
LOGPROBS = [[[-0.1, -0.2], [-0.3]], [[-0.4, -0.5, -0.6]]]


def _policy():
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=16), 0)
  return rl.PolicyWithValue(decoder)


def test_turn_batch_layout_on_a_tiny_policy():
  policy = _policy()
  rewards = np.array([[0.0, 1.0, 7.0], [0.5, 3.0, 3.0]])  # entries after a row's last turn ignored
  batch = turns.turn_batch(policy, tokens=TOKENS, input_mask=INPUT_MASK, token_turn=TOKEN_TURN,
                           prompt_length=2, turn_rewards=rewards, turn_logprobs=LOGPROBS,
                           reference=policy.decoder, gamma=1.0)
  mask = batch["response_mask"]
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_allclose(batch["sampling_logprobs"],
                             [[-0.1, -0.2, 0, 0, -0.3, 0], [-0.4, -0.5, -0.6, 0, 0, 0]], rtol=1e-6)
  # The value head starts at 0: each turn's advantage is its reward-to-go, on all its tokens.
  np.testing.assert_allclose(batch["advantages"], [[1, 1, 0, 0, 1, 0], [0.5, 0.5, 0.5, 0, 0, 0]])
  np.testing.assert_array_equal(batch["value_mask"], [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0]])
  np.testing.assert_allclose(batch["returns"], [[1, 0, 0, 0, 1, 0], [0.5, 0, 0, 0, 0, 0]])
  np.testing.assert_allclose(batch["rewards"], [1.0, 0.5])
  scored, _ = rl.score(policy.decoder, TOKENS, INPUT_MASK, 6)
  np.testing.assert_allclose(batch["reference_logprobs"], scored * mask, atol=1e-6)
  # The batch trains: make_loss_fn reads every key it needs.
  loss, metrics = rl.make_loss_fn(kl_coefficient=0.1)(policy, batch, None)
  assert np.isfinite(float(loss)) and float(metrics["reward"]) == pytest.approx(0.75)


def test_a_decoder_policy_has_baseline_zero_and_no_reference_means_no_kl_input():
  decoder = _policy().decoder
  batch = turns.turn_batch(decoder, tokens=TOKENS, input_mask=INPUT_MASK, token_turn=TOKEN_TURN,
                           prompt_length=2, turn_rewards=np.array([[1.0, 0.0], [0.0, 0.0]]),
                           turn_logprobs=LOGPROBS, estimator="gae", gamma=0.5, gae_lambda=1.0)
  assert "reference_logprobs" not in batch
  np.testing.assert_allclose(batch["advantages"][0], [1, 1, 0, 0, 0, 0])


def test_bad_turn_inputs_raise():
  policy = _policy()
  kwargs = dict(tokens=TOKENS, input_mask=INPUT_MASK, prompt_length=2,
                turn_rewards=np.zeros((2, 2)), turn_logprobs=LOGPROBS)
  with pytest.raises(ValueError, match="inside the prompt part"):
    turns.turn_batch(policy, token_turn=TOKEN_TURN, **dict(kwargs, prompt_length=3))
  with pytest.raises(ValueError, match="row 0 turn 1 has 1 policy tokens but 2"):
    turns.turn_batch(policy, token_turn=TOKEN_TURN,
                     **dict(kwargs, turn_logprobs=[[[-0.1, -0.2], [-0.3, -0.3]], LOGPROBS[1]]))
  with pytest.raises(ValueError, match="max_turns=1"):
    turns.turn_batch(policy, token_turn=TOKEN_TURN, **dict(kwargs, turn_rewards=np.zeros((2, 1))))
  skipped = TOKEN_TURN.copy()
  skipped[0, 6] = 2
  with pytest.raises(ValueError, match=r"policy turns \[0, 2\]"):
    turns.turn_batch(policy, token_turn=skipped, **dict(kwargs, turn_rewards=np.zeros((2, 3))))
