"""CURIO's mechanism in minutes on a CPU: discrete actions, a small MLP policy, REINFORCE.

The exercise domain of `persona_jax.curio.envs` (20 attributes, 5 decisive, 8 strategies; 8 of the 32
decisive combinations held out) played with discrete actions (`envs.DiscreteDialogues`: ask attribute
i / recommend strategy k) against the template user; the user model is the exact rule posterior
(`envs.RulePosterior`), so no user-model error is mixed into the comparison. The policy is an MLP
(observation -> 64 -> 64 -> action logits, plain JAX + optax) trained by REINFORCE on per-turn
returns (reward-to-go over turns, gamma 1) minus a leave-one-out batch-mean baseline per turn index
(a state-independent baseline, so shaping's -phi(b_t) term can act as the state-dependent part of
one), Adam, global-norm clipping 1. Rewards come from `persona_jax.curio.rewards.turn_rewards`, the
code the LLM job trains on.

Arms: 'none' (extrinsic only); each intrinsic reward of `rewards.INTRINSIC_REWARDS` (shaped:
diff_acc / diff_log_acc / diff_ent with phi = 0 at termination; the paper's form diff_*_paper; acc,
ent, info_gain); 'control' (extrinsic only, one recommend action whose strategy is the user model's
argmax: only question asking is learned).

Evaluation after training, greedy policy, on `--eval_users` held-out users (decisive combinations
never seen in training) and as many fresh training users: success, turns to identify (first turn
after which the user model's argmax is the true type with p >= 0.5; never = turn_cap + 1), decisive
questions asked (distinct decisive attributes, 0..5), dialogue length (turns), turn-cap rate.

Resumable: one JSON line per (arm, seed) in `<out>.jsonl`; a rerun skips those already there and
rebuilds the table (`<out>.md`, mean and 95% Student-t CI over seeds) and the plot (`--plot`).

    python -m benchmarks.curio_discrete --out=/tmp/curio_discrete/run --plot=docs/curio_discrete.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from persona_jax.curio import envs, rewards, tasks
from persona_jax.evaluation.stats import across_seeds

ARMS = ("none", "diff_acc", "diff_log_acc", "diff_ent", "diff_acc_paper", "diff_log_acc_paper",
        "diff_ent_paper", "acc", "ent", "info_gain", "control")
LABELS = {"none": "extrinsic only", "control": "control: recommend = user-model argmax (extrinsic)",
          "diff_acc": "DiffAcc (shaped)", "diff_log_acc": "DiffLogAcc (shaped)",
          "diff_ent": "DiffEnt (shaped)", "diff_acc_paper": "DiffAcc (paper form)",
          "diff_log_acc_paper": "DiffLogAcc (paper form)", "diff_ent_paper": "DiffEnt (paper form)",
          "acc": "Acc", "ent": "Ent", "info_gain": "InfoGain (KL, our reading)"}
METRICS = ("success", "turns_to_identify", "decisive_asked", "length", "cap_rate", "train_success")


# The policy ------------------------------------------------------------------------------------------
def init_params(key, sizes):
  params = []
  for fan_in, fan_out, k in zip(sizes[:-1], sizes[1:], jax.random.split(key, len(sizes) - 1)):
    params.append({"w": jax.random.normal(k, (fan_in, fan_out)) * np.sqrt(2.0 / fan_in),
                   "b": jnp.zeros((fan_out,))})
  params[-1]["w"] = params[-1]["w"] * 0.01  # near-uniform initial policy
  return params


def logits_fn(params, x):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


@jax.jit
def sample_actions(params, observation, key):
  return jax.random.categorical(key, logits_fn(params, observation))


@jax.jit
def greedy_actions(params, observation):
  return jnp.argmax(logits_fn(params, observation), axis=-1)


def loss_fn(params, observations, actions, advantages, mask, entropy_coefficient):
  logp = jax.nn.log_softmax(logits_fn(params, observations))
  taken = jnp.take_along_axis(logp, actions[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  count = jnp.maximum(mask.sum(), 1.0)
  return -jnp.sum(mask * (advantages * taken + entropy_coefficient * entropy)) / count


@partial(jax.jit, static_argnums=(0,))
def update(optimizer, params, opt_state, observations, actions, advantages, mask,
           entropy_coefficient):
  grads = jax.grad(loss_fn)(params, observations, actions, advantages, mask, entropy_coefficient)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


# Playing ---------------------------------------------------------------------------------------------
def play(params, profiles, *, turn_cap, control, posterior, key=None):
  """Plays one batch (sampled with `key`, greedy without). Returns the batch and, per turn, the
  observations `[turn_cap, B, obs]`, actions `[turn_cap, B]` and live masks `[turn_cap, B]`."""
  batch = envs.DiscreteDialogues(envs.EXERCISE, profiles, turn_cap=turn_cap,
                                 argmax_recommend=control, posterior=posterior)
  observations, actions, live = [], [], []
  for turn in range(turn_cap):
    observation = batch.observation()
    if key is None:
      action = np.asarray(greedy_actions(params, observation))
    else:
      action = np.asarray(sample_actions(params, observation, jax.random.fold_in(key, turn)))
    observations.append(observation)
    actions.append(action)
    live.append(~batch.done)
    batch.step(action)
    if batch.done.all():
      break
  while len(observations) < turn_cap:  # fixed shapes for the update
    observations.append(np.zeros_like(observations[0]))
    actions.append(np.zeros_like(actions[0]))
    live.append(np.zeros_like(live[0]))
  return batch, np.stack(observations), np.stack(actions), np.stack(live).astype(np.float32)


def turn_returns(total: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Reward-to-go over turns (gamma 1) `[B, T]`, 0 where mask is 0."""
  return np.cumsum(total[:, ::-1], axis=1)[:, ::-1] * mask


