"""Exports what a job trained to Hugging Face formats.

  python -m persona_jax.export --workdir=runs/coprocessor --output_dir=exports/coprocessor

How: the workdir holds the job's gin config (`config.gin`, written by `persona_jax.main`) and its
Orbax checkpoints. The config names the job (`run.job = @<room>.train`); the room's gin-configurable
`build_job(workdir)` rebuilds the same model and trainer, `trainer.restore()` loads the trained
state, and then:
  * every `persona_jax.nn.Decoder` in the trained model is written as a `transformers` model dir at
    its attribute path (`decoder/`, `coprocessor/`, ...), LoRA adapters merged into the kernels, with
    the job's tokenizer when it has a Hugging Face one;
  * a room may add its own artifacts with `persona_jax/<room>/export.py: export_artifacts(model,
    output_dir)` (the coprocessor writes its soft tokens and a `transformers` loader snippet);
  * PEFT adapters a job wrote into `<workdir>/peft/<name>/` (MiLP's per-user memories) are copied to
    `<output_dir>/peft/<name>/`, next to the exported base.
`<output_dir>/export_manifest.json` lists every artifact, and every module that could not be
exported with the reason (a decoder carrying a method module in `Block.after` has no `transformers`
equivalent).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any

import gin
from absl import app, flags

FLAGS = flags.FLAGS

CONFIG_FILE = "config.gin"
MANIFEST_FILE = "export_manifest.json"
PEFT_DIR = "peft"
_JOB_PATTERN = re.compile(r"^\s*run\.job\s*=\s*@(?:[\w.]+\.)?(\w+)\.(\w+)\s*$", re.MULTILINE)
# Bare selectors of a room's configurables in an operative config (`job.seed = 0`), qualified with the
# room on re-parsing, since several rooms register a `job` and a `train`.
_BARE_ROOM_SELECTOR = re.compile(r"^(job|train|eval)\.", re.MULTILINE)
_RUN_BINDING = re.compile(r"^run\.\w+\s*=.*$", re.MULTILINE)


def job_room(config_text: str, where: str) -> str:
  """The method room of a job config: `run.job = @coprocessor.train` -> 'coprocessor'."""
  match = _JOB_PATTERN.search(config_text)
  if match is None:
    raise ValueError(f"{where}: no `run.job = @<room>.train` line; export needs the config.gin that "
                     "`python -m persona_jax.main` wrote into the workdir.")
  if match.group(2) != "train":
    raise ValueError(f"{where}: the job is `{match.group(1)}.{match.group(2)}`; export rebuilds "
                     f"`{match.group(1)}.train` jobs (through the room's build_job) only.")
  return match.group(1)


def room_config(config_text: str, room: str) -> str:
  """The job's bindings without `run.*` (main's own) and with the room's bare selectors qualified."""
  return _BARE_ROOM_SELECTOR.sub(rf"{room}.\1.", _RUN_BINDING.sub("", config_text))


def _build_job_function(room: str, where: str):
  try:
    module = importlib.import_module(f"persona_jax.{room}.train")
  except ModuleNotFoundError as error:
    raise ValueError(f"{where}: the job's room persona_jax.{room} has no train module ({error}).") from error
  build_job = getattr(module, "build_job", None)
  if build_job is None:
    raise ValueError(f"{where}: persona_jax/{room}/train.py has no `build_job(workdir)`, so its trained "
                     "model cannot be rebuilt for export.")
  return build_job


def _job_binding(room: str, name: str) -> Any:
  try:
    return gin.query_parameter(f"{room}.job.{name}")
  except ValueError:
    return None


def _tokenizer_source(room: str) -> str | None:
  for name in ("vocabulary", "pretrained"):
    value = _job_binding(room, name)
    if isinstance(value, str) and value != "bytes":
      return value
    if value == "bytes":
      return None
  return None


