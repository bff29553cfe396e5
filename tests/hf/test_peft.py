"""PEFT round trip: the decoder's named LoRA adapters <-> PEFT adapters, checked against `peft` itself.

A tiny random llama decoder is written with `save_pretrained`; two named adapters (one stacked on the
same projection as the other, one with a non-grid set of sites and mixed ranks) with random non-zero
weights are written with `save_peft_adapters`; `transformers` + `peft` load them with the standard API
and give the JAX decoder's logits; `load_peft_adapters` reads a PEFT adapter that `peft` itself wrote
back into a fresh decoder with the same logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from persona_jax import nn as pnn
from persona_jax.hf import save_pretrained
from persona_jax.hf.peft import load_peft_adapters, save_peft_adapters

TOLERANCE = 1e-5


def _randomize_adapters(decoder, seed):
  """LoRA B starts at zero (a no-op); give every adapter non-zero weights so the check bites."""
  key = jax.random.key(seed)
  for _, _, _, adapter in pnn.lora_sites(decoder):
    key, ka, kb = jax.random.split(key, 3)
    adapter.a[...] = jax.random.normal(ka, adapter.a[...].shape) * 0.3
    adapter.b[...] = jax.random.normal(kb, adapter.b[...].shape) * 0.3


def _tokens():
  return np.random.default_rng(0).integers(0, 256, size=(2, 10))


def _jax_logits(decoder, tokens):
  return np.asarray(decoder(jnp.asarray(tokens)).logits)


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("peft")
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama"), seed=0)
  base_logits = _jax_logits(decoder, _tokens())
  base_dir = save_pretrained(decoder, root / "base")
  # Adapter "memory_0": a (layers x projections) grid on the MLP. Adapter "memory_1": the same up_proj
  # (stacked), plus an attention projection on the other layer with another rank and alpha.
  pnn.inject_lora(decoder, layers=[0, 1], projections=["gate_proj", "up_proj", "down_proj"], rank=4,
                  alpha=8.0, name="memory_0")
  pnn.inject_lora(decoder, layers=[1], projections=["up_proj"], rank=2, alpha=2.0, name="memory_1")
  pnn.inject_lora(decoder, layers=[0], projections=["v_proj"], rank=3, alpha=6.0, name="memory_1")
  _randomize_adapters(decoder, seed=1)
  adapters_dir = root / "adapters"
  written = save_peft_adapters(decoder, adapters_dir, base_model_name_or_path=str(base_dir))
  return dict(decoder=decoder, base_dir=base_dir, adapters_dir=adapters_dir, written=written,
              logits=_jax_logits(decoder, _tokens()), base_logits=base_logits)


def test_config_maps_grid_to_target_modules_and_layers(exported):
  config = json.loads((exported["written"]["memory_0"] / "adapter_config.json").read_text())
  assert config["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
  assert config["layers_to_transform"] == [0, 1] and config["r"] == 4 and config["lora_alpha"] == 8.0
  mixed = json.loads((exported["written"]["memory_1"] / "adapter_config.json").read_text())
  assert sorted(mixed["target_modules"]) == ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]


def test_peft_loads_adapters_with_the_decoders_logits(exported):
  from peft import PeftModel
  base = transformers.AutoModelForCausalLM.from_pretrained(exported["base_dir"]).eval()
  tokens = _tokens()
  plain = _torch_logits(base, tokens)
  assert np.abs(plain - exported["base_logits"]).max() < TOLERANCE
  # The standard PEFT API, nothing of ours: load both adapters and make both active.
  model = PeftModel.from_pretrained(base, str(exported["written"]["memory_0"]), adapter_name="memory_0")
  model.load_adapter(str(exported["written"]["memory_1"]), adapter_name="memory_1")
  model.base_model.set_adapter(["memory_0", "memory_1"])
  model.eval()
  ours = exported["logits"]
  error = np.abs(_torch_logits(model, tokens) - ours).max()
  assert error < TOLERANCE, f"max abs logit error {error:.2e}"
  # Not vacuous: the adapters move the logits by far more than the tolerance.
  assert np.abs(ours - exported["base_logits"]).max() > 1000 * TOLERANCE
  # One adapter alone differs from both: both really are applied and summed.
  model.base_model.set_adapter(["memory_0"])
  assert np.abs(_torch_logits(model, tokens) - ours).max() > 100 * TOLERANCE


def test_adapter_written_by_peft_loads_into_the_decoder(exported, tmp_path):
  from peft import LoraConfig, get_peft_model
  torch.manual_seed(0)
  base = transformers.AutoModelForCausalLM.from_pretrained(exported["base_dir"]).eval()
  config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                      init_lora_weights=False, lora_dropout=0.0)
  model = get_peft_model(base, config, adapter_name="user_7").eval()
  model.save_pretrained(tmp_path / "from_peft")
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama"), seed=0)  # the same base weights
  names = load_peft_adapters(decoder, tmp_path / "from_peft" / "user_7")
  assert names == ["user_7"]
  assert sorted((layer, proj) for layer, proj, _, _ in pnn.lora_sites(decoder)) == [
      (1, "down_proj"), (1, "q_proj")]
  tokens = _tokens()
  peft_logits = _torch_logits(model, tokens)
  error = np.abs(_jax_logits(decoder, tokens) - peft_logits).max()
  assert error < TOLERANCE, f"max abs logit error {error:.2e}"
  assert np.abs(peft_logits - exported["base_logits"]).max() > 100 * TOLERANCE


def test_round_trip_restores_the_same_adapters(exported):
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama"), seed=0)
  assert load_peft_adapters(decoder, exported["adapters_dir"]) == ["memory_0", "memory_1"]
  original = {(l, p, n): a for l, p, n, a in pnn.lora_sites(exported["decoder"])}
  restored = {(l, p, n): a for l, p, n, a in pnn.lora_sites(decoder)}
  assert sorted(original) == sorted(restored)
  for site, adapter in original.items():
    assert restored[site].rank == adapter.rank and restored[site].alpha == adapter.alpha, site
    np.testing.assert_array_equal(np.asarray(restored[site].a[...]), np.asarray(adapter.a[...]))
    np.testing.assert_array_equal(np.asarray(restored[site].b[...]), np.asarray(adapter.b[...]))


def test_bad_inputs_raise_clear_errors(exported, tmp_path):
  plain = pnn.build_decoder(pnn.get_config("tiny_llama"), seed=0)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    save_peft_adapters(plain, tmp_path / "none")
  with pytest.raises(ValueError, match=r"\['nope'\] are not on the decoder"):
    save_peft_adapters(exported["decoder"], tmp_path / "x", names=["nope"])
  with pytest.raises(FileExistsError, match="not empty"):
    save_peft_adapters(exported["decoder"], exported["adapters_dir"])
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    load_peft_adapters(plain, tmp_path)
  one_layer = pnn.build_decoder(pnn.get_config("tiny_llama", num_layers=1), seed=0)
  with pytest.raises(ValueError, match="names layer 1"):
    load_peft_adapters(one_layer, exported["adapters_dir"])
