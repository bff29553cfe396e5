"""A generic, sharded train loop over any method's loss function and trainable filter.

A method supplies:
  * `model`: an `nnx.Module` (the decoder, or a method model that contains it);
  * `loss_fn(model, batch, rng) -> (scalar loss, {name: scalar metric})`, traced inside jit;
  * `trainable`: an NNX filter (`nnx.Param`, `nnx.LoRAParam`, a path filter, `nnx.All(...)`); the rest of
    the model's state is frozen: it is neither differentiated, nor in the optimizer, nor checkpointed;
  * a training data iterator yielding `{name: np.ndarray [global_batch, ...]}` with `get_state()` /
    `set_state(state)` (JSON-able dicts) so a resumed run continues exactly where it stopped.

The model is split once into `graphdef` + trainable state + frozen state. The step is one pure jitted
function `(TrainState, frozen, batch) -> (TrainState, metrics)` with explicit in/out shardings and the
train state donated; gradients are accumulated over microbatches with `lax.scan`, so there is one
optimizer update per step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from persona_jax.errors import UserError
from persona_jax.train import partitioning
from persona_jax.train.checkpointing import Checkpointer
from persona_jax.train.metrics import MetricsWriter, ProgressLine, learning_rate_at
from persona_jax.train.optim import make_optimizer

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


class DataIterator(Protocol):
  """What the loop needs from a training data source (persona_jax.data's iterators satisfy it)."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or the gradient norm became NaN/Inf; the bad state was not saved."""


class StuckTrainingError(UserError, FloatingPointError):
  """The gradient norm was exactly 0 for `TrainConfig.stop_after_zero_grad_steps` consecutive steps."""


# Preemption ---------------------------------------------------------------------------------------
# A run stopped by SIGTERM (TPU VM / Slurm / Kubernetes preemption notice) saves a checkpoint and exits
# with this status (sysexits' EX_TEMPFAIL) so launchers and schedulers know to rerun the same command,
# which resumes from that checkpoint. Exit 0 means finished, 1 a user error, anything else a crash.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised by `raise_if_preempted()`: the run was stopped by SIGTERM after saving a checkpoint.

  `persona_jax.main` turns it into exit status `PREEMPTED_EXIT_CODE`."""


class PreemptionState:
  """Process-wide record that a Trainer stopped because of SIGTERM (set by `Trainer.train`).

  Jobs may return anything (a dict, a TrainResult); `persona_jax.main` checks `was_preempted()` after
  the job returns and exits with `PREEMPTED_EXIT_CODE`.
  """

  def __init__(self):
    self.preempted_at_step: int | None = None

  def mark(self, step: int) -> None:
    self.preempted_at_step = int(step)

  def clear(self) -> None:
    self.preempted_at_step = None


PREEMPTION = PreemptionState()


def was_preempted() -> bool:
  """True once any Trainer in this process stopped on SIGTERM (until `clear_preemption()`)."""
  return PREEMPTION.preempted_at_step is not None


def clear_preemption() -> None:
  PREEMPTION.clear()


def raise_if_preempted() -> None:
  """Jobs call this after `trainer.train(...)` to skip their final evaluation/export when preempted."""
  if was_preempted():
    raise Preempted(f"Preempted (SIGTERM) at step {PREEMPTION.preempted_at_step}; the checkpoint is "
                    "saved: rerun the same command to resume.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything the loop itself needs (model and data are the job's business).

  Attributes:
    num_steps: optimizer updates in the whole run (a resumed run continues up to it).
    learning_rate: peak learning rate; warmup from 0 over `warmup_steps`, cosine decay to
      `learning_rate * final_learning_rate_fraction` at `num_steps`.
    weight_decay / b1 / b2 / eps: AdamW (decay applies to matrices only).
    max_grad_norm: global-norm clipping threshold (<= 0 or None disables it).
    num_microbatches: the global batch is split into this many microbatches whose gradients are
      averaged (each microbatch's mean loss counts equally) before one update.
    compute_dtype: e.g. 'bfloat16': parameters are cast to it for the forward and backward pass while
      the fp32 master copy is what the optimizer updates. None: use the parameters as stored.
    mesh_data / mesh_fsdp / mesh_tensor: mesh shape (-1 takes the remaining devices).
    checkpoint_every: save every this many steps (and always at the end); 0 saves only at the end.
    keep_checkpoints: how many recent checkpoints to keep.
    async_checkpointing: write checkpoints in the background.
    eval_every: run evaluation every this many steps (and at the end); 0 disables periodic eval.
    num_eval_batches: batches per evaluation (None: until the eval iterator ends).
    log_every: console progress line / TensorBoard every this many steps.
    seed: the RNG seed of the loss function's `rng` argument.
    stop_after_zero_grad_steps: stop with `StuckTrainingError` when the gradient norm is exactly 0.0
      for this many consecutive steps (saturated parameters, e.g. a far too high learning rate);
      0 disables the check. A NaN/Inf loss or gradient norm always stops the run.
    metrics_writers: where the loop's scalars go: 'tensorboard' (event files in <workdir>/tensorboard)
      and/or 'wandb' (`pip install 'persona_jax[wandb]'`; WANDB_MODE=offline works without a network).

  Every field is checked on construction (type and range); a bad value raises `ValueError` naming the
  field and the fix, before any work starts.
  """

  num_steps: int = 100
  learning_rate: float = 1e-3
  warmup_steps: int = 10
  final_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  num_microbatches: int = 1
  compute_dtype: str | None = None
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  eval_every: int = 0
  num_eval_batches: int | None = None
  log_every: int = 10
  seed: int = 0
  stop_after_zero_grad_steps: int = 10
  metrics_writers: tuple[str, ...] = ("tensorboard",)

  def __post_init__(self):
    _validate_train_config(self)

  def optimizer(self) -> optax.GradientTransformation:
    return make_optimizer(
        learning_rate=self.learning_rate, num_steps=self.num_steps, warmup_steps=self.warmup_steps,
        final_learning_rate_fraction=self.final_learning_rate_fraction,
        weight_decay=self.weight_decay, b1=self.b1, b2=self.b2, eps=self.eps,
        max_grad_norm=self.max_grad_norm)

  def mesh(self) -> Mesh:
    return partitioning.make_mesh(self.mesh_data, self.mesh_fsdp, self.mesh_tensor)


def _validate_train_config(config: "TrainConfig") -> None:
  """Types and ranges of every TrainConfig field: one ValueError naming the field and the fix."""
  def fail(name: str, rule: str, example) -> None:
    raise UserError(f"TrainConfig.{name}={getattr(config, name)!r}: must be {rule}. Fix: e.g. "
                     f"--gin_bindings='TrainConfig.{name} = {example}'.")

  def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

  def is_real(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and
            not isinstance(value, (bool, np.bool_)) and math.isfinite(float(value)))

  int_rules = {  # name: (lowest allowed value, rule text, example)
      "num_steps": (1, "an integer >= 1", 100), "warmup_steps": (0, "an integer >= 0", 10),
      "num_microbatches": (1, "an integer >= 1", 1),
      "checkpoint_every": (0, "an integer >= 0 (0: only at the end)", 100),
      "keep_checkpoints": (1, "an integer >= 1 (0 would delete every checkpoint)", 3),
      "eval_every": (0, "an integer >= 0 (0: only at the end)", 0),
      "log_every": (1, "an integer >= 1", 10),
      "stop_after_zero_grad_steps": (0, "an integer >= 0 (0 disables the check)", 10)}
  for name, (lowest, rule, example) in int_rules.items():
    value = getattr(config, name)
    if not is_int(value) or value < lowest:
      fail(name, rule, example)
  if not is_int(config.seed):
    fail("seed", "an integer", 0)
  for name in ("mesh_data", "mesh_fsdp", "mesh_tensor"):
    value = getattr(config, name)
    if not is_int(value) or not (value == -1 or value >= 1):
      fail(name, "an integer >= 1, or -1 for the remaining devices", -1 if name == "mesh_data" else 1)
  if config.num_eval_batches is not None and (not is_int(config.num_eval_batches) or
                                              config.num_eval_batches < 1):
    fail("num_eval_batches", "None (the whole eval set) or an integer >= 1", "None")
  real_rules = {  # name: (check, rule text, example)
      "learning_rate": (lambda v: v >= 0, "a finite number >= 0", 1e-3),
      "final_learning_rate_fraction": (lambda v: 0 <= v <= 1, "a number in [0, 1]", 0.1),
      "weight_decay": (lambda v: v >= 0, "a finite number >= 0", 0.0),
      "b1": (lambda v: 0 <= v < 1, "a number in [0, 1)", 0.9),
      "b2": (lambda v: 0 <= v < 1, "a number in [0, 1)", 0.95),
      "eps": (lambda v: v > 0, "a finite number > 0", 1e-8)}
  for name, (check, rule, example) in real_rules.items():
    value = getattr(config, name)
    if not is_real(value) or not check(float(value)):
      fail(name, rule, example)
  if config.max_grad_norm is not None and not is_real(config.max_grad_norm):
    fail("max_grad_norm", "None (no clipping) or a finite number (<= 0 also disables clipping)", 1.0)
  if not isinstance(config.async_checkpointing, (bool, np.bool_)):
    fail("async_checkpointing", "True or False", True)
  if config.compute_dtype is not None:
    try:
      floating = jnp.issubdtype(jnp.dtype(config.compute_dtype), jnp.floating)
    except TypeError:
      floating = False
    if not isinstance(config.compute_dtype, str) or not floating:
      fail("compute_dtype", "None or the name of a floating dtype ('bfloat16', 'float32')", '"bfloat16"')


@dataclasses.dataclass
class TrainState:
  """What changes during training (and what a checkpoint holds).

  step: int32 scalar, completed optimizer updates.
  params: trainable parameters as a pure nested dict (`nnx.State.to_pure_dict()` layout).
  opt_state: optax state over `params` only.
  rng: uint32 `[2]` key; split once per step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state", "rng"],
                                 meta_fields=[])


@dataclasses.dataclass
class TrainResult:
  """What `Trainer.train` returns."""
  step: int
  metrics: dict[str, float]
  eval_metrics: dict[str, float]
  preempted: bool = False
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _cast_floating(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _tokens_in(batch: dict[str, np.ndarray]) -> int:
  if "decoder_input_tokens" in batch:
    return int(np.prod(np.shape(batch["decoder_input_tokens"])))
  first = np.shape(next(iter(batch.values())))
  return int(np.prod(first[:2]))


class _SigtermFlag:
  """Sets a flag on SIGTERM (TPU VM preemption notice); the loop checks it after every step."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after the current step, then exiting.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Trainer:
  """Trains the `trainable` part of `model` with `loss_fn`.

  Usage:
    trainer = Trainer(model, loss_fn, TrainConfig(num_steps=1000), trainable=nnx.LoRAParam,
                      workdir="/tmp/run", checkpoint_metadata={"base": "hf:HuggingFaceTB/SmolLM2-135M"})
    result = trainer.train(train_iterator, eval_batches=lambda: make_eval_iterator())
    model = trainer.model()  # the trained model (trainable state written back)
  """

  def __init__(self, model: nnx.Module, loss_fn: LossFn, config: TrainConfig | None = None, *,
               trainable: Any = nnx.Param, workdir: str | None = None, mesh: Mesh | None = None,
               checkpoint_metadata: dict | None = None, process_local_batches: bool = False,
               rules=partitioning.LOGICAL_AXIS_RULES):
    self.config = config or TrainConfig()
    self.loss_fn = loss_fn
    self.workdir = workdir
    self.mesh = mesh if mesh is not None else self.config.mesh()
    self.rules = rules
    self.process_local_batches = process_local_batches
    self.checkpoint_metadata = dict(checkpoint_metadata or {})
    self.tx = self.config.optimizer()

    graphdef, trainable_state, frozen_state = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(trainable_state):
      raise UserError(f"The trainable filter {trainable!r} selects no parameters of "
                       f"{type(model).__name__}: nothing to train.")
    self.graphdef = graphdef
    self.trainable_filter = trainable
    self.param_shardings = partitioning.state_shardings(trainable_state, self.mesh, rules)
    self.frozen_shardings = partitioning.state_shardings(frozen_state, self.mesh, rules)
    # A copy (never an alias): the train state is donated to the step, and the caller's module must
    # keep its arrays. (device_put may hand back the caller's buffer for a shard that already sits on
    # the right device, so copy explicitly.)
    params = jax.tree.map(jnp.copy, jax.device_put(trainable_state.to_pure_dict(), self.param_shardings))
    frozen = frozen_state.to_pure_dict()
    if self.config.compute_dtype is not None:
      # The frozen base is stored in the compute dtype once (half the memory at bf16), never cast
      # inside the step; rollouts and evals of `model()` then compute in that dtype too.
      frozen = _cast_floating(frozen, jnp.dtype(self.config.compute_dtype))
    self.frozen = jax.device_put(frozen, self.frozen_shardings)

    abstract_opt_state = jax.eval_shape(self.tx.init, params)
    opt_shardings = partitioning.optimizer_state_shardings(
        self.tx, self.param_shardings, abstract_opt_state, self.mesh)
    replicated = partitioning.replicated(self.mesh)
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=replicated)
    opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(params)
    self.state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
        opt_state=opt_state,
        rng=jax.device_put(jax.random.PRNGKey(self.config.seed), replicated))
    self._compiled_step = None
    self._compiled_eval = None
    self._batch_spec = None

  # The pure step --------------------------------------------------------------------------------
  def _forward_loss(self, params, frozen, batch, rng):
    if self.config.compute_dtype is not None:
      dtype = jnp.dtype(self.config.compute_dtype)
      params = _cast_floating(params, dtype)  # the frozen base is stored in this dtype already
    model = nnx.merge(self.graphdef, params, frozen)
    # Activations named by the model (nn/sharding.py) are constrained on a multi-device mesh only.
    with partitioning.activation_sharding(self.mesh, self.rules):
      loss, metrics = self.loss_fn(model, batch, rng)
    return loss.astype(jnp.float32), metrics

  def _train_step(self, state: TrainState, frozen, batch):
    num_micro = self.config.num_microbatches
    rng, step_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(self._forward_loss, has_aux=True)

    if num_micro == 1:
      (loss, metrics), grads = grad_fn(state.params, frozen, batch, step_rng)
    else:
      # Microbatch m takes rows m, m + M, m + 2M, ...: every device's contiguous slice of the batch
      # contributes to every microbatch, so no data moves between devices.
      def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
      micro_batches = jax.tree.map(split, batch)
      zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (_, zero_metrics), _ = jax.eval_shape(grad_fn, state.params, frozen,
                                            jax.tree.map(lambda x: x[0], micro_batches), step_rng)
      zero_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), zero_metrics)

      def accumulate(carry, inputs):
        grad_sum, loss_sum, metric_sum = carry
        micro_batch, micro_rng = inputs
        (loss, metrics), grads = grad_fn(state.params, frozen, micro_batch, micro_rng)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        metric_sum = jax.tree.map(lambda a, m: a + m.astype(jnp.float32), metric_sum, metrics)
        return (grad_sum, loss_sum + loss, metric_sum), None

      micro_rngs = jax.random.split(step_rng, num_micro)
      (grad_sum, loss_sum, metric_sum), _ = jax.lax.scan(
          accumulate, (zero_grads, jnp.zeros((), jnp.float32), zero_metrics),
          (micro_batches, micro_rngs))
      grads = jax.tree.map(lambda g, p: (g / num_micro).astype(p.dtype), grad_sum, state.params)
      loss = loss_sum / num_micro
      metrics = jax.tree.map(lambda m: m / num_micro, metric_sum)

    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    metrics.update(loss=loss, grad_norm=grad_norm)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  def _eval_step(self, params, frozen, batch):
    _, metrics = self._forward_loss(params, frozen, batch, jax.random.PRNGKey(0))
    return {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}

  def _global_rows(self, rows: int) -> int:
    return rows * jax.process_count() if self.process_local_batches else rows

  def _device_batch(self, batch, allow_replicated: bool = False):
    return partitioning.global_batch(batch, self.mesh, self.rules, self.process_local_batches,
                                     allow_replicated=allow_replicated)

  def _batch_shardings(self, batch):
    return {k: partitioning.batch_sharding(self.mesh, np.ndim(v), self._global_rows(np.shape(v)[0]),
                                           self.rules)
            for k, v in batch.items()}

  def compile(self, batch: dict[str, np.ndarray]):
    """Lowers and compiles the step for this batch shape; prints the compile-time memory analysis."""
    num_micro = self.config.num_microbatches
    for name, value in batch.items():
      if self._global_rows(np.shape(value)[0]) % num_micro:
        raise UserError(f"Batch feature {name!r} has {np.shape(value)[0]} rows, not a multiple of "
                         f"TrainConfig.num_microbatches={num_micro}.")
      partitioning.check_batch_divides(self.mesh, self._global_rows(np.shape(value)[0]), self.rules,
                                       what=f"The training batch (feature {name!r})")
    batch_shardings = self._batch_shardings(batch)
    replicated = partitioning.replicated(self.mesh)
    jitted = jax.jit(self._train_step,
                     in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
                     out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    abstract_batch = {
        k: jax.ShapeDtypeStruct((self._global_rows(np.shape(v)[0]),) + np.shape(v)[1:],
                                np.asarray(v).dtype, sharding=batch_shardings[k])
        for k, v in batch.items()}
    started = time.time()
    compiled = jitted.lower(self.state, self.frozen, abstract_batch).compile()
    logging.info("Train step compiled in %.1f s.", time.time() - started)
    self._report_memory(compiled)
    self._compiled_step = compiled
    self._batch_spec = {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    return compiled

  @staticmethod
  def _report_memory(compiled) -> None:
    analysis = compiled.memory_analysis()
    if analysis is None:
      logging.info("Compile-time memory analysis: not available on this backend.")
      return
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    fields = [("arguments", "argument_size_in_bytes"), ("outputs", "output_size_in_bytes"),
              ("aliased (donated)", "alias_size_in_bytes"), ("temporaries", "temp_size_in_bytes"),
              ("generated code", "generated_code_size_in_bytes")]
    parts = [f"{label} {mib(getattr(analysis, attr))}" for label, attr in fields
             if getattr(analysis, attr, None) is not None]
    message = "Compile-time memory analysis of the train step (per device): " + ", ".join(parts)
    if jax.process_index() == 0:  # printed once (not also logged: absl's INFO goes to the console)
      print(message, flush=True)
    else:
      logging.info(message)

  def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """One optimizer update on a host batch; returns device metrics (not yet fetched)."""
    if self._compiled_step is None or self._batch_spec != {
        k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}:
      self.compile(batch)
    device_batch = self._device_batch(batch)
    self.state, metrics = self._compiled_step(self.state, self.frozen, device_batch)
    return metrics

  def evaluate(self, batches: Iterable[dict[str, np.ndarray]],
               num_batches: int | None = None) -> dict[str, float]:
    """Mean of the loss function's metrics over `batches` (no gradients)."""
    if self._compiled_eval is None:
      self._compiled_eval = jax.jit(self._eval_step)
    sums: dict[str, float] = {}
    count = 0
    for batch in batches:
      if num_batches is not None and count >= num_batches:
        break
      metrics = self._compiled_eval(self.state.params, self.frozen,  # a last partial batch may replicate
                                    self._device_batch(batch, allow_replicated=True))
      for name, value in jax.device_get(metrics).items():
        sums[name] = sums.get(name, 0.0) + float(value)
      count += 1
    if count == 0:
      raise UserError("Evaluation got no batches: the eval data source is empty.")
    return {name: value / count for name, value in sums.items()}

  def model(self) -> nnx.Module:
    """The model with the current trainable state (a fresh module; frozen state shared)."""
    return nnx.merge(self.graphdef, self.state.params, self.frozen)

  # Checkpoints -----------------------------------------------------------------------------------
  def _checkpointer(self) -> Checkpointer | None:
    if self.workdir is None:
      return None
    return Checkpointer(os.path.join(self.workdir, "checkpoints"),
                        max_to_keep=self.config.keep_checkpoints,
                        async_save=self.config.async_checkpointing)

  def restore(self, step: int | None = None) -> dict | None:
    """Loads the checkpoint at `step` (default: the latest complete one) of the workdir into the
    train state. Returns the data iterator's saved state, or None when there is no checkpoint.

    Eval jobs use it to get the trained model: build the same model and filter, `restore()`, then
    `model()`.
    """
    checkpointer = self._checkpointer()
    if checkpointer is None:
      raise UserError("Trainer.restore needs a workdir: pass workdir= to the Trainer.")
    try:
      if step is not None:
        self.state, data_state, _ = checkpointer.restore(step, self.state)
        return data_state
      # The newest checkpoint that reads; broken or empty step directories are named and skipped.
      restored = checkpointer.restore_latest(self.state)
      if restored is None:
        return None
      _, self.state, data_state, _ = restored
      return data_state
    finally:
      checkpointer.close()

  def _meta(self) -> dict:
    meta = dict(self.checkpoint_metadata)
    meta.setdefault("trainable_filter", repr(self.trainable_filter))
    return meta

  # The loop --------------------------------------------------------------------------------------
  def train(self, train_data: DataIterator | Iterator[dict[str, np.ndarray]], *,
            eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]] | None = None,
            eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None,
            step_callback: Callable[[int, dict[str, float], dict[str, np.ndarray]], None] | None = None,
            final_eval: bool = True) -> TrainResult:
    """Trains up to `config.num_steps`, resuming from the latest checkpoint in the workdir.

    Args:
      train_data: yields host batches `{name: [global_batch, ...]}`; with `get_state()` / `set_state()`
        its position is checkpointed and restored.
      eval_batches: returns a fresh eval iterator; `loss_fn`'s metrics are averaged over it (prefixed
        `eval/`).
      eval_fn: `eval_fn(model, step) -> {name: float}` for method-specific evaluation (generation,
        accuracy, ...), run at the same times.
      step_callback: called after every step as `callback(step, metrics, host_batch)` (tests record
        the batches seen; methods may log more).
      final_eval: also evaluate after the last step (the generic jobs pass False: they run the
        method's full evaluation themselves).
    Returns:
      A `TrainResult` (final step, last metrics, last eval metrics, whether SIGTERM stopped it).
    Raises:
      NonFiniteLossError: the loss or gradient norm became NaN/Inf (that state is not saved).
      StuckTrainingError: the gradient norm was exactly 0 for `stop_after_zero_grad_steps` steps.
      CheckpointReadError: the workdir has checkpoints but none of them reads.

    Preemption: on SIGTERM the loop saves a checkpoint after the current step, skips the final eval,
    returns `preempted=True` and records it process-wide (`was_preempted()`), so `persona_jax.main`
    exits with `PREEMPTED_EXIT_CODE` (75) and the launcher reruns the command to resume. A job should
    return right after a preempted `train` (or call `raise_if_preempted()`), skipping its own final
    evaluation and exports.
    """
    config = self.config
    checkpointer = self._checkpointer()
    is_chief = jax.process_index() == 0
    writer = MetricsWriter(os.path.join(self.workdir, "tensorboard") if self.workdir and is_chief
                           else None, writers=config.metrics_writers,
                           hparams=dict(dataclasses.asdict(config), **self._meta()))
    start_step = 0
    # A checkpoint is "known good" once a finite loss with a non-zero gradient was computed from the
    # parameters it holds (the step after it was saved); only such a checkpoint is offered as the one
    # to go back to when the run diverges.
    last_saved: int | None = None
    known_good: int | None = None
    restored = checkpointer.restore_latest(self.state) if checkpointer is not None else None
    if restored is not None:
      latest, self.state, data_state, _ = restored
      last_saved = latest
      start_step = int(jax.device_get(self.state.step))
      if data_state and hasattr(train_data, "set_state"):
        train_data.set_state(data_state)
      elif not hasattr(train_data, "set_state"):
        logging.warning("The training data iterator has no set_state(): resuming at step %d without "
                        "restoring its position.", start_step)
      logging.info("Resumed from the checkpoint at step %d in %s.", latest, checkpointer.directory)
      if is_chief:
        print(f"Resumed from checkpoint step {latest} ({checkpointer.directory}).", flush=True)

    def save(step: int):
      nonlocal last_saved
      if checkpointer is None:
        return
      data_state = train_data.get_state() if hasattr(train_data, "get_state") else {}
      checkpointer.save(step, self.state, data_state, self._meta())
      last_saved = step

    def go_back_advice() -> str:
      if checkpointer is None:
        return "No workdir, so no checkpoint to go back to."
      checkpointer.wait()
      if known_good is not None:
        return (f"The last known-good checkpoint is step {known_good} in {checkpointer.directory} (a "
                "finite loss was computed from it).")
      if last_saved is not None:
        return (f"No checkpoint is known to be good: step {last_saved} was saved but no finite, "
                "still-learning step followed it, so it may hold the same problem.")
      return "No checkpoint was saved before this."

    def run_eval(step: int) -> dict[str, float]:
      results = {}
      if eval_batches is not None:
        results.update({f"eval/{k}": v for k, v in
                        self.evaluate(eval_batches(), config.num_eval_batches).items()})
      if eval_fn is not None:
        results.update({f"eval/{k}": float(v) for k, v in eval_fn(self.model(), step).items()})
      if results:
        writer.write(step, results)
        if is_chief:
          print(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())),
                flush=True)
      return results

    progress = ProgressLine(config.num_steps, start_step)
    step = start_step
    metrics_host: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    history = []
    preempted = False
    zero_grad_since: int | None = None  # first step of the current run of exactly-zero grad norms
    iterator = iter(train_data) if not hasattr(train_data, "__next__") else train_data
    try:
      with _SigtermFlag() as sigterm:
        while step < config.num_steps:
          try:
            batch = next(iterator)
          except StopIteration:
            raise UserError(f"The training data ran out at step {step} of {config.num_steps}: use a "
                             "repeating iterator or fewer TrainConfig.num_steps.") from None
          metrics = self.step(batch)
          step += 1
          metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
          loss_value, grad_norm = metrics_host["loss"], metrics_host["grad_norm"]
          if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(
                f"Non-finite training loss at step {step} (loss={loss_value}, grad_norm={grad_norm}); "
                f"stopped without saving it. Likely cause: TrainConfig.learning_rate="
                f"{config.learning_rate:g} is too high, or the data of step {step} holds NaN/Inf "
                f"(loss weights, inputs). {go_back_advice()}")
          if grad_norm == 0.0:
            zero_grad_since = step if zero_grad_since is None else zero_grad_since
            if (config.stop_after_zero_grad_steps and
                step - zero_grad_since + 1 >= config.stop_after_zero_grad_steps):
              raise StuckTrainingError(
                  f"Training is stuck at step {step}: the gradient norm has been exactly 0.0 for "
                  f"{step - zero_grad_since + 1} consecutive steps (since step {zero_grad_since}; loss "
                  f"{loss_value:.6g}); stopped without saving. Likely cause: TrainConfig.learning_rate="
                  f"{config.learning_rate:g} is far too high and saturated the parameters, or the loss "
                  "does not depend on the trainable parameters (check the trainable filter and the "
                  "loss weights). TrainConfig.stop_after_zero_grad_steps=0 disables this check. "
                  f"{go_back_advice()}")
          else:
            zero_grad_since = None
            # These metrics come from the parameters of the last save: that checkpoint is good.
            known_good = last_saved
          history.append(dict(metrics_host, step=step))
          if step_callback is not None:
            step_callback(step, metrics_host, batch)
          progress.update(step, tokens=_tokens_in(batch))
          if step % config.log_every == 0 or step == config.num_steps:
            writer.write(step, dict(metrics_host, **progress.rates(step),
                                    learning_rate=learning_rate_at(config, step)))
            if is_chief:
              print(progress.line(step, metrics_host["loss"]), flush=True)
          if config.eval_every and step % config.eval_every == 0 and step < config.num_steps:
            eval_metrics = run_eval(step)
          stop = self._agree(sigterm.received)
          if (stop or step == config.num_steps or
              (config.checkpoint_every and step % config.checkpoint_every == 0)):
            save(step)
          if stop:
            preempted = True
            PREEMPTION.mark(step)
            logging.warning("Stopped at step %d after SIGTERM; checkpoint saved.", step)
            if is_chief:
              print(f"SIGTERM: saved checkpoint at step {step}; exiting.", flush=True)
            break
      if final_eval and not preempted and (eval_batches is not None or eval_fn is not None):
        eval_metrics = run_eval(step)
      if checkpointer is not None and not preempted and start_step == config.num_steps:
        logging.info("Nothing to do: the checkpoint is already at num_steps=%d.", step)
    finally:
      if checkpointer is not None:
        checkpointer.wait()
        checkpointer.close()
      writer.close()
    return TrainResult(step=step, metrics=metrics_host, eval_metrics=eval_metrics,
                       preempted=preempted, history=history)

  def reset(self, model: nnx.Module, workdir: str | None = None) -> None:
    """A fresh train state (step 0, a new optimizer state, the config's seed) holding `model`'s
    trainable parameters, checkpointed under `workdir` from now on; the compiled step is kept.

    `model` has the structure the Trainer was built with (e.g. that module, kept untrained): one
    Trainer, compiled once, then trains many models of one shape (MiLP: a memory per user).
    """
    params = nnx.state(model, self.trainable_filter).to_pure_dict()
    if jax.tree.structure(params) != jax.tree.structure(self.state.params):
      raise UserError("Trainer.reset: the model's trainable parameters do not have the structure "
                       "the Trainer was built with; build a new Trainer for another model.")
    params = jax.tree.map(jnp.copy, jax.device_put(params, self.param_shardings))
    replicated = self.state_shardings.step
    self.state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
        opt_state=jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params),
        rng=jax.device_put(jax.random.PRNGKey(self.config.seed), replicated))
    self.workdir = workdir

  @staticmethod
  def _agree(flag: bool) -> bool:
    """All processes stop at the same step if any of them got SIGTERM."""
    if jax.process_count() == 1:
      return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
