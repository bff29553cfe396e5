r"""The accelerator checks and figures, in one script to run the day a GPU (or TPU) is available.

  1. Attention kernels vs the reference einsum on this backend, on the masks the methods use
     (causal, padded, packed, sliding window, the coprocessor's trace masks): cuDNN flash (bf16, via
     `jax.nn.dot_product_attention(implementation='cudnn')`, masks as bias) on GPU, Pallas splash on
     TPU, XLA everywhere. Errors are printed, not asserted: bf16 kernels differ from an fp32
     reference by bf16 rounding (about 1e-2); the fp32 XLA path must stay within 1e-5.
  2. `benchmarks.decoder_vs_hf` (decoder forward and greedy decoding per decode-weight format vs
     transformers) and `benchmarks.train_step` (a full AdamW step), each as its own process.

On a machine without an accelerator it runs step 1 on the CPU (XLA and Pallas interpret) and skips
step 2 unless `--run_benchmarks` is given.

Run from the repository root:
  python -m benchmarks.gpu_check
  python -m benchmarks.gpu_check --run_benchmarks --reps 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.coprocessor import masks as trace_masks
from persona_jax.nn import attention


def _masks(batch: int, seq: int):
  ids = np.zeros((batch, seq), np.int32)
  ids[0, seq // 8:] = 1
  ids[1, : seq // 3], ids[1, seq // 3: 2 * seq // 3], ids[1, 2 * seq // 3: seq - 4] = 1, 2, 3
  segment_ids = jnp.asarray(ids)
  real = segment_ids != 0
  # Positions restart per segment: they count within each run of equal ids.
  pos = np.zeros_like(ids)
  for b in range(batch):
    for t in range(1, seq):
      pos[b, t] = pos[b, t - 1] + 1 if ids[b, t] == ids[b, t - 1] else 0
  positions = jnp.asarray(pos)
  packed = attention.segment_causal_mask(segment_ids)
  window = (positions[:, :, None] - positions[:, None, :]) < 64
  yield "causal", attention.causal_mask(seq, batch), np.ones((batch, seq), bool), None, None
  yield "padded", attention.padded_causal_mask(real), np.asarray(real), real.astype(jnp.int32), None
  yield "packed", packed, np.asarray(real), segment_ids, None
  yield "sliding window 64", packed & window, np.asarray(real), segment_ids, 64


def check_attention(seq: int = 512, kv_heads: int = 2, groups: int = 4, head_dim: int = 64) -> None:
  backend = jax.default_backend()
  batch = 2
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, seq, kv_heads, groups, head_dim))
  k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim))
  scale = head_dim ** -0.5
  print(f"attention kernels vs reference einsum on {backend} ({jax.devices()[0].device_kind}), "
        f"[{batch}, {seq}] x {kv_heads * groups} heads (GQA {groups}), head_dim {head_dim}")
  for name, mask, rows, segment_ids, window in _masks(batch, seq):
    reference = np.asarray(attention.einsum_attention(q, k, v, mask, scale=scale))[rows]
    results = {"xla fp32": attention.dot_product_attention(q, k, v, mask, scale=scale)}
    if backend == "gpu":
      half = lambda x: x.astype(jnp.bfloat16)
      results["cudnn bf16"] = attention.dot_product_attention(
          half(q), half(k), half(v), mask, scale=scale, implementation="cudnn")
    if segment_ids is not None:
      results["pallas splash" + (" (interpret)" if backend != "tpu" else "")] = (
          attention.splash_attention(q, k, v, segment_ids, scale=scale, window=window,
                                     interpret=backend != "tpu"))
    errors = ", ".join(f"{kernel} {np.abs(np.asarray(out, np.float32)[rows] - reference).max():.1e}"
                       for kernel, out in results.items() if out is not None)
    print(f"  {name}: max |difference| {errors}")
  # The coprocessor's trace masks: arbitrary booleans over a cache (einsum / XLA / bias for cuDNN).
  segment_ids = jnp.ones((batch, seq), jnp.int32)
  points, _ = trace_masks.evenly_spaced_trace_positions(segment_ids, 8, 2)
  visible = trace_masks.original_visibility(segment_ids, points)
  mask = trace_masks.trace_group_mask(visible, 16, seq + 8 * 16)
  q_trace = q[:, : 8 * 16]
  k_trace = jnp.concatenate([k, k[:, : 8 * 16]], axis=1)
  v_trace = jnp.concatenate([v, v[:, : 8 * 16]], axis=1)
  reference = np.asarray(attention.einsum_attention(q_trace, k_trace, v_trace, mask, scale=scale))
  results = {"xla fp32": attention.dot_product_attention(q_trace, k_trace, v_trace, mask, scale=scale)}
  if backend == "gpu":
    half = lambda x: x.astype(jnp.bfloat16)
    results["cudnn bf16 (bias)"] = attention.dot_product_attention(
        half(q_trace), half(k_trace), half(v_trace), mask, scale=scale, implementation="cudnn")
  print("  trace masks: max |difference| " + ", ".join(
      f"{kernel} {np.abs(np.asarray(out, np.float32) - reference).max():.1e}"
      for kernel, out in results.items()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run_benchmarks", action="store_true",
                      help="also run the benchmarks on a machine without an accelerator")
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  check_attention()
  if jax.default_backend() == "cpu" and not args.run_benchmarks:
    print("no accelerator: benchmarks skipped (--run_benchmarks runs them on the CPU)")
    return
  for module, extra in (("benchmarks.decoder_vs_hf", []), ("benchmarks.train_step", [])):
    command = [sys.executable, "-m", module, "--reps", str(args.reps), *extra]
    print("\n$ " + " ".join(command), flush=True)
    subprocess.run(command, check=False)


if __name__ == "__main__":
  main()
