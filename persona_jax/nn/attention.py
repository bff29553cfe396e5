"""Grouped-query self-attention over an explicit mask and a plain-pytree kv cache.

Masks are explicit booleans `[batch, query, key]`: `True` means "may attend". Methods build their own
(the coprocessor's trace masks, prompt padding); the helpers below cover the common cases.

The kv cache is a tuple with one dict per layer:
  `{'k': [batch, max_len, kv_heads, head_dim], 'v': same, 'positions': [batch, max_len] int32,
    'length': int32 scalar}`
`length` is how many slots are filled; new keys/values are written at `length`. `positions` keeps
each slot's rotary position so sliding windows work on any layout (padding, inserted latents).
A method may append its own entries (latents, memories) by writing slots and advancing `length`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.config import DecoderConfig
from persona_jax.nn.layers import Linear, apply_rope, rope_frequencies
from persona_jax.nn.sharding import with_logical_constraint

_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)

_MASKED = -2.3819763e38  # large negative that stays finite in fp32 (a fully masked row gives no NaN)


# Masks --------------------------------------------------------------------------------------------
def causal_mask(seq_len: int, batch: int = 1) -> jax.Array:
  """`[batch, seq, seq]` lower-triangular mask."""
  mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
  return jnp.broadcast_to(mask, (batch, seq_len, seq_len))


def padded_causal_mask(input_mask: jax.Array) -> jax.Array:
  """Causal mask that also hides padding keys. `input_mask`: `[batch, seq]`, True for real tokens."""
  seq_len = input_mask.shape[1]
  return causal_mask(seq_len, input_mask.shape[0]) & input_mask[:, None, :].astype(bool)


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal mask for packed sequences: a token sees earlier tokens of its own segment only.

  `segment_ids`: `[batch, seq]`, 0 for padding (padding sees nothing and is seen by nothing).
  """
  seq_len = segment_ids.shape[1]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  real = (segment_ids != 0)[:, :, None] & (segment_ids != 0)[:, None, :]
  return causal_mask(seq_len, segment_ids.shape[0]) & same & real


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """Positions 0,1,2,... counted over real tokens only (left padding gets position 0)."""
  input_mask = input_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(input_mask, axis=-1) - 1, 0)


def cache_mask(key_valid: jax.Array, query_len: int, start: jax.Array | int) -> jax.Array:
  """Mask for `query_len` new tokens written at slot `start` of a cache.

  Args:
    key_valid: `[batch, max_len]` which cache slots hold real (non-padding) entries, the new ones
      included.
    query_len: number of new tokens.
    start: slot of the first new token.
  Returns:
    `[batch, query_len, max_len]`: query i sees valid slots up to `start + i`.
  """
  max_len = key_valid.shape[1]
  query_slots = start + jnp.arange(query_len)
  causal = jnp.arange(max_len)[None, :] <= query_slots[:, None]
  return causal[None] & key_valid[:, None, :].astype(bool)


# Cache --------------------------------------------------------------------------------------------
def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype=None) -> tuple[dict, ...]:
  """An empty kv cache: one dict per layer."""
  dtype = dtype or config.compute_dtype
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  return tuple(
      {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
       "positions": jnp.zeros((batch, max_len), jnp.int32), "length": jnp.zeros((), jnp.int32)}
      for _ in range(config.num_layers))


def update_layer_cache(layer_cache: dict, k: jax.Array, v: jax.Array, positions: jax.Array) -> dict:
  """Writes `k, v: [batch, n, kv_heads, head_dim]` at slot `length` and advances it by n."""
  start = layer_cache["length"]
  return {
      "k": jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, start, 0, 0)),
      "v": jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, start, 0, 0)),
      "positions": jax.lax.dynamic_update_slice(
          layer_cache["positions"], positions.astype(jnp.int32), (0, start)),
      "length": start + k.shape[1],
  }


