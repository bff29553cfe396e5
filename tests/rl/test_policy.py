"""Rollouts, the RL train step on the core Trainer, and a toy task where training raises the reward."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax import rl
from persona_jax.train import TrainConfig, Trainer

VOCAB = 16
PROMPTS = [{"prompt_tokens": [1, 2, 3]}, {"prompt_tokens": [4, 5]}]


def _decoder(seed=0):
  config = dataclasses.replace(pnn.get_config("tiny_llama", vocab_size=VOCAB), eos_token_id=None,
                               pad_token_id=0)
  return pnn.build_decoder(config, seed)


def low_token_reward(rows, rollout):
  """Share of response tokens with id < 8: about 0.5 for a random policy, 1 at best."""
  del rows
  return {"rewards": (rollout.response_tokens < 8).astype(np.float32).mean(-1)}


def _job(workdir=None, num_steps=30, estimator="reinforce", lora=False):
  decoder = _decoder()
  if lora:
    pnn.inject_lora(decoder, rank=4)
  policy = rl.PolicyWithValue(decoder)
  config = TrainConfig(num_steps=num_steps, learning_rate=3e-3, warmup_steps=0, checkpoint_every=2,
                       async_checkpointing=False, log_every=100)
  trainer = Trainer(policy, rl.make_loss_fn(kl_coefficient=0.01), config, workdir=workdir,
                    trainable=rl.PolicyWithValue.trainable_filter(lora=lora))
  batches = rl.RolloutBatches(trainer, rl.ExampleCycler(PROMPTS, batch_size=2, seed=1),
                              low_token_reward, reference=decoder, estimator=estimator,
                              samples_per_prompt=4, max_new_tokens=6, stop_tokens=())
  return decoder, trainer, batches


def test_rollout_masks_stop_tokens_and_logprobs_match_scoring():
  decoder = _decoder()
  # Shapes as in `_job` (2 prompts x 4 samples, 6 tokens): the compiled sampler is reused.
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


def test_sequence_batch_and_bad_estimator_settings():
  decoder = _decoder()
  rollout = rl.sample_rollouts(decoder, [[1, 2], [3]], max_new_tokens=6, rng=jax.random.key(0),
                               samples_per_prompt=4, stop_tokens=())
  rewards = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
  batch = rl.sequence_batch(rollout, rewards, estimator="rloo")
  np.testing.assert_allclose(batch["advantages"][:, 0], [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(batch["advantages"], batch["advantages"][:, :1] * np.ones((1, 6)))
  np.testing.assert_allclose(batch["returns"][:, 0], rewards)
  trainer = Trainer(rl.PolicyWithValue(decoder), rl.make_loss_fn(), TrainConfig(num_steps=1))
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    rl.RolloutBatches(trainer, rl.ExampleCycler(PROMPTS, 1), low_token_reward, estimator="grpo")
  with pytest.raises(ValueError, match="policy_loss='sft' is unknown"):
    rl.make_loss_fn(policy_loss="sft")


def test_training_raises_mean_reward_and_leaves_the_reference_unchanged():
  decoder, trainer, batches = _job(num_steps=30)
  reference_before = jax.tree.map(np.array, nnx.state(decoder, nnx.Param).to_pure_dict())
  history = trainer.train(batches).history

  def mean_reward(module):  # 64 fresh samples, in the training shapes (no recompilation)
    return float(np.mean([low_token_reward(None, rl.sample_rollouts(
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


def test_grpo_with_lora_trains_only_adapters_and_value_head():
  decoder, trainer, batches = _job(num_steps=2, estimator="grpo", lora=True)
  base_before = jax.tree.map(np.array, nnx.state(decoder, nnx.Param).to_pure_dict())
  result = trainer.train(batches)
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


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
  _, straight, batches = _job(str(tmp_path / "straight"), num_steps=4)
  straight.train(batches)

  def stop_after_checkpoint(step, metrics, batch):
    if step == 3:  # the checkpoint of step 2 is on disk; step 3's update is lost
      raise _Interrupt()

  _, first, batches = _job(str(tmp_path / "resumed"), num_steps=4)
  with pytest.raises(_Interrupt):
    first.train(batches, step_callback=stop_after_checkpoint)
  _, second, batches = _job(str(tmp_path / "resumed"), num_steps=4)
  result = second.train(batches)
  assert result.history[0]["step"] == 3  # resumed, not restarted
  assert batches.get_state() == {"examples": {"position": 8}, "count": 4}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               straight.state.params, second.state.params)
