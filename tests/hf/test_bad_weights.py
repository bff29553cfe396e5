"""Weights that would load "fine" and be silently wrong (issue 19): NaN/Inf and integer tensors in a
safetensors or GGUF import are refused with the tensor's name (integers cast only with allow_cast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from persona_jax.hf import load_pretrained
from persona_jax.hf.pretrained import _checked_source


@pytest.fixture
def hf_dir(tmp_path):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
  return tmp_path / "model"


def _rewrite(directory, name, change):
  path = directory / "model.safetensors"
  tensors = load_file(path)
  tensors[name] = change(tensors[name])
  save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_is_refused_naming_the_tensor(hf_dir, bad):
  def poison(x):
    x = x.copy()
    x[0, 0] = bad
    return x
  _rewrite(hf_dir, "model.layers.0.mlp.up_proj.weight", poison)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' "
                     r"holds 1 non-finite value"):
    load_pretrained(hf_dir, with_tokenizer=False)


def test_integer_weight_is_refused_unless_cast_explicitly(hf_dir):
  _rewrite(hf_dir, "model.norm.weight", lambda x: np.ones(x.shape, np.int32))
  with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' has dtype int32 but a float weight is "
                     r"expected.*allow_cast=True"):
    load_pretrained(hf_dir, with_tokenizer=False)
  loaded = load_pretrained(hf_dir, with_tokenizer=False, allow_cast=True)
  scale = np.asarray(loaded.decoder.final_norm.scale.get_value())
  assert scale.dtype == np.float32 and (scale == 1.0).all()


def test_gguf_tensor_check_names_the_file_and_tensor():
  # The GGUF loader runs every dequantized tensor through the same check.
  with pytest.raises(ValueError, match=r"tiny\.gguf: tensor 'blk\.0\.attn_q\.weight' holds 2 non-finite"):
    _checked_source(np.array([1.0, np.nan, np.inf], np.float32), "tiny.gguf: tensor 'blk.0.attn_q.weight'",
                    allow_cast=False)
  with pytest.raises(ValueError, match=r"tensor 'token_embd\.weight' has dtype int32"):
    _checked_source(np.ones(3, np.int32), "tiny.gguf: tensor 'token_embd.weight'", allow_cast=False)
  assert _checked_source(np.ones(3, np.int32), "x", allow_cast=True).dtype == np.float32
