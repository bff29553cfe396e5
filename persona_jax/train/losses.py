"""Reusable losses in fp32: next-token cross-entropy over packed (segmented) sequences.

`decoder_cross_entropy` is the entry point from hidden states: by default the full `[batch, seq,
vocab]` logits and `weighted_cross_entropy` (the reference); with `DecoderConfig.loss_chunk_tokens`
set, `chunked_cross_entropy`, a fused output-projection + cross-entropy with its own backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from persona_jax.errors import UserError
from persona_jax.nn import segment_causal_mask
from persona_jax.nn.logprobs import token_log_probs


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array,
                           weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy over weighted positions.

  Args:
    logits: `[batch, seq, vocab]` predictions for `targets`.
    targets: `[batch, seq]` ids.
    weights: `[batch, seq]` loss weights (0 for padding / positions not trained on).
  Returns:
    (loss: scalar `sum(w * nll) / max(sum(w), 1)`, metrics with `loss`, `accuracy`, `num_tokens`).
  """
  weights = weights.astype(jnp.float32)
  nll = -token_log_probs(logits, targets)
  total_weight = jnp.sum(weights)
  denominator = jnp.maximum(total_weight, 1.0)
  loss = jnp.sum(nll * weights) / denominator
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"loss": loss, "accuracy": jnp.sum(correct * weights) / denominator,
             "num_tokens": total_weight}
  return loss, metrics


def _chunk_logits(x, table, tied: bool, softcap):
  """`[c, embed] -> ([c, vocab] fp32 logits, tanh term or None)`, as `Decoder.logits` computes them."""
  if tied:
    z = jnp.einsum("ce,ve->cv", x, table.astype(x.dtype), preferred_element_type=jnp.float32)
  else:
    z = jnp.einsum("ce,ev->cv", x, table.astype(x.dtype), preferred_element_type=jnp.float32)
  if softcap is None:
    return z, None
  t = jnp.tanh(z / softcap)
  return t * softcap, t