def find_decoders(model) -> list[tuple[str, Any]]:
  """[(name, decoder)] for every `Decoder` in `model`, named by attribute path ('decoder', ...)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from persona_jax.nn import Decoder  # pylint: disable=g-import-not-at-top

  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Decoder):
      name = "/".join(str(part) for part in path) or "decoder"
      if not any(name.startswith(other + "/") for other, _ in found):  # a decoder inside a decoder
        found.append((name, node))
  return found


def export_decoder(decoder, out_dir: pathlib.Path, *, remove_adapters: bool = False, tokenizer=None,
                   chat_template=None, special_tokens=None) -> int:
  """Writes `decoder` (a copy) as a `transformers` model dir, its LoRA adapters merged into the
  kernels, or dropped with `remove_adapters` (the base that exported PEFT adapters apply to).
  Returns the number of adapters merged or removed."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from persona_jax.hf import save_pretrained  # pylint: disable=g-import-not-at-top
  from persona_jax.nn import lora, merge_lora  # pylint: disable=g-import-not-at-top

  decoder = nnx.clone(decoder)
  if remove_adapters:
    sites = lora.lora_sites(decoder)
    for layer, projection, key, _ in sites:
      del lora.get_projection(decoder, layer, projection).adapters[key]
    merged = len(sites)
  else:
    merged = merge_lora(decoder)
  save_pretrained(decoder, out_dir, tokenizer=tokenizer, chat_template=chat_template,
                  special_tokens=special_tokens)
  return merged


def copy_peft_adapters(workdir: pathlib.Path, output_dir: pathlib.Path) -> dict[str, str]:
  """Copies `<workdir>/peft/<name>/` to `<output_dir>/peft/<name>/`.

  `<name>` is one PEFT adapter (adapter_config.json + adapter_model.safetensors) or a directory of
  them (MiLP: `peft/<user>/<memory_j>/`, all active together; `persona_jax.hf.peft.peft_model`).
  """
  source = workdir / PEFT_DIR
  if not source.is_dir():
    return {}
  copied = {}
  for entry in sorted(p for p in source.iterdir() if p.is_dir()):
    configs = sorted(entry.glob("adapter_config.json")) or sorted(entry.glob("*/adapter_config.json"))
    if not configs:
      raise ValueError(f"{entry}: no adapter_config.json in it or its subdirectories, so it holds no PEFT "
                       "adapter; remove it or write adapters with persona_jax.hf.peft.save_peft_adapters.")
    shutil.copytree(entry, output_dir / PEFT_DIR / entry.name)
    copied[f"{PEFT_DIR}/{entry.name}"] = (f"{len(configs)} PEFT LoRA adapter(s) for the exported base "
                                          "decoder/")
  return copied


