"""MiLP evaluation library: prompts, greedy responses, ROUGE-L / Persona-F1 scores, the results table.

The decoder continues the prompt ("...\\n<speaker>:") greedily; the response is the text up to the
first newline (a newline token stops generation). Prompts longer than `max_prompt_tokens` are an
error, never truncated.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from persona_jax import sampling
from persona_jax.errors import UserError
from persona_jax.milp import tasks

# The systems of the results table, in order.
SYSTEMS = ("no_memory", "memory_as_prompt", "single_lora", "milp_searched")


def memory_prompt(user: tasks.User, example: tasks.HeldOutExample, history_turns: int) -> str:
  """The memory-as-prompt baseline: persona lines and the last `history_turns` past turns first."""
  history = list(user.history[-history_turns:]) if history_turns > 0 else []
  lines = [f"Persona: {fact}" for fact in user.persona] + history
  return "\n".join(lines) + "\n" + example.prompt


def generate_responses(decoder, vocabulary, prompts: Sequence[str], *, max_new_tokens: int,
                       max_prompt_tokens: int, batch_size: int = 8) -> list[str]:
  """Greedy continuations of `prompts` (`sampling.generate_in_batches`), each cut at its first
  newline and stripped."""
  newline = vocabulary.encode("\n")
  stop_tokens = [vocabulary.eos_id] + (list(newline) if len(newline) == 1 else [])
  encoded = [list(vocabulary.encode(prompt)) for prompt in prompts]
  for prompt, ids in zip(prompts, encoded):
    if len(ids) > max_prompt_tokens:
      raise UserError(f"milp: a prompt has {len(ids)} tokens, more than milp.job.max_prompt_tokens="
                      f"{max_prompt_tokens} (prompt starts {prompt[:60]!r}); raise max_prompt_tokens "
                      "or use fewer context/history turns.")
  generations = sampling.generate_in_batches(
      decoder, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
      decode=vocabulary.decode, stop_tokens=stop_tokens, prompt_length=max_prompt_tokens)
  return [text.split("\n")[0].strip() for text in generations.texts]


def score(responses: Sequence[str], examples: Sequence[tuple[tasks.User, tasks.HeldOutExample]]
          ) -> dict[str, float]:
  """Mean ROUGE-L F and Persona-F1 over the examples (and how many there were)."""
  rouge = [tasks.rouge_l(r, ex.response) for r, (_, ex) in zip(responses, examples)]
  persona = [tasks.persona_f1(r, user.persona) for r, (user, _) in zip(responses, examples)]
  return {"rouge_l": statistics.fmean(rouge), "persona_f1": statistics.fmean(persona),
          "num_responses": float(len(rouge))}


def example_rows(system: str, responses: Sequence[str],
                 examples: Sequence[tuple[tasks.User, tasks.HeldOutExample]]) -> list[dict]:
  """One row per scored response (for paired statistics later)."""
  return [{"system": system, "user_id": user.user_id, "prompt": ex.prompt, "response": response,
           "reference": ex.response, "rouge_l": tasks.rouge_l(response, ex.response),
           "persona_f1": tasks.persona_f1(response, user.persona)}
          for response, (user, ex) in zip(responses, examples)]


def results_table(results: dict, title: str) -> str:
  """Markdown: ROUGE-L and Persona-F1 of each system in `results` ({system: scores})."""
  lines = [f"### {title}", "", "| system | ROUGE-L | Persona-F1 | responses |", "|---|---|---|---|"]
  for system in SYSTEMS:
    if system in results:
      r = results[system]
      lines.append(f"| {system} | {r['rouge_l']:.4f} | {r['persona_f1']:.4f} | "
                   f"{int(r['num_responses'])} |")
  return "\n".join(lines) + "\n"


def trial_table(records: Sequence[dict]) -> str:
  """Markdown: the search's trials (layout, feasibility, dev scores, seconds)."""
  lines = ["| trial | layers | rank | learning rate | feasible | dev ROUGE-L | dev Persona-F1 | seconds |",
           "|---|---|---|---|---|---|---|---|"]
  for r in records:
    layout = r["layout"]
    scores = (f"{r['rouge_l']:.4f} | {r['persona_f1']:.4f}" if r["feasible"] else "- | -")
    lines.append(f"| {r['trial']} | {layout['layers']} | {layout['rank']} | "
                 f"{layout['learning_rate']:.2e} | {'yes' if r['feasible'] else 'no'} | {scores} | "
                 f"{r['seconds']} |")
  return "\n".join(lines) + "\n"
