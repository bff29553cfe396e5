"""The general-text mixture (rows from every source, none from GSM8K), the "another row's cache"
control (hand-checked), and the eval table's CI option leaving the numbers unchanged."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

from persona_jax import data as pdata
from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor import tasks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.nn import build_decoder, get_config


def test_mixture_registers_and_yields_rows_from_each_source(shared_dir):
  data_dir = shared_dir / "data"
  vocabulary = pdata.get_vocabulary("bytes")
  name = tasks.general_mixture(vocabulary, data_dir)
  assert tasks.general_mixture(vocabulary, data_dir) == name  # registered once
  mixture = seqio.get_mixture_or_task(name)
  assert len(mixture.tasks) == 3
  sources = {
      "tiny_shakespeare": (data_dir / "text" / "tinyshakespeare.txt").read_text(),
      "persona_chat": "\n".join(tasks.persona_chat_texts(data_dir, "train")),
      "amazon_reviews": "\n".join(tasks.amazon_review_texts(data_dir, "train")),
  }
  gsm8k = (data_dir / "reasoning" / "gsm8k" / "train.jsonl").read_text()
  chunks = mixture.get_dataset({"targets": 64}, split="train", shuffle=True, seed=0, num_epochs=1)
  seen = {source: 0 for source in sources}
  for example in chunks.take(90).as_numpy_iterator():
    text = vocabulary.decode(example["targets"].tolist())
    found = [source for source, whole in sources.items() if text in whole]
    assert found, f"a chunk from no source: {text!r}"
    assert text not in gsm8k or len(text) < 20
    for source in found:
      seen[source] += 1
  assert all(count >= 10 for count in seen.values()), seen  # equal rates: ~30 each
  # Batches through the project's pipeline (packed rows).
  batch = next(tasks.train_iterator(name, sequence_length=64, batch_size=2, seed=0))
  assert batch["decoder_target_tokens"].shape == (2, 64)
  # Held-out splits are other conversations / reviews than the training ones.
  held_out = set(tasks.persona_chat_texts(data_dir, "validation"))
  assert not held_out & set(tasks.persona_chat_texts(data_dir, "train"))


def _model():
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  model = CacheCoprocessor(decoder, num_latents=2, variant="full", seed=1)
  state = nnx.state(model.coprocessor, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  nnx.update(model.coprocessor, jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  return model


def test_other_row_control_feeds_the_other_rows_cache():
  model = _model()
  seq, ahead = 20, 3
  tokens = jax.random.randint(jax.random.key(4), (2, seq), 3, 256)
  segments = jnp.ones((2, seq), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq), (2, seq))
  points = jnp.array([[5, 11], [5, 11]])  # the same points in both rows
  own = model.forward_traces(tokens, segments, positions, points, ahead, with_baseline=True)
  swapped = model.forward_traces(tokens, segments, positions, points, ahead,
                                 with_baseline=True, latent_source_rows=jnp.array([1, 0]))
  # By hand: row 0 with the latents the coprocessor computes from row 1 ALONE (its own batch).
  row1 = tokens[1:]
  alone = model.encode_originals(row1, segments[1:], positions[1:], num_traces=2, ahead_tokens=ahead)
  visible = jnp.arange(seq)[None, None, :] <= points[1:, :, None]
  latent_positions = jnp.repeat(points[1:] + 1, 2, axis=1)
  latents_from_row1 = model.latents_from_cache(alone["cache"], visible, latent_positions,
                                               alone["cache"][0]["k"].shape[1])
  with mock.patch.object(CacheCoprocessor, "latents_from_cache",
                         lambda self, *args, **kwargs: latents_from_row1):
    by_hand = model.forward_traces(tokens[:1], segments[:1], positions[:1], points[:1], ahead)
  np.testing.assert_allclose(swapped["nll"][0], by_hand["nll"][0], atol=2e-5)
  assert not np.allclose(swapped["nll"][0], own["nll"][0], atol=1e-3)  # the latents did change
  np.testing.assert_allclose(swapped["baseline_nll"], own["baseline_nll"])  # baseline untouched


def test_other_row_sources_skip_padding_rows():
  segment_ids = np.array([[1, 1], [0, 0], [1, 0], [1, 1]])
  np.testing.assert_array_equal(eval_lib.other_row_sources(segment_ids), [2, 1, 3, 0])
  np.testing.assert_array_equal(eval_lib.other_row_sources(np.array([[1], [0]])), [0, 1])


@pytest.mark.slow
def test_eval_sets_and_cis_keep_the_numbers(shared_dir):
  from persona_jax.coprocessor.job import Coprocessor
  from persona_jax.hf.source import DecoderSource

  tiny = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")
  settings = dict(decoder=tiny, num_latents=2, ahead_tokens=3, num_traces=4, sequence_length=32,
                  batch_size=4, num_eval_batches=2, data_dir=str(shared_dir / "data"))
  plain = Coprocessor(**settings)
  plain.setup(None)
  model = plain.model()
  table = plain.evaluate(model, 0)
  blocks = Coprocessor(**settings, eval_sets=["tiny_shakespeare", "wikitext2"],
                       confidence_intervals=True, other_row_control=True)
  blocks.setup(None)
  evaluation = blocks.evaluate(model, 0)
  results = evaluation.results["eval_table"]
  assert list(results) == ["tiny_shakespeare:validation", "wikitext2:validation",
                           "tiny_shakespeare:validation, control: another row's cache",
                           "wikitext2:validation, control: another row's cache"]
  first = results["tiny_shakespeare:validation"]
  np.testing.assert_allclose(first["augmented_ppl"], table.results["eval_table"]["augmented_ppl"],
                             rtol=1e-5)
  for ci, change in zip(first["relative_change_ci"], first["relative_change"]):
    assert ci["low"] <= change <= ci["high"]
  assert evaluation.tables["eval_table"].count("| position |") == 4
  # The default table is unchanged in format.
  assert "95% CI" not in table.tables["eval_table"]
