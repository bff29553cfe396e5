"""Orbax checkpoints of the train state: trainable params, optimizer state, step, RNG and the data
iterator's position.

Frozen parameters are never saved; the checkpoint's `meta` item records where they come from (for
example the Hugging Face source string of the base model), so a checkpoint plus that pointer rebuilds
the full model.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint whose
write was interrupted (SIGKILL, preemption) is never listed by `latest_step()` and never restored.

Layout of `<workdir>/checkpoints/<step>/`:
  state/  the train state as a flat `{"params.layers.0.attention.q_proj.kernel": array, ...}` dict
  data/   JSON: the data iterator's `get_state()`
  meta/   JSON: step, the base-model pointer, anything the job adds
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

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
      raise ValueError(f"Two leaves of the train state flatten to the same checkpoint key {name!r}.")
    flat[name] = leaf
  return flat


def unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
  """Inverse of `flatten`: leaves of `flat` put back into `template`'s structure."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  names = [".".join(_key_name(k) for k in path) for path, _ in paths]
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f"Checkpoint lacks {len(missing)} entries of the train state, e.g. {missing[:3]}: "
                     "it was written by a different model or trainable filter.")
  return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) to restore into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  """A `CheckpointManager` over `<workdir>/checkpoints` that saves and restores train states."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = workdir_lib.resolve(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (unfinished temporary directories are ignored)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

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

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
