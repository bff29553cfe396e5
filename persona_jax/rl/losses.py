"""RL losses for LLM policies, fp32 with explicit masks.

Per-token arrays are `[batch, steps]` and aligned to the sampled tokens: `logprobs[b, t]` is
log pi(token t | earlier tokens). `mask` is 1 where the policy acted (its own tokens), 0 elsewhere.

Reductions (`REDUCTIONS`):
  * "token_mean": sum(x * mask) / sum(mask) over the whole batch;
  * "sequence_sum": per-row sum over tokens, then mean over rows (the REINFORCE estimator of a
    whole sequence's log-probability);
  * "sequence_mean": per-row token mean, then mean over rows (GRPO's original normalization).

Registries let a gin binding pick by name; a new entry is one decorated function:
`@register_policy_loss("<name>")` fills `POLICY_LOSSES` (signature of `ppo_clipped_loss`), and
`@register_kl_estimator("<name>")` fills `KL_ESTIMATORS` (`(logprobs, reference_logprobs) -> [B, T]`).

PPO's diagnostics (in `ppo_clipped_loss`'s metrics, and logged by `rl.make_loss_fn` for every loss):
`ratio_mean` (mean of pi_new / pi_sampling over the policy's tokens; 1 on a fresh rollout's first
update), `clip_fraction` (share of tokens whose ratio left [1 - eps, 1 + eps]) and `approx_kl` (k3
estimate of KL(pi_sampling || pi_new) on the sampled tokens).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

POLICY_LOSSES: dict[str, Callable[..., tuple[jax.Array, dict]]] = {}
KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {}


def _registrar(registry: dict, what: str):
  def register(name: str):
    def decorate(fn):
      if name in registry and registry[name] is not fn:
        raise ValueError(f"Two {what}s register the name {name!r}.")
      registry[name] = fn
      return fn
    return decorate
  return register


register_policy_loss = _registrar(POLICY_LOSSES, "policy loss")
register_policy_loss.__doc__ = "Decorator: registers a policy loss (gin `rl.loss.policy_loss`)."
register_kl_estimator = _registrar(KL_ESTIMATORS, "KL estimator")
register_kl_estimator.__doc__ = "Decorator: registers a per-token KL estimator (`rl.loss.kl_estimator`)."


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def reduce_masked(per_token: jax.Array, mask: jax.Array, reduction: str = "token_mean") -> jax.Array:
  """Reduces `[batch, steps]` values over the masked entries to a scalar (see `REDUCTIONS`)."""
  per_token, mask = _f32(per_token), _f32(mask)
  if per_token.shape != mask.shape:
    raise ValueError(f"reduce_masked: values {per_token.shape} and mask {mask.shape} differ in shape.")
  masked = per_token * mask
  if reduction == "token_mean":
    return masked.sum() / jnp.maximum(mask.sum(), 1.0)
  if reduction == "sequence_sum":
    return masked.sum(axis=-1).mean()
  if reduction == "sequence_mean":
    return (masked.sum(axis=-1) / jnp.maximum(mask.sum(axis=-1), 1.0)).mean()
  raise ValueError(f"Unknown reduction {reduction!r}; choose one of {REDUCTIONS}.")


REDUCTIONS = ("token_mean", "sequence_sum", "sequence_mean")


def ratio_metrics(logprobs, old_logprobs, mask, clip_epsilon: float | None = None) -> dict:
  """`ratio_mean`, `approx_kl` (k3 of the sampling vs the new policy) and, with `clip_epsilon`,
  `clip_fraction`, over the masked tokens (no gradient)."""
  log_ratio = jax.lax.stop_gradient(_f32(logprobs) - _f32(old_logprobs))
  ratio = jnp.exp(log_ratio)
  metrics = {"ratio_mean": reduce_masked(ratio, mask),
             "approx_kl": reduce_masked(ratio - 1.0 - log_ratio, mask)}
  if clip_epsilon is not None:
    clipped = (jnp.abs(ratio - 1.0) > clip_epsilon).astype(jnp.float32)
    metrics["clip_fraction"] = reduce_masked(clipped, mask)
  return metrics


@register_policy_loss("policy_gradient")
def policy_gradient_loss(logprobs, advantages, mask, *, old_logprobs=None, clip_epsilon=None,
                         reduction: str = "token_mean") -> tuple[jax.Array, dict]:
  """REINFORCE surrogate `-A * log pi(a)`; its gradient is `-A * grad log pi(a)`.

  `advantages` is treated as a constant (stop-gradient). `old_logprobs`/`clip_epsilon` are ignored
  (same signature as `ppo_clipped_loss`). Returns (scalar, metrics).
  """
  del old_logprobs, clip_epsilon
  advantages = jax.lax.stop_gradient(_f32(advantages))
  loss = reduce_masked(-advantages * _f32(logprobs), mask, reduction)
  return loss, {}


@register_policy_loss("ppo")
def ppo_clipped_loss(logprobs, advantages, mask, *, old_logprobs, clip_epsilon: float = 0.2,
                     reduction: str = "token_mean") -> tuple[jax.Array, dict]:
  """PPO's clipped surrogate `-min(rho A, clip(rho, 1-eps, 1+eps) A)`, `rho = exp(logp - logp_old)`.

  Returns (scalar, {"clip_fraction": share of masked tokens whose ratio was clipped, "ratio_mean",
  "approx_kl"}) (see `ratio_metrics`).
  """
  advantages = jax.lax.stop_gradient(_f32(advantages))
  ratio = jnp.exp(_f32(logprobs) - jax.lax.stop_gradient(_f32(old_logprobs)))
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
  per_token = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
  return (reduce_masked(per_token, mask, reduction),
          ratio_metrics(logprobs, old_logprobs, mask, clip_epsilon))


@register_kl_estimator("k1")
def kl_k1(logprobs, reference_logprobs):
  """Per-token k1 estimator of KL(pi || ref) on samples from pi: `log pi - log ref`."""
  return _f32(logprobs) - _f32(reference_logprobs)


@register_kl_estimator("k3")
def kl_k3(logprobs, reference_logprobs):
  """Per-token k3 (low-variance, non-negative) estimator: `exp(d) - d - 1` with `d = log ref - log pi`."""
  log_ratio = _f32(reference_logprobs) - _f32(logprobs)
  return jnp.exp(log_ratio) - log_ratio - 1.0


def kl_divergence(logprobs, reference_logprobs, estimator: str = "k3") -> jax.Array:
  """Per-token KL estimate `[batch, steps]` by the estimator named `estimator` ('k1' or 'k3')."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"Unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}.")
  return KL_ESTIMATORS[estimator](logprobs, reference_logprobs)


