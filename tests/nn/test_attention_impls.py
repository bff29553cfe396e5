"""Every attention kernel runnable on CPU equals the reference einsum (fp32, 1e-5).

Kernels: `jax.nn.dot_product_attention` with XLA, and Pallas splash attention in interpret mode (the
TPU kernel run on the CPU). Masks: causal, left-padded, packed (segment ids), gemma2's sliding window
and soft-cap, and the coprocessor's trace masks (arbitrary booleans over a cache). The cuDNN path is
checked where a GPU is (benchmarks/gpu_check.py); on CPU `'auto'` must resolve to the einsum so
today's numbers do not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import nn
from persona_jax.coprocessor import masks as trace_masks
from persona_jax.nn import attention

TOL = 1e-5


def _qkv(batch=2, seq=32, kv_heads=2, groups=2, head_dim=16, keys=None, seed=0):
  keys = keys or seq
  r = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(r[0], (batch, seq, kv_heads, groups, head_dim))
  k = jax.random.normal(r[1], (batch, keys, kv_heads, head_dim))
  v = jax.random.normal(r[2], (batch, keys, kv_heads, head_dim))
  return q, k, v


def _segments(batch=2, seq=32):
  """Row 0: left padding then one sequence; row 1: three packed segments then right padding."""
  ids = np.zeros((batch, seq), np.int32)
  at = lambda x: x * seq // 32
  ids[0, at(5):] = 1
  ids[1, :at(10)], ids[1, at(10):at(21)], ids[1, at(21):at(29)] = 1, 2, 3
  return jnp.asarray(ids)


def _sliding(mask, positions, window):
  distance = positions[:, :, None] - positions[:, None, :]
  return mask & (distance < window)


def _segment_positions(segment_ids):
  """Positions restarting at 0 in every segment (contiguous inside each)."""
  ids = np.asarray(segment_ids)
  pos = np.zeros_like(ids)
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      pos[b, t] = pos[b, t - 1] + 1 if ids[b, t] == ids[b, t - 1] else 0
  return jnp.asarray(pos)


def _trace_mask(batch=2, seq=24, traces=3, group=4):
  segment_ids = jnp.ones((batch, seq), jnp.int32).at[1, :6].set(0)
  positions, _ = trace_masks.evenly_spaced_trace_positions(segment_ids, traces, 2)
  visible = trace_masks.original_visibility(segment_ids, positions)
  cache_size = seq + traces * group + 4
  return trace_masks.trace_group_mask(visible, group, cache_size), cache_size


def _masks():
  seq = 32
  segment_ids = _segments(seq=seq)
  real = (segment_ids != 0)
  yield "causal", attention.causal_mask(seq, 2), None
  yield "padded", attention.padded_causal_mask(real), real
  yield "packed", attention.segment_causal_mask(segment_ids), real
  positions = _segment_positions(segment_ids)
  yield "sliding", _sliding(attention.segment_causal_mask(segment_ids), positions, 6), real


@pytest.mark.parametrize("name,mask,real", list(_masks()), ids=lambda x: x if isinstance(x, str) else "")
def test_xla_dot_product_attention_equals_einsum(name, mask, real):
  q, k, v = _qkv()
  reference = attention.einsum_attention(q, k, v, mask, scale=0.25)
  out = attention.dot_product_attention(q, k, v, mask, scale=0.25, implementation="xla")
  rows = np.ones(mask.shape[:2], bool) if real is None else np.asarray(real)
  np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(reference)[rows], atol=TOL, rtol=0)


def test_trace_masks_through_xla_and_as_bias_equal_einsum():
  mask, cache_size = _trace_mask()
  q, k, v = _qkv(seq=mask.shape[1], keys=cache_size, seed=1)
  reference = attention.einsum_attention(q, k, v, mask, scale=0.25)
  out = attention.dot_product_attention(q, k, v, mask, scale=0.25, implementation="xla")
  np.testing.assert_allclose(out, reference, atol=TOL, rtol=0)
  # The bias form the cuDNN path takes, evaluated by XLA.
  groups_q = q.reshape(q.shape[0], q.shape[1], -1, q.shape[-1])
  biased = jax.nn.dot_product_attention(groups_q, k, v, bias=attention.mask_to_bias(mask)[:, None],
                                        scale=0.25, implementation="xla")
  np.testing.assert_allclose(biased.reshape(out.shape), reference, atol=TOL, rtol=0)


@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 20.0)])
def test_pallas_splash_interpret_equals_einsum(window, softcap):
  seq = 128  # splash tiles keys in blocks of 128
  segment_ids = _segments(seq=seq)
  mask = attention.segment_causal_mask(segment_ids)
  if window is not None:
    mask = _sliding(mask, _segment_positions(segment_ids), window)
  q, k, v = _qkv(seq=seq, seed=2)
  assert attention.splash_block_size(seq) == 128 and attention.splash_block_size(32) is None
  reference = attention.einsum_attention(q, k, v, mask, scale=0.25, softcap=softcap)
  out = attention.splash_attention(q, k, v, segment_ids, scale=0.25, window=window, softcap=softcap,
                                   interpret=True)
  real = np.asarray(segment_ids != 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(reference)[real], atol=TOL, rtol=0)


def test_auto_is_the_einsum_on_cpu_and_unchanged_numbers():
  config = nn.get_config("tiny_llama")
  assert jax.default_backend() == "cpu"
  assert attention.resolve_attention_impl(config) == "einsum"
  with pytest.raises(ValueError, match="attention_impl"):
    config.replace(attention_impl="flash")


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gemma2"])
@pytest.mark.parametrize("impl", ["xla", "pallas", "cudnn"])
def test_decoder_with_each_impl_equals_einsum(preset, impl):
  """Whole decoder, packed + padded rows with segment ids; cache decoding too (kernels fall back).

  `'cudnn'` on CPU runs its fp32 fallback (XLA); the cuDNN kernel itself is checked on a GPU.
  """
  base = nn.build_decoder(nn.get_config(preset), seed=0)
  other = nn.build_decoder(nn.get_config(preset, attention_impl=impl), seed=0)
  segment_ids = _segments(seq=128)  # 128: the Pallas kernel's block (shorter falls back)
  positions = _segment_positions(segment_ids)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 128)), jnp.int32)
  reference = base(tokens, positions=positions, segment_ids=segment_ids).logits
  out = other(tokens, positions=positions, segment_ids=segment_ids).logits
  real = np.asarray(segment_ids != 0)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(reference)[real], atol=TOL, rtol=0)
  # The sampler's cache path.
  from persona_jax import sampling  # pylint: disable=g-import-not-at-top
  prompts = [[5, 17, 42, 9], [200, 100]]
  a = sampling.generate(base, prompts, max_new_tokens=4, stop_tokens=())
  b = sampling.generate(other, prompts, max_new_tokens=4, stop_tokens=())
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL, rtol=0)


def test_remat_policy_gives_the_same_gradients():
  config = nn.get_config("tiny_llama")
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)

  def grads(cfg):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nn.build_decoder(cfg, seed=0)
    return nnx.grad(lambda m: jnp.mean(m(tokens).logits ** 2))(model)

  plain = jax.tree.leaves(grads(config))
  for policy in (None, "dots_with_no_batch_dims_saveable"):
    remat = jax.tree.leaves(grads(config.replace(remat=True, remat_policy=policy)))
    for x, y in zip(plain, remat):
      np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="remat_policy"):
    config.replace(remat_policy="everything")