# Kernels ------------------------------------------------------------------------------------------
# All take grouped queries `q: [batch, seq, kv_heads, groups, head_dim]` (rotary applied, not yet
# scaled), `k, v: [batch, keys, kv_heads, head_dim]`, and return `[batch, seq, kv_heads, groups,
# head_dim]`. The einsum is the reference; the others equal it within 1e-5 in fp32 on the masks the
# methods use (causal, padded, packed, sliding window, the coprocessor's trace masks).
def resolve_attention_impl(config: DecoderConfig) -> str:
  """The kernel `config.attention_impl` means on this backend.

  `'auto'` keeps the reference einsum on CPU (so CPU numbers, checkpoints and result tables do not
  change), picks cuDNN flash on GPU and Pallas splash on TPU (each falls back per call, see
  `Attention.__call__`).
  """
  impl = config.attention_impl
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "gpu":
    return "cudnn"
  if backend == "tpu":
    return "pallas"
  return "einsum"


def einsum_attention(q, k, v, mask, *, scale: float, softcap: float | None = None) -> jax.Array:
  """The reference: explicit boolean `mask: [batch, seq, keys]`, fp32 logits and softmax."""
  q = q * jnp.asarray(scale, q.dtype)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def mask_to_bias(mask: jax.Array, dtype=jnp.float32) -> jax.Array:
  """A boolean mask `[...]` as an additive bias: 0 where allowed, a large finite negative elsewhere.

  This is how an arbitrary mask (the coprocessor's trace masks) reaches a kernel that takes a bias.
  """
  return jnp.where(mask, jnp.asarray(0, dtype), jnp.asarray(jnp.finfo(dtype).min / 2, dtype))


def dot_product_attention(q, k, v, mask, *, scale: float, implementation: str = "xla") -> jax.Array:
  """`jax.nn.dot_product_attention` with the mask as the kernel takes it.

  XLA takes the boolean mask as is; cuDNN gets it as a bias (any mask shape works, trace masks
  included; the causal/padding fast paths of cuDNN need right padding, which left-padded prompts
  and inserted latents are not).
  """
  batch, seq, kv_heads, groups, head_dim = q.shape
  q = q.reshape(batch, seq, kv_heads * groups, head_dim)  # head h uses kv head h // groups
  k = k.astype(q.dtype)
  v = v.astype(q.dtype)
  if implementation == "cudnn":
    bias = mask_to_bias(mask, q.dtype)[:, None, :, :]
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], scale=scale,
                                       implementation="xla")
  return out.reshape(batch, seq, kv_heads, groups, head_dim)


def splash_block_size(seq: int) -> int | None:
  """The splash block for a sequence length, or None when the length does not tile."""
  for block in (512, 256, 128):  # splash computes in blocks of whole 128-lane tiles
    if seq % block == 0:
      return block
  return None


