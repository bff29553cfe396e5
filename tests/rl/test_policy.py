"""Rollouts, the RL train step on the core Trainer through `rl.Learner`, and a toy task where
training raises the reward."""

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax import rl


def test_rollout_masks_stop_tokens_and_logprobs_match_scoring(toy):
  decoder = toy.decoder()
  # Shapes as in `toy.job` (2 prompts x 4 samples, 6 tokens): the compiled sampler is reused.
  rollout = rl.sample_rollouts(decoder, [[1, 2, 3], [4]], max_new_tokens=6, rng=jax.random.key(3),
                               samples_per_prompt=4, stop_tokens=(5, 6, 7))
  assert rollout.tokens.shape == (8, rollout.prompt_length + 6) and rollout.group_size == 4
  np.testing.assert_array_equal(rollout.tokens[:4, :rollout.prompt_length],
                                np.repeat(rollout.tokens[:1, :rollout.prompt_length], 4, axis=0))
  for row in range(8):
    length = rollout.response_lengths[row]
    np.testing.assert_array_equal(rollout.response_mask[row], np.arange(6) < length)
    response = rollout.response_tokens[row]
    if rollout.done[row]:
      assert response[length - 1] in (5, 6, 7)
    assert not np.isin(response[:length - 1], (5, 6, 7)).any()  # nothing after the first stop
  assert any(rollout.done)
  stripped = rollout.response_token_lists(stop_tokens=(5, 6, 7))
  assert [len(s) for s in stripped] == [int(l) - int(d) for l, d in
                                        zip(rollout.response_lengths, rollout.done)]
  # The sampler's behaviour log-probs are the teacher-forced log-probs of the same policy.
  logprobs, values = rl.score(decoder, rollout.tokens, rollout.input_mask, 6)
  assert values is None
  np.testing.assert_allclose(logprobs * rollout.response_mask, rollout.sampling_logprobs, atol=2e-5)


def test_sequence_batch_and_bad_estimator_settings(toy):
  decoder = toy.decoder()
  rollout = rl.sample_rollouts(decoder, [[1, 2], [3]], max_new_tokens=6, rng=jax.random.key(0),
                               samples_per_prompt=4, stop_tokens=())
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  batch = rl.sequence_batch(rollout, rewards, estimator="rloo")
  np.testing.assert_allclose(batch["advantages"][:, 0], [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(batch["advantages"], batch["advantages"][:, :1] * np.ones((1, 6)))
  np.testing.assert_allclose(batch["returns"][:, 0], rewards)
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    rl.PromptRollouts(rl.ExampleCycler(toy.prompts, 1), toy.reward, estimator="grpo")
  with pytest.raises(ValueError, match="policy_loss='sft' is unknown"):
    rl.make_loss_fn(policy_loss="sft")


def test_training_raises_mean_reward_and_leaves_the_reference_unchanged(toy):
  decoder, trainer, learner = toy.job(num_steps=30)
  reference_before = jax.tree.map(np.array, nnx.state(decoder, nnx.Param).to_pure_dict())
  history = learner.train().history

  def mean_reward(module):  # 64 fresh samples, in the training shapes (no recompilation)
    return float(np.mean([toy.reward(None, rl.sample_rollouts(
        module, [[1, 2, 3], [4, 5]], max_new_tokens=6, rng=jax.random.key(100 + seed),
        samples_per_prompt=4, stop_tokens=()))["rewards"] for seed in range(8)]))

  before = mean_reward(decoder)
  after = mean_reward(trainer.model().decoder)
  assert 0.3 < before < 0.7
  assert after > before + 0.2, (before, after)
  assert np.mean([h["reward"] for h in history[-5:]]) > np.mean([h["reward"] for h in history[:5]])
  assert "value_loss" in history[-1] and "kl_loss" in history[-1]
  reference_after = nnx.state(decoder, nnx.Param).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, reference_before, reference_after)


def test_grpo_with_lora_trains_only_adapters_and_value_head(toy):
  decoder, trainer, learner = toy.job(num_steps=2, estimator="grpo", lora=True)
  base_before = jax.tree.map(np.array, nnx.state(decoder, nnx.Param).to_pure_dict())
  result = learner.train()
  assert np.isfinite(result.metrics["loss"])
  adapters = nnx.state(trainer.model(), nnx.LoRAParam).to_pure_dict()
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(adapters))  # b moved off 0
  # The reference (the module given to the Trainer) keeps its weights, LoRA b = 0 included: it is
  # the base model, and its frozen arrays are the policy's frozen arrays.
  jax.tree.map(np.testing.assert_array_equal, base_before,
               nnx.state(decoder, nnx.Param).to_pure_dict())
  policy_base = nnx.state(trainer.model().decoder, nnx.Not(nnx.LoRAParam)).to_pure_dict()
  reference_base = nnx.state(decoder, nnx.Not(nnx.LoRAParam)).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, reference_base, policy_base)
