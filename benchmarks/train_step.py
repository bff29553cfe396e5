r"""A full fine-tuning step (AdamW, all parameters) of SmolLM2-135M: persona_jax vs transformers + torch.

Both sides train the same randomly initialized SmolLM2-135M-shaped decoder (ours is built, exported
with `persona_jax.hf.save_pretrained` and loaded by `transformers.LlamaForCausalLM`), fp32, on the same
`[batch, seq]` token block, with the same step: next-token cross-entropy (mean over tokens), global-norm
clipping at 1.0, AdamW (lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.01).

  * persona_jax: `persona_jax.train.Trainer` (one jitted step, donated state, optax chain);
  * PyTorch: forward, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW.step()`, `zero_grad`.

Reported: tokens/s of each (median over `--reps` steps after `--warmup` untimed ones), their ratio,
and model-FLOPs utilization `6 * params * tokens/s / peak`, the peak being the larger of the jax and
torch fp32 matmul FLOP/s measured in the same run (`benchmarks.common.measure_matmul_peak_flops`).
The first step's loss of both sides is printed as a check that they compute the same thing.

Run from the repository root:
  python -m benchmarks.train_step
  python -m benchmarks.train_step --batch 4 --seq 256 --reps 5 --warmup 2
  python -m benchmarks.train_step --loss_chunk_tokens 256   # the fused, chunked logits + loss
  python -m benchmarks.train_step --skip_torch --layers 4   # persona_jax only (quick A/B)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import jax
import numpy as np
from flax import nnx

from benchmarks.common import markdown_table, measure_matmul_peak_flops, median_seconds
from persona_jax import nn as pnn
from persona_jax.hf import save_pretrained
from persona_jax.train import TrainConfig, Trainer, lm_loss, make_mesh

LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, (0.9, 0.95), 1e-8, 0.01, 1.0


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--reps", type=int, default=3, help="timed steps per side (median)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--loss_chunk_tokens", type=int, default=None,
                      help="DecoderConfig.loss_chunk_tokens (fused chunked output projection + loss)")
  parser.add_argument("--scan_layers", action="store_true", help="DecoderConfig.scan_layers")
  parser.add_argument("--remat_policy", default=None, help="DecoderConfig.remat with this policy")
  parser.add_argument("--layers", type=int, default=None, help="fewer layers than SmolLM2's 30")
  parser.add_argument("--skip_torch", action="store_true", help="time persona_jax only")
  return parser.parse_args()


def make_batch(batch: int, seq: int, vocab_size: int) -> dict[str, np.ndarray]:
  tokens = np.random.default_rng(0).integers(0, vocab_size, (batch, seq + 1), dtype=np.int32)
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": np.ones((batch, seq), np.float32)}


def persona_jax_step(decoder: pnn.Decoder, batch: dict[str, np.ndarray]):
  """A step function (blocking) and the first step's loss."""
  config = TrainConfig(num_steps=1000, learning_rate=LEARNING_RATE, warmup_steps=0,
                       final_learning_rate_fraction=1.0, weight_decay=WEIGHT_DECAY, b1=BETAS[0],
                       b2=BETAS[1], eps=EPS, max_grad_norm=MAX_GRAD_NORM)
  trainer = Trainer(decoder, lm_loss, config, trainable=nnx.Param,
                    mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  first_loss = float(trainer.step(batch)["loss"])

  def step():
    jax.block_until_ready(trainer.step(batch)["loss"])

  return step, first_loss


def torch_step(model_dir: str, batch: dict[str, np.ndarray]):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaForCausalLM  # pylint: disable=g-import-not-at-top

  model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                           attn_implementation="sdpa")
  model.train()
  # Same decay rule as ours: matrices decay, vectors (norm scales) do not.
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=LEARNING_RATE, betas=BETAS, eps=EPS)
  inputs = torch.from_numpy(batch["decoder_input_tokens"]).long()
  targets = torch.from_numpy(batch["decoder_target_tokens"]).long()

  def step() -> float:
    logits = model(input_ids=inputs).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())

  first_loss = step()
  return step, first_loss


def main():
  args = parse_args()
  import torch  # pylint: disable=g-import-not-at-top

  overrides = {}
  if args.layers:
    overrides["num_layers"] = args.layers
  config = pnn.get_config("smollm2_135m", **overrides)
  num_params = config.num_params()
  tokens = args.batch * args.seq
  batch = make_batch(args.batch, args.seq, config.vocab_size)
  print(f"SmolLM2-135M config ({num_params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq}, "
        f"fp32, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)

  decoder = pnn.build_decoder(config, seed=0)
  if args.skip_torch:
    torch_fn, torch_loss = (lambda: None), float("nan")
  else:
    with tempfile.TemporaryDirectory() as tmp:
      model_dir = save_pretrained(decoder, os.path.join(tmp, "smollm2_random"))
      torch_fn, torch_loss = torch_step(str(model_dir), batch)
  # Training-speed switches change how the step computes, not the parameters (same seed).
  decoder.config = config.replace(loss_chunk_tokens=args.loss_chunk_tokens, scan_layers=args.scan_layers,
                                  remat=args.remat_policy is not None, remat_policy=args.remat_policy)
  print(f"step switches: loss_chunk_tokens={args.loss_chunk_tokens}, scan_layers={args.scan_layers}, "
        f"remat_policy={args.remat_policy}", flush=True)
  jax_fn, jax_loss = persona_jax_step(decoder, batch)
  del decoder
  print(f"first-step loss: persona_jax {jax_loss:.5f}, torch {torch_loss:.5f}", flush=True)

  # Alternate the two so that load from elsewhere on the machine hits both alike.
  jax_times, torch_times = [], []
  for _ in range(args.warmup):
    jax_fn()
    torch_fn()
  for _ in range(args.reps):
    jax_times.append(median_seconds(jax_fn, reps=1, warmup=0))
    torch_times.append(median_seconds(torch_fn, reps=1, warmup=0))
  jax_seconds, torch_seconds = float(np.median(jax_times)), float(np.median(torch_times))

  peak_jax = measure_matmul_peak_flops("jax", size=args.matmul_size)
  peak_torch = 0.0 if args.skip_torch else measure_matmul_peak_flops("torch", size=args.matmul_size)
  peak = max(peak_jax, peak_torch)
  flops_per_step = 6.0 * num_params * tokens
  rows = []
  sides = [("persona_jax (jit, optax AdamW)", jax_seconds)]
  if not args.skip_torch:
    sides.append(("transformers + torch.optim.AdamW", torch_seconds))
  for name, seconds in sides:
    rows.append([name, f"{seconds * 1e3:,.0f}", f"{tokens / seconds:,.0f}",
                 f"{flops_per_step / seconds / 1e9:,.1f}", f"{100 * flops_per_step / seconds / peak:.1f}%"])
  print()
  print(markdown_table(["framework", "ms / step", "tokens/s", "model GFLOP/s (6NT)", "MFU"], rows))
  print()
  if not args.skip_torch:
    print(f"speed ratio persona_jax / torch: {torch_seconds / jax_seconds:.2f}x")
  print(f"matmul peak ({args.matmul_size}^2 fp32): jax {peak_jax / 1e9:,.1f} GFLOP/s, "
        f"torch {peak_torch / 1e9:,.1f} GFLOP/s (MFU uses the larger)")
  print(f"per-step times (s): persona_jax {[round(t, 3) for t in jax_times]}, "
        f"torch {[round(t, 3) for t in torch_times]}")


if __name__ == "__main__":
  main()
