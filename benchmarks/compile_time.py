r"""Compile time of the train step with unrolled vs scanned layers (`DecoderConfig.scan_layers`).

The unrolled decoder puts `num_layers` copies of the block into the program, so XLA's compile time
grows with depth; the scanned one compiles one block body. This lowers and compiles the gradient of
`lm_loss` (the core of every method's step) for a decoder of `--layers` layers, both ways, and
reports seconds to lower+compile and the size of the optimized HLO. Parameters are abstract
(`jax.eval_shape`), so no weights are allocated and any depth fits in memory.

Run from the repository root:
  python -m benchmarks.compile_time                        # SmolLM2-135M shape, 30 layers
  python -m benchmarks.compile_time --preset gemma2_2b --layers 26 --width 256
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import markdown_table
from persona_jax import nn as pnn
from persona_jax.train.losses import lm_loss


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="smollm2_135m")
  parser.add_argument("--layers", type=int, default=None, help="default: the preset's depth")
  parser.add_argument("--width", type=int, default=None,
                      help="shrink embed/mlp dims to this (compile time depends on depth, not width)")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--reps", type=int, default=1, help="compiles per variant (median)")
  return parser.parse_args()


def compile_seconds(config: pnn.DecoderConfig, batch: int, seq: int) -> tuple[float, int]:
  """(seconds to lower + compile the gradient of lm_loss, optimized HLO text length)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: pnn.build_decoder(config, seed=0)))
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  data = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens,
          "decoder_loss_weights": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}

  def grad_fn(s, b):
    return jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p), b)[0])(s)

  started = time.perf_counter()
  compiled = jax.jit(grad_fn).lower(state, data).compile()
  return time.perf_counter() - started, len(compiled.as_text())


def main():
  args = parse_args()
  overrides = {}
  if args.layers:
    overrides["num_layers"] = args.layers
  if args.width:
    base = pnn.get_config(args.preset)
    overrides.update(embed_dim=args.width, mlp_dim=args.width * base.mlp_dim // base.embed_dim)
  config = pnn.get_config(args.preset, **overrides)
  print(f"{args.preset} ({config.num_layers} layers, embed {config.embed_dim}, mlp {config.mlp_dim}, "
        f"vocab {config.vocab_size}), gradient of lm_loss on [{args.batch}, {args.seq}], "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}",
        flush=True)
  rows = []
  for name, variant in (("unrolled (default)", config), ("scan_layers=True", config.replace(scan_layers=True))):
    results = [compile_seconds(variant, args.batch, args.seq) for _ in range(args.reps)]
    seconds = float(np.median([r[0] for r in results]))
    rows.append([name, f"{seconds:.1f}", f"{results[0][1] / 1e6:.2f}"])
    print(f"{name}: {seconds:.1f} s", flush=True)
  print()
  print(markdown_table(["variant", "lower + compile (s)", "optimized HLO text (MB chars)"], rows))


if __name__ == "__main__":
  main()
