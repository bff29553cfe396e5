"""Decoder configuration: one dataclass for the llama, gemma and gemma2 families, plus presets.

The family decides the small architectural switches (activation, norm offset, embedding scale,
post-norms, soft-capping, alternating sliding windows); sizes are plain fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from persona_jax.errors import UserError

FAMILIES = ("llama", "gemma", "gemma2")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and switches of a decoder-only transformer.

  Attributes:
    family: one of `FAMILIES`.
    vocab_size: rows of the token embedding.
    num_layers: number of transformer blocks.
    embed_dim: width of the residual stream (`hidden_size` in Hugging Face).
    mlp_dim: width of the gated MLP (`intermediate_size`).
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention when smaller than `num_heads`).
    head_dim: width of one head; independent of `embed_dim` (gemma uses 256 with d=2048).
    rope_theta: base of the rotary frequencies.
    rope_scaling: `None` or a dict in Hugging Face's format (only `rope_type='llama3'` is supported).
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the output projection reuses the token embedding.
    max_positions: `max_position_embeddings` written on export.
    sliding_window: gemma2's local-attention window (a query sees keys with `q_pos - k_pos < window`).
    attn_logit_softcap: gemma2's `tanh` cap on attention logits.
    final_logit_softcap: gemma2's `tanh` cap on output logits.
    query_pre_attn_scalar: gemma2 scales queries by `query_pre_attn_scalar ** -0.5` (default head_dim).
    bos_token_id / eos_token_id / pad_token_id: written on export; `eos_token_id` may be a tuple.
    dtype: compute dtype (`'float32'` or `'bfloat16'`); parameters are stored in `param_dtype`.
    remat: rematerialize each block in the backward pass (saves activation memory).
    remat_policy: what a rematerialized block keeps from the forward pass, by name of a
      `jax.checkpoint_policies` entry (`'nothing_saveable'` recomputes everything, as `remat=True`
      did before; `'dots_with_no_batch_dims_saveable'` keeps the weight matmuls). Only read when
      `remat` is True; None means `'nothing_saveable'`.
    attention_impl: which attention kernel runs (see `persona_jax.nn.attention.resolve_attention_impl`):
      `'auto'` picks per backend (CPU: the reference einsum, bit-identical to earlier releases; GPU:
      cuDNN flash for bf16/fp16, XLA otherwise; TPU: Pallas splash where the mask is expressible);
      `'einsum'`, `'xla'`, `'cudnn'`, `'pallas'` force one. A kernel that cannot express a call's
      mask falls back to the einsum.
    scan_layers: run the blocks as one `jax.lax.scan` over their stacked parameters instead of an
      unrolled Python loop, so the compiled program holds one block body instead of `num_layers`:
      compile time stops growing with depth (benchmarks/compile_time.py). The parameters stay one
      module per layer (checkpoints, Hugging Face import/export, LoRA injection and decode-weight
      quantization are unchanged); they are stacked inside the traced call, which costs one copy of
      the block weights per forward (and one per backward), so leave it off for decoding. Gemma2
      scans over pairs of layers (local, global). Layers whose structure differs (e.g. LoRA on some
      layers only) cannot share one body: the loop is unrolled then (logged once). Equal to the
      unrolled loop within fp32 round-off (tests/nn/test_scan_layers.py).
    loss_chunk_tokens: None (default) trains on the full `[tokens, vocab]` fp32 logits (the
      reference). An int: the training cross-entropy (`persona_jax.train.losses.lm_loss` /
      `decoder_cross_entropy`) fuses the output projection with the loss over that many tokens at a
      time, with a hand-written backward that never stores or transposes the logits' gradient
      (faster and far less memory with a large vocabulary; equal to the reference within fp32
      round-off, not bit-identical, hence opt-in; e.g. 256).
  """

  family: str
  vocab_size: int
  num_layers: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: Any = None
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_positions: int = 8192
  sliding_window: int | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float | None = None
  bos_token_id: int | None = None
  eos_token_id: Any = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  remat_policy: str | None = None
  attention_impl: str = "auto"
  scan_layers: bool = False
  loss_chunk_tokens: int | None = None

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise UserError(f"DecoderConfig.family={self.family!r} is not supported; use one of {FAMILIES}.")
    if self.num_heads % self.num_kv_heads:
      raise UserError(
          f"DecoderConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}.")
    if self.rope_scaling is not None and dict(self.rope_scaling).get("rope_type", "default") not in (
        "default", "llama3"):
      raise UserError(f"DecoderConfig.rope_scaling={self.rope_scaling!r}: only rope_type 'llama3' is supported.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise UserError(f"DecoderConfig.attention_impl={self.attention_impl!r} is not supported; use one "
                       f"of {ATTENTION_IMPLS}.")
    if self.remat_policy is not None and not hasattr(jax.checkpoint_policies, self.remat_policy):
      raise UserError(f"DecoderConfig.remat_policy={self.remat_policy!r} is not a "
                       "jax.checkpoint_policies name (e.g. 'nothing_saveable', "
                       "'dots_with_no_batch_dims_saveable').")
    if self.loss_chunk_tokens is not None and (not isinstance(self.loss_chunk_tokens, int)
                                               or self.loss_chunk_tokens <= 0):
      raise UserError(f"DecoderConfig.loss_chunk_tokens={self.loss_chunk_tokens!r}: use None or a "
                       "positive number of tokens per chunk (e.g. 256).")
    if isinstance(self.rope_scaling, dict):  # keep the dataclass hashable (jit static argument)
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  # Family switches -------------------------------------------------------------------------------
  @property
  def activation(self) -> str:
    return "silu" if self.family == "llama" else "gelu_tanh"

  @property
  def norm_offset(self) -> float:
    """Gemma norms multiply by (1 + w); llama by w."""
    return 0.0 if self.family == "llama" else 1.0

  @property
  def scale_embeddings(self) -> bool:
    return self.family in ("gemma", "gemma2")

  @property
  def post_norms(self) -> bool:
    return self.family == "gemma2"

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
    return float(scalar) ** -0.5

  def is_sliding_layer(self, layer: int) -> bool:
    """Gemma2 alternates local (even layers) and global (odd layers) attention."""
    return self.family == "gemma2" and self.sliding_window is not None and layer % 2 == 0

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weights_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embedding counted once when tied)."""
    attn = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.embed_dim * self.mlp_dim
    norms = (4 if self.post_norms else 2) * self.embed_dim
    head = 0 if self.tie_embeddings else self.vocab_size * self.embed_dim
    return self.vocab_size * self.embed_dim + self.num_layers * (attn + mlp + norms) + self.embed_dim + head


# Presets ------------------------------------------------------------------------------------------
PRESETS: dict[str, DecoderConfig] = {
    "smollm2_135m": DecoderConfig(
        family="llama", vocab_size=49152, num_layers=30, embed_dim=576, mlp_dim=1536, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100_000.0, norm_eps=1e-5, tie_embeddings=True,
        max_positions=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama3_2_1b": DecoderConfig(
        family="llama", vocab_size=128256, num_layers=16, embed_dim=2048, mlp_dim=8192, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=True,
        max_positions=131072, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "gemma_2b": DecoderConfig(
        family="gemma", vocab_size=256000, num_layers=18, embed_dim=2048, mlp_dim=16384, num_heads=8,
        num_kv_heads=1, head_dim=256, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma2_2b": DecoderConfig(
        family="gemma2", vocab_size=256000, num_layers=26, embed_dim=2304, mlp_dim=9216, num_heads=8,
        num_kv_heads=4, head_dim=256, rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True,
        sliding_window=4096, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1, pad_token_id=0),
    # Tiny configs for tests: a few layers, real structural switches.
    "tiny_llama": DecoderConfig(
        family="llama", vocab_size=256, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=True),
    "tiny_gemma": DecoderConfig(
        family="gemma", vocab_size=256, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
        num_kv_heads=1, head_dim=32, norm_eps=1e-6, tie_embeddings=True),
    "tiny_gemma2": DecoderConfig(
        family="gemma2", vocab_size=256, num_layers=2, embed_dim=64, mlp_dim=128, num_heads=4,
        num_kv_heads=2, head_dim=32, norm_eps=1e-6, tie_embeddings=True, sliding_window=8,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, query_pre_attn_scalar=24),
}


def get_config(name: str, **overrides) -> DecoderConfig:
  """A preset by name, with optional field overrides."""
  if name not in PRESETS:
    raise UserError(f"Unknown decoder preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
