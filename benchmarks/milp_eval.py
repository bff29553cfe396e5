"""MiLP on held-out conversations: the GP-searched memory vs random search vs a tuned single LoRA vs
memory as prompt vs BM25 retrieval vs no memory, with 95% CIs, and the search trace.

Runs the job of gin/milp.gin (frozen SmolLM2-135M-Instruct) at a size set by the flags: three searches
with --num_trials scored trials each on --num_dev_users dev users (objective: teacher-forced loss of
their held-out responses), each best trained on --num_test_users test users, then the six systems on
the test users' held-out responses (loss, ROUGE-L, Persona-F1 per example; mean and 95% bootstrap CI,
paired difference to no memory).

  python -m benchmarks.milp_eval --num_dev_users=5 --num_test_users=20 --num_trials=6 --num_steps=30

(`--gin_file=gin/milp_smoke.gin --plot=''` runs the same on a tiny random decoder in minutes.) It runs
the generic `train` job of `run.method = 'milp'` in --workdir, which resumes whatever an earlier run
of the same command left there (logged trials, finished memories); --fresh removes an earlier MiLP
run's outputs there first.

Writes <out>.json (everything, trials and per-example rows included), <out>.md (the table and the
trials) and docs/milp_search_trace.png (dev objective per trial of each search and the best so far;
test loss of each system with its CI).
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
from persona_jax.milp.job import SEARCHES
from persona_jax.train import jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  partial = "results" not in summary  # --trace_only: the trials logged so far, no test table yet
  figure, axes = plt.subplots(1, 1 if partial else 2, figsize=(6.5 if partial else 12, 4.2))
  left, right = (axes, None) if partial else axes
  minimize = summary["objective"] == "loss"
  for (name, entry), color in zip(summary["searches"].items(), ("C0", "C1", "C2")):
    scored = [r for r in entry["trials"] if r["feasible"]]
    if not scored:
      continue
    xs = list(range(1, len(scored) + 1))
    ys = [r["objective"] for r in scored]
    pick = min if minimize else max
    best = [pick(ys[:i + 1]) for i in range(len(ys))]
    left.plot(xs, ys, "o", color=color, alpha=0.5)
    left.step(xs, best, where="post", color=color, label=f"{name} (best so far)")
  left.set_xlabel("scored trial")
  left.set_ylabel(f"dev {summary['objective']}" + (" (nats/token)" if minimize else ""))
  left.set_title(f"searches on {len(summary['dev_users'])} dev users")
  left.legend(fontsize=8)
  if partial:
    left.set_title(f"searches on {len(summary['dev_users'])} dev users (trials logged so far)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return
  systems = [s for s in eval_lib.SYSTEMS if s in summary["results"]]
  values = [summary["results"][s]["loss"] for s in systems]
  xs = range(len(systems))
  right.errorbar(list(xs), [v["value"] for v in values],
                 yerr=[[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]],
                 fmt="o", capsize=4)
  right.set_xticks(list(xs), [s.replace("_", "\n") for s in systems], fontsize=8)
  right.set_ylabel("test loss of the held-out responses (nats/token)")
  right.set_title(f"{len(summary['test_users'])} test users of {summary['dataset']} (95% CI)")
  figure.tight_layout()
  figure.savefig(path, dpi=110)


def training_free(args, started: float) -> None:
  """The systems that train nothing, scored by the teacher-forced loss of the test users' held-out
  responses (the method's own prompts and `response_losses`), with 95% CIs and paired differences."""
  from persona_jax.milp.job import Milp  # pylint: disable=g-import-not-at-top
  method = Milp()
  method.setup(args.workdir)
  users = method.test_users
  examples = [(u, ex) for u in users for ex in u.held_out]
  prompts = {
      "no_memory": [ex.prompt for _, ex in examples],
      "memory_as_prompt": [eval_lib.memory_prompt(u, ex, method.prompt_history_turns, method.vocabulary,
                                                  method.memory_prompt_tokens) for u, ex in examples],
      "bm25_retrieval": [eval_lib.retrieval_prompt(u, ex, method.retrieval_top_k, method.vocabulary,
                                                   method.memory_prompt_tokens) for u, ex in examples]}
  rows = []
  for system, system_prompts in prompts.items():
    losses = method.response_losses(method.base, system_prompts, [ex.response for _, ex in examples])
    rows += [{"system": system, "user_id": u.user_id, "prompt": p, "reference": ex.response,
              "loss": loss} for (u, ex), p, loss in zip(examples, system_prompts, losses)]
  by_system = {}
  for row in rows:
    by_system.setdefault(row["system"], []).append(row["loss"])
  from persona_jax.evaluation import stats  # pylint: disable=g-import-not-at-top
  lines = [f"| system | loss (nats/token) [95% CI] | Δ vs no memory [95% CI], p | examples |",
           "|---|---|---|---|"]
  summary = {}
  for system, values in by_system.items():
    mean = stats.mean_ci(values)
    diff = (stats.paired_difference(values, by_system["no_memory"]) if system != "no_memory" else None)
    summary[system] = {"loss": mean.as_dict(), "loss_vs_no_memory": diff and diff.as_dict()}
    shown = "-" if diff is None else f"{diff.format(3)} p={diff.p_value:.3f}"
    lines.append(f"| {system} | {mean.format(3)} | {shown} | {len(values)} |")
  text = "\n".join(lines) + "\n"
  record = {"summary": summary, "rows": rows, "test_users": [u.user_id for u in users],
            "seconds": round(time.time() - started, 1),
            "command": "python -m benchmarks.milp_eval " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  with open(args.out + "_training_free.json", "w") as f:
    json.dump(record, f, indent=2)
  with open(args.out + "_training_free.md", "w") as f:
    f.write(text)
  print(text, f"{record['seconds']} s", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", default=os.path.join(REPO, "gin", "milp.gin"),
                      help="gin/milp_smoke.gin for a tiny random decoder (checks the script runs)")
  parser.add_argument("--dataset", default="synthetic_persona_chat")
  parser.add_argument("--num_dev_users", type=int, default=5)
  parser.add_argument("--num_test_users", type=int, default=20)
  parser.add_argument("--num_trials", type=int, default=6)
  parser.add_argument("--num_startup_trials", type=int, default=3)
  parser.add_argument("--num_steps", type=int, default=30, help="memory training steps per user")
  parser.add_argument("--batch_size", type=int, default=4, help="rows per memory training step")
  parser.add_argument("--sequence_length", type=int, default=128)
  parser.add_argument("--training_free", action="store_true",
                      help="only the systems that train nothing (no memory, memory as prompt, BM25), "
                           "teacher-forced loss only (no generation): <out>_training_free.{json,md}")
  parser.add_argument("--trace_only", action="store_true",
                      help="only plot the trials logged so far in --workdir (a run still going)")
  parser.add_argument("--fresh", action="store_true",
                      help="remove an earlier MiLP run's outputs in --workdir first (default: resume)")
  parser.add_argument("--max_new_tokens", type=int, default=16)
  parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "dialogue"))
  parser.add_argument("--workdir", default="/tmp/milp_eval")
  parser.add_argument("--out", default="/tmp/milp_eval")
  parser.add_argument("--plot", default=None, help="default docs/milp_search_trace.png ('' for none)")
  args = parser.parse_args()

  if args.trace_only:
    searches, settings = {}, {}
    for name, where in SEARCHES.items():
      log = os.path.join(args.workdir, where.log)
      trials = ([json.loads(line) for line in open(log) if line.strip()]
                if os.path.exists(log) else [])
      searches[name] = {"trials": trials}
      if os.path.exists(os.path.join(args.workdir, where.settings)):
        with open(os.path.join(args.workdir, where.settings)) as f:
          settings = json.load(f)
    plot({"searches": searches, "objective": settings["objective"],
          "dev_users": settings["dev_users"]},
         os.path.join(REPO, "docs", "milp_search_trace.png") if args.plot is None else args.plot)
    for name, entry in searches.items():
      print(f"{name}:\n" + eval_lib.trial_table(entry["trials"]), flush=True)
    return
  # --fresh: a new search, not a continuation (the job resumes whatever the workdir holds): remove
  # what an earlier MiLP run wrote there, and nothing else.
  os.makedirs(args.workdir, exist_ok=True)
  stale = [name for where in SEARCHES.values()
           for name in (where.log, where.settings, where.best, where.users_dir)] + ["peft"]
  for name in stale if args.fresh else []:
    path = os.path.join(args.workdir, name)
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
              f"milp.job.sequence_length = {args.sequence_length}",
              f"TrainConfig.num_steps = {args.num_steps}",
              f"TrainConfig.warmup_steps = {max(1, args.num_steps // 10)}",
              "TrainConfig.weight_decay = 0.0", "TrainConfig.checkpoint_every = 0",
              "TrainConfig.keep_checkpoints = 1", "TrainConfig.log_every = 1000",
              "TrainConfig.async_checkpointing = False"]
  gin.parse_config_files_and_bindings([args.gin_file], bindings)
  started = time.time()
  if args.training_free:
    training_free(args, started)
    return
  result = jobs.run(args.workdir)
  summary = dict(result["evaluation"].results["results"])
  summary["examples"] = result["evaluation"].examples
  summary["total_seconds"] = round(time.time() - started, 1)
  summary["command"] = "python -m benchmarks.milp_eval " + " ".join(sys.argv[1:])
  summary["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs ({platform.platform()})"
  summary["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  table = eval_lib.results_table(summary["results"], f"MiLP on {args.dataset}: "
                                 f"{len(summary['test_users'])} test users, searches on "
                                 f"{len(summary['dev_users'])} dev users")
  trials = "".join(f"\n{name} trials (best: {json.dumps(entry['best'])}):\n\n" +
                   eval_lib.trial_table(entry["trials"]) for name, entry in summary["searches"].items())
  text = (table + trials + f"\nTotal {summary['total_seconds']} s; seconds per stage "
          f"{summary['seconds']}.\n")
  with open(args.out + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  plot_path = os.path.join(REPO, "docs", "milp_search_trace.png") if args.plot is None else args.plot
  if plot_path:
    plot(summary, plot_path)
  print(text, flush=True)


if __name__ == "__main__":
  main()
