"""Unit tests of the named transforms and the mapping tables of persona_jax.hf."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax.hf import hf_config, mapping, transforms
from persona_jax.nn import Decoder, get_config
from persona_jax.nn.layers import apply_rope, rope_frequencies


def test_transpose_swaps_torch_and_kernel_layouts():
  weight = np.arange(6.0).reshape(2, 3)  # torch [out=2, in=3]
  kernel = transforms.TRANSPOSE.load(weight, None)
  assert kernel.shape == (3, 2)
  x = np.array([1.0, -2.0, 0.5])
  np.testing.assert_array_equal(x @ kernel, weight @ x)  # y = x @ kernel == W x
  np.testing.assert_array_equal(transforms.TRANSPOSE.save(kernel, None), weight)
  with pytest.raises(ValueError, match="matrix"):
    transforms.transpose(np.zeros(3))


def test_gguf_permute_matches_llama_cpp_row_order():
  # One head of width 6: HF rows (0 1 2 | 3 4 5) pair (j, j+3); llama.cpp stores pairs adjacent.
  rows = np.arange(6)[:, None]
  permuted = transforms.gguf_permute_rotary(rows, num_heads=1)[:, 0]
  np.testing.assert_array_equal(permuted, [0, 3, 1, 4, 2, 5])
  # Two heads are permuted independently.
  rows = np.arange(8)[:, None]
  np.testing.assert_array_equal(transforms.gguf_permute_rotary(rows, num_heads=2)[:, 0],
                                [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("num_heads,head_dim", [(1, 8), (3, 4), (4, 16)])
def test_gguf_unpermute_inverts_permute(num_heads, head_dim):
  weight = np.random.default_rng(0).normal(size=(num_heads * head_dim, 5))
  np.testing.assert_array_equal(
      transforms.gguf_unpermute_rotary(transforms.gguf_permute_rotary(weight, num_heads), num_heads), weight)
  np.testing.assert_array_equal(
      transforms.gguf_permute_rotary(transforms.gguf_unpermute_rotary(weight, num_heads), num_heads), weight)
  with pytest.raises(ValueError, match="heads"):
    transforms.gguf_unpermute_rotary(weight[:-1], num_heads)


def _interleaved_rope(x, positions, inv_freq):
  """llama.cpp's rotary (independent of persona_jax): rotates adjacent pairs (x[2j], x[2j+1])."""
  angles = positions[:, None] * inv_freq[None, :]  # [seq, head_dim/2]
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * cos - odd * sin
  out[..., 1::2] = odd * cos + even * sin
  return out


def test_unpermuted_gguf_rows_give_the_hf_rotary_result():
  """GGUF weights + interleaved rotary == unpermuted weights + HF half rotation (same attention scores)."""
  rng = np.random.default_rng(1)
  num_heads, num_kv_heads, head_dim, embed, seq = 4, 2, 8, 16, 5
  cfg = get_config("tiny_llama", num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   embed_dim=embed)
  gguf_q = rng.normal(size=(num_heads * head_dim, embed)).astype(np.float32)  # as stored in the file
  gguf_k = rng.normal(size=(num_kv_heads * head_dim, embed)).astype(np.float32)
  x = rng.normal(size=(seq, embed)).astype(np.float32)
  positions = np.arange(seq, dtype=np.float32) * 3.0
  inv_freq = np.asarray(rope_frequencies(head_dim, cfg.rope_theta))

  # llama.cpp: project with the stored rows, rotate adjacent pairs.
  q_cpp = _interleaved_rope((x @ gguf_q.T).reshape(seq, num_heads, head_dim), positions, inv_freq)
  k_cpp = _interleaved_rope((x @ gguf_k.T).reshape(seq, num_kv_heads, head_dim), positions, inv_freq)
  # Ours: the mapping table's transforms, then the decoder's half-rotation rotary.
  q_kernel = transforms.GGUF_QUERY.load(gguf_q, cfg)
  k_kernel = transforms.GGUF_KEY.load(gguf_k, cfg)
  pos = jnp.asarray(positions, jnp.int32)[None]
  q_ours = np.asarray(apply_rope(jnp.asarray(x @ q_kernel).reshape(1, seq, num_heads, head_dim), pos,
                                 jnp.asarray(inv_freq)))[0]
  k_ours = np.asarray(apply_rope(jnp.asarray(x @ k_kernel).reshape(1, seq, num_kv_heads, head_dim), pos,
                                 jnp.asarray(inv_freq)))[0]
  # Per head, ours is llama.cpp's vector with the pair members gathered into halves.
  np.testing.assert_allclose(q_ours, np.concatenate([q_cpp[..., 0::2], q_cpp[..., 1::2]], axis=-1), atol=1e-4)
  np.testing.assert_allclose(k_ours, np.concatenate([k_cpp[..., 0::2], k_cpp[..., 1::2]], axis=-1), atol=1e-4)
  # So attention scores agree (GQA: query head h reads kv head h // 2).
  scores_cpp = np.einsum("thd,shd->hts", q_cpp, np.repeat(k_cpp, 2, axis=1))
  scores_ours = np.einsum("thd,shd->hts", q_ours, np.repeat(k_ours, 2, axis=1))
  np.testing.assert_allclose(scores_ours, scores_cpp, rtol=1e-4, atol=1e-3)
  # And save() restores the stored rows exactly.
  np.testing.assert_array_equal(transforms.GGUF_QUERY.save(q_kernel, cfg), gguf_q)
  np.testing.assert_array_equal(transforms.GGUF_KEY.save(k_kernel, cfg), gguf_k)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gemma", "tiny_gemma2"])
@pytest.mark.parametrize("tied", [True, False])
def test_mapping_table_covers_every_parameter_once(preset, tied):
  cfg = get_config(preset, tie_embeddings=tied)
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  params = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  entries = mapping.expand(mapping.FAMILIES[cfg.family].weights, cfg)
  targets = [path for _, path, _ in entries]
  assert len(targets) == len(set(targets))
  assert set(targets) == params
  names = [name for name, _, _ in entries]
  assert len(names) == len(set(names))
  assert ("lm_head.weight" in names) == (not tied)
  if cfg.family == "llama" and not tied:
    gguf_targets = [path for _, path, _ in mapping.expand(mapping.GGUF_LLAMA_WEIGHTS, cfg)]
    assert set(gguf_targets) == params


@pytest.mark.parametrize("preset", ["smollm2_135m", "llama3_2_1b", "gemma_2b", "gemma2_2b", "tiny_gemma2"])
def test_hf_config_round_trip(preset):
  cfg = get_config(preset)
  hf = hf_config.to_hf_config(cfg)
  assert hf["architectures"] == [mapping.FAMILIES[cfg.family].architecture]
  back = hf_config.from_hf_config(hf, "config.json")
  expected = cfg.replace(query_pre_attn_scalar=cfg.query_pre_attn_scalar or (
      cfg.head_dim if cfg.family == "gemma2" else None))
  assert back == expected


def test_hf_config_reads_transformers_4_rope_keys():
  hf = hf_config.to_hf_config(get_config("llama3_2_1b"))
  del hf["rope_parameters"]
  hf["rope_scaling"] = dict(hf["rope_scaling"], type=hf["rope_scaling"].pop("rope_type"))
  assert hf_config.from_hf_config(hf, "config.json") == get_config("llama3_2_1b")
