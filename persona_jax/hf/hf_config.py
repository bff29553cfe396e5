"""Hugging Face `config.json` <-> `DecoderConfig`, for the families in `persona_jax.hf.mapping`."""

from __future__ import annotations

from typing import Any

from persona_jax.errors import UserError
from persona_jax.hf.mapping import ARCHITECTURES, FAMILIES, MODEL_TYPES, Family
from persona_jax.nn.config import DecoderConfig

# Values `transformers` assumes when a key is absent from config.json (its config classes' defaults).
_HF_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None},
    "gemma": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "head_dim": 256},
    "gemma2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 8192,
               "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "head_dim": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SUPPORTED = ", ".join(f"{f.architecture} (model_type '{f.model_type}')" for f in FAMILIES.values())


def family_of(hf_config: dict, where: str) -> Family:
  """The family a config.json describes, by `architectures` (else `model_type`)."""
  architectures = hf_config.get("architectures") or []
  for architecture in architectures:
    if architecture in ARCHITECTURES:
      return ARCHITECTURES[architecture]
  if not architectures and hf_config.get("model_type") in MODEL_TYPES:
    return MODEL_TYPES[hf_config["model_type"]]
  found = architectures or hf_config.get("model_type")
  raise UserError(f"{where}: architecture {found!r} is not supported; supported: {SUPPORTED}.")


def _rope(hf_config: dict, where: str) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or the older two keys."""
  params = hf_config.get("rope_parameters")
  if params:
    params = dict(params)
    theta = float(params.pop("rope_theta", hf_config.get("rope_theta", 10_000.0)))
    scaling = params if params.get("rope_type", "default") != "default" else None
  else:
    theta = float(hf_config.get("rope_theta", 10_000.0))
    scaling = hf_config.get("rope_scaling")
  if scaling is not None:
    scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:  # pre-4.45 spelling
      scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
      scaling = None
    elif scaling["rope_type"] != "llama3":
      raise UserError(f"{where}: rope scaling type {scaling['rope_type']!r} is not supported; only "
                       "'llama3' (or none) is. Use a checkpoint without it or add it to persona_jax.nn.layers.")
    else:
      scaling = {k: scaling[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                          "original_max_position_embeddings")}
  return theta, scaling


def from_hf_config(hf_config: dict, where: str, dtype: str = "float32") -> DecoderConfig:
  """A `DecoderConfig` from a parsed config.json; `where` names the file in error messages."""
  family = family_of(hf_config, where)
  missing = [key for key in _REQUIRED if key not in hf_config]
  if missing:
    raise UserError(f"{where}: missing required key(s) {missing} for {family.architecture}.")
  # An explicit null means None (no pad token, no soft-cap), as transformers reads it.
  values = {**_HF_DEFAULTS[family.name], **hf_config}
  if values.get("num_key_value_heads") is None:
    values["num_key_value_heads"] = values["num_attention_heads"]
  if values.get("head_dim") is None:
    values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]

  activation = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or family.activation
  if activation != family.activation:
    raise UserError(f"{where}: activation {activation!r} is not supported for {family.architecture}; "
                     f"the decoder implements {family.activation!r}.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag):
      raise UserError(f"{where}: {flag}=true is not supported (the decoder's projections have no bias).")

  fields: dict[str, Any] = {ours: values.get(key) for key, ours in family.fields}
  fields["rope_theta"], fields["rope_scaling"] = _rope(hf_config, where)
  if family.name == "gemma2":
    layer_types = hf_config.get("layer_types")
    expected = ["sliding_attention" if fields["sliding_window"] is not None and i % 2 == 0
                else "full_attention" for i in range(values["num_hidden_layers"])]
    if layer_types is not None and list(layer_types) != expected:
      raise UserError(f"{where}: layer_types {layer_types} is not supported; the decoder alternates "
                       f"sliding (even) and full (odd) layers: {expected}.")
  return DecoderConfig(family=family.name, dtype=dtype, param_dtype=dtype, **fields)


def to_hf_config(config: DecoderConfig) -> dict:
  """The config.json `transformers` needs to rebuild `config`'s architecture.

  Writes rope settings both as transformers 5's `rope_parameters` and as the older `rope_theta` /
  `rope_scaling` keys, so transformers 4.x reads the same model.
  """
  family = FAMILIES[config.family]
  hf = {"architectures": [family.architecture], "model_type": family.model_type}
  for key, ours in family.fields:
    hf[key] = getattr(config, ours)
  if isinstance(hf["eos_token_id"], tuple):
    hf["eos_token_id"] = list(hf["eos_token_id"])
  scaling = dict(config.rope_scaling) if config.rope_scaling is not None else None
  hf["rope_theta"] = float(config.rope_theta)
  hf["rope_scaling"] = scaling
  hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": float(config.rope_theta)}
  hf["hidden_act"] = family.activation
  hf["attention_bias"] = False
  hf["attention_dropout"] = 0.0
  if family.name == "llama":
    hf["mlp_bias"] = False
  else:
    hf["hidden_activation"] = family.activation
  if family.name == "gemma2":
    hf["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.head_dim
    hf["layer_types"] = ["sliding_attention" if config.is_sliding_layer(i) else "full_attention"
                         for i in range(config.num_layers)]
  hf["torch_dtype"] = config.param_dtype
  hf["dtype"] = config.param_dtype
  hf["use_cache"] = True
  return hf
