"""MiLP evaluation library: prompts, greedy responses, teacher-forced response loss, ROUGE-L /
Persona-F1 scores, the results table with confidence intervals.

The decoder continues the prompt ("...\\n<speaker>:") greedily; the response is the text up to the
first newline (a newline token stops generation). Prompts longer than `max_prompt_tokens` are an
error, never truncated.

Teacher-forced loss (`response_nll`, the search objective): the mean next-token NLL of the reference
response's tokens (`" " + response + "\\n"`, the text generation would have to produce, newline
included) given the prompt; no generation, one forward pass per batch.

Text memories in the prompt, capped at `memory_tokens` tokens (the context limit that motivates a
parameterized memory): memory as prompt (persona facts first, then the most recent history turns)
and BM25 retrieval as in LaMP (`bm25s`: the user's persona facts and history turns are the documents,
the held-out prompt is the query, the top-k documents in score order). Lines the prompt already shows
(its context turns) are left out of both; whole lines are added in order while they fit.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax import sampling
from persona_jax.evaluation import stats
from persona_jax.nn.logprobs import token_log_probs
from persona_jax.errors import UserError
from persona_jax.milp import tasks

# The systems of the results table, in order.
SYSTEMS = ("no_memory", "memory_as_prompt", "bm25_retrieval", "single_lora", "milp_random",
           "milp_searched")
# The per-example metrics each system is scored by (lower is better for loss).
METRICS = ("loss", "rouge_l", "persona_f1")


def memory_items(user: tasks.User) -> list[str]:
  """What a user's memory holds, one item a line: the lines the parameterized memory is trained on."""
  return [f"Persona: {fact}" for fact in user.persona] + list(user.history)


def capped(lines: Sequence[str], vocabulary, max_tokens: int) -> list[str]:
  """The leading lines of `lines` (in order) whose text, one a line, fits in `max_tokens` tokens."""
  kept, used = [], 0
  for line in lines:
    cost = len(vocabulary.encode(line + "\n"))
    if used + cost > max_tokens:
      break
    kept.append(line)
    used += cost
  return kept


def with_memory(lines: Sequence[str], example: tasks.HeldOutExample) -> str:
  return "".join(line + "\n" for line in lines) + example.prompt


def _not_in_prompt(lines: Sequence[str], example: tasks.HeldOutExample) -> list[str]:
  """The memory lines the example's prompt does not already show (its context turns can be the
  last history turns): a text memory adds only what the prompt lacks."""
  shown = set(example.prompt.split("\n"))
  return [line for line in lines if line not in shown]


def memory_prompt(user: tasks.User, example: tasks.HeldOutExample, history_turns: int,
                  vocabulary=None, max_tokens: int | None = None) -> str:
  """Memory as prompt: the persona facts, then the last `history_turns` past turns not already in the
  prompt (most recent kept first when `max_tokens` caps the memory), in their original order before
  the example's prompt."""
  history = _not_in_prompt(user.history, example)
  history = history[-history_turns:] if history_turns > 0 else []
  persona = [f"Persona: {fact}" for fact in user.persona]
  if max_tokens is None:
    return with_memory(persona + history, example)
  ranked = persona + history[::-1]  # priority: persona, then the most recent turns
  kept = set(capped(ranked, vocabulary, max_tokens))
  return with_memory([line for line in persona + history if line in kept], example)


def bm25_top_k(documents: Sequence[str], query: str, k: int) -> list[str]:
  """The `k` documents BM25 (`bm25s`, Lucene scoring, English stopwords) ranks highest for `query`,
  best first; documents sharing no term with the query (score 0) are not returned."""
  import bm25s  # pylint: disable=g-import-not-at-top
  documents = list(documents)
  if not documents or k <= 0:
    return []
  retriever = bm25s.BM25()
  retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False),
                  show_progress=False)
  query_tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
  indices, scores = retriever.retrieve(query_tokens, k=min(k, len(documents)), show_progress=False)
  return [documents[i] for i, score in zip(indices[0], scores[0]) if score > 0]


def retrieval_prompt(user: tasks.User, example: tasks.HeldOutExample, k: int, vocabulary,
                     max_tokens: int) -> str:
  """BM25 baseline (LaMP): the top-`k` memory items for the example's prompt, best first, capped."""
  retrieved = bm25_top_k(_not_in_prompt(memory_items(user), example), example.prompt, k)
  return with_memory(capped(retrieved, vocabulary, max_tokens), example)


@nnx.jit
def _masked_nll(decoder, inputs, targets, weights):
  nll = -token_log_probs(decoder(inputs).logits, targets)
  return jnp.sum(nll * weights, axis=-1), jnp.sum(weights, axis=-1)


