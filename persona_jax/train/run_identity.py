"""A run's identity: the config and base model a workdir was trained with, checked on every rerun.

The first run in a workdir records what it was asked for (every gin binding) and its base model in
`<workdir>/run_identity.json`, and writes `config.gin`. A rerun in the same workdir compares its own
bindings and base with the last recorded ones *before any work starts and before any file is
written*:

- identical: the run resumes; nothing is written (config.gin keeps describing the whole run);
- only bindings that change neither the model, the data nor the base (`FREE_TO_CHANGE`: how long and
  how often, where metrics go, the mesh, `run.job`, evaluation-only settings; `TrainConfig.num_steps`
  may grow, never shrink) differ: the run resumes and its config is added as
  `config.step<N>.gin` (N: the step it resumes from), so config.gin never claims the new values for
  the steps already trained;
- anything else (a room's model or data settings, the learning rate, the seed, `DecoderSource`, or
  the base weights' checksum) differs: `ConfigChangedError` names each differing binding and the
  fix; `--allow_config_change` continues anyway (recorded the same way, as `config.step<N>.gin`).

The base model is its `DecoderSource` settings (bindings) plus, for pretrained weights, the resolved
path and a SHA-256 of each weights file (the `.gguf`, or the directory's `*.safetensors`). A file
whose size and modification time match the record is not hashed again; one that changed is hashed
and compared, so a different frozen base of the same shape behind the same path is caught. A random
preset's base is its bindings (preset, vocabulary, the room's seed).

A workdir without any checkpoint has nothing to protect: its record is replaced. A workdir trained
before this record existed gets one on its next run (config.gin kept as it is).

`run.job = @evaluate` never writes config.gin or the record; an evaluation whose other bindings differ
from the record is checked the same way (a different base would score another model), and its
config is kept as `config.step<N>.evaluate.gin` when it differs in more than `run.job`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import pathlib
import re
from typing import Any

import gin
from etils import epath
from gin import config as gin_config

from persona_jax.errors import UserError
from persona_jax.train import workdir as workdir_lib

RECORD = "run_identity.json"
CONFIG = "config.gin"
HASH_CHUNK = 1 << 22

# Bindings that may change between runs of one workdir without --allow_config_change: they change how
# long or how often the loop does things, where its scalars go, or how it is laid out on devices, not
# what the model, the data or the base are. (`TrainConfig.num_steps` only upwards: see `_num_steps`.)
FREE_TO_CHANGE = frozenset({
    "TrainConfig.num_steps", "TrainConfig.log_every", "TrainConfig.checkpoint_every",
    "TrainConfig.keep_checkpoints", "TrainConfig.async_checkpointing", "TrainConfig.eval_every",
    "TrainConfig.num_eval_batches", "TrainConfig.metrics_writers",
    "TrainConfig.stop_after_zero_grad_steps", "TrainConfig.mesh_data", "TrainConfig.mesh_fsdp",
    "TrainConfig.mesh_tensor", "run.job",
})
# A room's evaluation-only arguments (`<room>.job.eval_batch_size`, `...num_eval_batches`, ...): they
# change what the evaluation reads, never what is trained.
FREE_ARGUMENT = re.compile(r"^(num_eval_|eval_)")


class ConfigChangedError(UserError):
  """A rerun's bindings or base differ from the ones the workdir was trained with."""


# The bindings ------------------------------------------------------------------------------------
def current_bindings() -> dict[str, str]:
  """{'scope/Configurable.argument': value as gin writes it} for every binding parsed so far (macros
  as `name`)."""
  bindings = {}
  for (scope, selector), arguments in gin_config._CONFIG.items():  # pylint: disable=protected-access
    for argument, value in arguments.items():
      bindings[_key(scope, selector, argument)] = _format(value)
  return dict(sorted(bindings.items()))


def _key(scope: str, selector: str, argument: str) -> str:
  if selector == "gin.macro":
    return scope  # a macro `name = value` is stored as gin.macro.value in the scope `name`
  name = gin_config._REGISTRY.minimal_selector(selector)  # pylint: disable=protected-access
  return f"{scope + '/' if scope else ''}{name}.{argument}"


def _format(value: Any) -> str:
  try:
    return gin_config._format_value(value)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  (a value gin cannot print: fall back to repr)
    return repr(value)


