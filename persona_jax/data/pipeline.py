"""Deterministic, resumable numpy batches from a SeqIO task or mixture.

The pipeline for a task (all tf.data, deterministic):

  task.get_dataset(split, sequence_length, shuffle=False, one epoch)   chunks of <= sequence_length
    -> shard(num_shards, shard_index)    each process keeps every num_shards-th chunk (multi-host)
    -> cache()                           in memory: later epochs and resumes skip re-tokenizing
    -> shuffle(buffer, seed)             a new order every epoch, the same orders for the same seed
    -> repeat(num_epochs)
    -> seqio.DecoderFeatureConverter(pack)
    -> batch(batch_size)                 the last partial batch is dropped or padded with empty rows
    -> skip(batches_consumed)            resuming: the same pipeline, advanced past what was seen

A mixture is read through `seqio.Mixture.get_dataset` (shuffled and mixed with the same seed on every
process), then sharded. Resuming rebuilds the same pipeline and skips the batches already consumed,
so the iterator state is a small JSON dict (`DataIterator.get_state()`) that a checkpoint can hold.

Every batch is a dict of int32 numpy arrays [batch, seq]:
  decoder_input_tokens   targets shifted right, each segment starting with `bos_id` (default 0)
  decoder_target_tokens  the tokens to predict; 0 is padding
  decoder_loss_weights   1 on real targets, 0 on padding
  decoder_segment_ids    1, 2, ... for the examples packed into a row; 0 on padding
  decoder_positions      position within its segment (0 on padding)
Unpacked rows hold one example each: segment id 1 on its tokens, positions 0..len-1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from persona_jax.errors import UserError
from persona_jax.data.tasks import DEFAULT_SHUFFLE_BUFFER_SIZE

STATE_FORMAT = "persona_jax.data.DataIterator/1"
BATCH_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "decoder_segment_ids", "decoder_positions")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything that determines the stream of batches (JSON-serialisable).

  Attributes:
    task: name of a registered SeqIO task or mixture.
    split: split to read, e.g. "train" / "validation".
    sequence_length: tokens per row, [batch, sequence_length].
    batch_size: rows per batch produced by THIS process (its shard of the global batch).
    seed: shuffle seed; the same seed gives the same batches in every run and process.
    shuffle: shuffle the chunks (a new order each epoch).
    pack: pack several chunks into a row (segment ids / positions tell them apart).
    num_epochs: passes over the split; None repeats forever.
    shard_index: this process's shard, in [0, num_shards).
    num_shards: number of shards (processes reading disjoint parts of the data).
    shuffle_buffer_size: chunks held by the shuffle buffer.
    bos_id: first input token of every segment.
    drop_remainder: drop a last partial batch; if False it is padded to batch_size with empty rows
      (all-zero, loss weight 0), so evaluation sees every token exactly once with fixed shapes.
    num_batches: yield exactly this many batches: stop early, or, once the data ends, continue with
      empty batches (all-zero, loss weight 0). Shards of a finite split can differ by a batch; with
      the same num_batches every process of a multi-host evaluation runs the same number of steps.
  """
  task: str
  split: str
  sequence_length: int
  batch_size: int
  seed: int = 0
  shuffle: bool = True
  pack: bool = True
  num_epochs: int | None = None
  shard_index: int = 0
  num_shards: int = 1
  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE
  bos_id: int = 0
  drop_remainder: bool = True
  num_batches: int | None = None

  def __post_init__(self):
    if self.sequence_length < 1 or self.batch_size < 1:
      raise UserError(f"sequence_length ({self.sequence_length}) and batch_size ({self.batch_size}) "
                       "must be positive.")
    if not 0 <= self.shard_index < self.num_shards:
      raise UserError(f"shard_index {self.shard_index} is outside [0, num_shards={self.num_shards}): "
                       "pass shard_index=jax.process_index(), num_shards=jax.process_count().")
    if self.num_batches is not None and self.num_batches < 0:
      raise UserError(f"num_batches must be None or >= 0, got {self.num_batches}.")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise UserError(f"num_epochs must be None (forever) or >= 1, got {self.num_epochs}.")


