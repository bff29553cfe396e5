"""Trace masks: many augmentation points ("traces") trained in one forward pass.

Layout. A sequence of `T` original tokens has already been run through the frozen decoder, whose kv
cache fills slots `[0, T)`. For each of `K` traces (augmentation after original token `p_k`) a group of
`G` new entries is appended: group k occupies slots `T + k*G ... T + k*G + G - 1`. A query in group k
may see
  * original slot j iff `j <= p_k` and j is a real token of the same packed segment as `p_k`;
  * slots of its own group up to itself (causal inside the group);
and nothing else: no later original token, no other trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from persona_jax.nn.attention import segment_causal_mask


def sample_trace_positions(rng: jax.Array, segment_ids: jax.Array, num_traces: int,
                           tokens_after: int) -> tuple[jax.Array, jax.Array]:
  """Draws `num_traces` distinct augmentation points per row, uniformly among the valid ones.

  A point p is valid when token p and the `tokens_after` tokens after it are real tokens of one
  segment (the coprocessor needs N_A + 1: N_A teacher-forced inputs and the target after the last).

  Args:
    rng: PRNG key.
    segment_ids: `[batch, seq]`, 0 for padding (unpacked data: 1 for every real token).
    num_traces: K.
    tokens_after: real tokens needed after p.
  Returns:
    positions `[batch, K]` int32 and valid `[batch, K]` bool (False when a row has fewer than K valid
    points; such traces get zero loss weight and point at position 0).
  """
  valid = valid_trace_points(segment_ids, tokens_after)
  # Gumbel top-k: distinct, uniform among the valid points, jit-friendly.
  scores = jnp.where(valid, jax.random.uniform(rng, valid.shape), -1.0)
  top_scores, positions = jax.lax.top_k(scores, num_traces)
  ok = top_scores >= 0.0
  return jnp.where(ok, positions, 0).astype(jnp.int32), ok


def valid_trace_points(segment_ids: jax.Array, tokens_after: int) -> jax.Array:
  """`[batch, seq]` bool: p has `tokens_after` real successors in its own segment."""
  seq = segment_ids.shape[1]
  if tokens_after >= seq:
    raise ValueError(f"A trace needs {tokens_after} tokens after its point (ahead_tokens + 1): the "
                     f"sequence length {seq} is too short.")
  head = segment_ids[:, : seq - tokens_after]
  tail = segment_ids[:, tokens_after:]
  ok = (head != 0) & (tail == head)
  return jnp.pad(ok, ((0, 0), (0, tokens_after)))


def evenly_spaced_trace_positions(segment_ids: jax.Array, num_traces: int,
                                  tokens_after: int) -> tuple[jax.Array, jax.Array]:
  """Deterministic augmentation points for evaluation: spread evenly over each row's valid points."""
  valid = valid_trace_points(segment_ids, tokens_after)
  count = valid.sum(axis=1, keepdims=True)  # [batch, 1]
  # The i-th chosen point is the valid point of rank floor((i + 0.5) * count / K).
  ranks = jnp.floor((jnp.arange(num_traces)[None, :] + 0.5) * count / num_traces).astype(jnp.int32)
  cumulative = jnp.cumsum(valid, axis=1) - 1  # rank of each valid point
  # position of the point with a given rank: first index whose cumulative rank reaches it.
  is_target = (cumulative[:, None, :] == ranks[:, :, None]) & valid[:, None, :]
  positions = jnp.argmax(is_target, axis=-1).astype(jnp.int32)
  ok = jnp.arange(num_traces)[None, :] < count
  return jnp.where(ok, positions, 0), ok


def original_visibility(segment_ids: jax.Array, trace_positions: jax.Array) -> jax.Array:
  """`[batch, K, T]`: which original tokens trace k may see (`j <= p_k`, same segment, not padding)."""
  seq = segment_ids.shape[1]
  trace_segments = jnp.take_along_axis(segment_ids, trace_positions, axis=1)  # [batch, K]
  before = jnp.arange(seq)[None, None, :] <= trace_positions[:, :, None]
  same_segment = segment_ids[:, None, :] == trace_segments[:, :, None]
  return before & same_segment & (segment_ids[:, None, :] != 0)


def trace_group_mask(visible_originals: jax.Array, group_size: int, cache_size: int) -> jax.Array:
  """Attention mask for K groups of `group_size` entries appended after the originals.

  Args:
    visible_originals: `[batch, K, T]` from `original_visibility`.
    group_size: G, entries per trace.
    cache_size: key slots of the cache (>= T + K * G); slots past the groups are hidden.
  Returns:
    `[batch, K * G, cache_size]` bool, queries ordered trace-major.
  """
  batch, num_traces, seq = visible_originals.shape
  new_slots = num_traces * group_size
  if cache_size < seq + new_slots:
    raise ValueError(f"cache_size={cache_size} < {seq} originals + {num_traces} x {group_size} entries.")
  originals = jnp.broadcast_to(visible_originals[:, :, None, :], (batch, num_traces, group_size, seq))
  originals = originals.reshape(batch, new_slots, seq)
  query_trace = jnp.arange(new_slots) // group_size
  same_trace = query_trace[:, None] == query_trace[None, :]
  causal = jnp.arange(new_slots)[:, None] >= jnp.arange(new_slots)[None, :]
  groups = jnp.broadcast_to(same_trace & causal, (batch, new_slots, new_slots))
  rest = jnp.zeros((batch, new_slots, cache_size - seq - new_slots), bool)
  return jnp.concatenate([originals, groups, rest], axis=-1)


def original_tokens_mask(segment_ids: jax.Array, cache_size: int) -> jax.Array:
  """`[batch, T, cache_size]`: the frozen decoder's own pass over the originals (packed-causal)."""
  seq = segment_ids.shape[1]
  mask = segment_causal_mask(segment_ids)
  return jnp.pad(mask, ((0, 0), (0, 0), (0, cache_size - seq)))
