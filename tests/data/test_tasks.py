"""Language-modelling tasks: documents, the text-file and tiny_shakespeare tasks, registration, errors."""

from __future__ import annotations

import os

import pytest
import seqio
import tensorflow_datasets as tfds

from persona_jax import data


def _all_tokens(task: str, split: str, sequence_length: int) -> tuple[list[list[int]], list[int]]:
  """Every row of one unshuffled, unpacked epoch: (rows' real tokens, their concatenation)."""
  iterator = data.make_iterator(task, split=split, sequence_length=sequence_length, batch_size=16,
                                shuffle=False, pack=False, num_epochs=1, drop_remainder=False)
  rows = []
  for batch in iterator:
    for targets, weights in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
      if weights.any():
        rows.append(targets[weights > 0].tolist())
  return rows, [token for row in rows for token in row]


def test_split_into_documents(make_text):
  text = make_text(40, seed=5)
  documents = data.split_into_documents(text, lines_per_document=6)
  assert "".join(documents) == text and len(documents) > 5
  for document in documents[:-1]:
    lines = document.splitlines()
    assert len(lines) >= 6 and not lines[-1].strip()  # Cut only at a blank line.
  assert data.split_into_documents(text, 6) == documents  # Deterministic.
  assert data.split_into_documents("one line, no newline", 3) == ["one line, no newline"]
  assert data.split_into_documents("\na\n\nb\n\n\n\nc", 1) == ["\na\n\n", "b\n\n\n\n", "c"]
  assert data.split_into_documents("", 3) == []


def test_text_file_task_covers_every_token_once(text_files, bpe_tokenizer_file):
  vocabulary = data.get_vocabulary(str(bpe_tokenizer_file))
  task = data.register_text_file_task("test_data.text_bpe", {k: str(v) for k, v in text_files.items()},
                                      vocabulary, lines_per_document=5)
  assert set(seqio.get_mixture_or_task(task).splits) == {"train", "validation"}
  for split, path in text_files.items():
    rows, tokens = _all_tokens(task, split, sequence_length=32)
    assert all(len(row) == 32 for row in rows[:-1])  # Full rows; only the last is shorter.
    assert vocabulary.decode(tokens) == path.read_text(encoding="utf-8")


def test_document_chunks_and_eos(text_files):
  text = text_files["validation"].read_text(encoding="utf-8")
  task = data.lm_task({"validation": text_files["validation"]}, "bytes", add_eos=True,
                      concatenate_documents=False, lines_per_document=4)
  rows, tokens = _all_tokens(task, "validation", sequence_length=64)
  documents = data.split_into_documents(text, 4)
  vocabulary = data.get_vocabulary("bytes")
  expected = [token for document in documents for token in list(vocabulary.encode(document)) + [1]]
  assert tokens == expected  # Each document followed by EOS (1), in order.
  # No chunk spans two documents: an EOS can only be a chunk's last token.
  assert all(1 not in row[:-1] for row in rows)


def test_registration_is_idempotent_and_conflicts_are_errors(text_files):
  first = data.lm_task(str(text_files["validation"]), "bytes")
  assert first == data.lm_task(str(text_files["validation"]), "bytes")  # Registering twice: no error.
  assert first.startswith("lm.text_validation_") and first.endswith(".bytes")
  assert seqio.get_mixture_or_task(first).splits == ("validation",)
  other = data.lm_task(str(text_files["validation"]), "bytes", lines_per_document=3)
  assert other != first and other.startswith(first + ".")
  paths = {"validation": str(text_files["validation"])}
  data.register_text_file_task("test_data.conflict", paths, "bytes")
  data.register_text_file_task("test_data.conflict", paths, "bytes")
  with pytest.raises(ValueError, match="test_data.conflict.*already registered with other settings"):
    data.register_text_file_task("test_data.conflict", {"validation": str(text_files["train"])}, "bytes")


def test_missing_text_file_is_one_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.txt.*split 'train'"):
    data.register_text_file_task("test_data.missing", {"train": tmp_path / "missing.txt"}, "bytes")
  with pytest.raises(ValueError, match="neither a known TFDS text data set"):
    data.lm_task("no_such_dataset", "bytes")


def test_tiny_shakespeare_reads_offline_and_matches_tfds(shared_dir):
  if os.environ.get("TFDS_DATA_DIR") != str(shared_dir / "tfds"):
    pytest.skip("TFDS_DATA_DIR is not the shared prepared dir (tests/conftest.py sets it).")
  task = data.lm_task("tiny_shakespeare", "bytes")
  assert task == "lm.tiny_shakespeare.bytes"
  assert set(seqio.get_mixture_or_task(task).splits) == {"train", "validation", "test"}
  reference = next(iter(tfds.load("tiny_shakespeare", split="validation").as_numpy_iterator()))["text"]
  rows, tokens = _all_tokens(task, "validation", sequence_length=128)
  assert bytes(token - 3 for token in tokens) == reference  # Byte ids are byte + 3: every byte, in order.
  assert all(len(row) == 128 for row in rows[:-1])
  # The same bytes as the shared plain-text copy (the validation split is a slice of it).
  assert reference in (shared_dir / "data" / "text" / "tinyshakespeare.txt").read_bytes()


def test_tfds_not_prepared_is_one_clear_error(tmp_path):
  task = data.lm_task("tiny_shakespeare", "bytes", tfds_data_dir=str(tmp_path))
  iterator = data.make_iterator(task, split="train", sequence_length=16, batch_size=2)
  with pytest.raises(FileNotFoundError) as error:
    next(iterator)
  message = str(error.value)
  for expected in ("tiny_shakespeare", str(tmp_path), "TFDS_DATA_DIR", "allow_download=True"):
    assert expected in message
