"""Held-out evaluation of the cache coprocessor: the paper's Table 1.

For each position i = 1..N_A after an augmentation point, the perplexity of token p+i with the frozen
decoder alone (baseline) and with the augmented cache, and the relative change. Augmentation points
are deterministic (evenly spaced over each row), so every run scores the same tokens. Each process
scores its own shard of the eval rows; the sums are reduced across processes, so the table covers
every shard.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.coprocessor import masks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.evaluation import sum_across_processes


@nnx.jit(static_argnums=(2, 3))
def _eval_sums(model: CacheCoprocessor, batch: dict, num_traces: int, ahead_tokens: int):
  segment_ids = batch["decoder_segment_ids"]
  trace_positions, valid = masks.evenly_spaced_trace_positions(segment_ids, num_traces,
                                                                ahead_tokens + 1)
  out = model.forward_traces(batch["decoder_target_tokens"], segment_ids, batch["decoder_positions"],
                             trace_positions, ahead_tokens, with_baseline=True)
  weights = valid[:, :, None].astype(jnp.float32)
  return {"augmented": (out["nll"] * weights).sum(axis=(0, 1)),
          "baseline": (out["baseline_nll"] * weights).sum(axis=(0, 1)),
          "count": jnp.broadcast_to(weights.sum(), (ahead_tokens,))}


def evaluate_perplexity(model: CacheCoprocessor, batches: Iterable[dict[str, np.ndarray]], *,
                        num_traces: int, ahead_tokens: int,
                        max_batches: int | None = None) -> dict[str, Any]:
  """Per-position held-out perplexity, baseline vs augmented.

  Returns a dict with lists (one entry per position 1..N_A): `baseline_ppl`, `augmented_ppl`,
  `relative_change` ((augmented - baseline) / baseline), the mean NLLs, and `num_traces_scored`.
  """
  sums = None
  for index, batch in enumerate(batches):
    if max_batches is not None and index >= max_batches:
      break
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    part = jax.device_get(_eval_sums(model, batch, num_traces, ahead_tokens))
    sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
  if sums is None:
    sums = {name: np.zeros((ahead_tokens,), np.float32) for name in ("augmented", "baseline", "count")}
  sums = sum_across_processes(sums)
  if float(sums["count"][0]) == 0:
    raise ValueError("Coprocessor evaluation scored no trace: the eval data is empty or its rows are "
                     f"shorter than ahead_tokens + 1 = {ahead_tokens + 1} tokens.")
  count = sums["count"]
  baseline_nll = (sums["baseline"] / count).tolist()
  augmented_nll = (sums["augmented"] / count).tolist()
  baseline_ppl = [math.exp(x) for x in baseline_nll]
  augmented_ppl = [math.exp(x) for x in augmented_nll]
  return {
      "positions": list(range(1, ahead_tokens + 1)),
      "baseline_nll": baseline_nll, "augmented_nll": augmented_nll,
      "baseline_ppl": baseline_ppl, "augmented_ppl": augmented_ppl,
      "relative_change": [(a - b) / b for a, b in zip(augmented_ppl, baseline_ppl)],
      "num_traces_scored": int(count[0]),
  }


def format_table(results: dict[str, Any], title: str = "") -> str:
  """Markdown table: one row per position after the augmentation point."""
  lines = [f"{title}\n" if title else "",
           "| position | baseline ppl | augmented ppl | relative change |",
           "|---:|---:|---:|---:|"]
  for i, base, aug, rel in zip(results["positions"], results["baseline_ppl"],
                               results["augmented_ppl"], results["relative_change"]):
    lines.append(f"| {i} | {base:.3f} | {aug:.3f} | {100 * rel:+.2f}% |")
  lines.append(f"\n({results['num_traces_scored']} augmentation points scored)")
  return "\n".join(line for line in lines if line is not None)
