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
equivalent). `<output_dir>/README.md` is the model card: the method, the base model, the step, the
run's operative config (also copied as `training_config.gin`), the evaluation tables the run wrote
(`<workdir>/*.md`), how to load each artifact, and the license note. PEFT adapters get
`base_model_name_or_path`: the base's hub id when the run started from a hub model, else the exported
base's path relative to `<output_dir>`.

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
CARD_FILE = "README.md"
# The run's config inside an export; not `config.gin`, which marks a workdir (see check_output_dir).
CONFIG_COPY = "training_config.gin"
# Licenses of the short-named bases (`persona_jax.hf.pretrained.SHORT_NAMES`), for the model card.
KNOWN_LICENSES = {"smollm2-135m-instruct": ("apache-2.0", "SmolLM2-135M-Instruct (HuggingFaceTB) is "
                                            "released under Apache-2.0")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


def _write_tokenizer(model_dir: pathlib.Path, tokenizer_files: dict) -> None:
  """Adds the tokenizer files `save_pretrained` writes to a `transformers` model dir a method wrote."""
  from persona_jax.hf.tokenizer import write_tokenizer_dir  # pylint: disable=g-import-not-at-top
  max_positions = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
  write_tokenizer_dir(model_dir, tokenizer_files["tokenizer"], tokenizer_files["chat_template"],
                      tokenizer_files["special_tokens"], max_positions)


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

  from persona_jax.train import run_identity  # pylint: disable=g-import-not-at-top

  workdir_path = pathlib.Path(workdir).expanduser().absolute()
  config_path = workdir_path / CONFIG_FILE
  record = run_identity.read_record(str(workdir_path)) if config_path.is_file() else None
  if record is not None:  # a run continued with --allow_config_change: its latest config built it
    config_path = workdir_path / record["configs"][-1].get("file", CONFIG_FILE)
  if not config_path.is_file():
    raise MissingFileError(f"--workdir={workdir}: no {CONFIG_FILE}; point it at the workdir of a job "
                           "run with `python -m persona_jax.main`.")
  output = pathlib.Path(output_dir).expanduser().absolute()
  check_output_dir(output, workdir_path, overwrite)

  checkpointer = Checkpointer(str(workdir_path / "checkpoints"), async_save=False)
  checkpoint_meta = None
  try:
    steps = checkpointer.all_steps()
    if steps:
      try:
        checkpoint_meta = checkpointer.restore_meta(step if step in steps else max(steps))
      except Exception:  # pylint: disable=broad-except  # the card falls back to the method's own
        checkpoint_meta = None
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
    method_artifacts = method.export_artifacts(model, staging) or {}
    for name in method_artifacts:
      # A module the generic loop could not write (a decoder with method modules in Block.after)
      # that the method wrote itself (User-LLM: the base without its cross-attention layers).
      not_exported.pop(name, None)
      if (tokenizer_files and (staging / name / "config.json").is_file()
          and not (staging / name / "tokenizer.json").exists()):
        _write_tokenizer(staging / name, tokenizer_files)
    artifacts.update(method_artifacts)
    copied = copy_peft_adapters(workdir_path, staging)
    artifacts.update(copied)
    if not artifacts:
      raise UserError(f"Nothing in the {method_name} job's model could be exported: {not_exported}")
    base = base_model(method, checkpoint_meta)
    exported_decoders = [name for name in artifacts if (staging / name / "config.json").is_file()]
    peft_base = ("decoder" if "decoder" in exported_decoders
                 else exported_decoders[0] if exported_decoders else None)
    if copied:
      from persona_jax.hf.peft import set_base_model_name_or_path  # pylint: disable=g-import-not-at-top
      # The hub id when the adapters apply to the unchanged hub model (a PEFT-only export); else the
      # exported base, relative to the export directory.
      recorded = base["hub_id"] if peft_only and base["hub_id"] else peft_base
      set_base_model_name_or_path(staging / PEFT_DIR, recorded)
      peft_base = recorded
    (staging / CONFIG_COPY).write_text(config_text)
    artifacts[CONFIG_COPY] = "the run's operative gin config"
    artifacts[CARD_FILE] = "model card"
    (staging / CARD_FILE).write_text(model_card(
        method=method, method_name=method_name, base=base, step=restored_step,
        config_text=config_text, workdir=workdir_path, staging=staging, artifacts=artifacts,
        not_exported=not_exported, tokenizer=tokenizer, peft_base=peft_base))
    manifest = {"method": method_name, "workdir": str(workdir_path), "step": restored_step,
                "tokenizer": tokenizer, "base_model": base["hub_id"] or base["describe"],
                "artifacts": artifacts, "not_exported": not_exported}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
  return manifest


# Model card ---------------------------------------------------------------------------------------
def hub_id(pretrained: str | None) -> str | None:
  """`pretrained` when it names a Hugging Face hub model ('org/name', not a local path), else None."""
  if not pretrained or pathlib.Path(pretrained).expanduser().exists():
    return None
  if pretrained.startswith((".", "~", "/")) or pretrained.endswith(".gguf"):
    return None
  return pretrained if _HUB_ID.match(pretrained) else None


def base_model(method, checkpoint_meta: dict | None) -> dict:
  """What the card says about the base: {"pretrained", "preset", "hub_id", "describe", "recorded"}.

  From the method's `DecoderSource` (the gin binding as written, e.g. a hub id or a short name) and
  the checkpoint's recorded `base` (the resolved source, or the preset, vocab size and seed).
  """
  from persona_jax.hf.source import DecoderSource  # pylint: disable=g-import-not-at-top

  source = getattr(method, "source", None)
  if not isinstance(source, DecoderSource):
    try:
      with gin.unlock_config():
        source = DecoderSource()
    except UserError:
      source = None
  recorded = (checkpoint_meta or {}).get("base")
  if recorded is None:
    for attribute in ("base_info", "base"):
      if isinstance(getattr(method, attribute, None), dict):
        recorded = getattr(method, attribute)
        break
  pretrained = source.pretrained if source is not None else None
  preset = source.preset if source is not None else None
  if isinstance(recorded, dict) and "preset" in recorded:
    pretrained, preset = None, recorded["preset"]
  return {"pretrained": pretrained, "preset": preset, "hub_id": hub_id(pretrained),
          "describe": (pretrained or (f"random {preset}" if preset else "unknown")),
          "recorded": recorded}


def eval_tables(workdir: pathlib.Path) -> list[tuple[str, str]]:
  """[(file name, markdown)] of the tables the generic jobs wrote (`<workdir>/*.md`), eval_table first."""
  tables = sorted(workdir.glob("*.md"), key=lambda p: (p.stem != "eval_table", p.name))
  return [(path.name, path.read_text().strip()) for path in tables if path.is_file()]


def _loader_usage(path: pathlib.Path) -> str:
  """The usage paragraph(s) of an exported loader script: its module docstring."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    return (ast.get_docstring(ast.parse(path.read_text())) or "").strip()
  except SyntaxError:
    return ""


def _how_to_load(name: str, what: str, staging: pathlib.Path, has_tokenizer: bool,
                 base_dir: str | None) -> str:
  """A markdown paragraph + snippet that loads one artifact (`name` relative to the export)."""
  path = staging / name
  if path.is_dir() and (path / "config.json").is_file():
    lines = ["from transformers import AutoModelForCausalLM"
             + (", AutoTokenizer" if has_tokenizer else ""),
             f'model = AutoModelForCausalLM.from_pretrained("{name}")']
    if has_tokenizer:
      lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{name}")')
    lines += ["# or in JAX: persona_jax.hf.load_pretrained(" f'"{name}")']
    return f"`{name}/` ({what}), with `transformers`:\n\n```python\n" + "\n".join(lines) + "\n```"
  if name.startswith(PEFT_DIR + "/") and path.is_dir():
    adapters = sorted(str(c.parent.relative_to(path)) for c in path.rglob("adapter_config.json"))
    lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
             f'base = AutoModelForCausalLM.from_pretrained("{base_dir or "<the base model>"}")',
             f'model = PeftModel.from_pretrained(base, "{name}/{adapters[0]}", '
             f'adapter_name="{adapters[0]}")']
    lines += [f'model.load_adapter("{name}/{a}", adapter_name="{a}")' for a in adapters[1:]]
    if len(adapters) > 1:
      lines.append(f"model.base_model.set_adapter({adapters!r})  # all active: their LoRAs add up")
    lines.append(f'# or: persona_jax.hf.peft.peft_model(base, "{name}") (same, every adapter active)')
    return (f"`{name}/` ({what}: {', '.join(adapters)}), with `peft` on the exported base:\n\n"
            "```python\n" + "\n".join(lines) + "\n```")
  if path.suffix == ".py":
    usage = _loader_usage(path)
    return (f"`{name}` ({what}). Its usage (from the script's docstring; it needs torch, "
            f"transformers and safetensors, not JAX):\n\n```\n{usage}\n```")
  return f"`{name}`: {what}."


def model_card(*, method, method_name: str, base: dict, step: int | None, config_text: str,
               workdir: pathlib.Path, staging: pathlib.Path, artifacts: dict[str, str],
               not_exported: dict[str, str], tokenizer: str | None,
               peft_base: str | None) -> str:
  """The export's README.md (Hugging Face model card: YAML metadata, then markdown)."""
  import inspect  # pylint: disable=g-import-not-at-top

  license_id, license_note = None, None
  if base["pretrained"] in KNOWN_LICENSES:
    license_id, license_note = KNOWN_LICENSES[base["pretrained"]]
  elif base["preset"]:
    license_id = "apache-2.0"
    license_note = (f"the base is the randomly initialized preset {base['preset']!r}: no upstream "
                    "weights, only this run's training")
  elif base["hub_id"]:
    license_note = (f"the weights derive from {base['hub_id']}; its license (see "
                    f"https://huggingface.co/{base['hub_id']}) governs them")
  else:
    license_note = (f"the weights derive from {base['describe']}; its license governs them (persona_jax "
                    "does not know it)")
  peft_only = all(name.startswith(PEFT_DIR + "/") or not (staging / name).is_dir()
                  for name in artifacts) and any(n.startswith(PEFT_DIR + "/") for n in artifacts)
  front = ["---", f"library_name: {'peft' if peft_only else 'transformers'}",
           f"tags: [persona_jax, {method_name}]"]
  if base["hub_id"]:
    front.append(f"base_model: {base['hub_id']}")
  front.append(f"license: {license_id or 'other'}")
  front.append("---")

  summary = (inspect.getdoc(type(method)) or "").strip().split("\n\n")[0].replace("\n", " ")
  try:
    settings = method.description()
  except Exception:  # pylint: disable=broad-except
    settings = None
  at = f"step {step}" if step is not None else "its PEFT adapters (no checkpoint: the base is untrained)"
  out = front + ["", f"# {method_name} (persona_jax export)", "",
                 f"Exported by `python -m persona_jax.export` from the run `{workdir}` at {at}.", "",
                 "## Method", "", f"**{method_name}**: {summary}"]
  if settings and settings != method_name:
    out += ["", f"This run: {settings}."]
  out += ["", "## Base model", "", f"- Base: `{base['describe']}`"
          + (f" (Hugging Face hub: [{base['hub_id']}](https://huggingface.co/{base['hub_id']}))"
             if base["hub_id"] else "")]
  if base["recorded"] is not None:
    out.append(f"- Recorded in the checkpoint: `{json.dumps(base['recorded'], sort_keys=True)}`")
  out.append(f"- Tokenizer: `{tokenizer}`" if tokenizer else
             "- Tokenizer: none saved (the run used the bytes vocabulary or none)")

  out += ["", "## Training config", "",
          f"The run's operative gin config (`{CONFIG_COPY}` in this directory; rerun it with "
          f"`python -m persona_jax.main --gin_file={CONFIG_COPY} --workdir=...`):", "",
          "```gin", config_text.strip(), "```"]

  out += ["", "## Evaluation", ""]
  tables = eval_tables(workdir)
  final = workdir / "final_metrics.json"
  final_step = None
  if final.is_file():
    try:
      final_step = json.loads(final.read_text()).get("step")
    except json.JSONDecodeError:
      final_step = None
  if tables:
    out.append("The tables the run wrote (`<workdir>/<name>.md`; `*_restored.md` come from "
               "`run.job = @evaluate`)"
               + (f", after training to step {final_step}" if final_step is not None else "") + ":")
    if final_step is not None and step is not None and final_step != step:
      out.append(f"\n**Note:** this export is step {step}, not the evaluated step {final_step}.")
    for name, table in tables:
      out += ["", f"### {name}", "", table]
  else:
    out.append("The run wrote no evaluation table (`<workdir>/*.md`); run "
               "`python -m persona_jax.main --gin_bindings='run.job = @evaluate' ...` to make one.")

  out += ["", "## How to load", "", "Paths are relative to this directory."]
  for name, what in artifacts.items():
    if name in (CARD_FILE, CONFIG_COPY):
      continue
    out += ["", "- " + _how_to_load(name, what, staging, tokenizer is not None, peft_base)]
  if not_exported:
    out += ["", "Not exported:"] + [f"- `{name}`: {reason}" for name, reason in not_exported.items()]

  out += ["", "## License", "",
          "The loader scripts and the persona_jax code that wrote this export are Apache-2.0 (the "
          f"project's LICENSE). The weights: {license_note}. The training data's own terms apply to "
          "what the model learned from it."]
  return "\n".join(out).rstrip() + "\n"


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
