"""Calibration baselines, reported in the same table as the method, with the same CIs.

A method that personalizes must beat answers that use no personal information (chance, the
majority class, item popularity) and cheap uses of it (the user's own history majority, no context
at all, the history cut to the same token budget as the method's summary or embedding). Every
function here takes per-example task data and returns per-example correctness (float, one per
example; ties between the top options give fractional credit 1/#tied, the expected correctness of
a uniformly random tie-break), so `persona_jax.evaluation.stats` gives CIs and paired differences
against the method on the same examples:

  chance(options)                                 1 / number of options
  argmax_correct(scores, answers)                 the scorer picks the highest score
  popularity(option_counts, answers)              the option most interacted with by TRAIN users
  majority_class(train_labels, options, answers)  the option that is most often the TRAIN label
  history_majority(history_counts, answers)       the option most frequent in the user's history
  truncate_to_tokens(ids, budget)                 the history cut to a token budget (most recent)
  recall_at_k(ranked, targets, k)                 generative next item over the whole catalogue
  popularity_ranking(counts, excluded, k)         the popularity baseline for Recall@K
  comparison_table(rows, reference=...)           markdown + JSON: mean [95% CI], paired diffs

"No context" is the method's own predictor scored with an empty context (the room does that: it
has the predictor); its per-example correctness goes into `comparison_table` like any other row.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from persona_jax.errors import UserError
from persona_jax.evaluation import stats


def _answers(answers: Sequence[int], num: int) -> np.ndarray:
  array = np.asarray(answers, np.int64).reshape(-1)
  if array.size != num:
    raise UserError(f"baselines: {array.size} answers for {num} examples.")
  return array


def argmax_correct(scores: Sequence[Sequence[float]], answers: Sequence[int]) -> np.ndarray:
  """Per-example correctness of picking the highest-scoring option: 1/#tied if the answer is among
  the tied maxima, else 0. `scores`: per example, one score per option (lists may differ in length)."""
  rows = [np.asarray(row, np.float64).reshape(-1) for row in scores]
  answers = _answers(answers, len(rows))
  out = np.zeros(len(rows), np.float64)
  for index, (row, answer) in enumerate(zip(rows, answers)):
    if not 0 <= answer < row.size:
      raise UserError(f"baselines: answer index {answer} outside {row.size} options (example "
                       f"{index}).")
    if np.any(np.isnan(row)):
      raise UserError(f"baselines: NaN score in example {index}.")
    best = row == row.max()
    out[index] = best[answer] / best.sum()
  return out


def chance(options: Sequence[Sequence[str]]) -> np.ndarray:
  """1 / number of options, per example."""
  return np.asarray([1.0 / len(o) for o in options], np.float64)


def popularity(option_counts: Sequence[Sequence[float]], answers: Sequence[int]) -> np.ndarray:
  """Pick the option with the most interactions by TRAIN users (`option_counts`: per example, each
  option's train count)."""
  return argmax_correct(option_counts, answers)


def majority_class(train_labels: Iterable[str], options: Sequence[Sequence[str]],
                   answers: Sequence[int]) -> np.ndarray:
  """Pick the option that is most often the right answer among TRAIN examples."""
  frequency: dict[str, int] = {}
  for label in train_labels:
    frequency[label] = frequency.get(label, 0) + 1
  if not frequency:
    raise UserError("majority_class: no train labels.")
  return argmax_correct([[frequency.get(o, 0) for o in row] for row in options], answers)


def history_majority(history_counts: Sequence[Sequence[float]], answers: Sequence[int]) -> np.ndarray:
  """Pick the option most frequent in the user's own history (e.g. the history's top genre);
  `history_counts`: per example, each option's count in that user's history."""
  return argmax_correct(history_counts, answers)


def truncate_to_tokens(ids: Sequence[int], budget: int) -> list[int]:
  """The last `budget` tokens of `ids` (the most recent part of a history, oldest first)."""
  if budget < 0:
    raise UserError(f"truncate_to_tokens: budget must be >= 0, got {budget}.")
  ids = list(ids)
  return ids[len(ids) - budget:] if budget else []


def truncate_text_to_tokens(text: str, budget: int, encode: Callable[[str], Sequence[int]],
                            decode: Callable[[Sequence[int]], str]) -> str:
  """`text` cut to its last `budget` tokens (same tokenizer as the method's context)."""
  return decode(truncate_to_tokens(encode(text), budget))


def recall_at_k(ranked: Sequence[Sequence[str]], targets: Sequence[str | Iterable[str]], k: int
                ) -> np.ndarray:
  """Per-example Recall@K: the share of a user's target items among their top-k ranked items (a
  single target: 1 if it is in the top k, else 0). `ranked`: per user, item ids best first."""
  if k < 1:
    raise UserError(f"recall_at_k: k must be >= 1, got {k}.")
  if len(ranked) != len(targets):
    raise UserError(f"recall_at_k: {len(ranked)} rankings for {len(targets)} targets.")
  out = np.zeros(len(ranked), np.float64)
  for index, (row, target) in enumerate(zip(ranked, targets)):
    wanted = {target} if isinstance(target, str) else set(target)
    if not wanted:
      raise UserError(f"recall_at_k: example {index} has no target.")
    out[index] = len(wanted & set(list(row)[:k])) / len(wanted)
  return out


def popularity_ranking(counts: Mapping[str, int], excluded: Iterable[str] = (), k: int | None = None
                       ) -> list[str]:
  """Items by TRAIN count (ties by id), without `excluded` (the user's seen items); the top k."""
  excluded = set(excluded)
  ranked = [item for item in sorted(counts, key=lambda item: (-counts[item], item))
            if item not in excluded]
  return ranked if k is None else ranked[:k]


def comparison_table(rows: Mapping[str, Sequence[float]], *, reference: str | None = None,
                     extra: Mapping[str, Mapping[str, str]] | None = None, title: str = "",
                     digits: int = 3, seed: int = 0) -> tuple[str, dict]:
  """Markdown and JSON: each row's mean with a 95% bootstrap CI, and (with `reference`) the paired
  difference row - reference with its CI and sign-flip p-value, on the same examples.

  rows: name -> per-example values (all the same length: the same examples).
  extra: name -> {column: text} extra columns (e.g. context tokens, reduction).
  """
  if not rows:
    raise UserError("comparison_table: no rows.")
  sizes = {name: len(values) for name, values in rows.items()}
  if len(set(sizes.values())) != 1:
    raise UserError(f"comparison_table: rows are not on the same examples: {sizes}.")
  if reference is not None and reference not in rows:
    raise UserError(f"comparison_table: reference {reference!r} is not a row ({list(rows)}).")
  extra = extra or {}
  columns = sorted({column for values in extra.values() for column in values})
  header = ["row", "mean [95% CI]"] + ([f"- {reference} [95% CI]", "p"] if reference else []) + columns
  lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                     "|" + "---|" * len(header)]
  results: dict[str, dict] = {}
  for name, values in rows.items():
    estimate = stats.mean_ci(values, seed=seed)
    result = {"mean": estimate.as_dict()}
    cells = [name, estimate.format(digits)]
    if reference is not None:
      if name == reference:
        cells += ["-", "-"]
      else:
        difference = stats.paired_difference(values, rows[reference], seed=seed)
        result["minus_reference"] = difference.as_dict()
        cells += [difference.format(digits), f"{difference.p_value:.3g}"]
    cells += [extra.get(name, {}).get(column, "") for column in columns]
    result.update(extra.get(name, {}))
    results[name] = result
    lines.append("| " + " | ".join(cells) + " |")
  count = next(iter(sizes.values()))
  lines.append("")
  lines.append(f"{count} examples; 95% percentile-bootstrap CIs"
               + (f"; differences paired on the same examples vs {reference} (sign-flip p)"
                  if reference else "") + ".")
  return "\n".join(lines) + "\n", {"examples": count, "reference": reference, "rows": results}
