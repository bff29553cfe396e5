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

from persona_jax.nn.config import DecoderConfig
from persona_jax.nn.layers import Linear, apply_rope, rope_frequencies

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
    return k, v

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    """Args:
      x: `[batch, seq, embed]`.
      positions: `[batch, seq]` rotary positions of `x`.
      mask: `[batch, seq, keys]` where keys is `seq` without a cache, the cache size with one.
      cache: this layer's cache dict; the new keys/values are written at its `length`.
    Returns:
      `[batch, seq, embed]` and the updated cache (None without one).
    """
    cfg = self.config
    batch, seq, _ = x.shape
    q = self.q_proj(x).reshape(batch, seq, cfg.num_heads, cfg.head_dim)
    q = apply_rope(q, positions, rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    k, v = self.project_kv(x, positions)

    if cache is not None:
      cache = update_layer_cache(cache, k, v, positions)
      k, v, key_positions = cache["k"], cache["v"], cache["positions"]
    else:
      key_positions = positions

    if mask.shape != (batch, seq, k.shape[1]):
      raise ValueError(
          f"Attention mask has shape {mask.shape}; expected {(batch, seq, k.shape[1])} "
          "([batch, queries, keys]; keys = cache size when a cache is passed).")
    if self.sliding:
      distance = positions[:, :, None] - key_positions[:, None, :]
      mask = mask & (distance < cfg.sliding_window)

    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(batch, seq, cfg.num_kv_heads, groups, cfg.head_dim) * jnp.asarray(
        cfg.query_scale, q.dtype)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    out = out.reshape(batch, seq, cfg.num_heads * cfg.head_dim)
    return self.o_proj(out), cache
