"""The optimizer chain: global-norm clipping -> AdamW on a warmup + cosine-decay schedule."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(peak_learning_rate: float, num_steps: int, warmup_steps: int,
                           final_learning_rate_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps`, then cosine decay to
  `peak * final_learning_rate_fraction` at `num_steps`."""
  warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1),
      end_value=peak_learning_rate * final_learning_rate_fraction)


def _decay_mask(params):
  """Weight decay on matrices only (not on norm scales or other vectors)."""
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(*, learning_rate: float, num_steps: int, warmup_steps: int,
                   final_learning_rate_fraction: float = 0.1, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   max_grad_norm: float | None = 1.0) -> optax.GradientTransformation:
  """`clip_by_global_norm(max_grad_norm)` then AdamW with the warmup + cosine schedule."""
  schedule = learning_rate_schedule(learning_rate, num_steps, warmup_steps, final_learning_rate_fraction)
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
  if max_grad_norm is None or max_grad_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
