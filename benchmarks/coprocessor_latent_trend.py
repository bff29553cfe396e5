"""The cache coprocessor's latent-count trend, measured so it can be believed (issue 16).

Two modes, both resumable: every finished run appends one JSON row to `<workdir>/results.jsonl`
(and its per-trace NLLs to `<workdir>/<run>.npz`); a rerun skips the runs already there, and a run
cut short resumes from its checkpoint in `<workdir>/<run>/`.

fast (default): a small llama decoder (bytes vocabulary) pretrained here on the general-text
  mixture (tiny_shakespeare + Synthetic-Persona-Chat + Amazon reviews; never GSM8K or MathDial) and
  frozen; then, for each seed, coprocessors ("full") with N_L in --latents, pause tokens and the
  LoRA variant at --variant_latents, each trained --num_steps on the same mixture; and the
  controls: every coprocessor evaluated with another row's cache (the gain must vanish if it
  depends on the input), and the decoder itself fine-tuned for the same steps on the same batches
  (an upper bound). Evaluation: each eval set's held-out rows, evenly spaced augmentation points,
  so every run scores the same tokens; paired bootstrap CIs of the relative perplexity change per
  run, t-intervals over seeds.

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.coprocessor_latent_trend --num_steps=1500

smollm2: SmolLM2-135M-Instruct frozen, N_L in {4, 8, 16, 32}, --num_steps (300+) each, one seed,
  evaluated on tiny_shakespeare validation and WikiText-2 validation.

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.coprocessor_latent_trend --mode=smollm2 --num_steps=300

Writes `<workdir>/table.md` and the plot (--plot, default docs/coprocessor_latent_trend.png for the
full fast bed; smoke runs should pass --plot under /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from persona_jax import data as pdata
from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor import tasks
from persona_jax.coprocessor.job import Coprocessor
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.evaluation import stats
from persona_jax.hf.source import DecoderSource
from persona_jax.nn import build_decoder, get_config
from persona_jax.train import checkpointing
from persona_jax.train.jobs import make_run
from persona_jax.train.pretrain import Pretrain
from persona_jax.train.trainer import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
FAST_EVAL_SETS = ["tiny_shakespeare", "persona_chat", "amazon_reviews", "wikitext2"]
SMOLLM2_EVAL_SETS = ["tiny_shakespeare", "wikitext2"]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=["fast", "smollm2"], default="fast")
  parser.add_argument("--workdir", default=None, help="default runs/coprocessor_latent_trend[_smollm2]")
  parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
  parser.add_argument("--dataset", default="general_mixture",
                      help="the coprocessors' (and fast bed decoder's) training data")
  parser.add_argument("--latents", type=int, nargs="+", default=None,
                      help="N_L of the 'full' runs (fast: 1 4 8 16 32; smollm2: 4 8 16 32)")
  parser.add_argument("--variant_latents", type=int, nargs="*", default=None,
                      help="N_L of the pause and lora runs (fast: 8 32; smollm2: none)")
  parser.add_argument("--seeds", type=int, nargs="+", default=None, help="fast: 0 1 2; smollm2: 0")
  parser.add_argument("--num_steps", type=int, default=None, help="fast: 1500; smollm2: 300")
  parser.add_argument("--learning_rate", type=float, default=None, help="fast: 1e-3; smollm2: 3e-4")
  parser.add_argument("--batch_size", type=int, default=None, help="fast: 8; smollm2: 4")
  parser.add_argument("--sequence_length", type=int, default=128)
  parser.add_argument("--ahead_tokens", type=int, default=8)
  parser.add_argument("--num_traces", type=int, default=8)
  parser.add_argument("--num_eval_batches", type=int, default=16)
  parser.add_argument("--no_controls", action="store_true", help="skip the other-row and fine-tune controls")
  # The fast bed's decoder.
  parser.add_argument("--pretrain_steps", type=int, default=3000)
  parser.add_argument("--pretrain_learning_rate", type=float, default=3e-3)
  parser.add_argument("--bed_layers", type=int, default=4)
  parser.add_argument("--bed_dim", type=int, default=128)
  parser.add_argument("--plot", default=None, help="default docs/coprocessor_latent_trend[_smollm2].png")
  args = parser.parse_args(argv)
  fast = args.mode == "fast"
  defaults = {"latents": [1, 4, 8, 16, 32] if fast else [4, 8, 16, 32],
              "variant_latents": [8, 32] if fast else [], "seeds": [0, 1, 2] if fast else [0],
              "num_steps": 1500 if fast else 300, "learning_rate": 1e-3 if fast else 3e-4,
              "batch_size": 8 if fast else 4,
              "workdir": "runs/coprocessor_latent_trend" + ("" if fast else "_smollm2"),
              "plot": str(REPO / "docs" / ("coprocessor_latent_trend" + ("" if fast else "_smollm2")
                                           + ".png"))}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def train_config(args, steps, learning_rate) -> TrainConfig:
  return TrainConfig(num_steps=steps, learning_rate=learning_rate, warmup_steps=min(50, steps // 10),
                     weight_decay=0.0, checkpoint_every=max(50, steps // 4), keep_checkpoints=1,
                     async_checkpointing=False, log_every=max(1, steps // 10), metrics_writers=())


def bed_decoder(args, seed=0):
  config = get_config("tiny_llama").replace(num_layers=args.bed_layers, embed_dim=args.bed_dim,
                                            mlp_dim=3 * args.bed_dim, num_heads=4, num_kv_heads=2,
                                            head_dim=args.bed_dim // 4)
  return build_decoder(config, seed=seed)


def load_rows(path: pathlib.Path) -> dict[str, dict]:
  if not path.exists():
    return {}
  return {row["run"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def append_row(path: pathlib.Path, row: dict) -> None:
  with open(path, "a") as file:
    file.write(json.dumps(row) + "\n")


def pretrain_decoder(args, workdir: pathlib.Path, rows: dict, results: pathlib.Path):
  """(i) the fast bed's decoder: the core pretrain method on the general mixture; frozen after."""
  method = Pretrain(decoder=DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes"),
                    sequence_length=args.sequence_length, batch_size=16, num_eval_batches=8, seed=0)
  run_dir = str(workdir / "pretrain")
  method.setup(run_dir)
  method.decoder = bed_decoder(args)
  method.task = tasks.resolve_dataset(args.dataset, method.vocabulary, data_dir=args.data_dir)
  config = train_config(args, args.pretrain_steps, args.pretrain_learning_rate)
  if "pretrain" in rows:
    model, _ = method.restore(make_run(method, run_dir, config))
    return model
  started = time.time()
  fit = method.fit(make_run(method, run_dir, config))
  metrics = method.evaluate(fit.model, fit.result.step).metrics
  append_row(results, {"run": "pretrain", "steps": fit.result.step, "eval": metrics,
                       "seconds": time.time() - started,
                       "parameters": sum(x.size for x in jax.tree.leaves(nnx.state(fit.model, nnx.Param)))})
  return fit.model


