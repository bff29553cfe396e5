"""CURIO on the exercise domain: baseline (extrinsic reward only) vs DiffLogAcc / DiffAcc / DiffEnt.

One user model and one imitation warm start (the tiny word-vocabulary policy of
gin/curio_smoke.gin) are trained once; then, for each seed, every reward variant runs the same RL
budget (`--rl_steps` steps of `--batch_size` dialogues with training users, the same users and
sampling keys across variants) from that warm start. Every `--eval_every` steps the policy talks to
the same held-out users (decisive combinations never seen in training). Reported per variant (mean
over seeds, with min..max): held-out success rate, turns until the user model identifies the type,
share of the decisive attributes the agent asked, and success on fresh training users.

  python -m benchmarks.curio_eval --seeds=0,1,2 --rl_steps=30 --out=/tmp/curio_eval

Writes <out>.json, <out>.md and docs/curio_eval.png (curves). The stages are the method's
(`persona_jax.curio.job.Curio`: `train_user_model`, `train_imitation`, then `rl.Learner` over
`Curio.rollouts`); a tiny setting that only checks the script runs:

  python -m benchmarks.curio_eval --seeds=0 --rewards=none,diff_log_acc --rl_steps=2 --eval_every=1 \
      --batch_size=4 --user_model_steps=2 --imitation_steps=2 --eval_users=4 --out=/tmp/curio_tiny \
      --plot=/tmp/curio_tiny.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from persona_jax import rl
from persona_jax.curio.job import Curio
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARDS = ("none", "diff_log_acc", "diff_acc", "diff_ent")
LABELS = {"none": "baseline (extrinsic only)", "diff_log_acc": "DiffLogAcc", "diff_acc": "DiffAcc",
          "diff_ent": "DiffEnt"}
CURVE_METRICS = ("success_rate", "turns_to_identify", "decisive_asked")


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--rewards", default=",".join(REWARDS))
  parser.add_argument("--rl_steps", type=int, default=30)
  parser.add_argument("--eval_every", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--intrinsic_coefficient", type=float, default=1.0)
  parser.add_argument("--kl_coefficient", type=float, default=0.05)
  parser.add_argument("--user_model_steps", type=int, default=300)
  parser.add_argument("--imitation_steps", type=int, default=300)
  parser.add_argument("--random_ask_prob", type=float, default=0.3)
  parser.add_argument("--eval_users", type=int, default=128)
  parser.add_argument("--out", default="/tmp/curio_eval")
  parser.add_argument("--plot", default=os.path.join(REPO, "docs", "curio_eval.png"))
  return parser.parse_args()


def main():
  args = parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  reward_names = args.rewards.split(",")
  started = time.time()
  rl_config = TrainConfig(num_steps=args.rl_steps, learning_rate=args.learning_rate, warmup_steps=2,
                          final_learning_rate_fraction=1.0, checkpoint_every=0,
                          eval_every=args.eval_every, log_every=args.eval_every)
  method = Curio(
      decoder=DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="words"),
      batch_size=args.batch_size, kl_coefficient=args.kl_coefficient,
      intrinsic_coefficient=args.intrinsic_coefficient, user_model_steps=args.user_model_steps,
      user_model_learning_rate=1e-2, imitation_steps=args.imitation_steps,
      imitation_learning_rate=1e-2, random_ask_prob=args.random_ask_prob,
      eval_users=args.eval_users)
  method.setup(None)
  run = Run(workdir=None, config=rl_config)
  user_model = method.train_user_model(run).metrics
  imitation = method.train_imitation(run).metrics
  warm = method.warm_policy
  evaluate = lambda policy, split="held_out": method.evaluate_policy(policy, split)[0]
  warm_eval = evaluate(warm)
  warm_train_users = evaluate(warm, split="train")
  print(f"warm start: held-out {warm_eval}; training users {warm_train_users}", flush=True)
  setup_seconds = time.time() - started

  runs = {}
  for seed in seeds:
    for reward in reward_names:
      run_started = time.time()
      trainer = method.rl_trainer(run, warm)
      settings = dataclasses.replace(method.settings, reward=reward)
      learner = rl.Learner(trainer, method.rollouts(warm.decoder, settings, seed=seed),
                           rl.LearnerConfig(seed=seed))
      curve = {0: warm_eval}
      result = learner.train(eval_fn=lambda model, step, curve=curve: curve.setdefault(
          step, evaluate(model)))
      policy = trainer.model()
      curve[result.step] = evaluate(policy)
      runs[(reward, seed)] = {
          "curve": {int(s): m for s, m in sorted(curve.items())},
          "held_out": curve[result.step], "train_users": evaluate(policy, split="train"),
          "train_success": [h["success"] for h in result.history],
          "seconds": time.time() - run_started}
      print(f"{reward} seed {seed}: held-out {curve[result.step]} "
            f"({runs[(reward, seed)]['seconds']:.0f} s)", flush=True)

  summary = {}
  for reward in reward_names:
    finals = [runs[(reward, s)] for s in seeds]
    summary[reward] = {}
    for metric in ("success_rate", "turns_to_identify", "decisive_asked"):
      values = [f["held_out"][metric] for f in finals]
      summary[reward][metric] = (float(np.mean(values)), float(np.min(values)), float(np.max(values)))
    values = [f["train_users"]["success_rate"] for f in finals]
    summary[reward]["train_users_success"] = (float(np.mean(values)), float(np.min(values)),
                                              float(np.max(values)))
  total_seconds = time.time() - started

  fmt = lambda v: f"{v[0]:.3f} ({v[1]:.3f}..{v[2]:.3f})"
  lines = [
      f"Exercise domain, held-out users ({args.eval_users}, sampled at temperature 1 with a fixed "
      f"key), {args.rl_steps} RL steps x {args.batch_size} dialogues, seeds {seeds}; mean (min..max).",
      "",
      "| reward | held-out success | turns to identify | decisive asked | training-user success |",
      "|---|---|---|---|---|",
      f"| warm start (before RL) | {warm_eval['success_rate']:.3f} | "
      f"{warm_eval['turns_to_identify']:.2f} | {warm_eval['decisive_asked']:.3f} | "
      f"{warm_train_users['success_rate']:.3f} |"]
  for reward in reward_names:
    s = summary[reward]
    lines.append(f"| {LABELS.get(reward, reward)} | {fmt(s['success_rate'])} | "
                 f"{fmt(s['turns_to_identify'])} | {fmt(s['decisive_asked'])} | "
                 f"{fmt(s['train_users_success'])} |")
  lines += ["", f"Setup (user model + warm start) {setup_seconds:.0f} s, total {total_seconds:.0f} s. "
            f"User model after training: {user_model}; imitation: {imitation}."]
  table = "\n".join(lines)
  print(table, flush=True)
  with open(args.out + ".md", "w") as f:
    f.write(table + "\n")
  with open(args.out + ".json", "w") as f:
    json.dump({"args": vars(args), "warm_start": {"held_out": warm_eval,
                                                  "train_users": warm_train_users},
               "user_model": user_model, "imitation": imitation, "summary": summary,
               "runs": {f"{r}/seed{s}": v for (r, s), v in runs.items()},
               "seconds": total_seconds}, f, indent=2)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 4))
  for axis, metric in zip(axes, CURVE_METRICS):
    for reward in reward_names:
      steps = sorted(runs[(reward, seeds[0])]["curve"])
      values = np.array([[runs[(reward, s)]["curve"][step][metric] for step in steps] for s in seeds])
      axis.plot(steps, values.mean(0), marker="o", label=LABELS.get(reward, reward))
      axis.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    axis.set_xlabel("RL step")
    axis.set_title(f"held-out {metric.replace('_', ' ')}")
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  figure.suptitle(f"CURIO, exercise domain, tiny policy; mean and min..max over seeds {seeds}")
  figure.tight_layout()
  figure.savefig(args.plot, dpi=110)
  print(f"wrote {args.out}.md, {args.out}.json, {args.plot}", flush=True)


if __name__ == "__main__":
  main()
