"""Held-out evaluation of the cache coprocessor: the paper's Table 1.

For each position i = 1..N_A after an augmentation point, the perplexity of token p+i with the frozen
decoder alone (baseline) and with the augmented cache, and the relative change. Augmentation points
are deterministic (evenly spaced over each row), so every run scores the same tokens. Each process
scores its own shard of the eval rows; the sums are reduced across processes, so the table covers
every shard.
"""

from __future__ import annotations

import decimal
import math
import re
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax import sampling
from persona_jax.coprocessor import masks
from persona_jax.coprocessor import model as model_lib
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.evaluation import stats, sum_across_processes


@nnx.jit(static_argnums=(2, 3))
def _eval_sums(model: CacheCoprocessor, batch: dict, num_traces: int, ahead_tokens: int):
  segment_ids = batch["decoder_segment_ids"]
  trace_positions, valid = masks.evenly_spaced_trace_positions(segment_ids, num_traces,
                                                                ahead_tokens + 1)
  out = model.forward_traces(batch["decoder_target_tokens"], segment_ids, batch["decoder_positions"],
                             trace_positions, ahead_tokens, with_baseline=True)
  weights = valid[:, :, None].astype(jnp.float32)
  return {"augmented": (out["nll"] * weights).sum(axis=(0, 1)),
          "baseline": (out["baseline_nll"] * weights).sum(axis=(0, 1)),
          "count": jnp.broadcast_to(weights.sum(), (ahead_tokens,))}


@nnx.jit(static_argnums=(2, 3))
def _eval_traces(model: CacheCoprocessor, batch: dict, num_traces: int, ahead_tokens: int,
                 latent_source_rows: jax.Array | None = None):
  """`_eval_sums`' sums plus the per-trace NLLs `[batch, K, N_A]` and trace validity `[batch, K]`."""
  segment_ids = batch["decoder_segment_ids"]
  trace_positions, valid = masks.evenly_spaced_trace_positions(segment_ids, num_traces,
                                                                ahead_tokens + 1)
  out = model.forward_traces(batch["decoder_target_tokens"], segment_ids, batch["decoder_positions"],
                             trace_positions, ahead_tokens, with_baseline=True,
                             latent_source_rows=latent_source_rows)
  weights = valid[:, :, None].astype(jnp.float32)
  sums = {"augmented": (out["nll"] * weights).sum(axis=(0, 1)),
          "baseline": (out["baseline_nll"] * weights).sum(axis=(0, 1)),
          "count": jnp.broadcast_to(weights.sum(), (ahead_tokens,))}
  return sums, {"augmented": out["nll"], "baseline": out["baseline_nll"], "valid": valid}


def other_row_sources(segment_ids: np.ndarray) -> np.ndarray:
  """`[batch]` for the "another row's cache" control: each row with real tokens takes the next such
  row (cyclically); rows of padding (and a lone real row) keep their own."""
  real = np.flatnonzero(np.asarray(segment_ids).any(axis=1))
  sources = np.arange(segment_ids.shape[0])
  if real.size > 1:
    sources[real] = np.roll(real, -1)
  return sources.astype(np.int32)


