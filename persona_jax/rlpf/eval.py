"""RLPF evaluation (a library): the frozen predictor's per-example correctness from every context,
beside the calibration baselines, in one table with 95% CIs.

Rows (all on the same held-out users, so differences are paired):
  chance, popularity, majority_class, history_majority     no model (`persona_jax.evaluation.baselines`)
  no_context                                               the predictor with an empty context
  full_history                                             the whole shown history text
  zero_shot_summary / rlpf_summary                         greedy summaries of the initial / trained policy
  truncated_history@<summary>                              each user's history cut to the same number
                                                           of tokens as that user's <summary>
Every predictor row is scored with the mean log-prob per option token (the default, the table's
main column) and with the sum (`accuracy (sum scoring)`), both reported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from persona_jax import sampling
from persona_jax.evaluation import baselines, stats
from persona_jax.rlpf.model import Predictor, TextCodec, summarizer_prompt

PRIOR_ROWS = ("chance", "popularity", "majority_class", "history_majority")


def summarizer_prompts(codec: TextCodec, examples: Sequence[dict]) -> list[list[int]]:
  return [codec.prompt(summarizer_prompt(e["history_text"], e["domain"])) for e in examples]


def generate_summaries(decoder, codec: TextCodec, examples: Sequence[dict], *, max_summary_tokens: int,
                       batch_size: int = 8) -> tuple[list[str], np.ndarray]:
  """Greedy summaries (text, without the stop token) and their token counts `[num_examples]`."""
  out = sampling.generate_in_batches(decoder, summarizer_prompts(codec, examples),
                                     max_new_tokens=max_summary_tokens, batch_size=batch_size,
                                     decode=codec.decode, stop_tokens=codec.stop_ids,
                                     pad_id=codec.pad_id)
  return list(out.texts), np.asarray([len(ids) for ids in out.token_ids], np.int32)


def predictor_scores(predictor: Predictor, contexts: Sequence[str], examples: Sequence[dict], *,
                     context_name: str, batch_size: int = 8) -> dict[str, list[np.ndarray]]:
  """{"mean", "sum"}: per example, the predictor's score of each option given its context."""
  out: dict[str, list[np.ndarray]] = {"mean": [], "sum": []}
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    scores = predictor.option_scores(list(contexts[start:start + batch_size]),
                                     [e["question"] for e in chunk], [e["options"] for e in chunk],
                                     context_name=context_name)
    for name in out:
      out[name].extend(scores[name])
  return out


def context_row(predictor: Predictor, contexts: Sequence[str], examples: Sequence[dict], *,
                context_name: str, context_tokens: Sequence[float], batch_size: int = 8) -> dict:
  """Per-example correctness of the predictor given `contexts` (mean and sum scoring)."""
  scores = predictor_scores(predictor, contexts, examples, context_name=context_name,
                            batch_size=batch_size)
  answers = [e["answer_index"] for e in examples]
  correct = baselines.argmax_correct(scores["mean"], answers)
  correct_sum = baselines.argmax_correct(scores["sum"], answers)
  return {"correct": correct.tolist(), "correct_sum": correct_sum.tolist(),
          "accuracy": float(correct.mean()), "accuracy_sum": float(correct_sum.mean()),
          "context_tokens": float(np.mean(context_tokens)),
          "token_counts": [float(t) for t in context_tokens]}


def history_tokens(codec: TextCodec, examples: Sequence[dict]) -> np.ndarray:
  return np.array([len(codec.encode(e["history_text"])) for e in examples], np.float64)


def history_context(predictor: Predictor, codec: TextCodec, examples: Sequence[dict], *,
                    batch_size: int = 8) -> dict:
  """The "full_history" row."""
  return context_row(predictor, [e["history_text"] for e in examples], examples,
                     context_name="User history", context_tokens=history_tokens(codec, examples),
                     batch_size=batch_size)


def no_context(predictor: Predictor, examples: Sequence[dict], *, batch_size: int = 8) -> dict:
  """The "no_context" row: the predictor's prior over the options (an empty context)."""
  return context_row(predictor, [""] * len(examples), examples, context_name="User history",
                     context_tokens=[0.0] * len(examples), batch_size=batch_size)


def truncated_history(predictor: Predictor, codec: TextCodec, examples: Sequence[dict],
                      budgets: Sequence[float], *, batch_size: int = 8) -> dict:
  """Each user's history text cut to its last `budgets[i]` tokens (the same count as a summary)."""
  texts = [baselines.truncate_text_to_tokens(e["history_text"], int(b), codec.encode, codec.decode)
           for e, b in zip(examples, budgets)]
  return context_row(predictor, texts, examples, context_name="User history",
                     context_tokens=[len(codec.encode(t)) if t else 0 for t in texts],
                     batch_size=batch_size)


