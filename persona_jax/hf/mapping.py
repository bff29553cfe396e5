"""Mapping tables: checkpoint tensor names <-> decoder parameter paths, one table per family.

A row says: checkpoint tensor `source` is decoder parameter `target`, after the named `transform`.
`{i}` stands for the layer index. `when` restricts a row to configs where it applies (the output
projection only exists untied; gemma2's extra norms only with post-norms). Import and export walk the
same rows in opposite directions, so a name can never be mapped one way and not the other.

Config tables map Hugging Face `config.json` keys to `DecoderConfig` fields for each family.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from persona_jax.hf.transforms import GGUF_KEY, GGUF_QUERY, IDENTITY, TRANSPOSE, Transform
from persona_jax.nn.config import DecoderConfig

always = lambda cfg: True
untied = lambda cfg: not cfg.tie_embeddings


@dataclasses.dataclass(frozen=True)
class Row:
  source: str
  target: str
  transform: Transform
  when: Callable[[DecoderConfig], bool] = always


def _hf_common(norm_rows: tuple[Row, ...]) -> tuple[Row, ...]:
  """Rows shared by LlamaForCausalLM, GemmaForCausalLM and Gemma2ForCausalLM."""
  layer = "model.layers.{i}."
  return (
      Row("model.embed_tokens.weight", "embedding", IDENTITY),
      Row(layer + "self_attn.q_proj.weight", "layers.{i}.attention.q_proj.kernel", TRANSPOSE),
      Row(layer + "self_attn.k_proj.weight", "layers.{i}.attention.k_proj.kernel", TRANSPOSE),
      Row(layer + "self_attn.v_proj.weight", "layers.{i}.attention.v_proj.kernel", TRANSPOSE),
      Row(layer + "self_attn.o_proj.weight", "layers.{i}.attention.o_proj.kernel", TRANSPOSE),
      Row(layer + "mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.kernel", TRANSPOSE),
      Row(layer + "mlp.up_proj.weight", "layers.{i}.mlp.up_proj.kernel", TRANSPOSE),
      Row(layer + "mlp.down_proj.weight", "layers.{i}.mlp.down_proj.kernel", TRANSPOSE),
      *norm_rows,
      Row("model.norm.weight", "final_norm.scale", IDENTITY),
      Row("lm_head.weight", "lm_head", TRANSPOSE, when=untied),
  )


# Norm scales are stored as Hugging Face stores them (gemma's `w` of `1 + w` included): identity.
LLAMA_WEIGHTS = _hf_common((
    Row("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale", IDENTITY),
    Row("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.pre_mlp_norm.scale", IDENTITY),
))
GEMMA_WEIGHTS = LLAMA_WEIGHTS
GEMMA2_WEIGHTS = _hf_common((
    Row("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale", IDENTITY),
    Row("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.scale",
        IDENTITY),
    Row("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.pre_mlp_norm.scale", IDENTITY),
    Row("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.scale",
        IDENTITY),
))

# llama.cpp's names for the llama architecture (GGUF). Rows are `[out, in]` as in PyTorch.
GGUF_LLAMA_WEIGHTS = (
    Row("token_embd.weight", "embedding", IDENTITY),
    Row("blk.{i}.attn_norm.weight", "layers.{i}.input_norm.scale", IDENTITY),
    Row("blk.{i}.attn_q.weight", "layers.{i}.attention.q_proj.kernel", GGUF_QUERY),
    Row("blk.{i}.attn_k.weight", "layers.{i}.attention.k_proj.kernel", GGUF_KEY),
    Row("blk.{i}.attn_v.weight", "layers.{i}.attention.v_proj.kernel", TRANSPOSE),
    Row("blk.{i}.attn_output.weight", "layers.{i}.attention.o_proj.kernel", TRANSPOSE),
    Row("blk.{i}.ffn_norm.weight", "layers.{i}.pre_mlp_norm.scale", IDENTITY),
    Row("blk.{i}.ffn_gate.weight", "layers.{i}.mlp.gate_proj.kernel", TRANSPOSE),
    Row("blk.{i}.ffn_up.weight", "layers.{i}.mlp.up_proj.kernel", TRANSPOSE),
    Row("blk.{i}.ffn_down.weight", "layers.{i}.mlp.down_proj.kernel", TRANSPOSE),
    Row("output_norm.weight", "final_norm.scale", IDENTITY),
    Row("output.weight", "lm_head", TRANSPOSE, when=untied),
)


def target_path(target: str, layer: int | None) -> tuple:
  """'layers.{i}.attention.q_proj.kernel' -> ('layers', 3, 'attention', 'q_proj', 'kernel')."""
  text = target.format(i=layer) if layer is not None else target
  return tuple(int(part) if part.isdigit() else part for part in text.split("."))


def expand(rows: tuple[Row, ...], config: DecoderConfig) -> list[tuple[str, tuple, Transform]]:
  """Every (checkpoint name, decoder path, transform) a model of `config` has, layers unrolled."""
  entries = []
  for row in rows:
    if not row.when(config):
      continue
    if "{i}" in row.source:
      for i in range(config.num_layers):
        entries.append((row.source.format(i=i), target_path(row.target, i), row.transform))
    else:
      entries.append((row.source, target_path(row.target, None), row.transform))
  return entries


# Config tables -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
  """What distinguishes a family in Hugging Face's config.json.

  `fields`: (config.json key, DecoderConfig field) pairs copied as they are.
  `activation`: the only `hidden_act` / `hidden_activation` the decoder implements for the family.
  """
  name: str
  architecture: str
  model_type: str
  weights: tuple[Row, ...]
  activation: str
  fields: tuple[tuple[str, str], ...]


_COMMON_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("num_hidden_layers", "num_layers"),
    ("hidden_size", "embed_dim"),
    ("intermediate_size", "mlp_dim"),
    ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"),
    ("head_dim", "head_dim"),
    ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_embeddings"),
    ("max_position_embeddings", "max_positions"),
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "pad_token_id"),
)

FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", LLAMA_WEIGHTS, "silu", _COMMON_FIELDS),
    "gemma": Family("gemma", "GemmaForCausalLM", "gemma", GEMMA_WEIGHTS, "gelu_pytorch_tanh",
                    _COMMON_FIELDS),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", "gemma2", GEMMA2_WEIGHTS, "gelu_pytorch_tanh",
                     _COMMON_FIELDS + (
                         ("sliding_window", "sliding_window"),
                         ("attn_logit_softcapping", "attn_logit_softcap"),
                         ("final_logit_softcapping", "final_logit_softcap"),
                         ("query_pre_attn_scalar", "query_pre_attn_scalar"))),
}
ARCHITECTURES = {family.architecture: family for family in FAMILIES.values()}
MODEL_TYPES = {family.model_type: family for family in FAMILIES.values()}
