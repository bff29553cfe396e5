"""The coprocessor's data: language-modelling SeqIO tasks (`persona_jax.data.lm_task`), packed rows
sharded over processes, and a deterministic held-out iterator (every run scores the same tokens)."""

from __future__ import annotations

import jax

from persona_jax import data as pdata


def train_iterator(task: str, *, sequence_length: int, batch_size: int, seed: int):
  """Packed training rows of `task` (this process's shard of the global `batch_size`)."""
  num_processes, index = jax.process_count(), jax.process_index()
  return pdata.make_iterator(task, split="train", sequence_length=sequence_length,
                             batch_size=batch_size // num_processes, seed=seed, pack=True,
                             shard_index=index, num_shards=num_processes)


def eval_iterator(task: str, split: str, *, sequence_length: int, batch_size: int, seed: int):
  """One unshuffled pass over `split` (this process's shard), the last batch kept."""
  num_processes, index = jax.process_count(), jax.process_index()
  return pdata.make_iterator(task, split=split, sequence_length=sequence_length,
                             batch_size=batch_size // num_processes, seed=seed, shuffle=False,
                             pack=True, num_epochs=1, drop_remainder=False, shard_index=index,
                             num_shards=num_processes)