def export(workdir: str, output_dir: str, *, step: int | None = None, tokenizer: str | None = None,
           overwrite: bool = False) -> dict:
  """Rebuilds the job of `workdir`, restores its checkpoint and writes the Hugging Face artifacts.

  Returns the manifest (also written as `<output_dir>/export_manifest.json`):
  {"room", "step", "artifacts": {relative path: what it is}, "not_exported": {module: reason}}.
  """
  from persona_jax.train.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top

  workdir_path = pathlib.Path(workdir).expanduser().absolute()
  config_path = workdir_path / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"--workdir={workdir}: no {CONFIG_FILE}; point it at the workdir of a job "
                            "run with `python -m persona_jax.main`.")
  output = pathlib.Path(output_dir).expanduser().absolute()
  replace_output = output.exists() and (not output.is_dir() or any(output.iterdir()))
  if replace_output and not overwrite:
    raise FileExistsError(f"--output_dir={output_dir} exists and is not empty; choose an empty "
                          "directory or pass --overwrite.")

  checkpointer = Checkpointer(str(workdir_path / "checkpoints"), async_save=False)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  peft_only = not steps and (workdir_path / PEFT_DIR).is_dir()
  if not steps and not peft_only:
    raise ValueError(f"--workdir={workdir}: no checkpoint under checkpoints/ and no PEFT adapters under "
                     f"{PEFT_DIR}/; train first (or let the job reach TrainConfig.checkpoint_every / its "
                     "end).")
  if steps:
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"--step={step}: no such checkpoint in {workdir}; available steps: {steps}.")
  elif step is not None:
    raise ValueError(f"--step={step}: {workdir} has no checkpoints/, only PEFT adapters; drop --step.")

  config_text = config_path.read_text()
  room = job_room(config_text, str(config_path))
  build_job = _build_job_function(room, str(config_path))
  gin.clear_config()
  try:
    gin.parse_config(room_config(config_text, room))
  except (ValueError, KeyError, SyntaxError, ImportError) as error:
    raise ValueError(f"{config_path} could not be parsed: {error}") from error
  tokenizer = tokenizer or _tokenizer_source(room)
  with gin.unlock_config():
    job = build_job(str(workdir_path))
  if steps:
    job.trainer.restore(step)
  # Without a checkpoint the job's product is its PEFT adapters: the decoders go out as the base they
  # apply to, with the job's (untrained) adapters removed rather than merged.
  model = job.trainer.model()

  tokenizer_files = {}
  if tokenizer is not None:
    from persona_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
    hf_tokenizer, chat_template, special_tokens = load_tokenizer(tokenizer)
    tokenizer_files = {"tokenizer": hf_tokenizer, "chat_template": chat_template,
                       "special_tokens": special_tokens}

  if replace_output:  # only now: a failed rebuild or restore leaves the previous export in place
    if output.is_dir():
      shutil.rmtree(output)
    else:
      output.unlink()
  output.mkdir(parents=True, exist_ok=True)
  artifacts, not_exported = {}, {}
  for name, decoder in find_decoders(model):
    try:
      merged = export_decoder(decoder, output / name, remove_adapters=peft_only, **tokenizer_files)
    except ValueError as error:  # a method module in Block.after: no transformers equivalent
      not_exported[name] = str(error)
      continue
    artifacts[name] = (f"transformers {decoder.config.family} model"
                       + (f", {merged} LoRA adapters {'removed' if peft_only else 'merged'}"
                          if merged else "")
                       + (", with tokenizer" if tokenizer_files else ""))
  if importlib.util.find_spec(f"persona_jax.{room}.export") is not None:
    room_export = importlib.import_module(f"persona_jax.{room}.export")
    artifacts.update(room_export.export_artifacts(model, output))
  artifacts.update(copy_peft_adapters(workdir_path, output))
  if not artifacts:
    raise ValueError(f"Nothing in the {room} job's model could be exported: {not_exported}")

  manifest = {"room": room, "workdir": str(workdir_path), "step": step, "tokenizer": tokenizer,
              "artifacts": artifacts, "not_exported": not_exported}
  (output / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
  return manifest


def define_flags():
  """The command line's flags (defined only when run as a program: persona_jax.main has its own)."""
  flags.DEFINE_string("workdir", None, "A job's workdir (holds config.gin and checkpoints/).")
  flags.DEFINE_string("output_dir", None, "Where the Hugging Face artifacts go (absent or empty).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer source saved with the decoders (default: the job's "
                      "`vocabulary`, else its `pretrained`; none for the bytes vocabulary).")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output_dir.")
  flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors too.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: use --workdir / --output_dir.")
  if not FLAGS.workdir or not FLAGS.output_dir:
    raise app.UsageError("--workdir and --output_dir are required.")
  try:
    manifest = export(FLAGS.workdir, FLAGS.output_dir, step=FLAGS.step, tokenizer=FLAGS.tokenizer,
                      overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as error:
    if FLAGS.traceback:
      raise
    print(f"error: {type(error).__name__}: {error}\n(run with --traceback for the full traceback)",
          file=sys.stderr, flush=True)
    sys.exit(1)
  at = (f"at step {manifest['step']}" if manifest["step"] is not None
        else "(its PEFT adapters; no checkpoints/)")
  print(f"exported the {manifest['room']} job {at} to {FLAGS.output_dir}:")
  for path, what in manifest["artifacts"].items():
    print(f"  {path}: {what}")
  for name, reason in manifest["not_exported"].items():
    print(f"  NOT exported {name}: {reason}")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  define_flags()
  app.run(main)