def response_nll(decoder, vocabulary, prompts: Sequence[str], responses: Sequence[str], *,
                 max_prompt_tokens: int, max_response_tokens: int = 64,
                 batch_size: int = 8) -> list[float]:
  """Teacher-forced loss: per example, the mean NLL (nats/token) of `" " + response + "\\n"` given
  the prompt (responses longer than `max_response_tokens` tokens are cut there). Rows are
  right-padded to a fixed width (one compile); pass a merged decoder (`model.merged`) so every
  memory shares the base's graph."""
  rows = []
  for prompt, response in zip(prompts, responses):
    prompt_ids = list(vocabulary.encode(prompt))
    if len(prompt_ids) > max_prompt_tokens:
      raise UserError(f"milp: a prompt has {len(prompt_ids)} tokens, more than "
                      f"milp.job.max_prompt_tokens={max_prompt_tokens} (prompt starts {prompt[:60]!r}).")
    response_ids = list(vocabulary.encode(" " + response.strip() + "\n"))[:max_response_tokens]
    rows.append((prompt_ids, response_ids))
  width = max_prompt_tokens + max_response_tokens
  values = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.zeros((batch_size, width + 1), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for i, (prompt_ids, response_ids) in enumerate(chunk):
      ids = prompt_ids + response_ids
      tokens[i, :len(ids)] = ids
      # Target position t predicts token t + 1: the response tokens are targets len(prompt)-1 ...
      weights[i, len(prompt_ids) - 1:len(ids) - 1] = 1.0
    sums, counts = _masked_nll(decoder, jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]),
                               jnp.asarray(weights))
    sums, counts = np.asarray(sums), np.asarray(counts)
    values += [float(sums[i] / counts[i]) for i in range(len(chunk))]
  return values


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
  """Mean ROUGE-L F and Persona-F1 of generated responses over the examples (and how many)."""
  rouge = [tasks.rouge_l(r, ex.response) for r, (_, ex) in zip(responses, examples)]
  persona = [tasks.persona_f1(r, user.persona) for r, (user, _) in zip(responses, examples)]
  return {"rouge_l": statistics.fmean(rouge), "persona_f1": statistics.fmean(persona),
          "num_responses": float(len(rouge))}


def example_rows(system: str, responses: Sequence[str],
                 examples: Sequence[tuple[tasks.User, tasks.HeldOutExample]],
                 losses: Sequence[float], prompts: Sequence[str] | None = None) -> list[dict]:
  """One row per scored example (per-example values for paired statistics)."""
  prompts = prompts or [ex.prompt for _, ex in examples]
  return [{"system": system, "user_id": user.user_id, "prompt": prompt, "response": response,
           "reference": ex.response, "loss": loss, "rouge_l": tasks.rouge_l(response, ex.response),
           "persona_f1": tasks.persona_f1(response, user.persona)}
          for response, (user, ex), loss, prompt in zip(responses, examples, losses, prompts)]


def summarize(rows: Sequence[dict], reference: str = "no_memory") -> dict:
  """Per system: mean and 95% bootstrap CI of each metric, and the paired difference to `reference`
  (same examples; CI and sign-flip p-value) — `persona_jax.evaluation.stats`."""
  by_system: dict[str, list[dict]] = {}
  for row in rows:
    by_system.setdefault(row["system"], []).append(row)
  base = by_system.get(reference)
  summary = {}
  for system, items in by_system.items():
    entry = {"count": len(items)}
    for metric in METRICS:
      values = [r[metric] for r in items]
      entry[metric] = stats.mean_ci(values).as_dict()
      if base is not None and system != reference:
        if [(r["user_id"], r["reference"]) for r in items] != [
            (r["user_id"], r["reference"]) for r in base]:
          raise UserError(f"milp summarize: {system} and {reference} were not scored on the same "
                          "examples; no paired difference.")
        entry[f"{metric}_vs_{reference}"] = stats.paired_difference(
            values, [r[metric] for r in base]).as_dict()
    summary[system] = entry
  return summary


def _ci(estimate: dict, digits: int = 3) -> str:
  return f"{estimate['value']:.{digits}f} [{estimate['low']:.{digits}f}, {estimate['high']:.{digits}f}]"


def _diff(estimate: dict | None, digits: int = 3) -> str:
  if estimate is None:
    return "-"
  return f"{estimate['value']:+.{digits}f} [{estimate['low']:+.{digits}f}, {estimate['high']:+.{digits}f}] p={estimate['p_value']:.2f}"


def results_table(summary: dict, title: str) -> str:
  """Markdown: per system, each metric's mean [95% CI] and the paired difference to no memory."""
  lines = [f"### {title}", "",
           "| system | loss (nats/token) | Δ loss vs no memory | ROUGE-L | Δ ROUGE-L vs no memory | "
           "Persona-F1 | Δ Persona-F1 vs no memory | examples |", "|---|---|---|---|---|---|---|---|"]
  for system in SYSTEMS:
    if system in summary:
      r = summary[system]
      lines.append(f"| {system} | {_ci(r['loss'])} | {_diff(r.get('loss_vs_no_memory'))} | "
                   f"{_ci(r['rouge_l'])} | {_diff(r.get('rouge_l_vs_no_memory'))} | "
                   f"{_ci(r['persona_f1'])} | {_diff(r.get('persona_f1_vs_no_memory'))} | "
                   f"{r['count']} |")
  return "\n".join(lines) + "\n"


def trial_table(records: Sequence[dict]) -> str:
  """Markdown: a search's trials (memory, feasibility, dev objective, seconds)."""
  lines = ["| trial | memory | learning rate | feasible | dev objective | dev loss | seconds |",
           "|---|---|---|---|---|---|---|"]
  for r in records:
    memory = r.get("memory") or {}
    if "layers" in memory:
      ranks = memory["rank"] if isinstance(memory["rank"], list) else [memory["rank"]] * len(
          memory["layers"])
      shown = f"{len(ranks)} modules: " + " ".join(f"{l}:r{k}" for l, k in zip(memory["layers"], ranks))
    elif memory:
      shown = f"single LoRA r{memory['rank']}"
    else:
      shown = "no memory (pruned)"
    rate = f"{memory['learning_rate']:.2e}" if memory else "-"
    scores = (f"{r['objective']:.4f} | {r['loss']:.4f}" if r["feasible"] else "- | -")
    lines.append(f"| {r['trial']} | {shown} | {rate} | {'yes' if r['feasible'] else 'pruned'} | "
                 f"{scores} | {r['seconds']} |")
  return "\n".join(lines) + "\n"
