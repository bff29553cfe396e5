"""User-LLM evaluation (a library; the jobs are in job.py): multiple-choice accuracy / Recall@K over
held-out users; for review generation (task amazon_review) greedy generation with
`persona_jax.sampling` and ROUGE-Lsum; the markdown table the jobs write as `eval_table.md`.

Generation works with both integrations: cross-attention passes the user tokens to the gated
cross-attention hooks as `side_inputs`; the soft prompt prefills them as input embeddings.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import jax
import numpy as np
from flax import nnx

from persona_jax import sampling
from persona_jax.user_llm import model as model_lib
from persona_jax.user_llm import tasks


@nnx.jit(static_argnums=2)
def option_logits(model: nnx.Module, batch: dict, method: str):
  """`[B, C]` option logits of a User-LLM (`method='user_llm'`) or a plain decoder ('text_prompt')."""
  if method == "user_llm":
    return model.option_logits(batch)
  return model_lib.text_prompt_option_logits(model, batch)


def evaluate_choices(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]], method: str,
                     recall_at=(1, 3)) -> dict[str, float]:
  """accuracy, Recall@K and mean option cross-entropy over all batches (every example once)."""
  logits, labels = [], []
  for batch in batches:
    logits.append(np.asarray(option_logits(model, batch, method)))
    labels.append(batch["label"])
  if not logits:
    raise ValueError("evaluate_choices: the evaluation split is empty.")
  logits_all, labels_all = np.concatenate(logits), np.concatenate(labels)
  metrics = tasks.choice_metrics(logits_all, labels_all, recall_at)
  log_probs = jax.nn.log_softmax(logits_all.astype(np.float64), axis=-1)
  metrics["choice_ce"] = float(-np.take_along_axis(np.asarray(log_probs), labels_all[:, None], 1).mean())
  metrics["examples"] = float(len(labels_all))
  return metrics


@nnx.jit(static_argnums=2)
def _review_loss(model: nnx.Module, batch: dict, method: str):
  return model_lib.review_loss(model_lib.review_logits(model, batch, method), batch)[0]


@nnx.jit
def _user_tokens(model: model_lib.UserLLM, features: dict):
  return model.user_tokens(features)


@nnx.jit
def _soft_prompt_inputs(model: model_lib.UserLLM, features: dict, prompt_tokens, prompt_mask):
  return model.soft_prompt_inputs(features, prompt_tokens, prompt_mask)


def generate_reviews(model: nnx.Module, batch: dict, method: str, vocabulary, max_new_tokens: int
                     ) -> tuple[list[str], np.ndarray]:
  """Greedy continuations of the batch's LEFT-padded prompts, up to `max_new_tokens` tokens or EOS.

  `method='user_llm'`: with the cross-attention integration the user tokens of the batch's
  histories are passed as `side_inputs` to both `sampling.prefill` and `sampling.decode`, so every
  prompt and generated token attends to them; with the soft prompt they are prefilled as input
  embeddings before the prompt (`sampling.prefill(..., embeddings=...)`) and stay in the cache.
  `method='text_prompt'`: the plain decoder.
  Returns (decoded texts without the EOS, int32 `[B, max_new_tokens]` generated ids).
  """
  prompt_tokens, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
  embeddings, side_inputs = None, None
  if method == "user_llm":
    features = {name: batch[name] for name in (*tasks.HISTORY_FEATURES, "history_mask")}
    decoder = model.decoder
    if model.integration == "cross_attention":
      side_inputs = {"user_tokens": _user_tokens(model, features)}
    else:
      embeddings, prompt_mask = _soft_prompt_inputs(model, features, prompt_tokens, prompt_mask)
      prompt_tokens = None
  else:
    decoder = model
  prompt_length = prompt_mask.shape[1]
  state = sampling.prefill(decoder, prompt_tokens, prompt_mask,
                           sampling.round_up(prompt_length + max_new_tokens, 64),
                           side_inputs=side_inputs, embeddings=embeddings)
  result = sampling.decode(decoder, state, max_new_tokens=max_new_tokens, stop_tokens=(vocabulary.eos_id,),
                           pad_id=vocabulary.pad_id, side_inputs=side_inputs)
  tokens, lengths, done = (np.asarray(x) for x in (result.tokens, result.lengths, result.done))
  texts = [vocabulary.decode([int(t) for t in row[:length - int(stopped)]])
           for row, length, stopped in zip(tokens, lengths, done)]
  return texts, tokens


def evaluate_reviews(model: nnx.Module, batches: Iterable[dict], method: str, vocabulary, max_new_tokens: int,
                     samples: list | None = None) -> dict[str, float]:
  """ROUGE-Lsum of greedy generations against the full references (`ReviewBatches(references=True)`),
  teacher-forced `target_ce`, `examples`, and `targets_truncated` (targets cut to the batch width
  for `target_ce`). Appends (reference, generated) pairs to `samples` if given."""
  predictions, references, ce, counts, truncated = [], [], [], [], 0
  for batch in batches:
    arrays = {name: value for name, value in batch.items() if name != "references"}
    ce.append(float(_review_loss(model, arrays, method)) * float(arrays["target_mask"].sum()))
    counts.append(float(arrays["target_mask"].sum()))
    texts, _ = generate_reviews(model, arrays, method, vocabulary, max_new_tokens)
    predictions += texts
    references += batch["references"]
    truncated += int(arrays["target_truncated"].sum())
  if not predictions:
    raise ValueError("evaluate_reviews: the evaluation split is empty.")
  if samples is not None:
    samples.extend(zip(references, predictions))
  return {"rougeLsum": tasks.rouge_lsum(predictions, references), "target_ce": sum(ce) / sum(counts),
          "examples": float(len(predictions)), "targets_truncated": float(truncated)}


def format_metrics(metrics: Mapping[str, float]) -> str:
  return ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))


def format_table(columns: Mapping[str, Mapping[str, float]], title: str = "") -> str:
  """Markdown table: one row per metric, one column per model (e.g. untrained, trained)."""
  names = sorted({name for metrics in columns.values() for name in metrics})
  lines = [f"{title}\n" if title else "", "| metric | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name in names:
    cells = [f"{metrics[name]:.4f}" if name in metrics else "" for metrics in columns.values()]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(line for line in lines if line)