def coprocessor_method(args, variant, num_latents, seed, eval_sets) -> Coprocessor:
  source = (DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")
            if args.mode == "fast" else DecoderSource(pretrained="smollm2-135m-instruct"))
  return Coprocessor(decoder=source, variant=variant, num_latents=num_latents,
                     ahead_tokens=args.ahead_tokens, num_traces=args.num_traces,
                     dataset=args.dataset, sequence_length=args.sequence_length,
                     batch_size=args.batch_size, num_eval_batches=args.num_eval_batches,
                     seed=seed, data_dir=args.data_dir, eval_sets=eval_sets)


def evaluate_run(args, method: Coprocessor, model, controls: bool) -> tuple[dict, dict]:
  """Per eval set: the table's numbers, paired CIs, and the per-trace NLLs (and the control)."""
  summary, arrays = {}, {}
  for label, task, split in method.eval_blocks:
    for control in ([False, True] if controls else [False]):
      batches = tasks.eval_iterator(task, split, sequence_length=args.sequence_length,
                                    batch_size=method.eval_batch_size, seed=0)
      result = eval_lib.add_paired_cis(eval_lib.evaluate_perplexity(
          model, batches, num_traces=args.num_traces, ahead_tokens=args.ahead_tokens,
          max_batches=args.num_eval_batches, per_trace=True, other_row_latents=control))
      per_trace = result.pop("per_trace")
      key = label + (" (other row's cache)" if control else "")
      summary[key] = result
      for name, values in per_trace.items():
        arrays[f"{key}|{name}"] = np.asarray(values, np.float32)
  return summary, arrays


