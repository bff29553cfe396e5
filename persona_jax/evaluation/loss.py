"""Held-out means of a loss function's metrics over batches (every process's slice counted)."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.evaluation.distributed import sum_across_processes


def mean_loss_metrics(model: nnx.Module, loss_fn: Callable, batches: Iterable[dict],
                      num_batches: int | None = None) -> dict[str, float]:
  """Mean over batches of `loss_fn(model, batch, rng)`'s metrics (and its loss), no gradients.

  Each process iterates its own shard; the batch sums are reduced across processes, so every
  process returns the mean over all shards' batches.
  """

  @nnx.jit
  def metrics_of(model, batch):
    loss, metrics = loss_fn(model, batch, jax.random.PRNGKey(0))
    return {"loss": jnp.asarray(loss, jnp.float32),
            **{name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}}

  sums: dict[str, float] = {}
  count = 0
  for batch in batches:
    if num_batches is not None and count >= num_batches:
      break
    values = jax.device_get(metrics_of(model, {k: jnp.asarray(v) for k, v in batch.items()}))
    for name, value in values.items():
      sums[name] = sums.get(name, 0.0) + float(value)
    count += 1
  names = sorted(sums)
  totals = sum_across_processes({"sums": np.asarray([sums[n] for n in names], np.float64),
                                 "count": np.asarray(count, np.float64)})
  if float(totals["count"]) == 0:
    raise UserError("Evaluation got no batches: the eval data source is empty.")
  return {name: float(value) / float(totals["count"]) for name, value in zip(names, totals["sums"])}
