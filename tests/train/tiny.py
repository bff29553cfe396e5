"""Tiny model and data shared by the train tests and their subprocess scripts."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from persona_jax import nn as pnn


class CountingIterator:
  """Deterministic LM batches: batch i is a function of (seed, i) only, so a resumed run that restores
  `i` continues with exactly the batches an uninterrupted run would see."""

  def __init__(self, batch_size: int = 4, seq_len: int = 16, vocab_size: int = 256, seed: int = 0,
               sleep: float = 0.0, nan_at: int | None = None):
    self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
    self.sleep = sleep
    self.nan_at = nan_at  # 1-based step whose batch carries NaN loss weights
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    tokens = rng.integers(1, self.vocab_size, (self.batch_size, self.seq_len + 1), dtype=np.int32)
    weights = np.ones((self.batch_size, self.seq_len), np.float32)
    weights[:, -2:] = 0.0  # some padding-like positions
    self.index += 1
    if self.nan_at is not None and self.index == self.nan_at:
      weights[0, 0] = np.nan
    if self.sleep:
      time.sleep(self.sleep)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": weights}

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])


def batch_hash(batch: dict) -> str:
  digest = hashlib.sha256()
  for key in sorted(batch):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(batch[key]).tobytes())
  return digest.hexdigest()[:16]


_BUILT = {}


def tiny_model(seed: int = 0):
  """A fresh copy of the tiny llama (built once per process: eager initialization is slow on CPU)."""
  from flax import nnx
  if seed not in _BUILT:
    _BUILT[seed] = pnn.build_decoder(pnn.get_config("tiny_llama"), seed)
  return nnx.clone(_BUILT[seed])
