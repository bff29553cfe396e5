"""Orbax checkpoints of the train state: trainable params, optimizer state, step, RNG and the data
iterator's position.

Frozen parameters are never saved; the checkpoint's `meta` item records where they come from (for
example the Hugging Face source string of the base model), so a checkpoint plus that pointer rebuilds
the full model.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint whose
write was interrupted (SIGKILL, preemption) is never listed by `latest_step()` and never restored.
A step directory that is there but incomplete (empty, an item missing) or that fails to read (an array
file deleted or corrupted) is named in one line and skipped: `restore_latest` falls back to the previous
complete checkpoint, says so, and moves the bad directory aside to `<checkpoints>.broken/` (never
deletes it) once an older checkpoint has restored, so the resumed run can write that step again.

Layout of `<workdir>/checkpoints/<step>/`:
  state/  the train state as a flat `{"params.layers.0.attention.q_proj.kernel": array, ...}` dict
  data/   JSON: the data iterator's `get_state()`
  meta/   JSON: step, the base-model pointer, anything the job adds
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from persona_jax.errors import UserError
from persona_jax.train import workdir as workdir_lib


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree: Any) -> dict[str, Any]:
  """A pytree -> `{"a.b.0.c": leaf}` (string keys keep the on-disk format independent of pytree types)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = ".".join(_key_name(k) for k in path)
    if name in flat:
      raise UserError(f"Two leaves of the train state flatten to the same checkpoint key {name!r}.")
    flat[name] = leaf
  return flat


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten`: leaves of `flat` put back into `template`'s structure."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [".".join(_key_name(k) for k in path) for path, _ in paths]
  missing = [n for n in names if n not in flat]
  if missing:
    raise UserError(f"Checkpoint lacks {len(missing)} entries of the train state, e.g. {missing[:3]}: "
                     "it was written by a different model or trainable filter.")
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


ITEM_NAMES = ("state", "data", "meta")


class CheckpointReadError(UserError):
  """No checkpoint of the directory could be read (each one's problem is in the message)."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _print_chief(message: str) -> None:
  logging.info("%s", message)  # info: the console gets the printed line once, log files get it too
  if jax.process_index() == 0:
    print(message, flush=True)


class _QuietClosedLoop:
  """While a failing Orbax restore unwinds, TensorStore callbacks land on a closed asyncio loop and
  print one 'Event loop is closed' traceback each; they say nothing the one-line report does not."""

  def __enter__(self):
    self._previous = sys.unraisablehook
    sys.unraisablehook = self._hook
    return self

  def _hook(self, unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
        unraisable.exc_value):
      return
    self._previous(unraisable)

  def __exit__(self, *exc):
    sys.unraisablehook = self._previous


class Checkpointer:
  """A `CheckpointManager` over `<workdir>/checkpoints` that saves and restores train states."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise UserError(f"Checkpointer(max_to_keep={max_to_keep!r}): must be an integer >= 1 (0 would delete "
                       "every checkpoint it writes). Fix: TrainConfig.keep_checkpoints=3.")
    self.directory = workdir_lib.resolve(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES)

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(workdir_lib.join(self.directory, str(int(step))))

  def incomplete(self, step: int) -> str | None:
    """Why the step directory is not a complete checkpoint (None when every item is there)."""
    directory = self._step_dir(step)
    if not directory.exists() or not any(directory.iterdir()):
      return "the step directory is empty"
    missing = [item for item in ITEM_NAMES
               if not (directory / item).is_dir() or not any((directory / item).iterdir())]
    if missing:
      return f"item(s) {missing} are missing or empty"
    return None

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (unfinished temporary directories and step directories with an
    item missing are ignored; one that fails to read is found only by `restore_latest`)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint directory, oldest first."""
    return sorted(s for s in self.manager.all_steps() if self.incomplete(s) is None)

  def save(self, step: int, state: Any, data_state: dict | None, meta: dict | None = None) -> None:
    """Saves asynchronously (device->host copy happens now, so the state may be donated right after)."""
    meta = dict(meta or {})
    meta["step"] = int(step)
    self.manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                                data=ocp.args.JsonSave(data_state or {}),
                                meta=ocp.args.JsonSave(meta)),
        force=True)
    logging.info("Checkpoint for step %d is being written to %s.", step, self.directory)

  def restore(self, step: int, template: Any) -> tuple[Any, dict, dict]:
    """Restores `(state, data_state, meta)`; `template` gives structure, dtypes and shardings."""
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_like(flatten(template))),
                                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return unflatten_like(template, restored["state"]), dict(restored["data"] or {}), dict(
        restored["meta"] or {})

  def restore_latest(self, template: Any, *, before: int | None = None,
                     report: Callable[[str], None] = _print_chief
                     ) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest checkpoint that reads, falling back to older ones.

    Every step directory that is incomplete or fails to read is named in one line (`report`), and the
    checkpoint finally used is named too. Once an older checkpoint has restored (so the template is
    right and the newer ones really are broken), the broken directories are moved aside to
    `<checkpoints>.broken/<step>-<time>` (kept, never deleted) so the run can write those steps again.

    Args:
      template: the train state giving structure, dtypes and shardings.
      before: only consider steps below this one.
    Returns:
      `(step, state, data_state, meta)`, or None when the directory holds no step directory at all.
    Raises:
      CheckpointReadError: step directories exist but none of them could be read (nothing is moved).
    """
    steps = sorted((int(s) for s in self.manager.all_steps()
                    if before is None or int(s) < before), reverse=True)
    if not steps:
      return None
    problems: list[tuple[int, str]] = []
    for step in steps:
      problem = self.incomplete(step)
      if problem is None:
        try:
          with _QuietClosedLoop():
            state, data_state, meta = self.restore(step, template)
        except Exception as error:  # pylint: disable=broad-except
          logging.debug("Checkpoint step %d failed to read.", step, exc_info=True)
          problem = f"failed to read ({_first_line(error)})"
        else:
          if problems:
            moved = self._move_aside([s for s, _ in problems])
            _print_chief(f"Using checkpoint step {step}, the previous complete one; skipped step(s) "
                         f"{[s for s, _ in problems]}" + (f", moved to {moved}." if moved else "."))
          return step, state, data_state, meta
      _print_chief(f"Checkpoint step {step} in {self.directory} is unusable: {problem}. Trying the "
                   "previous one.")
      problems.append((step, problem))
    details = "; ".join(f"step {s}: {p}" for s, p in problems)
    raise CheckpointReadError(
        f"No checkpoint in {self.directory} could be read ({details}). If the model, trainable filter or "
        "TrainConfig changed since they were written, restore the old settings or use a fresh workdir; "
        "otherwise move the broken step directories away and rerun.")

  def _move_aside(self, steps: list[int]) -> str | None:
    """Renames broken step directories into `<checkpoints>.broken/` (process 0; all processes wait)."""
    target = epath.Path(str(self.directory).rstrip("/") + ".broken")
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        source = self._step_dir(step)
        if source.exists():
          source.rename(target / f"{step}-{stamp}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("persona_jax_checkpoint_move_aside")
    self.manager.reload()
    return str(target)

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_trainable(workdir: str, model, trainable, step: int | None = None) -> int | None:
  """Loads only the trained parameters of `<workdir>/checkpoints/<step>` into `model` (in place).

  Evaluation and export need the trained weights, not the optimizer state: this reads the `params.*`
  entries of the saved train state and nothing else (Orbax partial restore), so no optimizer is
  built and no optimizer memory is allocated. `trainable` is the NNX filter the run trained with.
  Returns the restored step, or None when the workdir has no checkpoint.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  checkpointer = Checkpointer(workdir_lib.join(workdir, "checkpoints"), async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      return None
    state = nnx.state(model, trainable)
    params = state.to_pure_dict()
    template = {f"params.{name}": leaf for name, leaf in flatten(params).items()}
    abstract = abstract_like(template)
    restored = checkpointer.manager.restore(
        int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True)))["state"]
    missing = [name for name in template if name not in restored]
    if missing:
      raise UserError(f"Checkpoint step {step} in {checkpointer.directory} lacks {len(missing)} "
                       f"trained parameters, e.g. {missing[:3]}: it was written by another model or "
                       "trainable filter.")
    values = unflatten_like(params, {name[len("params."):]: value for name, value in restored.items()})
    state.replace_by_pure_dict(values)
    nnx.update(model, state)
    return int(step)
  finally:
    checkpointer.close()
