"""The coprocessor's Table 1 for several latent counts and the pause-token baseline, one budget.

For each configuration (N_L in --num_latents, plus pause tokens with the largest N_L) the job of
gin/coprocessor.gin trains for --num_steps on tiny_shakespeare, then the held-out perplexity at each
position after the augmentation point is measured, frozen baseline vs augmented, on
tiny_shakespeare's validation split and on WikiText-2 validation (a file of ../shared/data/text).

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.coprocessor_latents \
      --num_steps=60 --wikitext=../shared/data/text/wikitext2_valid.txt --out=/tmp/latents.md

A tiny check of the plumbing (a random 2-layer model, bytes vocabulary, seconds per configuration):

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.coprocessor_latents --gin_file=gin/coprocessor_smoke.gin \
      --num_latents 2 --num_steps=2 --num_eval_batches=1 --workdir=/tmp/latents_smoke

Prints one markdown table per configuration and data set, and a summary (position 1 and mean over
positions); `--out` also writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import gin
import jax

from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor.job import Coprocessor
from persona_jax.train import jobs
from persona_jax.train.trainer import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(args, variant: str, num_latents: int, workdir: str) -> dict:
  gin.clear_config()
  jobs.discover_methods()  # registers `run` / `train`, which the gin file binds
  gin.parse_config_file(args.gin_file)
  config = TrainConfig(num_steps=args.num_steps, learning_rate=args.learning_rate,
                       warmup_steps=min(10, args.num_steps // 5), checkpoint_every=0, eval_every=0,
                       log_every=max(1, args.num_steps // 10), async_checkpointing=False)
  with gin.unlock_config():
    method = Coprocessor(variant=variant, num_latents=num_latents,
                         num_eval_batches=args.num_eval_batches)
    method.setup(workdir)
    started = time.time()
    fit = method.fit(jobs.make_run(method, workdir, config))
    train_seconds = time.time() - started
  model = fit.model
  results = {"train_seconds": train_seconds}
  eval_sets = {f"{method.eval_dataset or method.dataset}:{method.eval_split}": method.eval_batches}
  if args.wikitext:
    from persona_jax import data as pdata

    task = pdata.lm_task(args.wikitext, method.vocabulary)
    eval_sets["wikitext2:validation"] = lambda: pdata.make_iterator(
        task, split="validation", sequence_length=method.sequence_length, batch_size=4,
        shuffle=False, pack=True, num_epochs=1, drop_remainder=False)
  for name, batches in eval_sets.items():
    results[name] = eval_lib.evaluate_perplexity(model, batches(), num_traces=method.eval_traces,
                                                 ahead_tokens=method.ahead_tokens,
                                                 max_batches=args.num_eval_batches)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_latents", type=int, nargs="+", default=[4, 8, 16])
  parser.add_argument("--num_steps", type=int, default=60)
  parser.add_argument("--learning_rate", type=float, default=3e-4)
  parser.add_argument("--num_eval_batches", type=int, default=16)
  parser.add_argument("--gin_file", default=os.path.join(REPO, "gin", "coprocessor.gin"),
                      help="The coprocessor config (gin/coprocessor_smoke.gin: a tiny random model).")
  parser.add_argument("--wikitext", default=os.path.join(REPO, "..", "shared", "data", "text",
                                                         "wikitext2_valid.txt"))
  parser.add_argument("--workdir", default="/tmp/coprocessor_latents")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.wikitext and not os.path.isfile(args.wikitext):
    raise SystemExit(f"--wikitext={args.wikitext}: file not found (pass '' to skip WikiText-2).")

  os.makedirs(args.workdir, exist_ok=True)
  configs = [("full", n) for n in args.num_latents] + [("pause", max(args.num_latents))]
  lines, summary = [], ["| variant | N_L | eval set | baseline ppl@1 | augmented ppl@1 | change@1 | "
                        "mean change (1..N_A) | train s |", "|---|---:|---|---:|---:|---:|---:|---:|"]
  for variant, num_latents in configs:
    workdir = os.path.join(args.workdir, f"{variant}_{num_latents}")
    results = run_config(args, variant, num_latents, workdir)
    for name, table in results.items():
      if name == "train_seconds":
        continue
      title = f"### {variant}, N_L={num_latents}, {args.num_steps} steps: {name}"
      lines.append(eval_lib.format_table(table, title))
      change = table["relative_change"]
      summary.append(f"| {variant} | {num_latents} | {name} | {table['baseline_ppl'][0]:.3f} | "
                     f"{table['augmented_ppl'][0]:.3f} | {100 * change[0]:+.2f}% | "
                     f"{100 * sum(change) / len(change):+.2f}% | {results['train_seconds']:.0f} |")
    with open(os.path.join(args.workdir, f"{variant}_{num_latents}.json"), "w") as f:
      json.dump(results, f, indent=2)
  report = "\n".join(summary) + "\n\n" + "\n\n".join(lines)
  print(report)
  if args.out and jax.process_index() == 0:
    with open(args.out, "w") as f:
      f.write(report + "\n")


if __name__ == "__main__":
  main()
