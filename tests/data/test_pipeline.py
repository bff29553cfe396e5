"""Batches: determinism, exact resumption, packing, padding, sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import seqio

from persona_jax import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def task(text_files) -> str:
  """Bytes-vocabulary task over the small text files: train ~9 KB, validation ~2 KB."""
  return data.lm_task({k: str(v) for k, v in text_files.items()}, "bytes")


@pytest.fixture(scope="module")
def document_task(text_files) -> str:
  """Short documents (one paragraph each) chunked on their own, so packing has work to do."""
  return data.lm_task({k: str(v) for k, v in text_files.items()}, "bytes", add_eos=True,
                      lines_per_document=1, concatenate_documents=False)


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(left, right):
  assert len(left) == len(right)
  for a, b in zip(left, right):
    assert a.keys() == b.keys() == set(data.BATCH_FEATURES)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_shapes_and_determinism(task):
  settings = dict(split="train", sequence_length=32, batch_size=4)
  first = _take(data.make_iterator(task, seed=3, **settings), 6)
  for batch in first:
    for key in data.BATCH_FEATURES:
      assert batch[key].shape == (4, 32) and batch[key].dtype == np.int32
  again = data.make_iterator(task, seed=3, **settings)
  assert again.element_spec["decoder_input_tokens"] == ((4, 32), np.int32)  # Known before reading.
  _assert_same_batches(first, _take(again, 6))


def test_seed_changes_the_order_not_the_rows(task):
  settings = dict(split="validation", sequence_length=32, batch_size=4, pack=False, num_epochs=1,
                  drop_remainder=False)
  epochs = {seed: [tuple(row) for b in data.make_iterator(task, seed=seed, **settings)
                   for row in b["decoder_target_tokens"].tolist()] for seed in (3, 4)}
  assert epochs[3] != epochs[4] and sorted(epochs[3]) == sorted(epochs[4])


def test_resume_continues_exactly(task):
  # validation holds about 16 batches of 4 x 32 bytes: 40 batches cross two epoch boundaries.
  settings = dict(split="validation", sequence_length=32, batch_size=4, seed=11)
  uninterrupted = _take(data.make_iterator(task, **settings), 40)
  k = 23
  iterator = data.make_iterator(task, **settings)
  _assert_same_batches(_take(iterator, k), uninterrupted[:k])
  state = json.loads(json.dumps(iterator.get_state()))  # What a checkpoint stores.
  assert state["batches_consumed"] == k
  _assert_same_batches(_take(data.DataIterator.from_state(state), 40 - k), uninterrupted[k:])
  restored = data.make_iterator(task, state=state, **settings)  # The training loop's way.
  _assert_same_batches(_take(restored, 3), uninterrupted[k:k + 3])
  assert restored.get_state()["batches_consumed"] == k + 3


def test_set_state_rejects_another_stream(task):
  iterator = data.make_iterator(task, split="validation", sequence_length=32, batch_size=4, seed=11)
  state = iterator.get_state()
  other = data.make_iterator(task, split="validation", sequence_length=32, batch_size=4, seed=12)
  with pytest.raises(ValueError, match=r"'seed': \(11, 12\)"):
    other.set_state(state)
  with pytest.raises(ValueError, match="Not a data iterator state"):
    other.set_state({"batches_consumed": 3})
  with pytest.raises(ValueError, match="not registered in this process"):
    next(data.make_iterator("no.such.task", split="train", sequence_length=8, batch_size=1))
  with pytest.raises(ValueError, match="Split 'test' is not in task"):
    next(data.make_iterator(task, split="test", sequence_length=8, batch_size=1))


@pytest.mark.slow
def test_resume_in_a_new_process(task, text_files):
  settings = dict(split="train", sequence_length=32, batch_size=4, seed=5)
  uninterrupted = _take(data.make_iterator(task, **settings), 9)
  iterator = data.make_iterator(task, **settings)
  _take(iterator, 6)
  script = textwrap.dedent(f"""
      import json, sys
      import numpy as np
      from persona_jax import data
      data.lm_task({ {k: str(v) for k, v in text_files.items()}!r}, "bytes")
      iterator = data.DataIterator.from_state(json.loads(sys.argv[1]))
      batches = [next(iterator) for _ in range(3)]
      np.savez(sys.argv[2], **{{f"{{i}}/{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
  """)
  output = os.path.join(os.path.dirname(str(text_files["train"])), "resumed.npz")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONHASHSEED="123")
  subprocess.run([sys.executable, "-c", script, json.dumps(iterator.get_state()), output], check=True, env=env,
                 cwd=REPO_ROOT, timeout=300)
  resumed = np.load(output)
  _assert_same_batches([{k: resumed[f"{i}/{k}"] for k in data.BATCH_FEATURES} for i in range(3)],
                       uninterrupted[6:9])


def _raw_chunks(task: str, split: str, sequence_length: int) -> list[list[int]]:
  """The task's examples straight from SeqIO, before feature conversion (independent reference)."""
  dataset = seqio.get_mixture_or_task(task).get_dataset({"targets": sequence_length}, split=split,
                                                        shuffle=False, num_epochs=1)
  return [example["targets"].tolist() for example in dataset.as_numpy_iterator()]


def test_packing_segments_and_positions_match_the_raw_examples(document_task):
  length = 512  # Longer than any paragraph (document) of the test text: rows hold several.
  raw = _raw_chunks(document_task, "validation", length)
  assert len(raw) > 20 and max(map(len, raw)) < length
  iterator = data.make_iterator(document_task, split="validation", sequence_length=length, batch_size=4,
                                shuffle=False, pack=True, num_epochs=1, drop_remainder=False)
  unpacked = []
  rows = 0
  for batch in iterator:
    for i in range(4):
      targets, inputs = batch["decoder_target_tokens"][i], batch["decoder_input_tokens"][i]
      segments, positions = batch["decoder_segment_ids"][i], batch["decoder_positions"][i]
      weights = batch["decoder_loss_weights"][i]
      if not segments.any():
        continue  # A padding row of the last batch.
      rows += 1
      num_segments = segments.max()
      used = segments > 0
      assert used[:used.sum()].all(), "segments fill the row from the left"
      np.testing.assert_array_equal(weights, used.astype(np.int32))
      assert not targets[~used].any() and not inputs[~used].any() and not positions[~used].any()
      for segment in range(1, num_segments + 1):
        where = np.flatnonzero(segments == segment)
        np.testing.assert_array_equal(positions[where], np.arange(len(where)))
        np.testing.assert_array_equal(inputs[where], [0] + targets[where][:-1].tolist())
        unpacked.append(targets[where].tolist())
  assert unpacked == raw  # Every example once, whole, in order.
  assert rows < len(raw) // 2  # Several examples share each row.


def test_unpacked_rows_weights_and_padding(document_task):
  length = 512
  raw = _raw_chunks(document_task, "validation", length)
  iterator = data.make_iterator(document_task, split="validation", sequence_length=length, batch_size=8,
                                shuffle=False, pack=False, num_epochs=1, drop_remainder=False)
  batches = list(iterator)
  assert len(batches) == -(-len(raw) // 8)  # ceil: the last partial batch is padded, not dropped.
  rows = [row for batch in batches for row in range(8)]
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in data.BATCH_FEATURES}
  assert len(rows) == stacked["decoder_target_tokens"].shape[0]
  for index, example in enumerate(raw):
    targets = stacked["decoder_target_tokens"][index]
    n = len(example)
    assert targets[:n].tolist() == example and not targets[n:].any()
    np.testing.assert_array_equal(stacked["decoder_loss_weights"][index], (np.arange(length) < n).astype(np.int32))
    np.testing.assert_array_equal(stacked["decoder_segment_ids"][index], (np.arange(length) < n).astype(np.int32))
    np.testing.assert_array_equal(stacked["decoder_positions"][index], np.where(np.arange(length) < n, np.arange(length), 0))
    assert stacked["decoder_input_tokens"][index].tolist() == [0] + example + [0] * (length - n - 1)
  # Padding rows added to the last batch are all zero: no loss.
  assert not stacked["decoder_loss_weights"][len(raw):].any() and not stacked["decoder_target_tokens"][len(raw):].any()


def test_shards_are_disjoint_and_cover_the_split(task):
  settings = dict(split="validation", sequence_length=32, batch_size=1, shuffle=False, pack=False,
                  num_epochs=1, drop_remainder=False)
  everything = [b["decoder_target_tokens"][0].tolist() for b in data.make_iterator(task, **settings)]
  num_shards = 3
  shards = [[b["decoder_target_tokens"][0].tolist()
             for b in data.make_iterator(task, shard_index=i, num_shards=num_shards, **settings)]
            for i in range(num_shards)]
  assert shards == [everything[i::num_shards] for i in range(num_shards)]
  # Shards of different lengths, each padded to the same number of batches (multi-host evaluation).
  longest = max(map(len, shards))
  assert min(map(len, shards)) < longest
  for i, shard in enumerate(shards):
    padded = list(data.make_iterator(task, shard_index=i, num_shards=num_shards, num_batches=longest, **settings))
    assert len(padded) == longest
    assert [b["decoder_target_tokens"][0].tolist() for b in padded[:len(shard)]] == shard
    assert not any(b["decoder_loss_weights"].any() or b["decoder_target_tokens"].any() for b in padded[len(shard):])
  with pytest.raises(ValueError, match="shard_index 3 is outside"):
    data.make_iterator(task, shard_index=3, num_shards=3, **settings)


def test_mixture_is_deterministic(task, document_task):
  name = "test_data.mixture"
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, [(task, 1.0), (document_task, 1.0)])
  settings = dict(split="train", sequence_length=32, batch_size=4, seed=2)
  first = _take(data.make_iterator(name, **settings), 5)
  # A new iterator, resumed after 3 batches, continues the first one exactly.
  resumed = data.make_iterator(name, **settings)
  resumed.set_state(dict(resumed.get_state(), batches_consumed=3))
  _assert_same_batches(_take(resumed, 2), first[3:])
