"""The decoder's named LoRA adapters as PEFT adapters, both ways.

Mapping (`persona_jax.nn.layers.LoRA` -> PEFT `LoraConfig` + `adapter_model.safetensors`):
  ours: `y += (x @ a) @ b * alpha / rank`, `a: [in, rank]`, `b: [rank, out]`
  PEFT: `y += lora_B(lora_A(x)) * lora_alpha / r`, `lora_A.weight: [r, in]`, `lora_B.weight: [out, r]`
so `lora_A.weight = a.T`, `lora_B.weight = b.T`, `r = rank`, `lora_alpha = alpha` (no rsLoRA, no
DoRA, no bias, no dropout at inference). Sites: layer `i`, projection `q_proj` -> module
`model.layers.{i}.self_attn.q_proj` (`gate_proj` -> `model.layers.{i}.mlp.gate_proj`), the names of
the model `persona_jax.hf.save_pretrained` writes, for llama, gemma and gemma2 alike.

One named adapter (a key of `Linear.adapters`) = one PEFT adapter, written to `out_dir/<name>/`.
Several named adapters may sit on the same projection (MiLP's memory modules do); PEFT holds one
LoRA per module per adapter, so keeping one PEFT adapter per name is the exact, lossless layout, and
PEFT sums several active adapters just as `Linear` sums its adapters:

  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)   # from save_pretrained
  model = peft_model(base, out_dir)   # PeftModel.from_pretrained + load_adapter + set_adapter([...])
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from persona_jax.hf.staging import checked_output_dir, staged_directory
from persona_jax.nn.decoder import Decoder
from persona_jax.nn.lora import get_projection, inject_lora, lora_sites
from persona_jax.errors import MissingFileError, UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Our projection name -> the Hugging Face submodule path inside `model.layers.{i}`.
HF_SUBMODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                 "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
                 "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
_FROM_HF = {sub: proj for proj, sub in HF_SUBMODULES.items()}
_KEY_PREFIX = "base_model.model."  # PeftModel wraps the causal LM: base_model.model.<HF module name>


def module_name(layer: int, projection: str) -> str:
  """`(3, 'up_proj')` -> `'model.layers.3.mlp.up_proj'` (the Hugging Face module name)."""
  return f"model.layers.{layer}.{HF_SUBMODULES[projection]}"


def _adapter_config(sites, base_model_name_or_path: str | None) -> dict:
  """PEFT `LoraConfig` fields (as `LoraConfig.to_dict()` writes them) for one named adapter's sites."""
  layers = sorted({layer for layer, _, _ in sites})
  projections = sorted({proj for _, proj, _ in sites})
  is_grid = len(sites) == len(layers) * len(projections)
  ranks = {module_name(layer, proj): adapter.rank for layer, proj, adapter in sites}
  alphas = {module_name(layer, proj): float(adapter.alpha) for layer, proj, adapter in sites}
  rank = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": rank,
      "lora_alpha": alpha,
      # The (layers x projections) grid inject_lora makes reads as PEFT's own two fields; any other set
      # of sites is listed module by module (PEFT matches a list entry against the full module name).
      "target_modules": projections if is_grid else sorted(ranks),
      "layers_to_transform": layers if is_grid else None,
      "layers_pattern": "layers" if is_grid else None,
      # Full module names, regex-escaped: PEFT matches `(.*\.)?(<key>)$`.
      "rank_pattern": {_escape(k): r for k, r in ranks.items() if r != rank},
      "alpha_pattern": {_escape(k): a for k, a in alphas.items() if a != alpha},
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "modules_to_save": None,
      "inference_mode": True,
  }


def _escape(name: str) -> str:
  return name.replace(".", r"\.")


