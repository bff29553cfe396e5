"""MiLP on held-out conversations: three baselines and the searched memory layout, with the trial history.

Runs the job of gin/milp.gin (frozen SmolLM2-135M-Instruct) at a size set by the flags: the Bayesian
search (Optuna GPSampler) on --num_dev_users dev users for --num_trials feasible trials, then no memory,
memory as prompt, one single LoRA and the best layout on --num_test_users test users; ROUGE-L and
Persona-F1 of each system's greedy responses to the users' held-out turns.

  python -m benchmarks.milp_eval --num_dev_users=1 --num_test_users=2 --num_trials=3 --num_steps=8

(`--gin_file=gin/milp_smoke.gin --plot=''` runs the same on a tiny random decoder in a minute.) It runs
the generic `train` job of `run.method = 'milp'` in --workdir (an earlier MiLP run's
outputs there are removed first: a fresh search).

Writes <out>.json (everything, trials and responses included), <out>.md (the table and the trial
history) and docs/milp_<dataset>.png (the objective per trial and the systems side by side).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time

import gin

from persona_jax.milp import eval as eval_lib
from persona_jax.train import jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  feasible = [r for r in summary["trials"] if r["feasible"]]
  left.plot([r["trial"] for r in feasible], [r["objective"] for r in feasible], "o-", label="trial")
  best = [max(r["objective"] for r in feasible[:i + 1]) for i in range(len(feasible))]
  left.step([r["trial"] for r in feasible], best, where="post", label="best so far")
  left.set_xlabel("trial (infeasible proposals skipped)")
  left.set_ylabel(f"dev {summary['objective']}")
  left.set_title("GP search on the dev users")
  left.legend()
  systems = [s for s in eval_lib.SYSTEMS if s in summary["results"]]
  xs = range(len(systems))
  width = 0.38
  right.bar([x - width / 2 for x in xs], [summary["results"][s]["rouge_l"] for s in systems], width,
            label="ROUGE-L")
  right.bar([x + width / 2 for x in xs], [summary["results"][s]["persona_f1"] for s in systems], width,
            label="Persona-F1")
  right.set_xticks(list(xs), [s.replace("_", "\n") for s in systems])
  right.set_title(f"{len(summary['test_users'])} test users of {summary['dataset']}")
  right.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", default=os.path.join(REPO, "gin", "milp.gin"),
                      help="gin/milp_smoke.gin for a tiny random decoder (checks the script runs)")
  parser.add_argument("--dataset", default="synthetic_persona_chat")
  parser.add_argument("--num_dev_users", type=int, default=1)
  parser.add_argument("--num_test_users", type=int, default=2)
  parser.add_argument("--num_trials", type=int, default=3)
  parser.add_argument("--num_startup_trials", type=int, default=2)
  parser.add_argument("--num_steps", type=int, default=8, help="memory training steps per user")
  parser.add_argument("--batch_size", type=int, default=2, help="rows per memory training step")
  parser.add_argument("--max_new_tokens", type=int, default=16)
  parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "dialogue"))
  parser.add_argument("--workdir", default="/tmp/milp_eval")
  parser.add_argument("--out", default="/tmp/milp_eval")
  parser.add_argument("--plot", default=None, help="default docs/milp_<dataset>.png ('' for none)")
  args = parser.parse_args()

  # A fresh search, not a continuation (the job resumes whatever the workdir holds): remove what an
  # earlier MiLP run wrote there, and nothing else.
  os.makedirs(args.workdir, exist_ok=True)
  for stale in ("trials.jsonl", "search.json", "best_layout.json", "users", "single_lora", "peft"):
    path = os.path.join(args.workdir, stale)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  gin.clear_config()
  jobs.discover_methods()
  bindings = [f"milp.job.dataset = {args.dataset!r}", f"milp.job.data_dir = {args.data_dir!r}",
              f"milp.job.num_dev_users = {args.num_dev_users}",
              f"milp.job.num_test_users = {args.num_test_users}",
              f"milp.job.num_trials = {args.num_trials}",
              f"milp.job.num_startup_trials = {args.num_startup_trials}",
              f"milp.job.max_new_tokens = {args.max_new_tokens}",
              f"milp.job.batch_size = {args.batch_size}",
              f"TrainConfig.num_steps = {args.num_steps}",
              f"TrainConfig.warmup_steps = {max(1, args.num_steps // 10)}",
              "TrainConfig.weight_decay = 0.0", "TrainConfig.checkpoint_every = 0",
              "TrainConfig.keep_checkpoints = 1", "TrainConfig.log_every = 1000",
              "TrainConfig.async_checkpointing = False"]
  gin.parse_config_files_and_bindings([args.gin_file], bindings)
  started = time.time()
  result = jobs.run(args.workdir)
  summary = dict(result["evaluation"].results["results"])
  summary["examples"] = result["evaluation"].examples
  summary["total_seconds"] = round(time.time() - started, 1)
  summary["command"] = "python -m benchmarks.milp_eval " + " ".join(sys.argv[1:])
  summary["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs ({platform.platform()})"
  summary["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  table = eval_lib.results_table(summary["results"], f"MiLP on {args.dataset}: "
                                 f"{len(summary['test_users'])} test users, search on "
                                 f"{len(summary['dev_users'])} dev users")
  text = (table + "\nBest layout: " + json.dumps(summary["best_layout"]) + "\n\nTrials:\n\n" +
          eval_lib.trial_table(summary["trials"]) + f"\nTotal {summary['total_seconds']} s; seconds "
          f"per stage {summary['seconds']}.\n")
  with open(args.out + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  plot_path = os.path.join(REPO, "docs", f"milp_{args.dataset}.png") if args.plot is None else args.plot
  if plot_path:
    plot(summary, plot_path)
  print(text, flush=True)


if __name__ == "__main__":
  main()
