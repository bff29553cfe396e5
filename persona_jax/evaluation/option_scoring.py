"""Scoring multiple-choice options by a language model's log-probabilities.

An option is scored as a continuation of the prompt. The sum of its tokens' log-probabilities
favours short options (every extra token costs); the mean per token does not, so it is the default.
Both are returned, and a method reports both:

  scores = option_scores(token_logprobs, option_mask)           # {"mean", "sum", "num_tokens"}
  choice = scores["mean"].argmax(-1)

`token_logprobs` `[..., T]`: log p(token) of each option token (`persona_jax.nn.logprobs`), and
`option_mask` `[..., T]`: 1 on the option's tokens, 0 on padding. An option with no token is an
error (its mean is undefined).
"""

from __future__ import annotations

import numpy as np

from persona_jax.errors import UserError

REDUCTIONS = ("mean", "sum")


def option_scores(token_logprobs, option_mask) -> dict[str, np.ndarray]:
  """{"sum": sum of the option's log-probs, "mean": sum / number of option tokens, "num_tokens"}
  over the last axis (fp64)."""
  logprobs = np.asarray(token_logprobs, np.float64)
  mask = np.asarray(option_mask, np.float64)
  if logprobs.shape != mask.shape:
    raise UserError(f"option_scores: log-probs {logprobs.shape} and mask {mask.shape} differ.")
  num_tokens = mask.sum(axis=-1)
  if np.any(num_tokens <= 0):
    raise UserError(f"option_scores: {int(np.sum(num_tokens <= 0))} option(s) with no token.")
  total = (logprobs * mask).sum(axis=-1)
  return {"sum": total, "mean": total / num_tokens, "num_tokens": num_tokens}


def reduce_options(scores: dict[str, np.ndarray], reduction: str = "mean") -> np.ndarray:
  """The chosen reduction's scores (`reduction` in REDUCTIONS)."""
  if reduction not in REDUCTIONS:
    raise UserError(f"option reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  return scores[reduction]
