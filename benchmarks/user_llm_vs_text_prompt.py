"""User-LLM (cross-attention, soft prompt) against the text-prompt baseline at history lengths 10/50/200.

Task: MovieLens latest-small (TFDS), favorite genre of each user's next 5 movies among a fixed list of
the `--num_options` most frequent genres (one example per user; training users train, the held-out
validation + test users evaluate). Every method uses the same decoder architecture and tokenizer:
  * User-LLM: history as user embeddings (user encoder -> Perceiver -> cross-attention or soft prompt),
    strategy 'enc' (decoder frozen; encoder, resampler, projection, cross-attention trained), trained
    once on histories of up to 200 items, evaluated with each user's last L items;
  * text prompt: the last L items written into the prompt (`render_history_text`, genres only: the
    task-relevant field, and the shortest text), the whole decoder trained ('full'), one run per L.
Same steps, batch size, learning rate for all. Per method and L: accuracy, Recall@3, prompt tokens,
FLOPs per example (XLA cost analysis of the jitted forward on the first held-out example, unpadded;
User-LLM also split into decoder and encoder+resampler), wall time per example (median of 3 timed
calls on that example), train time.

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.user_llm_vs_text_prompt --num_steps=60 \
      --out=/tmp/user_llm_vs_text_prompt

Writes <out>.json, <out>.md and docs/user_llm_vs_text_prompt.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.common import markdown_table, median_seconds
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig
from persona_jax.user_llm import eval as eval_lib
from persona_jax.user_llm import job as job_lib
from persona_jax.user_llm import model as model_lib
from persona_jax.user_llm import tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_batches(method, name: str, examples, history_items: int, text: bool, batch_size: int):
  spec = method.spec.__class__(items=method.spec.items, categories=method.spec.categories,
                               max_length=method.spec.max_length,
                               text_history_items=history_items if text else None,
                               history_items=history_items, history_fields=method.spec.history_fields)
  task = tasks.register_choice_task(name, {"eval": examples}, spec, method.vocabulary)
  max_prompt_length = -(-tasks.longest_prompt(task) // 64) * 64
  return lambda: tasks.ChoiceBatches(task, "eval", batch_size=batch_size, max_length=spec.max_length,
                                     max_prompt_length=max_prompt_length, shuffle=False, repeat=False,
                                     drop_remainder=False)


def _cost(model, batches, method: str) -> dict[str, float]:
  """Cost of the first held-out example without padding: XLA FLOPs and median wall time of 3 calls."""
  batch = next(iter(batches()))
  length = int(batch["prompt_mask"][0].sum())
  single = {name: value[:1] for name, value in batch.items()}
  single["prompt_tokens"] = single["prompt_tokens"][:, -length:]
  single["prompt_mask"] = single["prompt_mask"][:, -length:]
  graphdef, state = nnx.split(model)

  def forward(state, batch):
    merged = nnx.merge(graphdef, state)
    if method == "user_llm":
      return merged.option_logits(batch)
    return model_lib.text_prompt_option_logits(merged, batch)

  compiled = jax.jit(forward).lower(state, single).compile()
  cost = {"prompt_tokens": float(length), "flops_per_example": _flops(compiled), "encoder_flops_per_example": 0.0}
  if method == "user_llm":
    encode = jax.jit(lambda s, b: nnx.merge(graphdef, s).user_tokens(b))
    cost["encoder_flops_per_example"] = _flops(encode.lower(state, single).compile())
  cost["decoder_flops_per_example"] = cost["flops_per_example"] - cost["encoder_flops_per_example"]
  cost["seconds_per_example"] = median_seconds(lambda: jax.block_until_ready(compiled(state, single)),
                                               reps=3, warmup=1)
  return cost


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis["flops"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 200])
  parser.add_argument("--num_steps", type=int, default=60)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--num_options", type=int, default=8)
  parser.add_argument("--model", default="tiny_llama", help="random decoder preset (vocab from --vocabulary)")
  parser.add_argument("--pretrained", default=None, help="pretrained decoder instead of --model")
  parser.add_argument("--vocabulary", default="smollm2-135m-instruct")
  parser.add_argument("--num_latents", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="/tmp/user_llm_vs_text_prompt")
  parser.add_argument("--plot", default=os.path.join(REPO, "docs", "user_llm_vs_text_prompt.png"))
  args = parser.parse_args()

  started = time.time()
  data = tasks.load_user_data("movielens")
  source = (DecoderSource(pretrained=args.pretrained, vocabulary=args.vocabulary) if args.pretrained
            else DecoderSource(pretrained=None, preset=args.model, vocabulary=args.vocabulary))
  config = TrainConfig(num_steps=args.num_steps, learning_rate=args.learning_rate, warmup_steps=5,
                       checkpoint_every=0, log_every=max(1, args.num_steps // 4), seed=args.seed)
  common = dict(decoder=source, task="favorite_genre", num_options=args.num_options,
                shuffle_options=False, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                seed=args.seed, data=data, text_history_fields=("categories",),
                evaluate_untrained=False)

  def build_and_train(**settings):
    """A set-up `UserLLMMethod` trained for `config.num_steps` (no workdir); (method, model, seconds)."""
    method = job_lib.UserLLMMethod(**common, **settings)
    method.setup(None)
    start = time.time()
    fit = method.fit(Run(workdir=None, config=config))
    return method, fit.model, time.time() - start
  results = []

  def record(method_name, job, model, method, trained_seconds, length):
    held_out = job.examples["validation"] + job.examples["test"]
    batches = _eval_batches(job, f"user_llm.bench.{method_name.replace(' ', '_').replace('-', '_')}.{length}",
                            held_out, length,
                            method == "text_prompt", args.batch_size)
    metrics = eval_lib.evaluate_choices(model, batches(), method)
    cost = _cost(model, batches, method)
    row = dict(method=method_name, history_items=length, train_seconds=trained_seconds, **metrics, **cost)
    print(json.dumps(row), flush=True)
    results.append(row)

  train_labels = np.asarray([example.label for example in
                             tasks.choice_examples(data, "favorite_genre", num_options=args.num_options,
                                                       examples_per_user=1, seed=args.seed,
                                                       shuffle_options=False)["train"]])
  majority = int(np.bincount(train_labels).argmax())
  for integration in ("cross_attention", "soft_prompt"):
    job, model, trained = build_and_train(method="user_llm", integration=integration, strategy="enc",
                                          num_latents=args.num_latents, max_prompt_length=256)
    for length in args.lengths:
      record(f"User-LLM {integration.replace('_', ' ')}", job, model, "user_llm", trained, length)
  for length in args.lengths:
    job, model, trained = build_and_train(method="text_prompt", strategy="full",
                                          text_history_items=length, history_items=length,
                                          max_prompt_length=None)
    record("text prompt", job, model, "text_prompt", trained, length)

  held_out_labels = np.asarray([e.label for e in job.examples["validation"] + job.examples["test"]])
  summary = {"majority_class_accuracy": float(np.mean(held_out_labels == majority)),
             "held_out_examples": int(len(held_out_labels)), "train_examples": int(len(train_labels)),
             "args": vars(args), "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax "
             f"{jax.__version__} {jax.default_backend()}", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "total_seconds": time.time() - started}
  write_outputs(results, summary, args.out, args.plot, args.num_steps)


def write_outputs(results: list[dict], summary: dict, out: str, plot: str, num_steps: int) -> None:
  """Writes <out>.json, <out>.md and the plot from the per-(method, length) rows."""
  headers = ["method", "items", "accuracy", "recall@3", "prompt tokens", "decoder GFLOP/ex",
             "total GFLOP/ex", "ms/ex", "train s"]
  rows = [[r["method"], r["history_items"], f"{r['accuracy']:.3f}", f"{r['recall@3']:.3f}",
           f"{r['prompt_tokens']:.0f}", f"{r['decoder_flops_per_example'] / 1e9:.3f}",
           f"{r['flops_per_example'] / 1e9:.3f}", f"{r['seconds_per_example'] * 1e3:.1f}",
           f"{r['train_seconds']:.0f}"] for r in results]
  table = markdown_table(headers, rows)
  text = (f"{table}\n\nMajority-class accuracy (most common training label): "
          f"{summary['majority_class_accuracy']:.3f} over {summary['held_out_examples']} held-out users.\n")
  print(text)
  with open(out + ".json", "w") as f:
    json.dump({"results": results, **summary}, f, indent=2)
  with open(out + ".md", "w") as f:
    f.write(text)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  for method in dict.fromkeys(r["method"] for r in results):
    mine = [r for r in results if r["method"] == method]
    lengths = [r["history_items"] for r in mine]
    left.plot(lengths, [r["accuracy"] for r in mine], marker="o", label=method)
    right.plot(lengths, [r["decoder_flops_per_example"] for r in mine], marker="o", label=method)
  left.axhline(summary["majority_class_accuracy"], color="gray", linestyle="--", label="majority class")
  for axis, title in ((left, "held-out accuracy"), (right, "decoder FLOPs per example")):
    axis.set_xscale("log")
    axis.set_xlabel("history items")
    axis.set_title(title)
    axis.legend(fontsize=8)
  right.set_yscale("log")
  figure.suptitle(f"User-LLM vs text prompt: MovieLens favorite genre ({num_steps} steps)")
  figure.tight_layout()
  figure.savefig(plot, dpi=120)
  print(f"wrote {out}.json, {out}.md, {plot}")


if __name__ == "__main__":
  main()