def _to_chunks(a, chunk: int):
  rows = a.shape[0]
  pad = -rows % chunk
  if pad:
    a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
  return a.reshape((-1, chunk) + a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_nll(x, table, targets, chunk, tied, softcap):
  nll, correct, _ = _fused_nll_forward(x, table, targets, chunk, tied, softcap)
  return nll, correct


def _fused_nll_forward(x, table, targets, chunk, tied, softcap):
  rows = x.shape[0]
  vocab = table.shape[0] if tied else table.shape[1]

  def one(_, inputs):
    xc, tc = inputs
    logits, _ = _chunk_logits(xc, table, tied, softcap)
    top = jnp.max(logits, axis=-1)
    lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
    onehot = jnp.arange(vocab)[None, :] == tc[:, None]
    target_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return None, (lse - target_logit, (target_logit >= top).astype(jnp.float32), lse)

  _, (nll, correct, lse) = jax.lax.scan(one, None, (_to_chunks(x, chunk), _to_chunks(targets, chunk)))
  return nll.reshape(-1)[:rows], correct.reshape(-1)[:rows], lse.reshape(-1)[:rows]


def _fused_nll_fwd(x, table, targets, chunk, tied, softcap):
  nll, correct, lse = _fused_nll_forward(x, table, targets, chunk, tied, softcap)
  return (nll, correct), (x, table, targets, lse)


def _fused_nll_bwd(chunk, tied, softcap, residuals, cotangents):
  x, table, targets, lse = residuals
  g_nll, _ = cotangents  # `correct` is a metric: no gradient
  vocab = table.shape[0] if tied else table.shape[1]
  rows = x.shape[0]

  def one(d_table_t, inputs):
    xc, tc, lc, gc = inputs
    logits, t = _chunk_logits(xc, table, tied, softcap)
    onehot = jnp.arange(vocab)[None, :] == tc[:, None]
    d_logits = (jnp.exp(logits - lc[:, None]) - onehot.astype(jnp.float32)) * gc[:, None]
    if softcap is not None:
      d_logits = d_logits * (1.0 - t * t)
    d_logits = d_logits.astype(xc.dtype)
    if tied:
      dxc = jnp.einsum("cv,ve->ce", d_logits, table.astype(xc.dtype), preferred_element_type=jnp.float32)
    else:
      dxc = jnp.einsum("cv,ev->ce", d_logits, table.astype(xc.dtype), preferred_element_type=jnp.float32)
    # The table's gradient is accumulated as [embed, vocab] (x^T @ d_logits): the [chunk, vocab]
    # d_logits is read in its own layout, never transposed.
    d_table_t = d_table_t + jnp.einsum("ce,cv->ev", xc, d_logits, preferred_element_type=jnp.float32)
    return d_table_t, dxc.astype(xc.dtype)

  embed = x.shape[1]
  d_table_t, dx = jax.lax.scan(
      one, jnp.zeros((embed, vocab), jnp.float32),
      (_to_chunks(x, chunk), _to_chunks(targets, chunk), _to_chunks(lse, chunk),
       _to_chunks(g_nll.astype(jnp.float32), chunk)))
  d_table = d_table_t.T if tied else d_table_t
  return dx.reshape(-1, embed)[:rows], d_table.astype(table.dtype), None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def chunked_cross_entropy(model, hidden: jax.Array, targets: jax.Array, weights: jax.Array, *,
                          chunk_tokens: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`weighted_cross_entropy(model.logits(hidden), targets, weights)` without the full logits.

  The final norm runs as usual; the output projection, log-sum-exp and target logit run over
  `chunk_tokens` tokens at a time, and a hand-written backward recomputes each chunk's logits and
  turns them into the hidden-state and table gradients directly (`softmax - onehot`), so neither
  the `[tokens, vocab]` logits nor their gradient is ever stored whole or transposed. Equal to the
  reference within fp32 round-off (a different summation order: tests/nn/test_fused_loss.py),
  hence opt-in (`DecoderConfig.loss_chunk_tokens`). `accuracy` counts a tie for the top logit as
  correct (the reference's argmax takes the first of tied indices).
  """
  cfg = model.config
  if getattr(model, "embedding_scale", None) is not None or getattr(model, "lm_head_scale", None) is not None:
    raise UserError("chunked_cross_entropy: the decoder carries int8 decode weights; train the "
                     "float weights (DecoderConfig.loss_chunk_tokens=None uses the plain logits).")
  x = model.final_norm(hidden)
  batch, seq, embed = x.shape
  tied = model.lm_head is None
  table = model.embedding[...] if tied else model.lm_head[...]
  nll, correct = _fused_nll(x.reshape(batch * seq, embed), table, targets.reshape(-1).astype(jnp.int32),
                            int(chunk_tokens), tied, cfg.final_logit_softcap)
  weights = weights.astype(jnp.float32).reshape(-1)
  total_weight = jnp.sum(weights)
  denominator = jnp.maximum(total_weight, 1.0)
  loss = jnp.sum(nll * weights) / denominator
  metrics = {"loss": loss, "accuracy": jnp.sum(correct * weights) / denominator,
             "num_tokens": total_weight}
  return loss, metrics


def decoder_cross_entropy(model, hidden: jax.Array, targets: jax.Array, weights: jax.Array
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the decoder's predictions from its last hidden states `[batch, seq, embed]`.

  `DecoderConfig.loss_chunk_tokens` None (default): `model.logits` + `weighted_cross_entropy`, the
  reference; an int: `chunked_cross_entropy` over that many tokens per chunk (faster, less memory,
  fp32 round-off of the reference).
  """
  chunk = getattr(model.config, "loss_chunk_tokens", None)
  if chunk:
    return chunked_cross_entropy(model, hidden, targets, weights, chunk_tokens=chunk)
  return weighted_cross_entropy(model.logits(hidden), targets, weights)


def lm_loss(model, batch: dict[str, jax.Array], rng: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Language-model loss on a batch from a SeqIO decoder feature converter.

  Args:
    model: a `persona_jax.nn.Decoder` (or anything with its call signature).
    batch: `decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` `[batch, seq]`;
      with packing also `decoder_segment_ids` and `decoder_positions` `[batch, seq]`.
    rng: unused (the decoder has no dropout); part of the loss-function protocol.
  Returns:
    (scalar fp32 loss, metrics).
  """
  del rng
  inputs = batch["decoder_input_tokens"]
  segment_ids = batch.get("decoder_segment_ids")
  if segment_ids is None:
    # Unpacked: one sequence per row; padding (target 0 with weight 0) is masked by the weights, and
    # a padded key can only be seen by later (padded) queries under a causal mask.
    segment_ids = jnp.ones_like(inputs)
  mask = segment_causal_mask(segment_ids)
  positions = batch.get("decoder_positions")
  if getattr(getattr(model, "config", None), "loss_chunk_tokens", None):
    hidden = model(inputs, positions=positions, attention_mask=mask, return_logits=False).hidden
    return decoder_cross_entropy(model, hidden, batch["decoder_target_tokens"],
                                 batch["decoder_loss_weights"])
  output = model(inputs, positions=positions, attention_mask=mask)
  return weighted_cross_entropy(output.logits, batch["decoder_target_tokens"],
                                batch["decoder_loss_weights"])
