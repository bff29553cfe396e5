"""Exports what a job trained to Hugging Face formats.

  python -m persona_jax.export --workdir=runs/coprocessor --output_dir=exports/coprocessor

How: the workdir holds the job's gin config (`config.gin`, written by `persona_jax.main`) and its
Orbax checkpoints. The config names the method (`run.method = 'coprocessor'`); the method registry
(`persona_jax.train.method`) rebuilds it from the same bindings, `Method.restore` loads the trained
parameters (no optimizer state), and then:
  * every `persona_jax.nn.Decoder` in the trained model is written as a `transformers` model dir at
    its attribute path (`decoder/`, `coprocessor/`, ...), LoRA adapters merged into the kernels, with
    the method's tokenizer when it has a Hugging Face one;
  * the method adds its own artifacts through `Method.export_artifacts(model, output_dir)` (the
    coprocessor writes its soft tokens and a `transformers` loader snippet);
  * PEFT adapters a job wrote into `<workdir>/peft/<name>/` (MiLP's per-user memories) are copied to
    `<output_dir>/peft/<name>/`, next to the exported base.
`<output_dir>/export_manifest.json` lists every artifact, and every module that could not be
exported with the reason (a decoder carrying a method module in `Block.after` has no `transformers`
equivalent).

Safety: config.gin may only import persona_jax modules (any other `import` line is refused, so a
workdir's config cannot run arbitrary code); everything is written into a staging directory beside
`--output_dir` and swapped in only when complete; `--output_dir` may not be, contain or lie inside a
workdir (a directory with config.gin or checkpoints/), and `--overwrite` replaces only a previous
export (a directory holding export_manifest.json), never anything else.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import sys
from typing import Any

import gin
from absl import app, flags

from persona_jax.errors import MissingFileError, UserError

FLAGS = flags.FLAGS

CONFIG_FILE = "config.gin"
MANIFEST_FILE = "export_manifest.json"
PEFT_DIR = "peft"


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
      raise UserError(f"{entry}: no adapter_config.json in it or its subdirectories, so it holds no PEFT "
                       "adapter; remove it or write adapters with persona_jax.hf.peft.save_peft_adapters.")
    shutil.copytree(entry, output_dir / PEFT_DIR / entry.name)
    copied[f"{PEFT_DIR}/{entry.name}"] = (f"{len(configs)} PEFT LoRA adapter(s) for the exported base "
                                          "decoder/")
  return copied


_IMPORT_LINE = re.compile(r"^\s*import\s+([\w.]+)\s*$", re.MULTILINE)


def read_config(config_path: pathlib.Path) -> str:
  """The workdir's config.gin text, refusing `import` lines of anything but persona_jax modules."""
  text = config_path.read_text()
  foreign = [m.group(1) for m in _IMPORT_LINE.finditer(text)
             if not (m.group(1) == "persona_jax" or m.group(1).startswith("persona_jax."))]
  if foreign:
    raise UserError(f"{config_path}: imports {foreign}; export parses a workdir's config.gin only when "
                    "it imports persona_jax modules (a config could otherwise run any installed code). "
                    "Remove those lines if you trust them.")
  return text


def _is_workdir(path: pathlib.Path) -> bool:
  return (path / CONFIG_FILE).is_file() or (path / "checkpoints").is_dir()


def check_output_dir(output: pathlib.Path, workdir: pathlib.Path, overwrite: bool) -> bool:
  """Refuses an output dir that would touch a run; returns whether a previous export is replaced."""
  resolved, work = output.resolve(), workdir.resolve()
  if resolved == work or work in resolved.parents or resolved in work.parents:
    raise UserError(f"--output_dir={output} is, contains or lies inside the workdir {workdir}: an export "
                    "there could delete the run. Choose a directory outside it, e.g. exports/<run>.")
  for parent in [resolved, *resolved.parents]:
    if parent != resolved and _is_workdir(parent):
      raise UserError(f"--output_dir={output} lies inside another run's workdir {parent}; choose a "
                      "directory outside every workdir.")
  if not resolved.exists():
    return False
  if not resolved.is_dir():
    raise UserError(f"--output_dir={output} is a file; choose a directory.")
  entries = list(resolved.iterdir())
  if not entries:
    return False
  if any(_is_workdir(entry) for entry in entries if entry.is_dir()) or _is_workdir(resolved):
    raise UserError(f"--output_dir={output} contains a run's workdir; choose another directory.")
  if not overwrite:
    raise UserError(f"--output_dir={output} exists and is not empty; choose an empty directory or "
                    "pass --overwrite (which replaces a previous export only).")
  if not (resolved / MANIFEST_FILE).is_file():
    raise UserError(f"--output_dir={output} is not a previous export (no {MANIFEST_FILE}); --overwrite "
                    f"replaces only an earlier export and never deletes anything else. It holds: "
                    f"{sorted(e.name for e in entries)[:10]}.")
  return True