def summary_context(decoder, predictor: Predictor, codec: TextCodec, examples: Sequence[dict], *,
                    max_summary_tokens: int, history_tokens: float, batch_size: int = 8) -> dict:
  """One summarizer's row: correctness from its greedy summaries, their length, the context
  reduction vs the full history, the share of empty summaries and three example summaries."""
  texts, lengths = generate_summaries(decoder, codec, examples,
                                      max_summary_tokens=max_summary_tokens, batch_size=batch_size)
  empty = np.array([not t.strip() for t in texts])
  # An empty summary is still shown to the predictor (as an empty context) at evaluation time.
  row = context_row(predictor, texts, examples, context_name="User summary",
                    context_tokens=lengths, batch_size=batch_size)
  row.update(context_reduction=float(history_tokens / max(lengths.mean(), 1e-9)),
             empty_summaries=float(empty.mean()), examples=texts[:3])
  return row


def prior_rows(examples: Sequence[dict], train_labels: Sequence[str]) -> dict[str, dict]:
  """chance / popularity / majority class / history majority (no model), per example."""
  answers = [e["answer_index"] for e in examples]
  values = {
      "chance": baselines.chance([e["options"] for e in examples]),
      "popularity": baselines.popularity([e["option_popularity"] for e in examples], answers),
      "majority_class": baselines.majority_class(train_labels, [e["options"] for e in examples],
                                                 answers),
      "history_majority": baselines.history_majority([e["history_option_counts"] for e in examples],
                                                     answers),
  }
  return {name: {"correct": v.tolist(), "accuracy": float(v.mean()), "context_tokens": 0.0}
          for name, v in values.items()}


def evaluate_contexts(predictor: Predictor, codec: TextCodec, examples: Sequence[dict],
                      summarizers: dict, *, max_summary_tokens: int, batch_size: int = 8,
                      known: dict | None = None, train_labels: Sequence[str] | None = None
                      ) -> dict[str, dict]:
  """Side by side on `examples`: the prior rows (when the examples carry `option_popularity` and
  `train_labels` is given), no context, the full history, one row per summarizer (name -> decoder)
  and the history truncated to each summarizer's per-user token counts.

  known: rows already computed on the same examples (they do not change during training: the priors,
  no context, full history, the zero-shot summary and its truncation); reused, not recomputed.
  """
  known = dict(known or {})
  results: dict[str, dict] = {}
  if train_labels is not None and all("option_popularity" in e for e in examples):
    results.update(known.get("_priors") or prior_rows(examples, train_labels))
  results["no_context"] = known.get("no_context") or no_context(predictor, examples,
                                                                batch_size=batch_size)
  results["full_history"] = known.get("full_history") or history_context(
      predictor, codec, examples, batch_size=batch_size)
  for name, decoder in summarizers.items():
    results[name] = known.get(name) or summary_context(
        decoder, predictor, codec, examples, max_summary_tokens=max_summary_tokens,
        history_tokens=results["full_history"]["context_tokens"], batch_size=batch_size)
    truncated = f"truncated_history@{name}"
    results[truncated] = known.get(truncated) or truncated_history(
        predictor, codec, examples, results[name]["token_counts"], batch_size=batch_size)
  return results


def format_table(results: dict[str, dict], title: str, reference: str = "zero_shot_summary") -> str:
  """Markdown: every row's accuracy with its 95% CI (mean log-prob scoring), the paired difference
  from `reference` with its CI and p-value, the sum-scored accuracy, mean context tokens and the
  reduction vs the full history."""
  rows = {name: row["correct"] for name, row in results.items()}
  extra = {}
  for name, row in results.items():
    cells = {"context tokens": f"{row['context_tokens']:.1f}"}
    if "correct_sum" in row:
      cells["accuracy (sum scoring) [95% CI]"] = stats.mean_ci(row["correct_sum"]).format()
    if "context_reduction" in row:
      cells["reduction vs history"] = f"{row['context_reduction']:.1f}x"
    if "empty_summaries" in row:
      cells["empty summaries"] = f"{row['empty_summaries']:.2f}"
    extra[name] = cells
  markdown, _ = baselines.comparison_table(rows, reference=reference if reference in rows else None,
                                           extra=extra, title=title)
  return markdown


def accuracy(choices: np.ndarray, examples: Sequence[dict]) -> float:
  return float(np.mean(choices == np.array([e["answer_index"] for e in examples])))
