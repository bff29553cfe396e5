"""Does popularity alone answer RLPF's multiple-choice tasks? Counted from the data, no model.

For every task and every held-out user (validation + test; the training users too, as a larger
sample), per-example correctness of the answers that use no personal information -- chance, item
popularity (TRAIN counts), the majority class (TRAIN labels) -- and of the user's own history
majority, each with a 95% bootstrap CI and the paired difference from chance. The old next-movie
design (distractors uniform over unseen movies) is counted beside the new one.

  TFDS_DATA_DIR=/work/shared/tfds python -m benchmarks.rlpf_popularity_check --out /tmp/rlpf_pop
Writes <out>/rlpf_popularity_check.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess

import numpy as np


def _machine() -> str:
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith("Model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _rows(examples, train_examples):
  from persona_jax.evaluation import baselines
  answers = [e["answer_index"] for e in examples]
  return {
      "chance": baselines.chance([e["options"] for e in examples]),
      "popularity (train counts)": baselines.popularity([e["option_popularity"] for e in examples],
                                                       answers),
      "majority class (train labels)": baselines.majority_class(
          [e["label"] for e in train_examples], [e["options"] for e in examples], answers),
      "user's history majority": baselines.history_majority(
          [e["history_option_counts"] for e in examples], answers),
  }


def _old_uniform_next_movie(seed: int, num_history: int):
  """The pre-issue-14 design: 3 distractors uniform over titles rated by train users, unseen."""
  from persona_jax.data import choice_tasks as ct
  from persona_jax.evaluation import baselines
  from persona_jax.rlpf import tasks
  splits = tasks._movielens(1, seed)  # pylint: disable=protected-access
  counts = ct.item_counts(splits["train"])
  title_count: dict[str, int] = {}
  pool = sorted({i.title for u in splits["train"] for i in u.interactions})
  for user in splits["train"]:
    for i in user.interactions + user.heldout:
      title_count[i.title] = counts.get(i.item_id, 0)
  rows = {}
  for split in ("validation", "test"):
    option_counts, answers = [], []
    for user in splits[split]:
      rng = ct.user_rng(seed, user.user_id, "old")
      seen = {i.title for i in user.interactions + user.heldout}
      distractors = ct.uniform_distractors(user.heldout[0].title, pool, excluded=seen, rng=rng)
      options, answer = ct.place_answer(user.heldout[0].title, distractors, rng)
      option_counts.append([title_count.get(o, 0) for o in options])
      answers.append(answer)
    rows[split] = baselines.popularity(option_counts, answers)
  return np.concatenate([rows["validation"], rows["test"]])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_history", type=int, default=50)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="/tmp/rlpf_popularity_check")
  args = parser.parse_args()
  from persona_jax.evaluation import baselines
  from persona_jax.rlpf import tasks

  designs = [(name, {}) for name in tasks.TASKS]
  designs.insert(2, ("movielens_favorite_genre", {"genre_label": "count"}))
  sections, report = [], {}
  for name, options in designs:
    label = name + "".join(f" ({k}={v})" for k, v in options.items())
    kwargs = dict(num_history=args.num_history, seed=args.seed, **options)
    heldout = tasks.heldout_examples(name, **kwargs)
    train = list(tasks.build_examples(name, "train", **kwargs))
    for group, examples in (("held-out users (validation + test)", heldout),
                            ("train users", train)):
      rows = _rows(examples, train)
      if group == "train users":  # their own labels are among the train labels: not a baseline
        del rows["majority class (train labels)"]
      if name == "movielens_future_movie" and group.startswith("held-out") and not options:
        rows["popularity, OLD uniform distractors"] = _old_uniform_next_movie(args.seed,
                                                                              args.num_history)
      table, result = baselines.comparison_table(rows, reference="chance",
                                                 title=f"{label}: {group}")
      sections.append(table)
      report[f"{label}: {group}"] = result
      print(table, flush=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  footer = (f"Command: `python -m benchmarks.rlpf_popularity_check --num_history {args.num_history} "
            f"--seed {args.seed}`; machine: {_machine()}; date: {stamp}.\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "rlpf_popularity_check.md"), "w") as f:
    f.write("\n".join(sections) + "\n" + footer)
  with open(os.path.join(args.out, "rlpf_popularity_check.json"), "w") as f:
    json.dump({"args": vars(args), "tables": report, "machine": _machine(), "date": stamp}, f,
              indent=1)
  print(footer)


if __name__ == "__main__":
  main()
