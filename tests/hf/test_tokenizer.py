"""Tokenizer files and chat templates through a Hugging Face directory, checked against transformers."""

from __future__ import annotations

import json

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from persona_jax.hf import apply_chat_template, load_pretrained, load_tokenizer, save_pretrained
from persona_jax.nn import build_decoder, get_config

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}"
            "{% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}
MESSAGES = [{"role": "system", "content": "  Be brief. "},
            {"role": "user", "content": "Où est Paris ?", "meta": {"lang": "fr", "ünï": [1, 2]}}]


@pytest.fixture(scope="module")
def small_tokenizer():
  """A byte-level BPE trained on a few lines (no download)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(["the capital of France is Paris", "hello world, où est Paris ?"] * 5, trainer)
  return tokenizer


@pytest.fixture(scope="module")
def exported(small_tokenizer, tmp_path_factory):
  decoder = build_decoder(get_config("tiny_llama", vocab_size=small_tokenizer.get_vocab_size()), seed=0)
  return save_pretrained(decoder, tmp_path_factory.mktemp("tok") / "model", tokenizer=small_tokenizer,
                         chat_template=TEMPLATE, special_tokens=SPECIAL)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_chat_template_matches_transformers(exported, add_generation_prompt):
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  want = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert apply_chat_template(TEMPLATE, MESSAGES, add_generation_prompt, **SPECIAL) == want
  assert "<s><|system|>Be brief.</s>" in want and '"ünï"' in want  # the template really used them


def test_tokenizer_files_round_trip_through_transformers_and_ours(exported, small_tokenizer):
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
  text = "hello Paris, où est le monde ? 42"
  assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == small_tokenizer.encode(text).ids
  assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<s>", "</s>")
  loaded = load_pretrained(exported)
  assert loaded.chat_template == TEMPLATE and loaded.special_tokens == SPECIAL
  assert loaded.tokenizer.encode(text).ids == small_tokenizer.encode(text).ids
  tokenizer, template, special = load_tokenizer(exported)
  assert tokenizer.encode(text).ids == small_tokenizer.encode(text).ids and template == TEMPLATE


def test_chat_template_jinja_file_wins_over_tokenizer_config(exported, tmp_path):
  """transformers >= 4.47 writes the template to chat_template.jinja; both places are read."""
  import shutil
  directory = shutil.copytree(exported, tmp_path / "copy")
  config = json.loads((directory / "tokenizer_config.json").read_text())
  del config["chat_template"]
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  _, template, _ = load_tokenizer(directory)
  assert apply_chat_template(template, MESSAGES) == MESSAGES[0]["content"]


def test_template_errors_are_raised():
  with pytest.raises(ValueError, match="no chat template"):
    apply_chat_template(None, MESSAGES)
  with pytest.raises(Exception, match="only user turns"):
    apply_chat_template("{{ raise_exception('only user turns') }}", MESSAGES)
