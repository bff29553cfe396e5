"""The train loop in-process: trainable/frozen split, NaN guard, loss, schedule, accumulation."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from persona_jax import nn as pnn  # noqa: E402
from persona_jax.train import (Checkpointer, NonFiniteLossError, TrainConfig, Trainer,  # noqa: E402
                               learning_rate_schedule, lm_loss, make_mesh, weighted_cross_entropy)
from persona_jax.train.checkpointing import flatten  # noqa: E402
from tiny import CountingIterator, tiny_model  # noqa: E402

def _mesh():
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def test_lora_training_leaves_frozen_params_bitwise_unchanged(tmp_path):
  model = tiny_model()
  pnn.inject_lora(model, rank=2, projections=("q_proj", "v_proj"))
  frozen_before = _numpy(nnx.state(model, nnx.Not(nnx.LoRAParam)).to_pure_dict())
  lora_before = _numpy(nnx.state(model, nnx.LoRAParam).to_pure_dict())
  config = TrainConfig(num_steps=3, learning_rate=1e-2, warmup_steps=0, checkpoint_every=0)
  trainer = Trainer(model, lm_loss, config, trainable=nnx.LoRAParam, workdir=str(tmp_path), mesh=_mesh(),
                    checkpoint_metadata={"base": "tiny_llama seed 0"})
  trainer.train(CountingIterator())

  # The caller's module keeps its arrays (the train state is a copy, donated to the step).
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(model)))
  trained = trainer.model()
  frozen_after = _numpy(nnx.state(trained, nnx.Not(nnx.LoRAParam)).to_pure_dict())
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(frozen_before)[0],
                                   jax.tree.leaves(frozen_after)):
    assert before.tobytes() == after.tobytes(), jax.tree_util.keystr(path)
  lora_after = _numpy(nnx.state(trained, nnx.LoRAParam).to_pure_dict())
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora_after)))

  # The optimizer holds moments for the LoRA parameters only.
  lora_shapes = sorted(x.shape for x in jax.tree.leaves(lora_before))
  moment_shapes = sorted(x.shape for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0)
  assert moment_shapes == sorted(lora_shapes * 2)  # Adam's mu and nu
  # And the checkpoint holds no frozen weight, only a pointer to the base.
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
  state, _, meta = checkpointer.restore(checkpointer.latest_step(), trainer.state)
  names = flatten(state).keys()
  assert names and all(".adapters." in n for n in names if n.startswith(("params", "opt_state")) and
                       "count" not in n)
  assert not any(n.endswith(("kernel", "embedding", "scale")) for n in names)
  assert meta["base"] == "tiny_llama seed 0" and meta["step"] == 3
  checkpointer.close()

  # An eval job rebuilds the same model + filter and restores the trained adapters.
  fresh = tiny_model()
  pnn.inject_lora(fresh, rank=2, projections=("q_proj", "v_proj"))
  evaluator = Trainer(fresh, lm_loss, config, trainable=nnx.LoRAParam, workdir=str(tmp_path), mesh=_mesh())
  assert evaluator.restore() == {"index": 3}
  for a, b in zip(jax.tree.leaves(_numpy(nnx.state(evaluator.model(), nnx.LoRAParam).to_pure_dict())),
                  jax.tree.leaves(lora_after)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  config = TrainConfig(num_steps=6, learning_rate=1e-2, warmup_steps=0, checkpoint_every=2)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh())
  good = {}

  def remember(step, metrics, batch):
    good[step] = _numpy(trainer.state.params)

  # Step 3's finite loss (from step 2's parameters) makes checkpoint 2 known good.
  with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last known-good checkpoint is step 2"):
    trainer.train(CountingIterator(nan_at=4), step_callback=remember)
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
  assert checkpointer.latest_step() == 2
  restored, data_state, _ = checkpointer.restore(2, trainer.state)
  assert data_state == {"index": 2}
  for expected, actual in zip(jax.tree.leaves(good[2]), jax.tree.leaves(_numpy(restored.params))):
    np.testing.assert_array_equal(actual, expected)
  checkpointer.close()


def test_cross_entropy_closed_form_and_packing_matches_separate_sequences():
  # Uniform logits: the loss is log(vocab) whatever the targets; zero weights drop positions.
  logits = jnp.zeros((2, 5, 7))
  targets = jnp.arange(10).reshape(2, 5) % 7
  weights = jnp.ones((2, 5)).at[1, 3:].set(0.0)
  loss, metrics = weighted_cross_entropy(logits, targets, weights)
  assert float(loss) == pytest.approx(math.log(7), rel=1e-6)
  assert float(metrics["num_tokens"]) == 8.0

  # Two sequences packed in one row (segment ids + restarted positions) give the same loss as the
  # two sequences in separate rows: nothing leaks across the segment boundary.
  model = tiny_model()
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 256, 7), rng.integers(1, 256, 5)
  packed = {"decoder_input_tokens": np.concatenate([a[:-1], b[:-1]])[None],
            "decoder_target_tokens": np.concatenate([a[1:], b[1:]])[None],
            "decoder_loss_weights": np.ones((1, 10), np.float32),
            "decoder_segment_ids": np.array([[1] * 6 + [2] * 4]),
            "decoder_positions": np.array([list(range(6)) + list(range(4))])}
  loss_fn = nnx.jit(lm_loss)
  packed_loss, _ = loss_fn(model, packed)
  losses = []
  for seq in (a, b):
    single = {"decoder_input_tokens": seq[None, :-1], "decoder_target_tokens": seq[None, 1:],
              "decoder_loss_weights": np.ones((1, len(seq) - 1), np.float32)}
    losses.append(float(loss_fn(model, single)[0]) * (len(seq) - 1))
  assert float(packed_loss) == pytest.approx(sum(losses) / 10, rel=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
  schedule = learning_rate_schedule(1e-3, num_steps=100, warmup_steps=10, final_learning_rate_fraction=0.1)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)  # cosine midpoint
  assert float(schedule(100)) == pytest.approx(1e-4)


def test_gradient_accumulation_equals_the_full_batch():
  """Two microbatches with equal token counts give the full batch's update (one optimizer step)."""
  batch = next(CountingIterator(batch_size=4))
  results = []
  for micro in (1, 2):
    config = TrainConfig(num_steps=5, learning_rate=1e-3, warmup_steps=0, num_microbatches=micro)
    trainer = Trainer(tiny_model(), lm_loss, config, mesh=_mesh())
    metrics = trainer.step(batch)
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]), _numpy(trainer.state.params),
                    int(trainer.state.step)))
  (loss_1, norm_1, params_1, step_1), (loss_2, norm_2, params_2, step_2) = results
  assert step_1 == step_2 == 1
  assert loss_2 == pytest.approx(loss_1, abs=1e-5) and norm_2 == pytest.approx(norm_1, rel=1e-4)
  for x, y in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_2)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
  config = TrainConfig(num_steps=2, learning_rate=1e-2, warmup_steps=0, compute_dtype="bfloat16")
  trainer = Trainer(tiny_model(), lm_loss, config, mesh=_mesh())
  fp32 = Trainer(tiny_model(), lm_loss, TrainConfig(num_steps=2, learning_rate=1e-2, warmup_steps=0),
                 mesh=_mesh())
  batch = next(CountingIterator())
  loss_bf16 = float(trainer.step(batch)["loss"])
  loss_fp32 = float(fp32.step(batch)["loss"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.params))
  assert loss_bf16 == pytest.approx(loss_fp32, abs=0.05) and loss_bf16 != loss_fp32


def test_empty_trainable_filter_is_a_clear_error():
  with pytest.raises(ValueError, match="selects no parameters"):
    Trainer(tiny_model(), lm_loss, TrainConfig(), trainable=nnx.LoRAParam, mesh=_mesh())