def evaluate_perplexity(model: CacheCoprocessor, batches: Iterable[dict[str, np.ndarray]], *,
                        num_traces: int, ahead_tokens: int,
                        max_batches: int | None = None, per_trace: bool = False,
                        other_row_latents: bool = False) -> dict[str, Any]:
  """Per-position held-out perplexity, baseline vs augmented.

  Args:
    per_trace: also return `per_trace` = {"baseline_nll", "augmented_nll"}: `[traces, N_A]` lists,
      one row per scored augmentation point (same order in both), for paired CIs (`add_paired_cis`).
      Single process only (each process would hold only its own rows).
    other_row_latents: the control: every row's augmentation uses latents the coprocessor
      computed from another row's cache (`other_row_sources`); a gain that survives it does not
      depend on the input.
  Returns a dict with lists (one entry per position 1..N_A): `baseline_ppl`, `augmented_ppl`,
  `relative_change` ((augmented - baseline) / baseline), the mean NLLs, and `num_traces_scored`.
  """
  if (per_trace or other_row_latents) and jax.process_count() > 1:
    raise ValueError("evaluate_perplexity: per_trace / other_row_latents run on one process (each "
                     "process holds only its own rows).")
  sums, traces = None, {"baseline": [], "augmented": []}
  for index, batch in enumerate(batches):
    if max_batches is not None and index >= max_batches:
      break
    sources = other_row_sources(batch["decoder_segment_ids"]) if other_row_latents else None
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    if per_trace or other_row_latents:
      part, rows = jax.device_get(_eval_traces(
          model, batch, num_traces, ahead_tokens,
          None if sources is None else jnp.asarray(sources)))
      valid = np.asarray(rows["valid"], bool)
      for name in ("baseline", "augmented"):
        traces[name].append(np.asarray(rows[name], np.float32)[valid])
    else:
      part = jax.device_get(_eval_sums(model, batch, num_traces, ahead_tokens))
    sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
  if sums is None:
    sums = {name: np.zeros((ahead_tokens,), np.float32) for name in ("augmented", "baseline", "count")}
  sums = sum_across_processes(sums)
  if float(sums["count"][0]) == 0:
    raise ValueError("Coprocessor evaluation scored no trace: the eval data is empty or its rows are "
                     f"shorter than ahead_tokens + 1 = {ahead_tokens + 1} tokens.")
  count = sums["count"]
  baseline_nll = (sums["baseline"] / count).tolist()
  augmented_nll = (sums["augmented"] / count).tolist()
  baseline_ppl = [math.exp(x) for x in baseline_nll]
  augmented_ppl = [math.exp(x) for x in augmented_nll]
  return {
      "positions": list(range(1, ahead_tokens + 1)),
      "baseline_nll": baseline_nll, "augmented_nll": augmented_nll,
      "baseline_ppl": baseline_ppl, "augmented_ppl": augmented_ppl,
      "relative_change": [(a - b) / b for a, b in zip(augmented_ppl, baseline_ppl)],
      "num_traces_scored": int(count[0]),
  } | ({"per_trace": {f"{name}_nll": np.concatenate(traces[name]).tolist()
                       for name in ("baseline", "augmented")}} if per_trace else {})


def add_paired_cis(results: dict[str, Any], *, resamples: int = stats.DEFAULT_RESAMPLES,
                   seed: int = 0) -> dict[str, Any]:
  """Adds paired-bootstrap 95% CIs of the relative perplexity change to `evaluate_perplexity`'s
  results (which need `per_trace`): per position (resampling augmentation points: each point scores
  one token at each position), and `mean_relative_change_ci` over all positions (each point's mean
  NLL over its N_A tokens, resampled by point, so the tokens of one point stay together)."""
  rows = results.get("per_trace")
  if rows is None:
    raise ValueError("add_paired_cis: evaluate_perplexity(..., per_trace=True) first.")
  baseline = np.asarray(rows["baseline_nll"], np.float64)
  augmented = np.asarray(rows["augmented_nll"], np.float64)
  per_position = [stats.relative_perplexity_change(augmented[:, i], baseline[:, i],
                                                   resamples=resamples, seed=seed).as_dict()
                  for i in range(baseline.shape[1])]
  overall = stats.relative_perplexity_change(augmented.mean(axis=1), baseline.mean(axis=1),
                                             resamples=resamples, seed=seed).as_dict()
  return dict(results, relative_change_ci=per_position, mean_relative_change_ci=overall)


def format_table(results: dict[str, Any], title: str = "") -> str:
  """Markdown table: one row per position after the augmentation point (with a CI column and a
  mean row when `add_paired_cis` added them)."""
  cis = results.get("relative_change_ci")
  if cis is None:
    lines = [f"{title}\n" if title else "",
             "| position | baseline ppl | augmented ppl | relative change |",
             "|---:|---:|---:|---:|"]
    for i, base, aug, rel in zip(results["positions"], results["baseline_ppl"],
                                 results["augmented_ppl"], results["relative_change"]):
      lines.append(f"| {i} | {base:.3f} | {aug:.3f} | {100 * rel:+.2f}% |")
  else:
    lines = [f"{title}\n" if title else "",
             "| position | baseline ppl | augmented ppl | relative change | 95% CI (paired) | p |",
             "|---:|---:|---:|---:|---:|---:|"]
    for i, base, aug, rel, ci in zip(results["positions"], results["baseline_ppl"],
                                     results["augmented_ppl"], results["relative_change"], cis):
      lines.append(f"| {i} | {base:.3f} | {aug:.3f} | {100 * rel:+.2f}% | "
                   f"[{100 * ci['low']:+.2f}%, {100 * ci['high']:+.2f}%] | {ci['p_value']:.3g} |")
    mean = results["mean_relative_change_ci"]
    lines.append(f"| all | | | {100 * mean['value']:+.2f}% | "
                 f"[{100 * mean['low']:+.2f}%, {100 * mean['high']:+.2f}%] | {mean['p_value']:.3g} |")
  lines.append(f"\n({results['num_traces_scored']} augmentation points scored)")
  return "\n".join(line for line in lines if line is not None)


