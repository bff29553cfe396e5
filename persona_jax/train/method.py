"""The method contract: what a method room provides, and the registry that finds the rooms.

In the spirit of T5X's `BaseModel` (loss / eval / predict driven by generic train, eval and infer
jobs) and Levanter's trainer hooks. A method room `persona_jax/<room>/` has the same four files:

  model.py   its modules (nnx), if any
  tasks.py   its SeqIO tasks and data readers
  job.py     its `Method` subclass, registered with `@register_method("<room>")` and configured by
             gin as `<room>.job.<argument>`
  eval.py    an evaluation library (functions; no job)

and the core's generic jobs (`persona_jax.train.jobs`: `train` and `evaluate`) do the rest the same
way for every room: the parameter-count line, periodic evaluation at `TrainConfig.eval_every`, the
final table and `final_metrics.json`, restore for evaluation without optimizer state, and export.

A method supplies (override what applies; the defaults fit one model trained by one `Trainer`):

  setup(workdir)          load the decoder, tokenizer and data (called once, before anything else)
  model()                 the `nnx.Module` to train (the frozen base inside it)
  trainable_filter()      an NNX filter of what trains (the rest is frozen)
  loss_fn()               `loss_fn(model, batch, rng) -> (loss, metrics)` for the core `Trainer`
  train_data()            a resumable iterator of host batches (`get_state` / `set_state`)
  checkpoint_metadata()   JSON-able facts recorded with each checkpoint (the base-model pointer)
  fit(run)                train; default: one Trainer over `train_data()`. RL methods run an
                          `rl.Learner`, MiLP runs its layout search (several Trainers).
  evaluate(model, step)   -> `Evaluation` (scalar metrics, markdown tables, per-example rows)
  periodic_metrics(model, step)  the cheap evaluation run every `eval_every` steps (default:
                          `evaluate(...).metrics`)
  restore(run)            the trained model from the workdir (default: parameters only, no
                          optimizer state)
  export_artifacts(model, output_dir)  files beyond the `transformers` decoders that export writes
  tokenizer_source()      what export saves as the decoders' tokenizer (None: none)

A sixth method is one new folder: `discover_methods()` imports every `persona_jax.<room>.job` module
it finds, and `main` / `export` look rooms up here by name, never by a hard-coded list.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pkgutil
from typing import Any, Callable, Iterator

import jax
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.train.trainer import LossFn, TrainConfig, Trainer, TrainResult


@dataclasses.dataclass
class Evaluation:
  """What a method's evaluation returns.

  metrics: scalar metrics (logged to TensorBoard as `eval/<name>`, written to final_metrics.json).
  tables: {name: markdown} written as `<workdir>/<name>.md` and printed at the end of a run.
  results: {name: JSON-able} written as `<workdir>/<name>.json` (e.g. a table's numbers).
  examples: per-example rows (one dict per scored example) for paired statistics later; written
    as `<workdir>/eval_examples.jsonl` when given.
  """
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  tables: dict[str, str] = dataclasses.field(default_factory=dict)
  results: dict[str, Any] = dataclasses.field(default_factory=dict)
  examples: list[dict] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Run:
  """What the generic jobs hand a method's `fit` / `restore`: where, with which loop settings.

  workdir: the run's directory (None in tests that keep nothing).
  config: the loop's `TrainConfig`.
  eval_fn: `eval_fn(model, step) -> {name: float}` to run every `config.eval_every` steps (None when
    periodic evaluation is off); `Run.train` passes it to the Trainer, a learner calls it itself.
  on_trainer: called as `on_trainer(model, trainable)` for the first Trainer built (the generic jobs
    print the parameter-count line there).
  step: the checkpoint step `restore` loads (None: the latest).
  """
  workdir: str | None
  config: TrainConfig
  eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None
  on_trainer: Callable[[nnx.Module, Any], None] | None = None
  step: int | None = None
  _announced: bool = dataclasses.field(default=False, repr=False)

  def trainer(self, model: nnx.Module, loss_fn: LossFn, trainable: Any, *,
              workdir: Any = ..., checkpoint_metadata: dict | None = None,
              config: TrainConfig | None = None, process_local_batches: bool = True) -> Trainer:
    """A core `Trainer` in this run's workdir (or `workdir=` a subdirectory; None: no checkpoints)."""
    if self.on_trainer is not None and not self._announced:
      self._announced = True
      self.on_trainer(model, trainable)
    return Trainer(model, loss_fn, config or self.config, trainable=trainable,
                   workdir=self.workdir if workdir is ... else workdir,
                   checkpoint_metadata=checkpoint_metadata,
                   process_local_batches=process_local_batches)

  def train(self, trainer: Trainer, data) -> TrainResult:
    """`trainer.train(data)` with this run's periodic evaluation (the final one is the job's)."""
    return trainer.train(data, eval_fn=self.eval_fn, final_eval=False)


@dataclasses.dataclass
class FitResult:
  """What `Method.fit` returns: the loop's result and the trained model."""
  result: TrainResult
  model: nnx.Module


class Method:
  """Base class of a method room's job (see the module docstring for the contract)."""

  name: str = ""  # set by `register_method`

  # Set up -----------------------------------------------------------------------------------------
  def setup(self, workdir: str | None) -> None:
    """Loads the decoder, tokenizer and data. Called once by the generic jobs before anything else."""

  def description(self) -> str:
    """One line naming the run's settings (printed, and used in table titles)."""
    return self.name

  # One model, one trainer (the defaults of `fit` and `restore` use these) -------------------------
  def model(self) -> nnx.Module:
    raise NotImplementedError(f"{type(self).__name__} must provide model() or override fit().")

  def trainable_filter(self) -> Any:
    return nnx.Param

  def loss_fn(self) -> LossFn:
    raise NotImplementedError(f"{type(self).__name__} must provide loss_fn() or override fit().")

  def train_data(self) -> Iterator[dict]:
    raise NotImplementedError(f"{type(self).__name__} must provide train_data() or override fit().")

  def checkpoint_metadata(self) -> dict:
    return {}

  def trainer(self, run: Run) -> Trainer:
    """The method's Trainer in the run's workdir (built once per call)."""
    return run.trainer(self.model(), self.loss_fn(), self.trainable_filter(),
                       checkpoint_metadata=self.checkpoint_metadata())

  def fit(self, run: Run) -> FitResult:
    """Trains up to `run.config.num_steps` (resuming from the workdir); returns the trained model."""
    trainer = self.trainer(run)
    result = run.train(trainer, self.train_data())
    return FitResult(result=result, model=trainer.model())

  def restore(self, run: Run) -> tuple[nnx.Module, int | None]:
    """(the trained model, its step) from the workdir's checkpoint `run.step` (default the latest),
    parameters only. A method whose product is not a checkpoint (MiLP's PEFT memories) may return
    its base model and step None."""
    from persona_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

    model = self.model()
    step = checkpointing.restore_trainable(run.workdir, model, self.trainable_filter(), run.step)
    if step is None:
      raise UserError(f"{self.name}: no checkpoint in {run.workdir}/checkpoints; train first "
                      f"(run.job = @train).")
    return model, step

  # Evaluation -----------------------------------------------------------------------------------
  def evaluate(self, model: nnx.Module, step: int) -> Evaluation:
    """The method's held-out evaluation of `model` (after training, or restored)."""
    del model, step
    return Evaluation()

  def periodic_metrics(self, model: nnx.Module, step: int) -> dict[str, float]:
    """Metrics for `TrainConfig.eval_every` (default: the full evaluation's scalar metrics)."""
    return self.evaluate(model, step).metrics

  # Export ---------------------------------------------------------------------------------------
  def export_artifacts(self, model: nnx.Module, output_dir) -> dict[str, str]:
    """Extra files for `python -m persona_jax.export` ({relative path: what it is})."""
    del model, output_dir
    return {}

  def tokenizer_source(self) -> str | None:
    """The tokenizer export saves beside the decoders (a `load_tokenizer` source), or None."""
    return None


# Registry -----------------------------------------------------------------------------------------
_METHODS: dict[str, Callable[[], Method]] = {}
# Core jobs that follow the contract without being a room.
_CORE_METHOD_MODULES = ("persona_jax.train.pretrain",)


def register_method(name: str):
  """Class decorator: `@register_method("coprocessor")` makes the room findable by name."""

  def decorate(cls):
    if name in _METHODS and _METHODS[name] is not cls:
      raise UserError(f"Two methods register the name {name!r}: {_METHODS[name]} and {cls}.")
    cls.name = name
    _METHODS[name] = cls
    return cls

  return decorate


def discover_methods() -> list[str]:
  """Imports every `persona_jax.<room>.job` module (and the core's pretrain); returns the names.

  A room that fails to import fails loudly: a broken room is a bug, not an absent one.
  """
  import persona_jax  # pylint: disable=g-import-not-at-top

  for module in _CORE_METHOD_MODULES:
    importlib.import_module(module)
  for info in pkgutil.iter_modules(persona_jax.__path__):
    if not info.ispkg:
      continue
    spec = importlib.util.find_spec(f"persona_jax.{info.name}.job")
    if spec is not None:
      importlib.import_module(f"persona_jax.{info.name}.job")
  return sorted(_METHODS)


def get_method(name: str) -> Callable[[], Method]:
  """The registered method class `name` (after `discover_methods()`)."""
  if name not in _METHODS:
    discover_methods()
  if name not in _METHODS:
    raise UserError(f"No method named {name!r}; registered: {sorted(_METHODS)}. Bind "
                    "run.method to one of them.")
  return _METHODS[name]


def method_names() -> list[str]:
  return sorted(_METHODS)


def is_chief() -> bool:
  return jax.process_index() == 0