def export(workdir: str, output_dir: str, *, step: int | None = None, tokenizer: str | None = None,
           overwrite: bool = False) -> dict:
  """Rebuilds the method of `workdir`, restores its trained parameters and writes the Hugging Face
  artifacts.

  Returns the manifest (also written as `<output_dir>/export_manifest.json`):
  {"method", "step", "artifacts": {relative path: what it is}, "not_exported": {module: reason}}.
  """
  from persona_jax.train import jobs  # pylint: disable=g-import-not-at-top
  from persona_jax.train.checkpointing import Checkpointer  # pylint: disable=g-import-not-at-top
  from persona_jax.train.method import Run, get_method  # pylint: disable=g-import-not-at-top
  from persona_jax.train.trainer import TrainConfig  # pylint: disable=g-import-not-at-top
  from persona_jax.hf.staging import staged_directory  # pylint: disable=g-import-not-at-top

  workdir_path = pathlib.Path(workdir).expanduser().absolute()
  config_path = workdir_path / CONFIG_FILE
  if not config_path.is_file():
    raise MissingFileError(f"--workdir={workdir}: no {CONFIG_FILE}; point it at the workdir of a job "
                           "run with `python -m persona_jax.main`.")
  output = pathlib.Path(output_dir).expanduser().absolute()
  check_output_dir(output, workdir_path, overwrite)

  checkpointer = Checkpointer(str(workdir_path / "checkpoints"), async_save=False)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  peft_only = not steps and (workdir_path / PEFT_DIR).is_dir()
  if not steps and not peft_only:
    raise UserError(f"--workdir={workdir}: no checkpoint under checkpoints/ and no PEFT adapters under "
                    f"{PEFT_DIR}/; train first (or let the job reach TrainConfig.checkpoint_every / its "
                    "end).")
  if steps:
    step = max(steps) if step is None else step
    if step not in steps:
      raise UserError(f"--step={step}: no such checkpoint in {workdir}; available steps: {steps}.")
  elif step is not None:
    raise UserError(f"--step={step}: {workdir} has no checkpoints/, only PEFT adapters; drop --step.")

  config_text = read_config(config_path)
  jobs.discover_methods()
  gin.clear_config()
  try:
    gin.parse_config(config_text)
    method_name = gin.query_parameter("run.method")
  except (ValueError, KeyError, SyntaxError, ImportError) as error:
    raise UserError(f"{config_path} could not be parsed: {error}") from error
  with gin.unlock_config():
    method = get_method(method_name)()
    method.setup(str(workdir_path))
    # Without a checkpoint the job's product is its PEFT adapters: the decoders go out as the base
    # they apply to, with the job's (untrained) adapters removed rather than merged.
    model, restored_step = method.restore(Run(workdir=str(workdir_path), config=TrainConfig(),
                                              step=step if steps else None))
  tokenizer = tokenizer or method.tokenizer_source()

  tokenizer_files = {}
  if tokenizer is not None:
    from persona_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
    hf_tokenizer, chat_template, special_tokens = load_tokenizer(tokenizer)
    tokenizer_files = {"tokenizer": hf_tokenizer, "chat_template": chat_template,
                       "special_tokens": special_tokens}

  output.parent.mkdir(parents=True, exist_ok=True)
  with staged_directory(output) as staging:
    artifacts, not_exported = {}, {}
    for name, decoder in find_decoders(model):
      try:
        merged = export_decoder(decoder, staging / name, remove_adapters=peft_only,
                                **tokenizer_files)
      except ValueError as error:  # a method module in Block.after: no transformers equivalent
        not_exported[name] = str(error)
        continue
      artifacts[name] = (f"transformers {decoder.config.family} model"
                         + (f", {merged} LoRA adapters {'removed' if peft_only else 'merged'}"
                            if merged else "")
                         + (", with tokenizer" if tokenizer_files else ""))
    artifacts.update(method.export_artifacts(model, staging))
    artifacts.update(copy_peft_adapters(workdir_path, staging))
    if not artifacts:
      raise UserError(f"Nothing in the {method_name} job's model could be exported: {not_exported}")
    manifest = {"method": method_name, "workdir": str(workdir_path), "step": restored_step,
                "tokenizer": tokenizer, "artifacts": artifacts, "not_exported": not_exported}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
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
  except UserError as error:
    if FLAGS.traceback:
      raise
    print(f"error: {type(error).__name__}: {error}\n(run with --traceback for the full traceback)",
          file=sys.stderr, flush=True)
    sys.exit(1)
  at = (f"at step {manifest['step']}" if manifest["step"] is not None
        else "(its PEFT adapters; no checkpoints/)")
  print(f"exported the {manifest['method']} job {at} to {FLAGS.output_dir}:")
  for path, what in manifest["artifacts"].items():
    print(f"  {path}: {what}")
  for name, reason in manifest["not_exported"].items():
    print(f"  NOT exported {name}: {reason}")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  define_flags()
  app.run(main)
