"""RLPF evaluation: predictor accuracy from (a) the full history text, (b) a summary by the initial
policy (zero-shot), (c) a summary by the trained policy; summary lengths and context reduction."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from persona_jax import sampling
from persona_jax.rlpf.model import Predictor, TextCodec, summarizer_prompt


def summarizer_prompts(codec: TextCodec, examples: Sequence[dict]) -> list[list[int]]:
  return [codec.prompt(summarizer_prompt(e["history_text"], e["domain"])) for e in examples]


def generate_summaries(decoder, codec: TextCodec, examples: Sequence[dict], *, max_summary_tokens: int,
                       batch_size: int = 8, temperature: float = 0.0, seed: int = 0
                       ) -> tuple[list[str], np.ndarray]:
  """Summaries (text, without the stop token) and their token counts `[num_examples]`; greedy by
  default."""
  prompts = summarizer_prompts(codec, examples)
  prompt_width = -(-max(len(p) for p in prompts) // 16) * 16  # one shape for every batch
  texts, lengths = [], []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a full last batch: same shape
    result = sampling.generate(decoder, chunk, max_new_tokens=max_summary_tokens,
                               temperature=temperature, rng=jax.random.key(seed + start),
                               stop_tokens=codec.stop_ids, pad_id=codec.pad_id,
                               prompt_bucket=prompt_width)
    tokens, counts, done = (np.asarray(result.tokens), np.asarray(result.lengths),
                            np.asarray(result.done))
    for row in range(min(batch_size, len(prompts) - start)):
      ids = tokens[row, :counts[row] - int(done[row])]
      texts.append(codec.decode(ids))
      lengths.append(len(ids))
  return texts, np.asarray(lengths, np.int32)


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


def evaluate_contexts(predictor: Predictor, codec: TextCodec, examples: Sequence[dict],
                      summarizers: dict, *, max_summary_tokens: int, batch_size: int = 8
                      ) -> dict[str, dict]:
  """Side by side on `examples`: "full_history" plus one entry per summarizer (name -> decoder).

  Each entry: accuracy, mean context tokens (history tokens for full_history, summary tokens else),
  and for summaries the context reduction vs the full history and the share of empty summaries.
  """
  history_tokens = np.array([len(codec.encode(e["history_text"])) for e in examples])
  results = {"full_history": {
      "accuracy": accuracy(predictor_choices(predictor, [e["history_text"] for e in examples],
                                             examples, context_name="User history",
                                             batch_size=batch_size), examples),
      "context_tokens": float(history_tokens.mean())}}
  for name, decoder in summarizers.items():
    texts, lengths = generate_summaries(decoder, codec, examples,
                                        max_summary_tokens=max_summary_tokens, batch_size=batch_size)
    empty = np.array([not t.strip() for t in texts])
    # An empty summary is still shown to the predictor (as an empty context) at evaluation time.
    choices = predictor_choices(predictor, texts, examples, context_name="User summary",
                                batch_size=batch_size)
    results[name] = {
        "accuracy": accuracy(choices, examples), "context_tokens": float(lengths.mean()),
        "context_reduction": float(history_tokens.mean() / max(lengths.mean(), 1e-9)),
        "empty_summaries": float(empty.mean()), "examples": texts[:3]}
  return results
