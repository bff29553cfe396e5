"""The policy step on the training core: a value-headed policy, the RL loss, the train batch.

  * `PolicyWithValue`: a decoder plus a scalar value head on its final-normed hidden states.
  * `make_loss_fn(...)`: `loss_fn(model, batch, rng)` for `persona_jax.train.Trainer` over a rollout
    batch (the layout of `rl.rollout`): policy loss (registry `losses.POLICY_LOSSES`) + KL to the
    reference (k1/k3) + value loss. The step is the core's jitted, sharded train step; the loop that
    feeds it rollouts (several epochs of minibatches per rollout) is `rl.Learner`.
  * `sequence_batch(...)`: that batch for one scalar reward per sampled response.

Sharing weights: the Trainer copies the trainable parameters into its own state, so the module you
hand it keeps its initial weights. That module (or its decoder) IS the reference policy: no second
load, no copy; with LoRA (`nnx.LoRAParam` trainable), the base weights are the same arrays in the
policy, the reference and any frozen scorer built on the same decoder, and since LoRA's `b` starts
at zero the initial policy computes exactly the base model.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.nn.layers import logical_param
from persona_jax.rl import advantages as adv
from persona_jax.rl import losses
from persona_jax.rl.rollout import Rollout, response_hidden, response_logprobs
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
      `rl.PromptRollouts(kl_reward_coefficient=...)`). As a loss term use k3: k1's gradient on
      on-policy samples is zero in expectation.
    kl_estimator: 'k1' or 'k3'.
    value_coefficient: weight of the value loss (used when the model has a value head).
    reduction: a key of `losses.REDUCTIONS` for the policy and KL terms.

  The batch (see `rl.rollout`): tokens, input_mask `[B, P+R]`; response_mask, sampling_logprobs,
  advantages `[B, R]`; reference_logprobs `[B, R]` when kl_coefficient > 0; returns and value_mask
  `[B, R]` for the value loss; optional `rewards [B]` and `metric/<name> [B]` are averaged into the
  metrics (so the training curve has them).

  Metrics: the loss terms, `ratio_mean` / `approx_kl` (how far the updated policy moved from the
  sampling policy; 1 and 0 on a rollout's first update) and, for 'ppo', `clip_fraction`, the mean
  reward and every `metric/<name>`.
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
    metrics = dict(losses.ratio_metrics(logprobs, batch["sampling_logprobs"], mask), **metrics,
                   policy_loss=loss)
    if kl_coefficient > 0:
      kl = losses.reduce_masked(
          losses.kl_divergence(logprobs, batch["reference_logprobs"], kl_estimator), mask, reduction)
      loss = loss + kl_coefficient * kl
      metrics["kl_loss"] = kl
    if values is not None and value_coefficient > 0:
      v_loss = losses.value_loss(values, batch["returns"], batch["value_mask"])
      loss = loss + value_coefficient * v_loss
      metrics["value_loss"] = v_loss
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