def value_loss(values, returns, mask, *, old_values=None, clip_epsilon: float | None = None,
               reduction: str = "token_mean") -> jax.Array:
  """`0.5 * (V - R)^2` over masked entries; with `old_values` and `clip_epsilon`, PPO's clipped form
  `0.5 * max((V - R)^2, (old + clip(V - old, -eps, eps) - R)^2)`."""
  values = _f32(values)
  returns = jax.lax.stop_gradient(_f32(returns))
  squared = (values - returns) ** 2
  if old_values is not None and clip_epsilon is not None:
    old_values = jax.lax.stop_gradient(_f32(old_values))
    clipped = old_values + jnp.clip(values - old_values, -clip_epsilon, clip_epsilon)
    squared = jnp.maximum(squared, (clipped - returns) ** 2)
  return 0.5 * reduce_masked(squared, mask, reduction)


def kl_penalized_rewards(rewards, logprobs, reference_logprobs, mask, coefficient: float) -> jax.Array:
  """Sequence rewards `[batch]` minus `coefficient * sum_t k1_t` (the KL-in-the-reward form of
  RLHF/RLPF; k1 summed over a sampled sequence is an unbiased estimate of its KL)."""
  per_token = kl_k1(logprobs, reference_logprobs) * _f32(mask)
  return _f32(rewards) - coefficient * per_token.sum(axis=-1)
