"""Parity with `transformers`, fp32, on tiny random models built locally (no download).

For each model: transformers saves it -> `load_pretrained` -> our logits on a padded batch match
transformers' within 1e-4; `save_pretrained` -> transformers reloads it with no missing/unexpected
weights and the same tensors and logits; incremental decoding with the kv cache matches the full pass.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from persona_jax.hf import load_pretrained, save_pretrained
from persona_jax.nn import cache_mask, init_cache, padded_causal_mask, positions_from_mask

VOCAB, SEQ = 96, 12
TOLERANCE = 1e-4

_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4)
CASES = {
    # GQA 4/4 (multi-head), untied, theta 1e4.
    "llama_mha_untied": (transformers.LlamaConfig, dict(
        _SIZES, num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10_000.0)),
    # GQA 4/2, tied, theta 5e5.
    "llama_gqa2_tied": (transformers.LlamaConfig, dict(
        _SIZES, num_hidden_layers=2, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500_000.0)),
    # GQA 4/1 (multi-query), untied, Llama-3 rope scaling (short original context so it bites).
    "llama_mqa_llama3_rope": (transformers.LlamaConfig, dict(
        _SIZES, num_hidden_layers=2, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # Gemma: GeGLU, sqrt(d) embedding scale, (1 + w) norms, head_dim != hidden / heads.
    "gemma": (transformers.GemmaConfig, dict(
        _SIZES, num_hidden_layers=2, num_key_value_heads=1, head_dim=16)),
    # Gemma2: sliding window 4 < sequence 12 on even layers, tight soft-caps so they change the result.
    "gemma2_sliding_softcap": (transformers.Gemma2Config, dict(
        _SIZES, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, query_pre_attn_scalar=12)),
}


def _build_hf_model(config_class, kwargs):
  torch.manual_seed(0)
  config = config_class(**kwargs)
  # Eager attention: it applies gemma2's soft-capping and handles fully padded query rows in
  # transformers 5 (sdpa/flex may not).
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():  # random norm scales and larger weights so every switch matters
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.1)
  return model


def _padded_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(3, SEQ))
  input_mask = np.ones((3, SEQ), dtype=bool)
  input_mask[1, :3] = False  # left padding
  input_mask[2, SEQ - 5:] = False  # right padding
  positions = np.asarray(positions_from_mask(jnp.asarray(input_mask)))
  return tokens, input_mask, positions


def _hf_logits(model, tokens, input_mask, positions):
  with torch.no_grad():
    return model(torch.tensor(tokens), attention_mask=torch.tensor(input_mask.astype(np.int64)),
                 position_ids=torch.tensor(positions)).logits.numpy()


@nnx.jit
def _forward(decoder, tokens, positions, attention_mask, cache=None):
  # Jitted: op-by-op dispatch of a whole decoder is several times slower on a 2-core CPU.
  return decoder(tokens, positions=positions, attention_mask=attention_mask, cache=cache)


def _our_logits(decoder, tokens, input_mask, positions):
  out = _forward(decoder, jnp.asarray(tokens), jnp.asarray(positions),
                 padded_causal_mask(jnp.asarray(input_mask)))
  return np.asarray(out.logits)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(name, transformers model, its saved directory, what load_pretrained returned, batch, HF logits)."""
  config_class, kwargs = CASES[request.param]
  model = _build_hf_model(config_class, kwargs)
  hf_dir = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(hf_dir)
  batch = _padded_batch()
  return dict(name=request.param, model=model, hf_dir=hf_dir, pretrained=load_pretrained(hf_dir),
              batch=batch, hf_logits=_hf_logits(model, *batch))


def test_import_matches_transformers_on_padded_batch(case):
  tokens, input_mask, positions = case["batch"]
  ours = _our_logits(case["pretrained"].decoder, tokens, input_mask, positions)
  assert ours.shape == case["hf_logits"].shape
  error = np.abs(ours - case["hf_logits"])[input_mask].max()
  assert error < TOLERANCE, f"{case['name']}: max abs logit error {error:.2e}"
  # The comparison is not vacuous: logits vary across tokens by far more than the tolerance.
  assert np.abs(case["hf_logits"][input_mask]).max() > 100 * TOLERANCE


def test_export_reloads_in_transformers_with_same_weights_and_logits(case, tmp_path):
  out_dir = save_pretrained(case["pretrained"].decoder, tmp_path / "export")
  reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert type(reloaded) is type(case["model"])
  original = case["model"].state_dict()
  for name, tensor in reloaded.state_dict().items():
    torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
  tokens, input_mask, positions = case["batch"]
  reloaded_logits = _hf_logits(reloaded.eval(), tokens, input_mask, positions)
  assert np.abs(reloaded_logits - case["hf_logits"])[input_mask].max() < TOLERANCE
  # And our own importer reads the export back to the same config.
  assert load_pretrained(out_dir, with_tokenizer=False).config == case["pretrained"].config


def test_incremental_decoding_with_cache_matches_full_forward(case):
  """Prefill 5 tokens, then decode one at a time; the padded batch keeps its mask in the cache."""
  decoder = case["pretrained"].decoder
  tokens, input_mask, positions = case["batch"]
  full = _our_logits(decoder, tokens, input_mask, positions)
  prefill = 5
  cache = init_cache(decoder.config, batch=tokens.shape[0], max_len=SEQ)
  key_valid = jnp.asarray(input_mask)  # slot s holds token s
  steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, SEQ)]
  pieces = []
  for start, stop in steps:
    out = _forward(decoder, jnp.asarray(tokens[:, start:stop]), jnp.asarray(positions[:, start:stop]),
                   cache_mask(key_valid, stop - start, start), cache)
    cache = out.cache
    pieces.append(np.asarray(out.logits))
  incremental = np.concatenate(pieces, axis=1)
  error = np.abs(incremental - full)[input_mask].max()
  assert error < TOLERANCE, f"{case['name']}: cache vs full max abs error {error:.2e}"
  # And against transformers directly.
  assert np.abs(incremental - case["hf_logits"])[input_mask].max() < TOLERANCE