# GSM8K -----------------------------------------------------------------------------------------
_FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")
_NUMBER = re.compile(r"-?\$?\s*[0-9][0-9,]*(?:\.[0-9]+)?")


def normalize_number(text: str) -> str | None:
  """A number's canonical string: commas, '$' and spaces dropped, trailing zeros after a point
  dropped ("1,000.50" -> "1000.5", "18.00" -> "18", "-0" -> "0"); None if it is not a number."""
  cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  try:
    value = decimal.Decimal(cleaned)
  except decimal.InvalidOperation:
    return None
  if not value.is_finite():
    return None
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), "f")


def extract_final_answer(text: str) -> str | None:
  """The normalized number after the first `####` (GSM8K's answer line), or None (strict match)."""
  match = _FINAL_ANSWER.search(text)
  return normalize_number(match.group(1)) if match else None


def extract_last_number(text: str) -> str | None:
  """The last number in the text, normalized (the lenient match), or None."""
  numbers = _NUMBER.findall(text)
  for candidate in reversed(numbers):
    value = normalize_number(candidate)
    if value is not None:
      return value
  return None


def cut_generation(text: str) -> str:
  """A generated answer up to where the model starts a new exemplar ("\\n\\nQuestion:") or ends
  the answer line after `#### <number>`."""
  for marker in ("\n\nQuestion:", "\nQuestion:"):
    if marker in text:
      text = text[:text.index(marker)]
  match = _FINAL_ANSWER.search(text)
  if match:
    end = text.find("\n", match.end())
    text = text if end < 0 else text[:end]
  return text


