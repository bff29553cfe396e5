"""RLPF evaluation (a library): predictor accuracy from (a) the full history text, (b) a summary by
the initial policy (zero-shot), (c) a summary by the trained policy; summary lengths, context
reduction, and the held-out table."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from persona_jax import sampling
from persona_jax.rlpf.model import Predictor, TextCodec, summarizer_prompt


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


def predictor_choices(predictor: Predictor, contexts: Sequence[str], examples: Sequence[dict], *,
                      context_name: str, batch_size: int = 8) -> np.ndarray:
  """Option index `[num_examples]` the predictor picks given each context."""
  choices = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    scores = predictor.option_logprobs(contexts[start:start + batch_size],
                                       [e["question"] for e in chunk], [e["options"] for e in chunk],
                                       context_name=context_name)
    choices.append(scores.argmax(-1))
  return np.concatenate(choices)


def accuracy(choices: np.ndarray, examples: Sequence[dict]) -> float:
  return float(np.mean(choices == np.array([e["answer_index"] for e in examples])))


def history_context(predictor: Predictor, codec: TextCodec, examples: Sequence[dict], *,
                    batch_size: int = 8) -> dict:
  """The "full_history" row: accuracy with the whole history text, its mean token count."""
  history_tokens = np.array([len(codec.encode(e["history_text"])) for e in examples])
  choices = predictor_choices(predictor, [e["history_text"] for e in examples], examples,
                              context_name="User history", batch_size=batch_size)
  return {"accuracy": accuracy(choices, examples), "context_tokens": float(history_tokens.mean())}


def summary_context(decoder, predictor: Predictor, codec: TextCodec, examples: Sequence[dict], *,
                    max_summary_tokens: int, history_tokens: float, batch_size: int = 8) -> dict:
  """One summarizer's row: accuracy from its greedy summaries, their length, the context reduction
  vs the full history, the share of empty summaries and three example summaries."""
  texts, lengths = generate_summaries(decoder, codec, examples,
                                      max_summary_tokens=max_summary_tokens, batch_size=batch_size)
  empty = np.array([not t.strip() for t in texts])
  # An empty summary is still shown to the predictor (as an empty context) at evaluation time.
  choices = predictor_choices(predictor, texts, examples, context_name="User summary",
                              batch_size=batch_size)
  return {"accuracy": accuracy(choices, examples), "context_tokens": float(lengths.mean()),
          "context_reduction": float(history_tokens / max(lengths.mean(), 1e-9)),
          "empty_summaries": float(empty.mean()), "examples": texts[:3]}


def evaluate_contexts(predictor: Predictor, codec: TextCodec, examples: Sequence[dict],
                      summarizers: dict, *, max_summary_tokens: int, batch_size: int = 8,
                      known: dict | None = None) -> dict[str, dict]:
  """Side by side on `examples`: "full_history" plus one entry per summarizer (name -> decoder).

  known: rows already computed on the same examples (e.g. "full_history" and "zero_shot_summary",
  which do not change during training); they are reused, not recomputed.
  """
  known = dict(known or {})
  results = {"full_history": known.get("full_history") or history_context(
      predictor, codec, examples, batch_size=batch_size)}
  for name, decoder in summarizers.items():
    results[name] = known.get(name) or summary_context(
        decoder, predictor, codec, examples, max_summary_tokens=max_summary_tokens,
        history_tokens=results["full_history"]["context_tokens"], batch_size=batch_size)
  return results


def format_table(results: dict[str, dict], title: str) -> str:
  """Markdown: one row per context (accuracy, mean context tokens, reduction vs the history)."""
  lines = [f"### {title}", "", "| context | accuracy | context tokens | reduction vs history | "
           "empty summaries |", "|---|---:|---:|---:|---:|"]
  for name, row in results.items():
    reduction = f"{row['context_reduction']:.1f}x" if "context_reduction" in row else "1.0x"
    empty = f"{row['empty_summaries']:.2f}" if "empty_summaries" in row else "-"
    lines.append(f"| {name} | {row['accuracy']:.3f} | {row['context_tokens']:.1f} | {reduction} | "
                 f"{empty} |")
  return "\n".join(lines) + "\n"
