"""`sampling.prefill(..., embeddings=...)`: input embeddings instead of token ids."""

import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import nn as pnn
from persona_jax import sampling


def test_prefill_from_embeddings_equals_prefill_from_the_same_tokens():
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama"), 0)
  tokens, mask = sampling.pad_prompts([[5, 6, 7, 8, 9], [10, 11, 12]], length_multiple=8)
  by_tokens = sampling.decode(decoder, sampling.prefill(decoder, tokens, mask, 32), max_new_tokens=6)
  embeddings = decoder.embed(jnp.asarray(tokens))
  state = sampling.prefill(decoder, None, mask, 32, embeddings=embeddings)
  by_embeddings = sampling.decode(decoder, state, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(by_embeddings.tokens), np.asarray(by_tokens.tokens))
  np.testing.assert_allclose(np.asarray(by_embeddings.logprobs), np.asarray(by_tokens.logprobs),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="prompt_tokens=None"):
    sampling.prefill(decoder, tokens, mask, 32, embeddings=embeddings)
  with pytest.raises(ValueError, match=r"\[batch, prompt_len, embed\]"):
    sampling.prefill(decoder, None, mask[:, :4], 32, embeddings=embeddings)