def _bucket(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def score_continuations(model: CacheCoprocessor, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], *, batch_size: int = 8,
                        prompt_width: int | None = None, continuation_width: int | None = None,
                        pad_id: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Yields (index, baseline_nll, augmented_nll) per prompt: the per-token NLL of its continuation,
  with the frozen decoder alone and with the cache augmented once at the end of the prompt.

  Batches have one shape (prompts left-padded to `prompt_width`, continuations right-padded to
  `continuation_width`, the last batch filled with copies), so the program compiles once.
  """
  if len(prompts) != len(continuations):
    raise ValueError("score_continuations: one continuation per prompt.")
  if any(len(p) < 2 for p in prompts) or any(len(c) < 1 for c in continuations):
    raise ValueError("score_continuations: prompts need >= 2 tokens, continuations >= 1.")
  width = prompt_width or _bucket(max(len(p) for p in prompts) - 1, 64)
  length = continuation_width or _bucket(max(len(c) for c in continuations), 64)
  for start in range(0, len(prompts), batch_size):
    rows = list(range(start, min(start + batch_size, len(prompts))))
    padded = rows + [rows[-1]] * (batch_size - len(rows))
    heads, head_mask = sampling.pad_prompts([list(prompts[i])[:-1] for i in padded], pad_id=pad_id,
                                            length_multiple=width)
    if heads.shape[1] != width:
      raise ValueError(f"score_continuations: a prompt is longer than prompt_width={width}.")
    inputs = np.full((batch_size, length), pad_id, np.int32)
    targets = np.full((batch_size, length), pad_id, np.int32)
    for row, i in enumerate(padded):
      continuation = list(continuations[i])
      if len(continuation) > length:
        raise ValueError(f"score_continuations: continuation {i} is longer than {length}.")
      inputs[row, :len(continuation)] = [prompts[i][-1]] + continuation[:-1]
      targets[row, :len(continuation)] = continuation
    baseline, augmented = jax.device_get(
        model_lib.continuation_nll(model, heads, head_mask, inputs, targets))
    for row, i in enumerate(rows):
      count = len(continuations[i])
      yield i, np.asarray(baseline[row, :count]), np.asarray(augmented[row, :count])


def generate_texts(model: CacheCoprocessor, prompts: Sequence[Sequence[int]], decode, *,
                   augment: bool, max_new_tokens: int, batch_size: int = 8,
                   prompt_width: int | None = None, stop_tokens=None,
                   pad_id: int | None = None) -> Iterator[tuple[int, str]]:
  """Yields (index, text) per prompt: greedy decoding, with the cache augmented once at the end of
  the prompt (augment) or by the frozen decoder alone; fixed-shape batches."""
  width = prompt_width or _bucket(max(len(p) for p in prompts), 64)
  for start in range(0, len(prompts), batch_size):
    rows = list(range(start, min(start + batch_size, len(prompts))))
    chunk = [list(prompts[i]) for i in rows]
    chunk += [chunk[-1]] * (batch_size - len(rows))
    result = model_lib.generate(model, chunk, max_new_tokens=max_new_tokens, augment=augment,
                                prompt_bucket=width, stop_tokens=stop_tokens, pad_id=pad_id)
    tokens, lengths, done = (np.asarray(result.tokens), np.asarray(result.lengths),
                             np.asarray(result.done))
    for row, i in enumerate(rows):
      yield i, decode([int(t) for t in tokens[row, :lengths[row] - int(done[row])]])


def gsm8k_summary(rows: Sequence[dict], *, resamples: int = stats.DEFAULT_RESAMPLES) -> dict:
  """Per shots setting: the gold solutions' NLL (per token and per problem, paired CIs of the
  relative perplexity change) and the generation accuracy (strict `####` and lenient last-number
  matches, paired difference with CI and sign-flip p-value)."""
  summary: dict[str, Any] = {}
  for shots in sorted({row["shots"] for row in rows if "shots" in row}):
    block: dict[str, Any] = {}
    scored = sorted((r for r in rows if r.get("kind") == "nll" and r["shots"] == shots),
                    key=lambda r: r["index"])
    if scored:
      base_tokens = np.concatenate([r["baseline_nll"] for r in scored])
      aug_tokens = np.concatenate([r["augmented_nll"] for r in scored])
      base_problem = np.array([np.mean(r["baseline_nll"]) for r in scored])
      aug_problem = np.array([np.mean(r["augmented_nll"]) for r in scored])
      block["nll"] = {
          "problems": len(scored), "tokens": int(base_tokens.size),
          "baseline_token_nll": float(base_tokens.mean()),
          "augmented_token_nll": float(aug_tokens.mean()),
          "baseline_ppl": math.exp(base_tokens.mean()), "augmented_ppl": math.exp(aug_tokens.mean()),
          "relative_change_per_token": stats.relative_perplexity_change(
              aug_tokens, base_tokens, resamples=resamples).as_dict(),
          "relative_change_per_problem": stats.relative_perplexity_change(
              aug_problem, base_problem, resamples=resamples).as_dict()}
    generated = sorted((r for r in rows if r.get("kind") == "generation" and r["shots"] == shots),
                       key=lambda r: r["index"])
    if generated:
      accuracy = {}
      for match in ("strict", "lenient"):
        base = np.array([r[f"baseline_{match}_correct"] for r in generated], np.float64)
        aug = np.array([r[f"augmented_{match}_correct"] for r in generated], np.float64)
        accuracy[match] = {"baseline": stats.mean_ci(base, resamples=resamples).as_dict(),
                           "augmented": stats.mean_ci(aug, resamples=resamples).as_dict(),
                           "difference": stats.paired_difference(aug, base,
                                                                 resamples=resamples).as_dict()}
      block["generation"] = {"problems": len(generated), **accuracy}
    summary[f"{shots}-shot"] = block
  return summary


def format_gsm8k_table(summary: dict, title: str = "") -> str:
  """Markdown: one NLL row and one accuracy row per match type, per shots setting."""
  pct = lambda e: f"{100 * e['value']:+.2f}% [{100 * e['low']:+.2f}%, {100 * e['high']:+.2f}%]"
  acc = lambda e: f"{100 * e['value']:.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"
  lines = [f"{title}\n" if title else "",
           "| setting | measure | problems | frozen decoder | augmented | change (95% paired CI) | p |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for setting, block in summary.items():
    if "nll" in block:
      n = block["nll"]
      for unit in ("per_token", "per_problem"):
        change = n[f"relative_change_{unit}"]
        lines.append(f"| {setting} | gold-solution ppl, CI by {unit.replace('per_', '')} | "
                     f"{n['problems']} | {n['baseline_ppl']:.3f} | {n['augmented_ppl']:.3f} | "
                     f"{pct(change)} | {change['p_value']:.3g} |")
    if "generation" in block:
      g = block["generation"]
      for match in ("strict", "lenient"):
        diff = g[match]["difference"]
        lines.append(f"| {setting} | greedy accuracy ({match}) | {g['problems']} | "
                     f"{acc(g[match]['baseline'])} | {acc(g[match]['augmented'])} | "
                     f"{100 * diff['value']:+.1f} pts [{100 * diff['low']:+.1f}, "
                     f"{100 * diff['high']:+.1f}] | {diff['p_value']:.3g} |")
  return "\n".join(lines)
