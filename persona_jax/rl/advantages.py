"""Advantage estimators, fp32, usable inside and outside jit.

Sequence-level rewards (one scalar per sampled response) use `[batch]` arrays; rows are grouped
contiguously, `group_size` samples per prompt: row `i` belongs to group `i // group_size`.
Step-level rewards (per turn or per token) use `[batch, steps]` arrays with a `[batch, steps]` mask.

  * `reinforce_advantages`: `r - b` with a (learned, detached) value baseline `b`.
  * `rloo_advantages`: REINFORCE leave-one-out, `r_i - mean_{j != i} r_j` within the group.
  * `grpo_advantages`: group-normalized, `(r_i - mean_g) / (std_g + eps)` (unbiased std, as TRL).
  * `gae_advantages`: generalized advantage estimation over turns or tokens.

Sequence-level estimators register by name with `@register_estimator("<name>")` (the registry is
`SEQUENCE_ESTIMATORS`), so a gin binding picks one and a new estimator is one decorated function.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# name -> estimator(rewards [batch], values [batch] | None, group_size=k) -> advantages [batch]
SEQUENCE_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {}


def register_estimator(name: str):
  """Decorator: registers a sequence-level advantage estimator under `name`."""

  def decorate(fn):
    if name in SEQUENCE_ESTIMATORS and SEQUENCE_ESTIMATORS[name] is not fn:
      raise ValueError(f"Two advantage estimators register the name {name!r}.")
    SEQUENCE_ESTIMATORS[name] = fn
    return fn

  return decorate


def _group(rewards: jax.Array, group_size: int, name: str) -> jax.Array:
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1:
    raise ValueError(f"{name}: rewards must be [batch], got shape {rewards.shape}.")
  if group_size < 2:
    raise ValueError(f"{name} needs group_size >= 2 samples per prompt (got {group_size}); set "
                     "samples_per_prompt >= 2 or use the 'reinforce' estimator.")
  if rewards.shape[0] % group_size:
    raise ValueError(f"{name}: batch {rewards.shape[0]} is not a multiple of group_size {group_size}.")
  return rewards.reshape(-1, group_size)


@register_estimator("reinforce")
def reinforce_advantages(rewards: jax.Array, values: jax.Array | None = None,
                         group_size: int = 1) -> jax.Array:
  """`[batch]` advantages `r - stop_gradient(values)` (values None: plain REINFORCE, baseline 0)."""
  del group_size
  rewards = jnp.asarray(rewards, jnp.float32)
  if values is None:
    return rewards
  return rewards - jax.lax.stop_gradient(jnp.asarray(values, jnp.float32))


@register_estimator("rloo")
def rloo_advantages(rewards: jax.Array, values: jax.Array | None = None,
                    group_size: int = 2) -> jax.Array:
  """`[batch]` leave-one-out advantages: `r_i - (sum_g - r_i) / (k - 1)`; `values` unused."""
  del values
  grouped = _group(rewards, group_size, "rloo_advantages")
  others_mean = (grouped.sum(axis=1, keepdims=True) - grouped) / (group_size - 1)
  return (grouped - others_mean).reshape(-1)


@register_estimator("grpo")
def grpo_advantages(rewards: jax.Array, values: jax.Array | None = None, group_size: int = 2,
                    epsilon: float = 1e-4) -> jax.Array:
  """`[batch]` group-normalized advantages `(r - mean_g) / (std_g + epsilon)`; `values` unused."""
  del values
  grouped = _group(rewards, group_size, "grpo_advantages")
  mean = grouped.mean(axis=1, keepdims=True)
  std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
  return ((grouped - mean) / (std + epsilon)).reshape(-1)


def sequence_advantages(name: str, rewards: jax.Array, values: jax.Array | None = None,
                        group_size: int = 1) -> jax.Array:
  """Runs the estimator called `name` (a key of `SEQUENCE_ESTIMATORS`); returns `[batch]`."""
  if name not in SEQUENCE_ESTIMATORS:
    raise ValueError(f"Unknown advantage estimator {name!r}; choose one of "
                     f"{sorted(SEQUENCE_ESTIMATORS)} (gin: the job's `advantage_estimator`).")
  return SEQUENCE_ESTIMATORS[name](rewards, values, group_size=group_size)


def gae_advantages(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float = 1.0,
                   lam: float = 1.0, last_values: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation over turns or tokens.

  Args:
    rewards: `[batch, steps]` reward received after acting at each step.
    values: `[batch, steps]` V(state before acting at each step) (detached here).
    mask: `[batch, steps]` 1 at steps where the policy acted. Masked steps (an environment's or
      user's tokens between two turns, padding) are skipped: they get advantage 0 and the recursion
      passes through them, so the next acting step bootstraps the previous one.
    gamma: discount per acting step. lam: GAE lambda (1: Monte Carlo returns minus values; 0: TD).
    last_values: `[batch]` value after the last step (default 0: the episode ended).
  Returns:
    (advantages, returns) `[batch, steps]` fp32, both 0 at masked steps; returns = advantages + values.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  values = jax.lax.stop_gradient(jnp.asarray(values, jnp.float32))
  mask = jnp.asarray(mask, jnp.float32)
  if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
    raise ValueError(f"gae_advantages: rewards {rewards.shape}, values {values.shape} and mask "
                     f"{mask.shape} must all be [batch, steps].")
  batch = rewards.shape[0]
  next_value = (jnp.zeros((batch,), jnp.float32) if last_values is None
                else jnp.asarray(last_values, jnp.float32))

  def step(carry, inputs):
    next_value, next_advantage = carry
    reward, value, acting = inputs
    delta = reward + gamma * next_value - value
    advantage = delta + gamma * lam * next_advantage
    keep = acting > 0
    carry = (jnp.where(keep, value, next_value), jnp.where(keep, advantage, next_advantage))
    return carry, jnp.where(keep, advantage, 0.0)

  _, advantages = jax.lax.scan(step, (next_value, jnp.zeros((batch,), jnp.float32)),
                               (rewards.T, values.T, mask.T), reverse=True)
  advantages = advantages.T
  return advantages, (advantages + values) * mask


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float = 1.0) -> jax.Array:
  """`[batch, steps]` reward-to-go `sum_{k>=t} gamma^(k-t) r_k` over acting steps (0 when masked)."""
  zeros = jnp.zeros_like(jnp.asarray(rewards, jnp.float32))
  advantages, _ = gae_advantages(rewards, zeros, mask, gamma=gamma, lam=1.0)
  return advantages
