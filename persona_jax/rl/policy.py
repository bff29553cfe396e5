"""The policy step on the training core: a value-headed policy, the RL loss, rollout batches.

  * `PolicyWithValue`: a decoder plus a scalar value head on its final-normed hidden states.
  * `make_loss_fn(...)`: `loss_fn(model, batch, rng)` for `persona_jax.train.Trainer` over a rollout
    batch (the layout of `rl.rollout`): policy loss (registry `losses.POLICY_LOSSES`) + KL to the
    reference (k1/k3) + value loss. The step is the core's jitted, sharded train step.
  * `RolloutBatches`: the Trainer's "data iterator": each `next()` samples with the trainer's current
    policy, scores the samples (reference log-probs, values), asks the method's reward function, and
    returns the batch. Its `get_state()` (prompt position, rollout count) is checkpointed with the
    train state, so a resumed run continues exactly.

Sharing weights: the Trainer copies the trainable parameters into its own state, so the module you
hand it keeps its initial weights. That module (or its decoder) IS the reference policy: no second
load, no copy; with LoRA (`nnx.LoRAParam` trainable), the base weights are the same arrays in the
policy, the reference and any frozen scorer built on the same decoder, and since LoRA's `b` starts
at zero the initial policy computes exactly the base model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.nn.layers import logical_param
from persona_jax.rl import advantages as adv
from persona_jax.rl import losses
from persona_jax.rl.rollout import (Rollout, response_hidden, response_logprobs, sample_rollouts,
                                    score)
from persona_jax.nn.logprobs import token_log_probs


class PolicyWithValue(nnx.Module):
  """A decoder (the policy) and a linear value head `V(s)` on `final_norm(hidden)`.

  The head starts at zero (V = 0), so the first baseline is 0. Its parameters are `nnx.Param` at
  path `value_head`/`value_bias`; pair it with LoRA via `trainable_filter(lora=True)`.
  """

  def __init__(self, decoder, *, param_dtype=jnp.float32):
    self.decoder = decoder
    embed_dim = decoder.config.embed_dim
    self.value_head = logical_param(jnp.zeros((embed_dim, 1), param_dtype), ("embed", None))
    self.value_bias = logical_param(jnp.zeros((1,), param_dtype), (None,))

  def __call__(self, tokens, input_mask, response_length: int) -> tuple[jax.Array, jax.Array]:
    """(log-probs, values), both `[batch, response_len]` fp32; values[:, t] = V(state before token t)."""
    hidden = response_hidden(self.decoder, tokens, input_mask, response_length)
    logits = self.decoder.logits(hidden)
    logprobs = token_log_probs(logits, tokens[:, tokens.shape[1] - response_length:])
    normed = self.decoder.final_norm(hidden).astype(jnp.float32)
    values = (normed @ self.value_head[...].astype(jnp.float32))[..., 0] + self.value_bias[0]
    return logprobs, values

  @staticmethod
  def trainable_filter(lora: bool) -> Any:
    """LoRA adapters + value head (lora=True), or every parameter (full fine-tuning)."""
    if lora:
      return nnx.Any(nnx.LoRAParam, nnx.PathContains("value_head"), nnx.PathContains("value_bias"))
    return nnx.Param


@gin.configurable("loss", module="rl")
def make_loss_fn(policy_loss: str = "policy_gradient", clip_epsilon: float = 0.2,
                 kl_coefficient: float = 0.0, kl_estimator: str = "k3",
                 value_coefficient: float = 0.5, reduction: str = "token_mean") -> Callable:
  """Builds `loss_fn(model, batch, rng) -> (loss, metrics)` for the core `Trainer`.

  loss = policy_loss + kl_coefficient * KL(pi || ref) + value_coefficient * value_loss.

  Args:
    policy_loss: a key of `losses.POLICY_LOSSES` ('policy_gradient' or 'ppo').
    clip_epsilon: PPO ratio clip.
    kl_coefficient: weight of the KL loss term (0: none; put a KL penalty in the reward instead with
      `RolloutBatches(kl_reward_coefficient=...)`). As a loss term use k3: k1's gradient on on-policy
      samples is zero in expectation.
    kl_estimator: 'k1' or 'k3'.
    value_coefficient: weight of the value loss (used when the model has a value head).
    reduction: a key of `losses.REDUCTIONS` for the policy and KL terms.

  The batch (see `rl.rollout`): tokens, input_mask `[B, P+R]`; response_mask, sampling_logprobs,
  advantages `[B, R]`; reference_logprobs `[B, R]` when kl_coefficient > 0; returns and value_mask
  `[B, R]` for the value loss; optional `rewards [B]` and `metric/<name> [B]` are averaged into the
  metrics (so the training curve has them).
  """
  if policy_loss not in losses.POLICY_LOSSES:
    raise ValueError(f"rl.loss.policy_loss={policy_loss!r} is unknown; choose one of "
                     f"{sorted(losses.POLICY_LOSSES)}.")
  if kl_estimator not in losses.KL_ESTIMATORS:
    raise ValueError(f"rl.loss.kl_estimator={kl_estimator!r} is unknown; choose one of "
                     f"{sorted(losses.KL_ESTIMATORS)}.")
  if reduction not in losses.REDUCTIONS:
    raise ValueError(f"rl.loss.reduction={reduction!r} is unknown; choose one of {losses.REDUCTIONS}.")
  policy_loss_fn = losses.POLICY_LOSSES[policy_loss]

  def loss_fn(model, batch: dict, rng: jax.Array):
    del rng
    mask = batch["response_mask"]
    response_length = mask.shape[1]
    if isinstance(model, PolicyWithValue):
      logprobs, values = model(batch["tokens"], batch["input_mask"], response_length)
    else:
      logprobs, values = response_logprobs(model, batch["tokens"], batch["input_mask"],
                                           response_length), None
    loss, metrics = policy_loss_fn(logprobs, batch["advantages"], mask,
                                   old_logprobs=batch["sampling_logprobs"],
                                   clip_epsilon=clip_epsilon, reduction=reduction)
    metrics = dict(metrics, policy_loss=loss)
    if kl_coefficient > 0:
      kl = losses.reduce_masked(
          losses.kl_divergence(logprobs, batch["reference_logprobs"], kl_estimator), mask, reduction)
      loss = loss + kl_coefficient * kl
      metrics["kl_loss"] = kl
    if values is not None and value_coefficient > 0:
      v_loss = losses.value_loss(values, batch["returns"], batch["value_mask"])
      loss = loss + value_coefficient * v_loss
      metrics["value_loss"] = v_loss
    # How far the policy moved from the sampling policy (0 on the first pass over fresh samples).
    metrics["sampling_kl_k3"] = losses.reduce_masked(
        losses.kl_k3(logprobs, batch["sampling_logprobs"]), mask)
    metrics["response_tokens"] = jnp.sum(mask, axis=-1).mean()
    if "rewards" in batch:
      metrics["reward"] = jnp.mean(batch["rewards"])
    for name, value in batch.items():
      if name.startswith("metric/"):
        metrics[name[len("metric/"):]] = jnp.mean(value.astype(jnp.float32))
    return loss, metrics

  return loss_fn


def sequence_batch(rollout: Rollout, rewards: np.ndarray, *, estimator: str,
                   values: np.ndarray | None = None,
                   reference_logprobs: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """The train batch for one scalar reward per response.

  Every response token gets its row's advantage (estimator `estimator`, baseline `values[:, 0]` =
  V(prompt) for 'reinforce'); the value head regresses V(prompt) on the reward.
  """
  rewards = np.asarray(rewards, np.float32)
  baseline = None if values is None else values[:, 0]
  advantages = np.asarray(adv.sequence_advantages(estimator, rewards, baseline, rollout.group_size))
  value_mask = np.zeros_like(rollout.response_mask)
  value_mask[:, 0] = 1.0
  batch = {
      "tokens": rollout.tokens, "input_mask": rollout.input_mask,
      "response_mask": rollout.response_mask, "sampling_logprobs": rollout.sampling_logprobs,
      "advantages": advantages[:, None] * rollout.response_mask,
      "returns": rewards[:, None] * value_mask, "value_mask": value_mask, "rewards": rewards,
  }
  if reference_logprobs is not None:
    batch["reference_logprobs"] = (reference_logprobs * rollout.response_mask).astype(np.float32)
  return batch


class ExampleCycler:
  """Endless, seeded pass over a list of examples in batches of `batch_size` (a fresh permutation
  each epoch); `get_state`/`set_state` make it resumable."""

  def __init__(self, examples: Sequence[Any], batch_size: int, seed: int = 0):
    if not examples:
      raise ValueError("ExampleCycler: no examples to train on (the prompt source is empty).")
    if batch_size < 1:
      raise ValueError(f"ExampleCycler: batch_size must be >= 1, got {batch_size}.")
    self.examples = list(examples)
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0  # examples drawn so far

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def __next__(self) -> list[Any]:
    picked = []
    for _ in range(self.batch_size):
      epoch, index = divmod(self.position, len(self.examples))
      picked.append(self.examples[self._order(epoch)[index]])
      self.position += 1
    return picked

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


RewardFn = Callable[[list[Any], Rollout], dict[str, np.ndarray]]


class RolloutBatches:
  """Rollout batches for `Trainer.train`, sampled with the trainer's current policy.

  Args:
    trainer: the core `Trainer` whose model is the policy (a `PolicyWithValue` or a `Decoder`).
    examples: an `ExampleCycler` (or anything with `__next__` -> list of examples and
      `get_state`/`set_state`); each example is a dict with `prompt_tokens` (list of ids).
    reward_fn: `reward_fn(examples_per_row, rollout) -> {"rewards": [B], other name: [B] ...}`; rows
      are the examples repeated `samples_per_prompt` times; extra entries become `metric/<name>`.
    reference: the frozen reference policy (a `Decoder`, e.g. the module given to the Trainer), or
      None when no KL is used.
    estimator: a key of `advantages.SEQUENCE_ESTIMATORS`.
    samples_per_prompt / max_new_tokens / temperature / top_k / top_p / stop_tokens / pad_id: sampling.
    kl_reward_coefficient: subtract `coef * sum_t k1_t` (KL to the reference) from each reward.
    prompt_length: left-pad every prompt to this width (default: the longest prompt of
      `examples.examples` rounded up to 16, when the source exposes its examples), so every batch
      has one shape and the sampler, scorer and train step compile once.
    seed: sampling randomness (folded with the rollout count: resumable and reproducible).
  """

  def __init__(self, trainer, examples, reward_fn: RewardFn, *, reference=None,
               estimator: str = "reinforce", samples_per_prompt: int = 1, max_new_tokens: int = 32,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
               kl_reward_coefficient: float = 0.0, prompt_length: int | None = None,
               seed: int = 0):
    if estimator not in adv.SEQUENCE_ESTIMATORS:
      raise ValueError(f"RolloutBatches: estimator={estimator!r} is unknown; choose one of "
                       f"{sorted(adv.SEQUENCE_ESTIMATORS)}.")
    if estimator != "reinforce" and samples_per_prompt < 2:
      raise ValueError(f"RolloutBatches: estimator={estimator!r} compares samples of the same prompt: "
                       f"set samples_per_prompt >= 2 (got {samples_per_prompt}).")
    if kl_reward_coefficient > 0 and reference is None:
      raise ValueError("RolloutBatches: kl_reward_coefficient > 0 needs a reference policy.")
    self.trainer = trainer
    self.examples = examples
    self.reward_fn = reward_fn
    self.reference = reference
    self.estimator = estimator
    self.samples_per_prompt = samples_per_prompt
    self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id)
    self.kl_reward_coefficient = kl_reward_coefficient
    if prompt_length is None and hasattr(examples, "examples"):
      prompt_length = -(-max(len(e["prompt_tokens"]) for e in examples.examples) // 16) * 16
    self.prompt_length = prompt_length
    self.seed = seed
    self.count = 0
    self.last_rollout: Rollout | None = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    policy = self.trainer.model()
    decoder = policy.decoder if isinstance(policy, PolicyWithValue) else policy
    examples = next(self.examples)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.count)
    self.count += 1
    rollout = sample_rollouts(decoder, [e["prompt_tokens"] for e in examples], rng=rng,
                              samples_per_prompt=self.samples_per_prompt,
                              prompt_bucket=self.prompt_length or 16, **self.sampling)
    rows = [e for e in examples for _ in range(self.samples_per_prompt)]
    reward_out = dict(self.reward_fn(rows, rollout))
    rewards = np.asarray(reward_out.pop("rewards"), np.float32)
    if rewards.shape != (rollout.batch_size,):
      raise ValueError(f"reward_fn returned rewards of shape {rewards.shape}; expected "
                       f"({rollout.batch_size},), one per sampled response.")
    needs_values = isinstance(policy, PolicyWithValue) and self.estimator == "reinforce"
    values = score(policy, rollout.tokens, rollout.input_mask, rollout.response_length)[1] \
        if needs_values else None
    reference_logprobs = None
    if self.reference is not None:
      reference_logprobs, _ = score(self.reference, rollout.tokens, rollout.input_mask,
                                    rollout.response_length)
      kl = (rollout.sampling_logprobs - reference_logprobs) * rollout.response_mask
      reward_out["kl_to_reference"] = kl.sum(axis=-1)
      if self.kl_reward_coefficient > 0:
        reward_out["task_reward"] = rewards
        rewards = np.asarray(losses.kl_penalized_rewards(
            rewards, rollout.sampling_logprobs, reference_logprobs, rollout.response_mask,
            self.kl_reward_coefficient))
    batch = sequence_batch(rollout, rewards, estimator=self.estimator, values=values,
                           reference_logprobs=reference_logprobs)
    for name, value in reward_out.items():
      batch[f"metric/{name}"] = np.asarray(value, np.float32)
    self.last_rollout = rollout
    return batch

  def get_state(self) -> dict:
    return {"examples": self.examples.get_state(), "count": self.count}

  def set_state(self, state: dict) -> None:
    self.examples.set_state(state["examples"])
    self.count = int(state["count"])
