"""The generic jobs every method runs through: `train` and `evaluate`.

Gin: a job file names the method and the job,

  run.method = 'coprocessor'      # a name registered with `persona_jax.train.method.register_method`
  run.job = @train                # or @evaluate: restore the trained model and re-write its tables

and configures the method as `<method>.job.<argument> = ...` and the loop as `TrainConfig.<field>`.

What the jobs own (the same for every method): the parameter-count line, periodic evaluation every
`TrainConfig.eval_every` steps (through the Trainer's eval hook), the final evaluation, its tables
(`<workdir>/<name>.md` / `.json`, printed), `final_metrics.json`, and restoring for evaluation
without optimizer state. A preempted run (SIGTERM) saves, skips the final evaluation and says so in
its result, so `persona_jax.main` can exit with the preemption status.
"""

from __future__ import annotations

import json
from typing import Any

import gin
import jax
from flax import nnx

from persona_jax.train import workdir as workdir_lib
from persona_jax.train.method import Evaluation, Method, Run, discover_methods, get_method
from persona_jax.train.trainer import TrainConfig


@gin.configurable("run")
def run(workdir: str | None, job=gin.REQUIRED, method: str = gin.REQUIRED):
  """Runs `job(workdir=..., method=<the method named by run.method, built from its gin bindings>)`."""
  return job(workdir=workdir, method=get_method(method)())


__all__ = ["discover_methods", "evaluate", "run", "train"]


def count_parameters(model: nnx.Module, trainable: Any) -> tuple[int, int]:
  """(trainable, total) parameter counts of `model`."""
  trainable_count = sum(x.size for x in jax.tree.leaves(nnx.state(model, trainable)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return trainable_count, total


def _chief() -> bool:
  return jax.process_index() == 0


def write_evaluation(workdir: str | None, evaluation: Evaluation, suffix: str = "") -> None:
  """Writes the tables (`<name><suffix>.md`), results (`.json`) and per-example rows of an evaluation."""
  if not workdir or not _chief():
    return
  for name, table in evaluation.tables.items():
    workdir_lib.write_text(workdir_lib.join(workdir, f"{name}{suffix}.md"), table.rstrip() + "\n")
  for name, result in evaluation.results.items():
    workdir_lib.write_json(workdir_lib.join(workdir, f"{name}{suffix}.json"), result)
  if evaluation.examples:
    lines = "".join(json.dumps(row, default=float) + "\n" for row in evaluation.examples)
    workdir_lib.write_text(workdir_lib.join(workdir, f"eval_examples{suffix}.jsonl"), lines)


def _print_evaluation(evaluation: Evaluation) -> None:
  if not _chief():
    return
  for table in evaluation.tables.values():
    print(table, flush=True)
  if evaluation.metrics and not evaluation.tables:
    print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(evaluation.metrics.items())),
          flush=True)


def make_run(method: Method, workdir: str | None, config: TrainConfig) -> Run:
  """The `Run` a method's `fit` gets: periodic eval wired to `method.periodic_metrics`."""
  eval_fn = None
  if config.eval_every:
    eval_fn = method.periodic_metrics
  return Run(workdir=workdir, config=config, eval_fn=eval_fn,
             on_trainer=lambda model, trainable: _print_parameter_count(method, model, trainable))


def _print_parameter_count(method: Method, model: nnx.Module, trainable: Any) -> None:
  count, total = count_parameters(model, trainable)
  if _chief():
    print(f"{method.name}: {method.description()}; {count:,} trainable of {total:,} parameters",
          flush=True)


@gin.configurable("train")
def train(workdir: str | None, method: Method, train_config: TrainConfig | None = None) -> dict:
  """Trains `method` (resuming from `workdir`), evaluates it and writes its tables.

  Returns the summary written to `final_metrics.json`: method, step, preempted, the last train
  metrics, the last periodic eval metrics and the final evaluation's metrics.
  """
  config = train_config or TrainConfig()
  method.setup(workdir)
  run = make_run(method, workdir, config)
  fit = method.fit(run)
  result = fit.result
  summary: dict[str, Any] = {"method": method.name, "step": result.step,
                             "preempted": result.preempted, "train": result.metrics,
                             "periodic_eval": result.eval_metrics}
  if result.preempted:
    if _chief():
      print(f"{method.name}: preempted at step {result.step}; the final evaluation is skipped "
            "(rerun the same command to resume).", flush=True)
  else:
    evaluation = method.evaluate(fit.model, result.step)
    write_evaluation(workdir, evaluation)
    _print_evaluation(evaluation)
    summary["eval"] = evaluation.metrics
    summary["evaluation"] = evaluation
  if workdir and _chief():
    workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"),
                           {k: v for k, v in summary.items() if k != "evaluation"})
  return summary


@gin.configurable("evaluate")
def evaluate(workdir: str, method: Method, train_config: TrainConfig | None = None) -> dict:
  """Restores the trained `method` from `workdir` (parameters only) and re-writes its tables with the
  suffix `_restored`. Bind the same settings as the training run (e.g. the same gin file)."""
  config = train_config or TrainConfig()
  method.setup(workdir)
  model, step = method.restore(Run(workdir=workdir, config=config))
  evaluation = method.evaluate(model, step)
  write_evaluation(workdir, evaluation, suffix="_restored")
  _print_evaluation(evaluation)
  return {"method": method.name, "step": step, "eval": evaluation.metrics, "evaluation": evaluation}
