"""Shared fixtures for the data tests: a small BPE tokenizer and small text files, built once."""

from __future__ import annotations

import pathlib

import pytest

# A small corpus with paragraphs (blank lines) and non-ASCII text, so documents, packing and
# byte-level round trips are all exercised.
_WORDS = ("the king speaks of honour and the crown while the fool laughs at winter "
          "naïve café — señor Ødegaard 日本語 🤖 thou art").split()


def make_text(num_paragraphs: int, seed: int) -> str:
  """Deterministic text: paragraphs of 1-4 lines of 3-12 words, separated by blank lines."""
  lines = []
  state = seed
  for paragraph in range(num_paragraphs):
    state = (state * 1103515245 + 12345) % 2**31
    for line in range(1 + state % 4):
      state = (state * 1103515245 + 12345) % 2**31
      count = 3 + state % 10
      words = [_WORDS[(state // (7 ** k) + paragraph + line + k) % len(_WORDS)] for k in range(count)]
      lines.append(f"P{paragraph}: " + " ".join(words))
    lines.append("")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="session", name="make_text")
def make_text_fixture():
  """`make_text(num_paragraphs, seed) -> str`, for tests that need their own small text."""
  return make_text


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> pathlib.Path:
  """A byte-level BPE tokenizer.json trained on `make_text`; <|endoftext|> is id 0, <|im_end|> id 1."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator([make_text(200, seed=1)], trainer=trainer)
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  tokenizer.save(str(path))
  return path


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> dict[str, pathlib.Path]:
  """Two small text files: 'train' (about 9 KB) and 'validation' (about 2 KB)."""
  directory = tmp_path_factory.mktemp("text")
  files = {"train": directory / "train.txt", "validation": directory / "validation.txt"}
  files["train"].write_text(make_text(120, seed=2), encoding="utf-8")
  files["validation"].write_text(make_text(25, seed=3), encoding="utf-8")
  return files
