"""DecoderConfig.loss_chunk_tokens: the fused, chunked output projection + cross-entropy equals the
reference (full logits + weighted_cross_entropy) in value, metrics and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.train.losses import lm_loss


def _batch(vocab, rows=2, seq=11):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
  weights = (rng.random((rows, seq)) > 0.3).astype(np.float32)
  return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
          "decoder_loss_weights": weights}


def _value_and_grad(model, batch):
  graphdef, params = nnx.split(model, nnx.Param)
  fn = lambda p: lm_loss(nnx.merge(graphdef, p), batch)
  return jax.value_and_grad(fn, has_aux=True)(params)


# chunk 5 does not divide the 22 tokens: the padded last chunk must not count.
@pytest.mark.parametrize("name,tie,chunk", [("tiny_llama", True, 5), ("tiny_llama", False, 8),
                                            ("tiny_gemma2", True, 4)])
def test_chunked_loss_equals_the_reference(name, tie, chunk):
  config = pnn.get_config(name, tie_embeddings=tie)
  reference = pnn.build_decoder(config, seed=1)
  fused = pnn.build_decoder(config.replace(loss_chunk_tokens=chunk), seed=1)
  batch = _batch(config.vocab_size)
  (loss_r, metrics_r), grads_r = _value_and_grad(reference, batch)
  (loss_f, metrics_f), grads_f = _value_and_grad(fused, batch)
  # Independent check of the reference value itself: mean NLL over weighted positions, by hand.
  logits = np.asarray(reference(batch["decoder_input_tokens"]).logits, np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  w = batch["decoder_loss_weights"]
  assert float(loss_f) == pytest.approx((nll * w).sum() / w.sum(), abs=1e-5)
  assert float(loss_f) == pytest.approx(float(loss_r), abs=1e-5)
  for key in ("accuracy", "num_tokens"):
    assert float(metrics_f[key]) == pytest.approx(float(metrics_r[key]), abs=1e-6)
  flat_r, flat_f = jax.tree.leaves(grads_r), jax.tree.leaves(grads_f)
  assert len(flat_r) == len(flat_f)
  for a, b in zip(flat_r, flat_f):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=1e-4)
  # The table's gradient is nonzero (it gets both the input-embedding and the output-head parts).
  table = grads_f["embedding"] if tie else grads_f["lm_head"]
  assert float(jnp.max(jnp.abs(table))) > 1e-4


def test_bad_chunk_size_is_refused():
  with pytest.raises(ValueError, match="loss_chunk_tokens"):
    pnn.get_config("tiny_llama", loss_chunk_tokens=0)