def advantages_from(returns: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-turn returns minus the leave-one-out mean return of the other live rows at that turn."""
  count = mask.sum(0, keepdims=True)
  total = (returns * mask).sum(0, keepdims=True)
  baseline = np.where(count > 1, (total - returns) / np.maximum(count - 1, 1), 0.0)
  return (returns - baseline) * mask


def dialogue_metrics(batch: envs.DiscreteDialogues) -> dict[str, float]:
  identify = tasks.turns_to_identify(batch.belief_history, batch.types, batch.turns)
  decisive = batch.asked[:, batch.decisive_index].sum(1)
  return {"success": float(batch.success.mean()), "turns_to_identify": float(identify.mean()),
          "decisive_asked": float(decisive.mean()), "length": float(batch.turns.mean()),
          "cap_rate": float(batch.hit_cap.mean())}


def run_arm(arm: str, seed: int, args, population: envs.UserPopulation,
            posterior: envs.RulePosterior) -> dict:
  control = arm == "control"
  reward = "none" if control else arm
  probe = envs.DiscreteDialogues(envs.EXERCISE, population.sample_many(0, "train", 1),
                                 turn_cap=args.turn_cap, argmax_recommend=control)
  key = jax.random.key(seed)
  params = init_params(key, (probe.observation_size, args.hidden, args.hidden, probe.num_actions))
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.learning_rate))
  opt_state = optimizer.init(params)
  curve = []
  start = time.perf_counter()
  for step in range(args.updates):
    # The same training users and sampling keys for every arm of a seed.
    profiles = population.sample_many([seed, 1, step], "train", args.batch_size)
    batch, observations, actions, live = play(params, profiles, turn_cap=args.turn_cap,
                                              control=control, posterior=posterior,
                                              key=jax.random.fold_in(key, 1 + step))
    mask = live.T  # [B, T]
    total, extrinsic, intrinsic = rewards.turn_rewards(
        reward, batch.belief_history, batch.types, batch.turns, batch.success,
        turn_cap=args.turn_cap, gamma=1.0, intrinsic_coefficient=args.intrinsic_coefficient)
    advantages = advantages_from(turn_returns(total, mask), mask)
    if args.normalize:
      advantages = advantages / (advantages[mask > 0].std() + 1e-6) * mask
    params, opt_state = update(
        optimizer, params, opt_state,
        jnp.asarray(observations.reshape(-1, observations.shape[-1])),
        jnp.asarray(actions.reshape(-1)), jnp.asarray(advantages.T.reshape(-1), jnp.float32),
        jnp.asarray(live.reshape(-1)), args.entropy_coefficient)
    if step % args.curve_every == 0 or step == args.updates - 1:
      m = dialogue_metrics(batch)
      curve.append({"step": step, "episodes": (step + 1) * args.batch_size,
                    "success": m["success"], "length": m["length"],
                    "decisive_asked": m["decisive_asked"],
                    "intrinsic_return": float(intrinsic.sum(1).mean())})
  train_seconds = time.perf_counter() - start
  held_out = population.sample_many([20_000, seed], "held_out", args.eval_users)
  fresh = population.sample_many([30_000, seed], "train", args.eval_users)
  metrics = dialogue_metrics(play(params, held_out, turn_cap=args.turn_cap, control=control,
                                  posterior=posterior)[0])
  metrics["train_success"] = dialogue_metrics(play(params, fresh, turn_cap=args.turn_cap,
                                                   control=control, posterior=posterior)[0])["success"]
  return {"arm": arm, "seed": seed, "metrics": metrics, "curve": curve,
          "episodes": args.updates * args.batch_size, "train_seconds": train_seconds}


# Reporting -------------------------------------------------------------------------------------------
def load(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def table(rows: list[dict], arms, header: str) -> str:
  lines = [header, "",
           "| arm | held-out success | turns to identify | decisive asked (of 5) | dialogue length "
           "| turn-cap rate | training-user success | seeds |",
           "|---|---|---|---|---|---|---|---|"]
  for arm in arms:
    runs = [r for r in rows if r["arm"] == arm]
    if not runs:
      continue
    cells = []
    for metric in METRICS:
      estimate = across_seeds([r["metrics"][metric] for r in runs])
      cells.append(f"{estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"
                   if len(runs) > 1 else f"{estimate.value:.3f}")
    lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + f" | {len(runs)} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], arms, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  arms = [a for a in arms if any(r["arm"] == a for r in rows)]
  fig, axes = plt.subplots(1, 4, figsize=(20, 5.2))
  colors = [plt.cm.tab20(i) for i in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 7)]
  for ax, metric, title in zip(axes[:3], ("success", "length", "decisive_asked"),
                               ("held-out success", "dialogue length (turns)",
                                "decisive attributes asked (of 5)")):
    for i, arm in enumerate(arms):
      estimate = across_seeds([r["metrics"][metric] for r in rows if r["arm"] == arm])
      error = [[estimate.value - estimate.low], [estimate.high - estimate.value]]
      ax.errorbar(estimate.value, i, xerr=error if estimate.count > 1 else None, fmt="o",
                  color=colors[i % len(colors)], capsize=3)
    ax.set_yticks(range(len(arms)), [LABELS[a] for a in arms] if ax is axes[0] else [""] * len(arms))
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
  ax = axes[3]
  for i, arm in enumerate(arms):
    curves = [r["curve"] for r in rows if r["arm"] == arm]
    episodes = [c["episodes"] for c in curves[0]]
    mean = np.mean([[c["success"] for c in curve] for curve in curves], axis=0)
    ax.plot(episodes, mean, color=colors[i % len(colors)], label=LABELS[arm],
            linestyle="--" if "paper" in arm or arm in ("acc", "ent", "info_gain") else "-")
  ax.set_xlabel("training episodes")
  ax.set_title("training-batch success (mean over seeds)", fontsize=10)
  fig.suptitle("CURIO discrete actions, held-out users: mean and 95% CI over seeds", fontsize=11)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="/tmp/curio_discrete/run")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", type=int, default=10)
  parser.add_argument("--updates", type=int, default=120)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--turn_cap", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--entropy_coefficient", type=float, default=0.01)
  parser.add_argument("--intrinsic_coefficient", type=float, default=1.0)
  parser.add_argument("--eval_users", type=int, default=512)
  parser.add_argument("--curve_every", type=int, default=10)
  parser.add_argument("--split_seed", type=int, default=0)
  parser.add_argument("--normalize", type=int, default=1,
                      help="divide the batch's advantages by their standard deviation")
  parser.add_argument("--plot", default="")
  args = parser.parse_args()
  arms = args.arms.split(",")
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise SystemExit(f"curio_discrete: unknown arms {unknown}; choose from {', '.join(ARMS)}.")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  path = args.out + ".jsonl"
  settings = {k: getattr(args, k) for k in ("updates", "batch_size", "turn_cap", "hidden",
                                             "learning_rate", "entropy_coefficient",
                                             "intrinsic_coefficient", "eval_users", "split_seed",
                                             "normalize")}
  done = {(r["arm"], r["seed"]) for r in load(path) if r.get("settings") == settings}
  population = envs.UserPopulation(envs.EXERCISE, args.split_seed)
  posterior = envs.RulePosterior(envs.EXERCISE)
  for seed in range(args.seeds):
    for arm in arms:
      if (arm, seed) in done:
        continue
      row = run_arm(arm, seed, args, population, posterior)
      row["settings"] = settings
      with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
      m = row["metrics"]
      print(f"seed {seed} {arm:>20}: success {m['success']:.3f} length {m['length']:.2f} "
            f"decisive {m['decisive_asked']:.2f} identify {m['turns_to_identify']:.2f} "
            f"({row['train_seconds']:.1f} s)", flush=True)
  rows = [r for r in load(path) if r.get("settings") == settings and r["arm"] in arms]
  machine = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True,
                           text=True).stdout.split(":")[-1].strip() or platform.processor()
  header = (f"CURIO discrete-action experiment: {args.updates} updates x {args.batch_size} "
            f"dialogues per run, {len(set(r['seed'] for r in rows))} seeds, {args.eval_users} "
            f"held-out users, greedy policy; {machine}; "
            f"{sum(r['train_seconds'] for r in rows):.0f} s of training in all")
  text = table(rows, arms, header)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  print(text)
  if args.plot:
    plot(rows, arms, args.plot)


if __name__ == "__main__":
  main()