def run_coprocessor(args, workdir, rows, results, name, variant, num_latents, seed, eval_sets,
                    frozen=None):
  if name in rows:
    return
  method = coprocessor_method(args, variant, num_latents, seed, eval_sets)
  run_dir = str(workdir / name)
  method.setup(run_dir)
  if frozen is not None:  # the fast bed: the pretrained decoder, frozen; the coprocessor copies it
    method._model = CacheCoprocessor(nnx.clone(frozen), num_latents=num_latents, variant=variant,
                                     lora_rank=method.lora_rank, seed=seed)
    method.base = {"decoder": "fast bed", "pretrain": str(workdir / "pretrain")}
  config = train_config(args, args.num_steps, args.learning_rate)
  started = time.time()
  fit = method.fit(make_run(method, run_dir, config))
  seconds = time.time() - started
  summary, arrays = evaluate_run(args, method, fit.model, controls=not args.no_controls and
                                 variant != "pause")
  np.savez_compressed(workdir / f"{name}.npz", **arrays)
  append_row(results, {"run": name, "kind": "coprocessor", "variant": variant,
                       "num_latents": num_latents, "seed": seed, "steps": fit.result.step,
                       "train_seconds": seconds, "eval": summary})
  rows[name] = True


def run_finetune_control(args, workdir, rows, results, frozen, seed, eval_sets):
  """(iii) the decoder itself fine-tuned on the same batches for the same steps: scored on the
  same tokens as the coprocessors (its NLL at each trace's ahead positions), vs the frozen one."""
  name = f"decoder_finetune_seed{seed}"
  if name in rows:
    return
  method = Pretrain(decoder=DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes"),
                    sequence_length=args.sequence_length, batch_size=args.batch_size, seed=seed)
  run_dir = str(workdir / name)
  method.setup(run_dir)
  method.decoder = nnx.clone(frozen)
  method.task = tasks.resolve_dataset(args.dataset, method.vocabulary, data_dir=args.data_dir)
  # The coprocessor runs read packed rows of the same task, seed, batch size and length.
  method.train_data = lambda: tasks.train_iterator(method.task, sequence_length=args.sequence_length,
                                                   batch_size=args.batch_size, seed=seed)
  started = time.time()
  fit = method.fit(make_run(method, run_dir, train_config(args, args.num_steps, args.learning_rate)))
  seconds = time.time() - started
  # Wrap both decoders so evaluate_perplexity scores the very same tokens: "baseline" is then the
  # fine-tuned decoder's own prediction; the frozen one's comes from a frozen wrapper.
  probe = coprocessor_method(args, "pause", 1, seed, eval_sets)
  probe.setup(None)
  summary, arrays = {}, {}
  for label, task, split in probe.eval_blocks:
    per_model = {}
    for which, decoder in (("frozen", frozen), ("finetuned", fit.model)):
      wrapper = CacheCoprocessor(decoder, num_latents=1, variant="pause")
      batches = tasks.eval_iterator(task, split, sequence_length=args.sequence_length,
                                    batch_size=probe.eval_batch_size, seed=0)
      result = eval_lib.evaluate_perplexity(wrapper, batches, num_traces=args.num_traces,
                                            ahead_tokens=args.ahead_tokens,
                                            max_batches=args.num_eval_batches, per_trace=True)
      per_model[which] = np.asarray(result["per_trace"]["baseline_nll"], np.float64)
    frozen_nll, tuned_nll = per_model["frozen"], per_model["finetuned"]
    summary[label] = {
        "baseline_ppl": np.exp(frozen_nll.mean(axis=0)).tolist(),
        "augmented_ppl": np.exp(tuned_nll.mean(axis=0)).tolist(),
        "relative_change": np.expm1(tuned_nll.mean(axis=0) - frozen_nll.mean(axis=0)).tolist(),
        "relative_change_ci": [stats.relative_perplexity_change(tuned_nll[:, i], frozen_nll[:, i])
                               .as_dict() for i in range(frozen_nll.shape[1])],
        "mean_relative_change_ci": stats.relative_perplexity_change(
            tuned_nll.mean(axis=1), frozen_nll.mean(axis=1)).as_dict(),
        "num_traces_scored": int(frozen_nll.shape[0])}
    arrays[f"{label}|baseline_nll"] = frozen_nll.astype(np.float32)
    arrays[f"{label}|augmented_nll"] = tuned_nll.astype(np.float32)
  np.savez_compressed(workdir / f"{name}.npz", **arrays)
  append_row(results, {"run": name, "kind": "decoder_finetune", "variant": "decoder fine-tuned",
                       "num_latents": 0, "seed": seed, "steps": fit.result.step,
                       "train_seconds": seconds, "eval": summary})
  rows[name] = True


