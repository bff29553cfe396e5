"""Log-probabilities of given tokens: the one implementation the sampler, losses and methods share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position, via log_softmax in fp32.

  Args:
    logits: `[..., vocab]` (e.g. `[batch, seq, vocab]`, or `[batch, vocab]` for one decode step).
    targets: `[...]` int ids (the logits' shape without the vocabulary axis).
  Returns:
    `[...]` fp32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