def _default(key: str) -> str | None:
  """The default of an unbound `Configurable.argument` as gin would write it (None: none known)."""
  if "." not in key or "/" in key:
    return None
  selector, argument = key.rsplit(".", 1)
  try:
    configurable = gin_config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    parameter = inspect.signature(configurable.wrapped).parameters.get(argument)
  except (KeyError, ValueError, TypeError):
    return None
  if parameter is None or parameter.default is inspect.Parameter.empty:
    return None
  return _format(parameter.default)


# The base ----------------------------------------------------------------------------------------
def describe_base(recorded: dict | None = None) -> dict:
  """What the base decoder is: `DecoderSource`'s settings and, for pretrained weights, the resolved
  path and each weights file's size, mtime and SHA-256 (reused from `recorded` when size and mtime
  match it)."""
  from persona_jax.hf import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  from persona_jax.hf.source import DecoderSource  # pylint: disable=g-import-not-at-top

  source = DecoderSource()
  base: dict[str, Any] = {"source": dataclasses.asdict(source)}
  if source.pretrained is None:
    return base
  kind, path = pretrained_lib.resolve_source(source.pretrained)
  files = [path] if kind == "gguf" else sorted(
      p for pattern in ("*.safetensors", "*.bin", "*.gguf") for p in path.glob(pattern))
  known = (recorded or {}).get("files", {})
  base["path"] = str(path)
  base["files"] = {}
  for file in files:
    stat = file.stat()
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    previous = known.get(file.name, {})
    if (str(path) == (recorded or {}).get("path") and previous.get("size") == entry["size"] and
        previous.get("mtime_ns") == entry["mtime_ns"] and previous.get("sha256")):
      entry["sha256"] = previous["sha256"]
    else:
      entry["sha256"] = _sha256(file)
    base["files"][file.name] = entry
  return base


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as stream:
    for chunk in iter(lambda: stream.read(HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _base_differences(old: dict, new: dict) -> list[str]:
  """Lines naming how the base weights differ (their settings are bindings, compared elsewhere)."""
  lines = []
  if old.get("path") != new.get("path") and old.get("path") and new.get("path"):
    lines.append(f"base weights path: {old.get('path')} -> {new.get('path')}")
  old_files, new_files = old.get("files") or {}, new.get("files") or {}
  for name in sorted(set(old_files) | set(new_files)):
    before, after = old_files.get(name, {}).get("sha256"), new_files.get(name, {}).get("sha256")
    if before != after:
      lines.append(f"base weights file {name}: sha256 {str(before)[:12]} -> {str(after)[:12]} "
                   "(another model behind the same name)" if before and after else
                   f"base weights file {name}: {'added' if after else 'removed'}")
  return lines


# The workdir -------------------------------------------------------------------------------------
def checkpoint_steps(workdir: str) -> list[int]:
  """Checkpoint steps under the workdir (`checkpoints/<step>` up to two directories deep, e.g. a
  room's stage or user directory), the workdir's own first when it has any."""
  root = epath.Path(workdir)
  own, nested = [], []
  for pattern, found in (("checkpoints/*", own), ("*/checkpoints/*", nested),
                         ("*/*/checkpoints/*", nested)):
    try:
      found.extend(int(p.name) for p in root.glob(pattern) if p.name.isdigit() and p.is_dir())
    except OSError:
      continue
  return sorted(own) or sorted(nested)


def read_record(workdir: str) -> dict | None:
  path = workdir_lib.join(workdir, RECORD)
  if not workdir_lib.exists(path):
    return None
  try:
    record = json.loads(workdir_lib.read_text(path))
    record["configs"][-1]["bindings"]  # pylint: disable=pointless-statement
    return record
  except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
    raise UserError(f"{path}: not a readable run record ({error}). It records the config this workdir "
                    "was trained with; restore it, or delete it to record this run's config as the "
                    "first (config.gin is kept).") from None


@dataclasses.dataclass
class Decision:
  """What `check` decided: the config file this run writes (None: none) and the record to write."""
  config_file: str | None
  record: dict | None
  differences: list[str]
  notes: list[str]


def _job_name() -> str:
  try:
    job = gin.query_parameter("run.job")
  except ValueError:
    return ""
  return getattr(getattr(job, "configurable", None), "name", "") or str(job)


def _num_steps(old: str | None, new: str | None) -> bool:
  """True when TrainConfig.num_steps only grew (continuing a run)."""
  try:
    return int(new) >= int(old)
  except (TypeError, ValueError):
    return False


def check(workdir: str, *, allow_change: bool = False) -> Decision:
  """Compares this run's bindings and base with the workdir's record (see the module docstring).

  Raises `ConfigChangedError` before anything is written when a binding that shapes the model, the
  data or the base differs (unless `allow_change`). Writes nothing itself: `write` does, on the chief.
  """
  evaluating = _job_name() == "evaluate"
  record = read_record(workdir)
  steps = checkpoint_steps(workdir)
  bindings = current_bindings()
  if record is None or not steps:
    if evaluating:
      return Decision(None, None, [], [])
    base = describe_base()
    first = {"step": 0, "file": CONFIG, "job": "train", "bindings": bindings, "base": base}
    if record is None and steps:  # trained before records existed: keep its config.gin
      step = steps[-1]
      first = dict(first, step=step, file=f"config.step{step}.gin")
      return Decision(first["file"], {"version": 1, "configs": [first]}, [],
                      [f"{workdir} holds checkpoints (step {step}) but no {RECORD}: recording this "
                       f"run's config as {first['file']}; {CONFIG} is kept as it is."])
    return Decision(CONFIG, {"version": 1, "configs": [first]}, [], [])

  last = record["configs"][-1]
  base = describe_base(last.get("base"))
  shaping, free = [], []
  old_bindings = last["bindings"]
  for key in sorted(set(old_bindings) | set(bindings)):
    before = old_bindings.get(key, _default(key))
    after = bindings.get(key, _default(key))
    if before == after:
      continue
    line = f"{key}: {before if before is not None else '(unbound)'} -> " \
           f"{after if after is not None else '(unbound)'}"
    name = key.split("/")[-1]
    argument = name.rsplit(".", 1)[-1]
    is_free = (name in FREE_TO_CHANGE and (name != "TrainConfig.num_steps" or _num_steps(before, after))
               ) or ("." in name and not name.startswith(("TrainConfig.", "DecoderSource.")) and
                     FREE_ARGUMENT.match(argument))
    if name == "TrainConfig.num_steps" and not is_free:
      line += " (num_steps may only grow in a workdir: a smaller value cuts the learning-rate schedule)"
    (free if is_free else shaping).append(line)
  shaping.extend(_base_differences(last.get("base") or {}, base))
  step = steps[-1]
  if shaping and not allow_change:
    described = f"{last.get('file', CONFIG)} (step {last.get('step', 0)})"
    raise ConfigChangedError(
        f"This run differs from the one {workdir} was trained with ({described}; latest checkpoint "
        f"step {step}) in what shapes the model, the data or the base:\n  " + "\n  ".join(shaping) +
        ("\n(also changed, allowed: " + "; ".join(free) + ")" if free else "") +
        f"\nNothing was written. Fix: use a fresh --workdir for the new settings, rerun with the "
        f"recorded ones (see {workdir}/{CONFIG} and {RECORD}), or pass --allow_config_change to "
        f"continue this run with them (the new config is then kept as config.step{step}.gin beside "
        f"{CONFIG}).")
  differences = shaping + free
  notes = []
  if differences:
    notes.append(f"config differs from {last.get('file', CONFIG)} (resuming from step {step}): "
                 + "; ".join(differences))
  only_job = all(line.startswith("run.job:") for line in differences)
  if evaluating:
    if not differences or only_job:
      return Decision(None, None, differences, notes)
    return Decision(_unused_name(workdir, f"config.step{step}.evaluate"), None, differences, notes)
  if not differences:
    return Decision(None, None, [], [])
  name = _unused_name(workdir, f"config.step{step}")
  entry = {"step": step, "file": name, "job": "train", "bindings": bindings, "base": base,
           "allowed_by_flag": bool(shaping)}
  return Decision(name, dict(record, configs=record["configs"] + [entry]), differences, notes)


def _unused_name(workdir: str, stem: str) -> str:
  name, index = f"{stem}.gin", 2
  while workdir_lib.exists(workdir_lib.join(workdir, name)):
    name, index = f"{stem}.{index}.gin", index + 1
  return name


def write(workdir: str, decision: Decision, config_text: str) -> None:
  """Writes the decision's record and config file (call on the chief only)."""
  if decision.record is not None:
    workdir_lib.write_text(workdir_lib.join(workdir, RECORD),
                           json.dumps(decision.record, indent=1, sort_keys=True) + "\n")
  if decision.config_file is not None:
    workdir_lib.write_text(workdir_lib.join(workdir, decision.config_file), config_text)


def config_path(workdir: str, decision: Decision) -> str | None:
  return None if decision.config_file is None else workdir_lib.join(workdir, decision.config_file)


__all__ = ["ConfigChangedError", "Decision", "FREE_TO_CHANGE", "check", "checkpoint_steps",
           "current_bindings", "describe_base", "write"]