def report(args, workdir: pathlib.Path, eval_sets) -> str:
  """The table (one row per configuration and eval set: mean over seeds with a t-interval, and
  each seed's paired-bootstrap CI) and the plot."""
  rows = [row for row in load_rows(workdir / "results.jsonl").values() if row.get("kind")]
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["variant"], row["num_latents"]), []).append(row)
  labels = sorted({label for row in rows for label in row["eval"]})
  lines = ["| variant | N_L | eval set | seeds | change@1, mean over seeds [95% t] | mean change "
           "1..N_A, mean over seeds [95% t] | per-seed change 1..N_A [95% paired bootstrap] |",
           "|---|---:|---|---:|---:|---:|---|"]
  trend = {}
  for (variant, num_latents), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    for label in labels:
      entries = [row["eval"][label] for row in sorted(group, key=lambda r: r["seed"])
                 if label in row["eval"]]
      if not entries:
        continue
      first = [e["relative_change"][0] for e in entries]
      overall = [e["mean_relative_change_ci"]["value"] for e in entries]
      fmt = lambda est: (f"{100 * est.value:+.2f}%" + ("" if np.isnan(est.low) else
                                                        f" [{100 * est.low:+.2f}, {100 * est.high:+.2f}]"))
      per_seed = "; ".join(f"{100 * e['mean_relative_change_ci']['value']:+.2f}% "
                           f"[{100 * e['mean_relative_change_ci']['low']:+.2f}, "
                           f"{100 * e['mean_relative_change_ci']['high']:+.2f}]" for e in entries)
      lines.append(f"| {variant} | {num_latents} | {label} | {len(entries)} | "
                   f"{fmt(stats.across_seeds(first))} | {fmt(stats.across_seeds(overall))} | "
                   f"{per_seed} |")
      trend.setdefault((variant, label), []).append((num_latents, stats.across_seeds(overall)))
  table = "\n".join(lines)
  (workdir / "table.md").write_text(table + "\n")
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return table
  figure, axes = plt.subplots(1, len(eval_sets), figsize=(4.2 * len(eval_sets), 3.6), squeeze=False)
  for axis, name in zip(axes[0], eval_sets):
    label = f"{name}:{tasks.EVAL_SPLITS[name]}"
    for (variant, where), points in sorted(trend.items()):
      if where not in (label, label + " (other row's cache)"):
        continue
      points.sort()
      xs = [max(n, 0.5) for n, _ in points]
      ys = [100 * e.value for _, e in points]
      errors = [[100 * (e.value - e.low) if not np.isnan(e.low) else 0 for _, e in points],
                [100 * (e.high - e.value) if not np.isnan(e.high) else 0 for _, e in points]]
      control = where != label
      axis.errorbar(xs, ys, yerr=errors, marker="o" if not control else "x", capsize=3,
                    linestyle="-" if variant == "full" and not control else ":",
                    label=variant + (", other row's cache" if control else ""))
    axis.axhline(0.0, color="gray", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("latents N_L (decoder fine-tune at 0.5)")
    axis.set_title(label, fontsize=9)
  axes[0][0].set_ylabel("perplexity change vs frozen, % (1..N_A)")
  axes[0][-1].legend(fontsize=7)
  figure.suptitle(f"cache coprocessor, {args.mode} bed, {args.num_steps} steps, mean over seeds "
                  "(95% t)", fontsize=10)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
  figure.savefig(args.plot, dpi=120)
  return table


def main(argv=None):
  args = parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = workdir / "results.jsonl"
  settings = {k: v for k, v in vars(args).items() if k not in ("plot", "workdir", "seeds", "latents",
                                                                 "variant_latents", "no_controls")}
  settings_path = workdir / "settings.json"
  if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
    raise SystemExit(f"{workdir} holds runs with other settings ({settings_path}); use another "
                     "--workdir.")
  settings_path.write_text(json.dumps(settings, indent=2))
  rows = load_rows(results)
  fast = args.mode == "fast"
  eval_sets = FAST_EVAL_SETS if fast else SMOLLM2_EVAL_SETS
  frozen = pretrain_decoder(args, workdir, rows, results) if fast else None
  for seed in args.seeds:
    for num_latents in args.latents:
      run_coprocessor(args, workdir, rows, results, f"full_nl{num_latents}_seed{seed}", "full",
                      num_latents, seed, eval_sets, frozen)
    for variant in ("pause", "lora"):
      for num_latents in args.variant_latents:
        run_coprocessor(args, workdir, rows, results, f"{variant}_nl{num_latents}_seed{seed}",
                        variant, num_latents, seed, eval_sets, frozen)
    if fast and not args.no_controls:
      run_finetune_control(args, workdir, rows, results, frozen, seed, eval_sets)
  print(report(args, workdir, eval_sets))


if __name__ == "__main__":
  main()
