"""MiLP evaluation: generate each held-out response, score it by ROUGE-L and Persona-F1.

The decoder continues the prompt ("...\\n<speaker>:") greedily; the response is the text up to the
first newline (a newline token stops generation). Prompts longer than `max_prompt_tokens` are an
error, never truncated.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np

from persona_jax import sampling
from persona_jax.milp import tasks


def memory_prompt(user: tasks.User, example: tasks.HeldOutExample, history_turns: int) -> str:
  """The memory-as-prompt baseline: persona lines and the last `history_turns` past turns first."""
  history = list(user.history[-history_turns:]) if history_turns > 0 else []
  lines = [f"Persona: {fact}" for fact in user.persona] + history
  return "\n".join(lines) + "\n" + example.prompt


def generate_responses(decoder, vocabulary, prompts: Sequence[str], *, max_new_tokens: int,
                       max_prompt_tokens: int, batch_size: int = 8) -> list[str]:
  """Greedy continuations of `prompts`, each cut at its first newline and stripped."""
  newline = vocabulary.encode("\n")
  stop_tokens = [vocabulary.eos_id] + (list(newline) if len(newline) == 1 else [])
  encoded = [list(vocabulary.encode(prompt)) for prompt in prompts]
  for prompt, ids in zip(prompts, encoded):
    if len(ids) > max_prompt_tokens:
      raise ValueError(f"milp: a prompt has {len(ids)} tokens, more than milp.job.max_prompt_tokens="
                       f"{max_prompt_tokens} (prompt starts {prompt[:60]!r}); raise max_prompt_tokens or "
                       "use fewer context/history turns.")
  responses = []
  for start in range(0, len(encoded), batch_size):
    chunk = encoded[start:start + batch_size]
    rows = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - rows)  # one batch shape: one compilation
    result = sampling.generate(decoder, chunk, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                               prompt_bucket=max_prompt_tokens)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    for row in range(rows):
      text = vocabulary.decode([int(t) for t in tokens[row, :lengths[row]]])
      responses.append(text.split("\n")[0].strip())
  return responses


def score(responses: Sequence[str], examples: Sequence[tuple[tasks.User, tasks.HeldOutExample]]
          ) -> dict[str, float]:
  """Mean ROUGE-L F and Persona-F1 over the examples (and how many there were)."""
  rouge = [tasks.rouge_l(r, ex.response) for r, (_, ex) in zip(responses, examples)]
  persona = [tasks.persona_f1(r, user.persona) for r, (user, _) in zip(responses, examples)]
  return {"rouge_l": statistics.fmean(rouge), "persona_f1": statistics.fmean(persona),
          "num_responses": float(len(rouge))}
