"""DecoderConfig.scan_layers: one lax.scan over the stacked blocks equals the unrolled loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.nn.lora import inject_lora


def _pair(name, **overrides):
  config = pnn.get_config(name, **overrides)
  # The same seed gives the same parameters: only the flag differs.
  return (pnn.build_decoder(config, seed=3),
          pnn.build_decoder(config.replace(scan_layers=True), seed=3))


def _loss(model, tokens):
  logits = model(tokens).logits
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(logits.shape[1]))


def _jaxpr(model, tokens) -> str:
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name,layers,remat", [("tiny_llama", 4, False), ("tiny_gemma2", 4, False),
                                                ("tiny_llama", 3, True)])
def test_scan_equals_unrolled_forward_and_gradients(name, layers, remat):
  unrolled, scanned = _pair(name, num_layers=layers, remat=remat)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  # The scanned program really is a scan (one block body), the unrolled one is not.
  assert "scan" in _jaxpr(scanned, tokens)
  assert "scan" not in _jaxpr(unrolled, tokens)
  np.testing.assert_allclose(scanned(tokens).logits, unrolled(tokens).logits, atol=1e-5, rtol=0)

  grads = []
  for model in (unrolled, scanned):
    graphdef, params = nnx.split(model, nnx.Param)
    grads.append(jax.grad(lambda p, g=graphdef: _loss(nnx.merge(g, p), tokens))(params))
  largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[0]))
  assert largest > 1e-4  # not all zero
  assert _max_diff(grads[0], grads[1]) < 1e-5 * max(1.0, largest)  # fp32 round-off of the largest
  # Every layer gets its own gradient (the stacking is differentiated back to each block).
  layer_grads = [np.asarray(grads[1]["layers"][i]["mlp"]["up_proj"]["kernel"]) for i in range(layers)]
  assert not np.allclose(layer_grads[0], layer_grads[1])


def test_scan_with_a_kv_cache_decodes_like_unrolled():
  unrolled, scanned = _pair("tiny_gemma2", num_layers=4)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 256)
  outputs = []
  for model in (unrolled, scanned):
    cache = pnn.init_cache(model.config, 2, 10)
    out = model(tokens[:, :5], cache=cache)
    step = model(tokens[:, 5:], cache=out.cache)
    outputs.append((out.logits, step.logits, step.cache))
  assert _max_diff(outputs[0], outputs[1]) < 1e-5
  assert int(outputs[1][2][3]["length"]) == 6


def test_layers_of_different_structure_run_unrolled_with_the_same_result():
  unrolled, scanned = _pair("tiny_llama", num_layers=3)
  for model in (unrolled, scanned):  # an adapter on the first layer only: no common body
    inject_lora(model, layers=[0], rank=2, alpha=4.0)
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, 256)
  assert "scan" not in _jaxpr(scanned, tokens)
  np.testing.assert_array_equal(scanned(tokens).logits, unrolled(tokens).logits)
