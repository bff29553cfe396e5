"""User-LLM evaluation: multiple-choice accuracy / Recall@K over held-out users.

Gin job `user_llm.evaluate` restores a trained stage-2 run from its workdir (same gin config) in a
fresh process and prints the test-user metrics.
"""

from __future__ import annotations

from typing import Iterable

import gin
import jax
import numpy as np
from flax import nnx

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


def format_metrics(metrics: dict[str, float]) -> str:
  return ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))


@gin.configurable("evaluate", module="user_llm")
def evaluate(workdir: str, **overrides) -> dict[str, float]:
  """Restores the latest stage-2 checkpoint of `workdir` and evaluates it on the test users."""
  from persona_jax.user_llm.train import build_job  # train imports this module

  job = build_job(workdir, **overrides)
  if job.trainer.restore() is None:
    raise ValueError(f"user_llm.evaluate: {workdir} holds no checkpoint; train first (user_llm.train).")
  metrics = evaluate_choices(job.trainer.model(), job.eval_batches(), job.method)
  print(f"{job.description}, test users: {format_metrics(metrics)}", flush=True)
  return metrics
