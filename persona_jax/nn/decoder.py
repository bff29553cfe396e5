"""The decoder: embed -> blocks -> final norm -> logits, over tokens or input embeddings.

Methods extend it without forking this file:
  * LoRA adapters live in each `Linear.adapters` (see `persona_jax.nn.lora`).
  * `Block.after` is an optional module called on the block's output as `after(x, **side_inputs)`;
    User-LLM puts gated cross-attention there. `side_inputs` are passed through `Decoder.__call__`.
  * The kv cache is a plain pytree (`persona_jax.nn.attention`), so a method can read it, copy it and
    append entries (the coprocessor's latents).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.attention import Attention, causal_mask, cache_mask, segment_causal_mask
from persona_jax.nn.config import DecoderConfig
from persona_jax.nn.layers import GatedMLP, RMSNorm, logical_param
from persona_jax.nn.sharding import BATCH_LENGTH_EMBED, with_logical_constraint


@dataclasses.dataclass
class DecoderOutput:
  """What a forward pass returns.

  logits: `[batch, seq, vocab]` fp32 (None when `return_logits=False`).
  hidden: `[batch, seq, embed]` output of the last block, before the final norm.
  cache: the updated kv cache (None when none was passed).
  """
  logits: jax.Array | None
  hidden: jax.Array
  cache: Any = None


jax.tree_util.register_dataclass(DecoderOutput, data_fields=["logits", "hidden", "cache"], meta_fields=[])


class Block(nnx.Module):
  """Pre-norm transformer block; gemma2 adds post-norms after attention and MLP."""

  def __init__(self, config: DecoderConfig, layer: int, *, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(config.embed_dim, eps=config.norm_eps, offset=config.norm_offset,
                           param_dtype=config.weights_dtype)
    self.input_norm = norm()
    self.attention = Attention(config, sliding=config.is_sliding_layer(layer), rngs=rngs)
    self.post_attention_norm = norm() if config.post_norms else nnx.data(None)
    self.pre_mlp_norm = norm()
    self.mlp = GatedMLP(config.embed_dim, config.mlp_dim, activation=config.activation, rngs=rngs,
                        dtype=config.compute_dtype, param_dtype=config.weights_dtype)
    self.post_mlp_norm = norm() if config.post_norms else nnx.data(None)
    self.after = nnx.data(None)  # optional method module: after(x, **side_inputs) -> x

  def __call__(self, x, positions, mask, cache=None, side_inputs=None, segment_ids=None):
    h, cache = self.attention(self.input_norm(x), positions, mask, cache, segment_ids=segment_ids)
    if self.post_attention_norm is not None:
      h = self.post_attention_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    x = x + h
    if self.after is not None:
      x = self.after(x, **(side_inputs or {}))
    return with_logical_constraint(x, BATCH_LENGTH_EMBED), cache


class Decoder(nnx.Module):
  """Decoder-only language model for the llama, gemma and gemma2 families."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    embed_init = jax.nn.initializers.normal(stddev=0.02)
    self.embedding = logical_param(
        embed_init(rngs.params(), (config.vocab_size, config.embed_dim), config.weights_dtype),
        ("vocab", "embed"))
    self.layers = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.embed_dim, eps=config.norm_eps, offset=config.norm_offset,
                              param_dtype=config.weights_dtype)
    if config.tie_embeddings:
      self.lm_head = nnx.data(None)
    else:
      self.lm_head = logical_param(
          embed_init(rngs.params(), (config.embed_dim, config.vocab_size), config.weights_dtype),
          ("embed", "vocab"))

  def embed(self, tokens: jax.Array) -> jax.Array:
    """Token ids `[batch, seq]` -> embeddings `[batch, seq, embed]` (unscaled table rows)."""
    rows = jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.compute_dtype)
    row_scale = getattr(self, "embedding_scale", None)  # int8 decode weights (nn/quantization.py)
    if row_scale is not None:
      rows = rows * jnp.take(row_scale[...], tokens, axis=0).astype(rows.dtype)
    return rows

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final norm + output projection + optional soft-cap, in fp32. `[.., embed] -> [.., vocab]`."""
    cfg = self.config
    x = self.final_norm(hidden)
    if self.lm_head is None:
      logits = jnp.einsum("...e,ve->...v", x, self.embedding[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
      vocab_scale = getattr(self, "embedding_scale", None)  # [vocab, 1] per-row int8 scales
    else:
      logits = jnp.einsum("...e,ev->...v", x, self.lm_head[...].astype(x.dtype),
                          preferred_element_type=jnp.float32)
      vocab_scale = getattr(self, "lm_head_scale", None)  # [1, vocab]
    if vocab_scale is not None:
      logits = logits * vocab_scale[...].reshape(-1).astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    if logits.ndim == 3:
      logits = with_logical_constraint(logits, ("activation_batch", "activation_length",
                                                "activation_vocab"))
    return logits

  def __call__(self, tokens: jax.Array | None = None, *, embeddings: jax.Array | None = None,
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               cache: tuple[dict, ...] | None = None, side_inputs: dict | None = None,
               return_logits: bool = True, segment_ids: jax.Array | None = None) -> DecoderOutput:
    """Forward pass.

    Args:
      tokens: `[batch, seq]` ids, or None when `embeddings` is given.
      embeddings: `[batch, seq, embed]` input embeddings (gemma's sqrt(d) scale is applied to them,
        as it is to embedded tokens; transformers 5 no longer scales `inputs_embeds`, so callers that
        feed embeddings to an exported gemma scale them first, see coprocessor/hf_loader.py).
      positions: `[batch, seq]` rotary positions; default `cache length + arange(seq)`.
      attention_mask: `[batch, seq, keys]` bool; keys = seq without a cache, cache size with one.
        Default: causal (over the filled cache slots plus the new tokens).
      cache: kv cache from `init_cache`; the new keys/values are written at its `length`.
      side_inputs: keyword arguments for the `Block.after` modules a method installed.
      return_logits: False skips the output projection (hidden states only).
      segment_ids: optional `[batch, seq]` packing/padding ids (0 = padding), with positions
        contiguous inside each segment. Without an `attention_mask` they define it
        (`segment_causal_mask`); they also let the Pallas splash kernel run
        (`DecoderConfig.attention_impl`), which cannot take a dense mask. Without a cache only.
    """
    cfg = self.config
    if (tokens is None) == (embeddings is None):
      raise UserError("Decoder: pass exactly one of `tokens` or `embeddings`.")
    x = self.embed(tokens) if embeddings is None else embeddings.astype(cfg.compute_dtype)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.embed_dim ** 0.5, x.dtype)
    x = with_logical_constraint(x, BATCH_LENGTH_EMBED)
    batch, seq = x.shape[:2]
    start = cache[0]["length"] if cache is not None else 0
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if segment_ids is not None and cache is not None:
      raise UserError("Decoder: segment_ids describe a forward without a cache; pass an "
                       "attention_mask over the cache slots instead.")
    if attention_mask is None and segment_ids is not None:
      attention_mask = segment_causal_mask(segment_ids)
    if attention_mask is None:
      if cache is None:
        attention_mask = causal_mask(seq, batch)
      else:
        max_len = cache[0]["k"].shape[1]
        valid = jnp.broadcast_to(jnp.arange(max_len) < start + seq, (batch, max_len))
        attention_mask = cache_mask(valid, seq, start)

    scanned = self._scan_blocks(x, positions, attention_mask, cache, side_inputs,
                                segment_ids) if cfg.scan_layers else None
    if scanned is not None:
      x, new_cache = scanned
    else:
      new_cache = [] if cache is not None else None
      for i, block in enumerate(self.layers):
        layer_cache = cache[i] if cache is not None else None
        if cfg.remat:
          policy = getattr(jax.checkpoint_policies, cfg.remat_policy) if cfg.remat_policy else None
          x, layer_cache = nnx.remat(lambda b, *a: b(*a), policy=policy)(
              block, x, positions, attention_mask, layer_cache, side_inputs, segment_ids)
        else:
          x, layer_cache = block(x, positions, attention_mask, layer_cache, side_inputs, segment_ids)
        if new_cache is not None:
          new_cache.append(layer_cache)
    logits = self.logits(x) if return_logits else None
    return DecoderOutput(logits=logits, hidden=x,
                         cache=tuple(new_cache) if new_cache is not None else None)


  def scan_period(self) -> int:
    """Layers per scanned step: 2 for gemma2's alternating local/global layers, else 1."""
    cfg = self.config
    return 2 if cfg.family == "gemma2" and cfg.sliding_window is not None else 1

  def _scan_blocks(self, x, positions, mask, cache, side_inputs, segment_ids):
    """The blocks as one `lax.scan` over their stacked states (`DecoderConfig.scan_layers`).

    Returns (x, new_cache) or None when the layers cannot share one body (a depth that is not a
    multiple of the period, or layers of different structure: the caller unrolls then).
    """
    cfg = self.config
    period, num = self.scan_period(), len(self.layers)
    if num % period:
      _log_unrolled_once(f"{num} layers are not a multiple of the scan period {period}")
      return None
    splits = [nnx.split(tuple(self.layers[i:i + period])) for i in range(0, num, period)]
    graphdef = splits[0][0]
    if any(other != graphdef for other, _ in splits[1:]):
      _log_unrolled_once("the layers differ in structure (e.g. adapters on some layers only)")
      return None
    states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[state for _, state in splits])
    caches = None
    if cache is not None:
      caches = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                            *[tuple(cache[i:i + period]) for i in range(0, num, period)])

    def body(x, inputs):
      state, group_cache = inputs
      blocks = nnx.merge(graphdef, state)
      out_cache = []
      for j, block in enumerate(blocks):
        x, layer_cache = block(x, positions, mask, None if group_cache is None else group_cache[j],
                               side_inputs, segment_ids)
        out_cache.append(layer_cache)
      return x, (tuple(out_cache) if group_cache is not None else None)

    if cfg.remat:
      policy = getattr(jax.checkpoint_policies, cfg.remat_policy) if cfg.remat_policy else None
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, stacked_cache = jax.lax.scan(body, x, (states, caches))
    if cache is None:
      return x, None
    new_cache = [jax.tree.map(lambda leaf, g=g: leaf[g], stacked_cache)[j]
                 for g in range(num // period) for j in range(period)]
    return x, new_cache


_UNROLLED_REASONS: set[str] = set()


def _log_unrolled_once(reason: str) -> None:
  if reason not in _UNROLLED_REASONS:
    _UNROLLED_REASONS.add(reason)
    logging.warning("DecoderConfig.scan_layers: %s; the layers run unrolled.", reason)


def build_decoder(config: DecoderConfig, seed: int = 0) -> Decoder:
  """A randomly initialized decoder."""
  return Decoder(config, rngs=nnx.Rngs(seed))