def save_peft_adapters(decoder: Decoder, out_dir: str | os.PathLike, names: Sequence[str] | None = None,
                       base_model_name_or_path: str | None = None, overwrite: bool = False
                       ) -> dict[str, pathlib.Path]:
  """Writes each named LoRA adapter of `decoder` as a PEFT adapter directory `out_dir/<name>/`.

  Args:
    decoder: a decoder carrying adapters (`persona_jax.nn.inject_lora`).
    out_dir: target directory; must be absent or empty unless `overwrite=True`.
    names: adapter names to export (default: every name on the decoder, sorted).
    base_model_name_or_path: recorded in adapter_config.json (the `save_pretrained` directory or hub id).
    overwrite: replace an existing non-empty `out_dir`.
  Returns:
    {adapter name: its directory}.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  by_name: dict[str, list] = {}
  for layer, proj, name, adapter in lora_sites(decoder):
    by_name.setdefault(name, []).append((layer, proj, adapter))
  if not by_name:
    raise UserError("save_peft_adapters: the decoder has no LoRA adapters; add them with "
                     "persona_jax.nn.inject_lora before exporting.")
  names = sorted(by_name) if names is None else list(names)
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise UserError(f"save_peft_adapters: adapter(s) {unknown} are not on the decoder; it has "
                     f"{sorted(by_name)}.")
  bad = [n for n in names if not n or "/" in n or n.startswith(".")]
  if bad:
    raise UserError(f"save_peft_adapters: adapter name(s) {bad} cannot be directory names; rename them.")
  out_dir = checked_output_dir(out_dir, overwrite)
  with staged_directory(out_dir) as staging:
    for name in names:
      sites = by_name[name]
      tensors = {}
      for layer, proj, adapter in sites:
        key = _KEY_PREFIX + module_name(layer, proj)
        tensors[key + ".lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter.a[...]).T)
        tensors[key + ".lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter.b[...]).T)
      (staging / name).mkdir()
      save_file(tensors, str(staging / name / WEIGHTS_FILE), metadata={"format": "pt"})
      config = _adapter_config(sites, base_model_name_or_path)
      (staging / name / CONFIG_FILE).write_text(json.dumps(config, indent=2))
  return {name: out_dir / name for name in names}


def set_base_model_name_or_path(directory: str | os.PathLike, base_model_name_or_path: str | None
                                ) -> list[pathlib.Path]:
  """Records `base_model_name_or_path` in every adapter_config.json under `directory` (one adapter,
  a directory of them, or a directory of such directories, as MiLP's `peft/<user>/<memory>/`).

  PEFT's `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` loads the base from this field: a hub
  id, or a path (PEFT resolves a relative one against the current directory). Returns the configs
  rewritten.
  """
  directory = pathlib.Path(directory).expanduser()
  configs = sorted(directory.rglob(CONFIG_FILE))
  for path in configs:
    try:
      config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise UserError(f"{path}: invalid JSON ({error}).") from None
    config["base_model_name_or_path"] = base_model_name_or_path
    path.write_text(json.dumps(config, indent=2))
  return configs


def adapter_dirs(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
  """{adapter name: directory} of a PEFT adapter directory, or of a directory of them (`out_dir/<name>`).

  A directory holding adapter_config.json itself is one adapter named after the directory.
  """
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    raise MissingFileError(f"{directory}: no such directory (expected a PEFT adapter directory with "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE}, or a directory of them).")
  if (directory / CONFIG_FILE).is_file():
    return {directory.name: directory}
  found = {child.name: child for child in sorted(directory.iterdir()) if (child / CONFIG_FILE).is_file()}
  if not found:
    raise MissingFileError(f"{directory}: no {CONFIG_FILE} in it or in its subdirectories; pass the "
                            "directory save_peft_adapters wrote (or one adapter's directory).")
  return found


def _read_adapter(directory: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
  try:
    config = json.loads(config_path.read_text())
  except json.JSONDecodeError as error:
    raise UserError(f"{config_path}: invalid JSON ({error}).") from None
  if config.get("peft_type") != "LORA":
    raise UserError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA' "
                     "adapters map onto the decoder's LoRA.")
  unsupported = {"use_dora": True, "fan_in_fan_out": True}
  for field, value in unsupported.items():
    if config.get(field) == value:
      raise UserError(f"{config_path}: {field}={value} is not supported by persona_jax.nn's LoRA; export "
                       f"the adapter with {field}={not value}.")
  if config.get("bias", "none") != "none" or config.get("modules_to_save"):
    raise UserError(f"{config_path}: bias={config.get('bias')!r} / modules_to_save="
                     f"{config.get('modules_to_save')!r} train weights outside LoRA, which the decoder's "
                     "adapters cannot hold; use bias='none' and no modules_to_save.")
  if not weights_path.is_file():
    raise MissingFileError(f"{weights_path}: missing (only safetensors adapter weights are read).")
  try:
    tensors = load_file(str(weights_path))
  except Exception as error:  # SafetensorError: truncated or corrupt
    raise UserError(f"{weights_path}: not a complete safetensors file ({error}).") from None
  return config, tensors


def _parse_key(key: str, where: pathlib.Path) -> tuple[int, str, str]:
  """'base_model.model.model.layers.3.mlp.up_proj.lora_A.weight' -> (3, 'up_proj', 'A')."""
  parts = key.split(".")
  try:
    assert parts[:5] == ["base_model", "model", "model", "layers", parts[4]] and parts[-1] == "weight"
    layer = int(parts[4])
    proj = _FROM_HF[".".join(parts[5:-2])]
    side = {"lora_A": "A", "lora_B": "B"}[parts[-2]]
  except (AssertionError, ValueError, KeyError, IndexError):
    raise UserError(f"{where}: tensor {key!r} is not a LoRA weight of a decoder projection (expected "
                     "'base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight').") from None
  return layer, proj, side


def load_peft_adapters(decoder: Decoder, directory: str | os.PathLike,
                       names: Sequence[str] | None = None) -> list[str]:
  """Adds the PEFT LoRA adapter(s) in `directory` to `decoder` as named adapters.

  Args:
    decoder: the base decoder (`load_pretrained` of the model the adapters were trained on).
    directory: one adapter's directory (named after it) or a directory of them, as `save_peft_adapters`
      writes.
    names: which adapters to load (default: all found).
  Returns:
    The adapter names added (keys of `Linear.adapters`).
  """
  found = adapter_dirs(directory)
  names = sorted(found) if names is None else list(names)
  unknown = [n for n in names if n not in found]
  if unknown:
    raise UserError(f"{directory}: adapter(s) {unknown} not found; it has {sorted(found)}.")
  for name in names:
    where = found[name]
    config, tensors = _read_adapter(where)
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
      layer, proj, side = _parse_key(key, where / WEIGHTS_FILE)
      pairs.setdefault((layer, proj), {})[side] = value
    num_layers = decoder.config.num_layers
    for (layer, proj), pair in sorted(pairs.items()):
      if set(pair) != {"A", "B"}:
        raise UserError(f"{where / WEIGHTS_FILE}: {module_name(layer, proj)} has lora_{list(pair)[0]} but "
                         "not its other half; the adapter file is incomplete.")
      if not 0 <= layer < num_layers:
        raise UserError(f"{where / WEIGHTS_FILE}: {module_name(layer, proj)} names layer {layer}, but the "
                         f"decoder has layers 0..{num_layers - 1}; load it onto the model it was trained on.")
      a, b = pair["A"].T, pair["B"].T  # [in, r], [r, out]
      linear = get_projection(decoder, layer, proj)
      rank = a.shape[1]
      if a.shape[0] != linear.in_features or b.shape != (rank, linear.out_features):
        raise UserError(f"{where / WEIGHTS_FILE}: {module_name(layer, proj)} lora_A {pair['A'].shape} / "
                         f"lora_B {pair['B'].shape} do not fit the projection [{linear.out_features}, "
                         f"{linear.in_features}]; load it onto the model it was trained on.")
      lora_alpha = _pattern_value(config.get("alpha_pattern") or {}, module_name(layer, proj),
                                  config.get("lora_alpha", 8))
      # rsLoRA scales by alpha / sqrt(r); ours by alpha / rank: the same scale is alpha * sqrt(r) / r.
      alpha = lora_alpha * math.sqrt(rank) if config.get("use_rslora") else lora_alpha
      inject_lora(decoder, layers=[layer], projections=[proj], rank=rank, alpha=float(alpha), name=name)
      adapter = linear.adapters[name]
      adapter.a[...] = jnp.asarray(a, adapter.a[...].dtype)
      adapter.b[...] = jnp.asarray(b, adapter.b[...].dtype)
  return names


def _pattern_value(patterns: dict, module: str, default):
  """PEFT's `get_pattern_key` rule: a pattern key matches a module name ending in it."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", module):
      return value
  return default


def peft_model(base_model, directory: str | os.PathLike, names: Sequence[str] | None = None):
  """A `peft.PeftModel` over a `transformers` model with the adapters in `directory` all active.

  `base_model` is the model `save_pretrained` wrote, loaded with `transformers`; the result's logits
  equal the decoder's with the same adapters.
  """
  from peft import PeftModel  # pylint: disable=g-import-not-at-top
  found = adapter_dirs(directory)
  names = sorted(found) if names is None else list(names)
  unknown = [n for n in names if n not in found]
  if unknown:
    raise UserError(f"{directory}: adapter(s) {unknown} not found; it has {sorted(found)}.")
  model = PeftModel.from_pretrained(base_model, str(found[names[0]]), adapter_name=names[0])
  for name in names[1:]:
    model.load_adapter(str(found[name]), adapter_name=name)
  model.base_model.set_adapter(names)  # LoRA sums every active adapter, as Linear sums its adapters
  return model.eval()


__all__ = ["CONFIG_FILE", "HF_SUBMODULES", "WEIGHTS_FILE", "adapter_dirs", "load_peft_adapters",
           "module_name", "peft_model", "save_peft_adapters", "set_base_model_name_or_path"]
