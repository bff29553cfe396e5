"""Decode weights (persona_jax.nn.quantization): bf16 and int8 weight-only copies of a decoder.

Accuracy bounds here are loose sanity checks on tiny random models; the figures that matter (logit
difference vs fp32 and greedy agreement on real prompts of SmolLM2) come from
benchmarks/decoder_vs_hf.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import nn, sampling
from persona_jax.nn import quantization


@pytest.fixture(scope="module", params=[("tiny_llama", True), ("tiny_gemma2", False)])
def decoder(request):
  preset, tied = request.param
  return nn.build_decoder(nn.get_config(preset, tie_embeddings=tied), seed=4)


def test_int8_values_and_scales_reconstruct_the_weight():
  weight = jnp.asarray(np.random.default_rng(0).normal(size=(64, 48)), jnp.float32)
  values, scale = quantization.quantize_int8(weight, channel_axis=1)
  assert values.dtype == jnp.int8 and scale.shape == (1, 48)
  # absmax: each column's largest entry maps to the end of the int8 range (Qwix uses [-128, 127]
  # around 127.5), so the error is at most half a step.
  assert np.all(np.abs(np.asarray(values, np.int32)).max(axis=0) >= 127)
  assert np.all(np.abs(values * scale - weight) <= scale * 0.5 * (1 + 1e-5))


@pytest.mark.parametrize("weight_format,max_bytes_ratio,tolerance",
                         [("bfloat16", 0.51, 0.02), ("int8", 0.3, 0.06)])
def test_converted_decoder_is_smaller_and_close(decoder, weight_format, max_bytes_ratio, tolerance):
  converted = quantization.convert_decoder_weights(decoder, weight_format)
  assert quantization.weight_bytes(converted) <= max_bytes_ratio * quantization.weight_bytes(decoder)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
  reference = np.asarray(decoder(tokens).logits)
  logits = np.asarray(converted(tokens).logits)
  assert logits.dtype == np.float32
  assert np.abs(logits - reference).max() <= tolerance * np.abs(reference).max()
  # Random tiny models have near-ties; real-model agreement is measured by the benchmark.
  assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.75
  # The original is untouched (the conversion works on a copy).
  assert decoder.embedding[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(decoder(tokens).logits), reference)


def test_float32_is_the_decoder_itself_and_errors_are_clear(decoder):
  assert quantization.convert_decoder_weights(decoder, "float32") is decoder
  with pytest.raises(ValueError, match="int4"):
    quantization.convert_decoder_weights(decoder, "int4")
  converted = quantization.convert_decoder_weights(decoder, "int8")
  with pytest.raises(ValueError, match="already converted"):
    quantization.convert_decoder_weights(converted, "bfloat16")