def splash_attention(q, k, v, segment_ids, *, scale: float, window: int | None = None,
                     softcap: float | None = None, interpret: bool = False) -> jax.Array | None:
  """Pallas splash attention (TPU; interpret mode elsewhere) for packed/padded causal attention.

  The mask is what splash takes: causal (or causal + local window of `window` for gemma2's sliding
  layers) over indices, and `segment_ids: [batch, seq]` (a query sees keys of its own segment).
  Index distance equals rotary-position distance when positions are contiguous inside a segment.
  Returns None (the caller falls back to the einsum) when the length does not tile into blocks.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  batch, seq, kv_heads, groups, head_dim = q.shape
  block = splash_block_size(seq)
  if block is None or k.shape[1] != seq:
    return None
  if window is None:
    head_mask = splash_mask.CausalMask((seq, seq))
  else:  # q_pos - k_pos < window, and causal
    head_mask = splash_mask.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
  block_sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mqa_single_device(
      splash_mask.MultiHeadMask([head_mask] * groups), block_sizes=block_sizes,
      attn_logits_soft_cap=softcap, interpret=interpret)
  q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, groups, seq, d]
  k = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, d]
  v = v.astype(q.dtype).transpose(0, 2, 1, 3)
  segment_ids = segment_ids.astype(jnp.int32)

  def one_row(q_row, k_row, v_row, segments):
    ids = splash.SegmentIds(q=segments, kv=segments)
    return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

  out = jax.vmap(one_row)(q, k, v, segment_ids)  # [batch, kv_heads, groups, seq, d]
  return out.transpose(0, 3, 1, 2, 4)


# Attention ----------------------------------------------------------------------------------------
class Attention(nnx.Module):
  """GQA self-attention with rotary embeddings, optional soft-capping and sliding window."""

  def __init__(self, config: DecoderConfig, *, sliding: bool, rngs: nnx.Rngs):
    self.config = config
    self.sliding = sliding
    kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weights_dtype)
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    self.q_proj = Linear(config.embed_dim, q_width, in_axis="embed", out_axis="heads", **kw)
    self.k_proj = Linear(config.embed_dim, kv_width, in_axis="embed", out_axis="kv", **kw)
    self.v_proj = Linear(config.embed_dim, kv_width, in_axis="embed", out_axis="kv", **kw)
    self.o_proj = Linear(q_width, config.embed_dim, in_axis="heads", out_axis="embed", **kw)

  def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rotary-embedded keys and values `[batch, seq, kv_heads, head_dim]` for inputs `x`."""
    cfg = self.config
    batch, seq, _ = x.shape
    k = self.k_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    v = self.v_proj(x).reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
    k = apply_rope(k, positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    return with_logical_constraint(k, _KV_HEADS), with_logical_constraint(v, _KV_HEADS)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: dict | None = None, segment_ids: jax.Array | None = None
               ) -> tuple[jax.Array, dict | None]:
    """Args:
      x: `[batch, seq, embed]`.
      positions: `[batch, seq]` rotary positions of `x`.
      mask: `[batch, seq, keys]` where keys is `seq` without a cache, the cache size with one.
      cache: this layer's cache dict; the new keys/values are written at its `length`.
      segment_ids: optional `[batch, seq]` (0 = padding) saying that `mask` is exactly
        `segment_causal_mask(segment_ids)` with positions contiguous inside each segment; the Pallas
        splash kernel needs this structure (it cannot take a dense mask) and is used only with it.
    Returns:
      `[batch, seq, embed]` and the updated cache (None without one).
    """
    cfg = self.config
    batch, seq, _ = x.shape
    q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    q = apply_rope(q, positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    q = with_logical_constraint(q, _HEADS)
    k, v = self.project_kv(x, positions)

    if cache is not None:
      cache = update_layer_cache(cache, k, v, positions)
      k, v, key_positions = cache["k"], cache["v"], cache["positions"]
    else:
      key_positions = positions

    if mask.shape != (batch, seq, k.shape[1]):
      raise UserError(
          f"Attention mask has shape {mask.shape}; expected {(batch, seq, k.shape[1])} "
          "([batch, queries, keys]; keys = cache size when a cache is passed).")
    if self.sliding:
      distance = positions[:, :, None] - key_positions[:, None, :]
      mask = mask & (distance < cfg.sliding_window)

    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim)
    impl = resolve_attention_impl(cfg)
    out = None
    if impl == "pallas" and cache is None and segment_ids is not None:
      out = splash_attention(q, k, v, segment_ids, scale=cfg.query_scale,
                             window=cfg.sliding_window if self.sliding else None,
                             softcap=cfg.attn_logit_softcap, interpret=jax.default_backend() != "tpu")
    elif impl in ("xla", "cudnn") and cfg.attn_logit_softcap is None:
      # cuDNN flash wants half precision and more than one query; the decode step uses XLA's fusion.
      use_cudnn = impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16) and seq > 1
      out = dot_product_attention(q, k, v, mask, scale=cfg.query_scale,
                                  implementation="cudnn" if use_cudnn else "xla")
    if out is None:  # the reference; every kernel above equals it (tests/nn/test_attention_impls.py)
      out = einsum_attention(q, k, v, mask, scale=cfg.query_scale, softcap=cfg.attn_logit_softcap)
    out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
    out = with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads"))
    return self.o_proj(out), cache
