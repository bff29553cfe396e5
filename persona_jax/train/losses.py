"""Reusable losses in fp32: next-token cross-entropy over packed (segmented) sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
  output = model(inputs, positions=positions, attention_mask=mask)
  return weighted_cross_entropy(output.logits, batch["decoder_target_tokens"],
                                batch["decoder_loss_weights"])
