"""Shared helpers for the side-by-side benchmarks: timing, the machine's own matmul peak, model FLOPs.

Every benchmark reports achieved model FLOPs as a fraction of a peak measured in the same run on the
same machine (a large fp32 matmul), so the figures say how close to the hardware the code runs, not
only how it compares with another framework.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from persona_jax.nn.config import DecoderConfig


def median_seconds(fn: Callable[[], object], *, reps: int, warmup: int = 1) -> float:
  """Median wall-clock seconds of `fn()` over `reps` timed calls after `warmup` untimed ones.

  `fn` must block until its result is ready (e.g. `jax.block_until_ready`), so the time is real.
  Warm-up calls absorb compilation and first-touch allocation.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_matmul_peak_flops(framework: str = "jax", size: int = 2048, reps: int = 5,
                              dtype: str = "float32") -> float:
  """FLOP/s of a `[size, size] @ [size, size]` matmul (median of `reps`), in `jax` or `torch`.

  This is the practical peak of the machine for that framework's BLAS with all its threads:
  `2 * size**3` FLOPs per product.
  """
  flops = 2.0 * size ** 3
  if framework == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), reps=reps, warmup=2)
  elif framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator, dtype=getattr(torch, dtype))
    b = torch.randn(size, size, generator=generator, dtype=getattr(torch, dtype))
    with torch.inference_mode():
      seconds = median_seconds(lambda: torch.mm(a, b), reps=reps, warmup=2)
  else:
    raise ValueError(f"measure_matmul_peak_flops: framework={framework!r}; use 'jax' or 'torch'.")
  return flops / seconds


def _matmul_flops_per_token(config: DecoderConfig, with_head: bool = True) -> float:
  """Weight-matmul FLOPs of one token through the decoder (projections, MLP, output head)."""
  attention = config.embed_dim * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
  mlp = 3 * config.embed_dim * config.mlp_dim
  head = config.vocab_size * config.embed_dim if with_head else 0
  return 2.0 * (config.num_layers * (attention + mlp) + head)


def _attention_flops(config: DecoderConfig, keys: float) -> float:
  """Score and value FLOPs of one query attending to `keys` keys, all layers."""
  return 4.0 * config.num_layers * config.num_heads * config.head_dim * keys


def forward_flops(config: DecoderConfig, batch: int, seq: int) -> float:
  """Model FLOPs of a causal forward over `[batch, seq]` tokens (logits at every position).

  Counts useful work only: a causal query at position t attends to t + 1 keys.
  """
  mean_keys = (seq + 1) / 2
  return batch * seq * (_matmul_flops_per_token(config) + _attention_flops(config, mean_keys))


def generation_flops(config: DecoderConfig, batch: int, prompt_len: int, new_tokens: int) -> float:
  """Model FLOPs of prefilling `prompt_len` tokens then decoding `new_tokens` one at a time.

  The prefill produces the first token (output head on the last position only, as both
  `persona_jax.sampling` and `transformers.generate` do); each further token costs one
  single-token forward.
  """
  mean_keys = (prompt_len + 1) / 2
  total = batch * prompt_len * (_matmul_flops_per_token(config, with_head=False)
                                + _attention_flops(config, mean_keys))
  total += batch * 2.0 * config.vocab_size * config.embed_dim
  for step in range(1, new_tokens):
    total += batch * (_matmul_flops_per_token(config) + _attention_flops(config, prompt_len + step))
  return total


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)
