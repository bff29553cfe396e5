"""The toy RL task shared by the rl tests: 2 prompts x 4 samples of 6 tokens from a tiny llama of 16
ids; the reward is the share of sampled ids below 8 (about 0.5 for the initial policy)."""

import dataclasses
import types

import numpy as np
import pytest

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


def _job(workdir=None, num_steps=30, estimator="reinforce", lora=False, learner=None,
         learning_rate=3e-3, checkpoint_every=2, **loss):
  """(reference decoder, trainer, learner) on the toy task: 2 prompts x 4 samples of 6 tokens."""
  decoder = _decoder()
  if lora:
    pnn.inject_lora(decoder, rank=4)
  policy = rl.PolicyWithValue(decoder)
  config = TrainConfig(num_steps=num_steps, learning_rate=learning_rate, warmup_steps=0,
                       checkpoint_every=checkpoint_every, async_checkpointing=False, log_every=100)
  trainer = Trainer(policy, rl.make_loss_fn(**dict(dict(kl_coefficient=0.01), **loss)), config,
                    workdir=workdir, trainable=rl.PolicyWithValue.trainable_filter(lora=lora))
  source = rl.PromptRollouts(rl.ExampleCycler(PROMPTS, batch_size=2, seed=1), low_token_reward,
                             reference=decoder, estimator=estimator, samples_per_prompt=4,
                             max_new_tokens=6, stop_tokens=())
  return decoder, trainer, rl.Learner(trainer, source, learner or rl.LearnerConfig(seed=0))


@pytest.fixture
def toy():
  """The toy task's pieces: `toy.job(...)`, `toy.decoder()`, `toy.reward`, `toy.prompts`."""
  return types.SimpleNamespace(job=_job, decoder=_decoder, reward=low_token_reward, prompts=PROMPTS)