def _provider(name: str) -> seqio.Task | seqio.Mixture:
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as error:
    raise UserError(f"SeqIO task or mixture {name!r} is not registered in this process: register it "
                     "first (e.g. persona_jax.data.lm_task(dataset, vocabulary)) and pass the name it "
                     "returns.") from error


def _add_unpacked_segments(example: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Unpacked rows: segment id 1 on the example, 0 on padding; positions 0..len-1 (0 on padding)."""
  segment_ids = tf.cast(tf.not_equal(example["decoder_target_tokens"], 0), tf.int32)
  positions = tf.range(tf.shape(segment_ids)[0], dtype=tf.int32) * segment_ids
  return dict(example, decoder_segment_ids=segment_ids, decoder_positions=positions)


def build_dataset(config: DataConfig, batches_consumed: int = 0) -> tf.data.Dataset:
  """The tf.data pipeline of numpy batches for `config`, advanced past `batches_consumed` batches.

  Returns:
    A dataset of dicts `BATCH_FEATURES` -> int32 [batch_size, sequence_length].
  """
  provider = _provider(config.task)
  if config.split not in provider.splits:
    raise UserError(f"Split {config.split!r} is not in task {config.task!r}; its splits are "
                     f"{list(provider.splits)}.")
  lengths = {"targets": config.sequence_length}
  if isinstance(provider, seqio.Task):
    chunks = provider.get_dataset(lengths, split=config.split, use_cached=False, shuffle=False,
                                  seed=config.seed, num_epochs=1)
    chunks = chunks.shard(config.num_shards, config.shard_index).cache()
    if config.shuffle:
      chunks = chunks.shuffle(config.shuffle_buffer_size, seed=config.seed, reshuffle_each_iteration=True)
    chunks = chunks.repeat(config.num_epochs)
  else:
    # The same seed on every process gives every process the same mixed order; shards split it.
    chunks = provider.get_dataset(lengths, split=config.split, use_cached=False, shuffle=config.shuffle,
                                  seed=config.seed, num_epochs=config.num_epochs)
    chunks = chunks.shard(config.num_shards, config.shard_index)

  converter = seqio.DecoderFeatureConverter(pack=config.pack, bos_id=config.bos_id)
  rows = converter(chunks, lengths)
  if not config.pack:
    rows = rows.map(_add_unpacked_segments)
  rows = rows.map(lambda row: {k: tf.cast(row[k], tf.int32) for k in BATCH_FEATURES})

  batches = rows.batch(config.batch_size, drop_remainder=config.drop_remainder)
  if not config.drop_remainder:
    def pad_batch(batch):
      missing = config.batch_size - tf.shape(batch["decoder_target_tokens"])[0]
      return {k: tf.ensure_shape(tf.pad(v, [[0, missing], [0, 0]]), [config.batch_size, config.sequence_length])
              for k, v in batch.items()}
    batches = batches.map(pad_batch)

  if config.num_batches is not None:
    shape = [config.batch_size, config.sequence_length]
    empty = tf.data.Dataset.from_tensors({k: tf.zeros(shape, tf.int32) for k in BATCH_FEATURES}).repeat()
    batches = batches.concatenate(empty).take(config.num_batches)

  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: same seed, same batches.
  batches = batches.with_options(options)
  if batches_consumed:
    batches = batches.skip(batches_consumed)
  return batches.prefetch(2)


class DataIterator(Iterator[dict[str, np.ndarray]]):
  """A Python iterator of numpy batches with a JSON state for exact resumption.

  `get_state()` after k batches, then `DataIterator.from_state(state)` (or `set_state(state)` on an
  iterator built with the same config, in any process) yields batch k, k+1, ... of the
  uninterrupted stream.
  """

  def __init__(self, config: DataConfig, batches_consumed: int = 0):
    self._config = config
    self._batches_consumed = int(batches_consumed)
    self._iterator = None  # Built on first use, so set_state right after construction is free.

  @property
  def config(self) -> DataConfig:
    return self._config

  @property
  def batches_consumed(self) -> int:
    return self._batches_consumed

  @property
  def element_spec(self) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """Shape and dtype of every batch array, known without reading data (e.g. to compile a step)."""
    shape = (self._config.batch_size, self._config.sequence_length)
    return {name: (shape, np.dtype(np.int32)) for name in BATCH_FEATURES}

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = build_dataset(self._config, self._batches_consumed).as_numpy_iterator()
    batch = next(self._iterator)  # StopIteration ends a finite stream.
    self._batches_consumed += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the config and the number of batches consumed."""
    return {"format": STATE_FORMAT, "batches_consumed": self._batches_consumed,
            **dataclasses.asdict(self._config)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`), which must describe this iterator's stream.

    The shard index is this iterator's own: every process restores the same saved state into its
    own shard.
    """
    saved = _config_from_state(state)
    mine = dataclasses.replace(self._config, shard_index=saved.shard_index)
    if saved != mine:
      differences = {f.name: (getattr(saved, f.name), getattr(mine, f.name))
                     for f in dataclasses.fields(DataConfig) if getattr(saved, f.name) != getattr(mine, f.name)}
      raise UserError(f"Data iterator state does not match this iterator (field: (saved, now)): "
                       f"{differences}. Restore with the same data settings, or start a new run.")
    self._batches_consumed = int(state["batches_consumed"])
    self._iterator = None

  @classmethod
  def from_state(cls, state: Mapping[str, Any], shard_index: int | None = None) -> DataIterator:
    """A new iterator continuing from `state` (optionally in another shard)."""
    config = _config_from_state(state)
    if shard_index is not None:
      config = dataclasses.replace(config, shard_index=shard_index)
    return cls(config, batches_consumed=int(state["batches_consumed"]))


def _config_from_state(state: Mapping[str, Any]) -> DataConfig:
  if state.get("format") != STATE_FORMAT:
    raise UserError(f"Not a data iterator state (format {state.get('format')!r}, expected "
                     f"{STATE_FORMAT!r}): pass the dict returned by DataIterator.get_state().")
  return DataConfig(**{f.name: state[f.name] for f in dataclasses.fields(DataConfig) if f.name in state})


def make_iterator(task: str | seqio.Task | seqio.Mixture, *, split: str, sequence_length: int,
                  batch_size: int, seed: int = 0, shuffle: bool = True, pack: bool = True,
                  num_epochs: int | None = None, shard_index: int = 0, num_shards: int = 1,
                  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE, bos_id: int = 0,
                  drop_remainder: bool = True, num_batches: int | None = None,
                  state: Mapping[str, Any] | None = None) -> DataIterator:
  """An iterator of numpy batches {name: int32 [batch_size, sequence_length]} (see `DataConfig`).

  Args:
    task: a registered task/mixture name (e.g. from `lm_task`) or the Task/Mixture itself.
    state: a state from `DataIterator.get_state()` to continue from (must match these settings;
      the shard index stays this call's).
    Other args: see `DataConfig`.
  """
  name = task if isinstance(task, str) else task.name
  config = DataConfig(task=name, split=split, sequence_length=sequence_length, batch_size=batch_size,
                      seed=seed, shuffle=shuffle, pack=pack, num_epochs=num_epochs,
                      shard_index=shard_index, num_shards=num_shards,
                      shuffle_buffer_size=shuffle_buffer_size, bos_id=bos_id,
                      drop_remainder=drop_remainder, num_batches=num_batches)
  iterator = DataIterator(config)
  if state is not None:
    iterator.set_state(state)
  return iterator
