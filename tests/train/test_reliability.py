"""Nothing lost, nothing silently wrong (issue 19): config validation, broken checkpoints, divergence,
preemption and batch/mesh divisibility. Each test uses a fresh tmp workdir and the tiny model."""

import os
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from persona_jax.train import (PREEMPTED_EXIT_CODE, Checkpointer, CheckpointReadError,  # noqa: E402
                               NonFiniteLossError, Preempted, StuckTrainingError, TrainConfig, Trainer,
                               clear_preemption, lm_loss, make_mesh, raise_if_preempted, was_preempted)
from persona_jax.train import partitioning  # noqa: E402
from tiny import CountingIterator, tiny_model  # noqa: E402


def _mesh():
  return make_mesh(1, 1, 1, devices=jax.devices()[:1])


# (b) Config validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("num_steps", 0), ("num_steps", -5), ("num_steps", 2.5), ("num_steps", "two"), ("num_steps", True),
    ("keep_checkpoints", 0), ("learning_rate", float("nan")), ("learning_rate", -1.0),
    ("warmup_steps", -1), ("num_microbatches", 0), ("mesh_data", 0), ("log_every", 0),
    ("compute_dtype", "int8"), ("b2", 1.0), ("num_eval_batches", 0), ("stop_after_zero_grad_steps", -1)])
def test_train_config_refuses_bad_values_naming_the_field(field, value):
  with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=.*must be .*Fix: "):
    TrainConfig(**{field: value})


def test_train_config_accepts_the_usual_values():
  config = TrainConfig(num_steps=np.int64(5), learning_rate=1, max_grad_norm=None, compute_dtype="bfloat16",
                       mesh_data=-1, num_eval_batches=None, keep_checkpoints=1)
  assert config.num_steps == 5


def test_keep_checkpoints_zero_is_refused_by_the_checkpointer_too(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep=0.*>= 1"):
    Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=0)


def test_batch_that_does_not_divide_the_data_axes_is_an_error_not_a_replication():
  mesh = jax.sharding.AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))
  with pytest.raises(ValueError, match=r"6 rows.*4 data-parallel devices.*data=2, fsdp=2.*multiple of 4"):
    partitioning.check_batch_divides(mesh, 6)
  partitioning.check_batch_divides(mesh, 8)
  one_device = _mesh()
  partitioning.check_batch_divides(one_device, 3)  # nothing to split over: any batch is fine
  # Evaluation may replicate a last partial batch, explicitly.
  assert partitioning.batch_sharding(one_device, 2, 3, allow_replicated=True) is not None


# (a) Checkpoints -------------------------------------------------------------------------------------
def _state(value: float):
  return {"w": jnp.full((64, 64), value, jnp.float32), "b": jnp.full((64,), value, jnp.float32)}


def _write_steps(directory, steps):
  checkpointer = Checkpointer(str(directory), max_to_keep=10, async_save=False)
  for step in steps:
    checkpointer.save(step, _state(float(step)), {"index": step})
  checkpointer.wait()
  checkpointer.close()


def _delete_one_array_file(step_dir: pathlib.Path):
  files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")
  assert files, list((step_dir / "state").rglob("*"))
  for path in files:  # every data file of the state: whichever holds the arrays is gone
    path.unlink()


def test_unreadable_and_empty_checkpoints_are_named_and_the_previous_one_is_used(tmp_path, capsys):
  directory = tmp_path / "checkpoints"
  _write_steps(directory, [1, 2, 3])
  _delete_one_array_file(directory / "3")
  (directory / "4").mkdir()  # an empty step directory
  checkpointer = Checkpointer(str(directory), max_to_keep=10, async_save=False)
  assert checkpointer.latest_step() == 3  # the empty one is not complete; the unreadable one looks so
  step, state, data_state, _ = checkpointer.restore_latest(_state(0.0))
  out = capsys.readouterr().out
  assert step == 2 and data_state == {"index": 2}
  np.testing.assert_array_equal(state["w"], np.full((64, 64), 2.0))
  lines = out.splitlines()
  assert any("step 4" in l and "empty" in l for l in lines), out
  assert any("step 3" in l and "failed to read" in l for l in lines), out
  assert any("Using checkpoint step 2, the previous complete one" in l for l in lines), out
  assert len(out) < 2000, out  # a few clear lines, not pages of tracebacks
  # The broken directories are kept aside, and the run can write those steps again.
  broken = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints.broken").iterdir())
  assert broken == ["3", "4"]
  checkpointer.save(3, _state(3.5), {"index": 3})
  checkpointer.wait()
  assert checkpointer.latest_step() == 3
  checkpointer.close()


def test_no_readable_checkpoint_is_one_clear_error_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _write_steps(directory, [1])
  _delete_one_array_file(directory / "1")
  checkpointer = Checkpointer(str(directory), async_save=False)
  with pytest.raises(CheckpointReadError, match=r"No checkpoint .* could be read \(step 1: failed to read"):
    checkpointer.restore_latest(_state(0.0))
  assert (directory / "1").is_dir()
  checkpointer.close()


def test_trainer_resumes_from_the_previous_checkpoint_when_the_latest_is_broken(tmp_path, capsys):
  config = TrainConfig(num_steps=4, learning_rate=1e-2, warmup_steps=0, checkpoint_every=2,
                       async_checkpointing=False)
  Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh()).train(CountingIterator())
  _delete_one_array_file(tmp_path / "checkpoints" / "4")
  (tmp_path / "checkpoints" / "6").mkdir()
  capsys.readouterr()
  longer = TrainConfig(num_steps=6, learning_rate=1e-2, warmup_steps=0, checkpoint_every=2,
                       async_checkpointing=False)
  trainer = Trainer(tiny_model(), lm_loss, longer, workdir=str(tmp_path), mesh=_mesh())
  seen = []
  result = trainer.train(CountingIterator(), step_callback=lambda step, m, b: seen.append(step))
  out = capsys.readouterr().out
  assert seen == [3, 4, 5, 6] and result.step == 6
  assert "Using checkpoint step 2, the previous complete one" in out and "Resumed from checkpoint step 2" in out
  # Eval jobs (Trainer.restore) get the same fallback.
  assert Trainer(tiny_model(), lm_loss, longer, workdir=str(tmp_path), mesh=_mesh()).restore() == {"index": 6}


# (c) Divergence --------------------------------------------------------------------------------------
def test_nan_names_the_last_known_good_checkpoint(tmp_path):
  config = TrainConfig(num_steps=6, learning_rate=1e-2, warmup_steps=0, checkpoint_every=2)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh())
  # Step 3's finite loss was computed from step 2's parameters: checkpoint 2 is known good.
  with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last known-good checkpoint is step 2"):
    trainer.train(CountingIterator(nan_at=4))


def test_nan_right_after_a_save_does_not_call_that_checkpoint_good(tmp_path):
  config = TrainConfig(num_steps=6, learning_rate=1e-2, warmup_steps=0, checkpoint_every=2)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh())
  with pytest.raises(NonFiniteLossError, match=r"at step 3 .*No checkpoint is known to be good: step 2 "
                     r"was saved but no finite"):
    trainer.train(CountingIterator(nan_at=3))


def test_huge_learning_rate_stuck_run_stops_with_the_step_and_cause(tmp_path):
  # Learning rate 1e6 saturates the tiny model: the loss stops moving and the gradient is exactly 0.
  config = TrainConfig(num_steps=30, learning_rate=1e6, warmup_steps=0, checkpoint_every=2,
                       stop_after_zero_grad_steps=3)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh())
  with pytest.raises(StuckTrainingError, match=r"stuck at step \d+: the gradient norm has been exactly 0.0 "
                     r"for 3 consecutive steps.*learning_rate=1e\+06 is far too high.*No checkpoint is "
                     r"known to be good"):
    trainer.train(CountingIterator())


def test_zero_gradient_check_can_be_disabled(tmp_path):
  def no_gradient_loss(model, batch, rng):
    loss, metrics = lm_loss(model, batch, rng)
    return jax.lax.stop_gradient(loss), metrics

  config = TrainConfig(num_steps=3, warmup_steps=0, checkpoint_every=0, stop_after_zero_grad_steps=0)
  result = Trainer(tiny_model(), no_gradient_loss, config, mesh=_mesh()).train(CountingIterator())
  assert result.step == 3 and result.metrics["grad_norm"] == 0.0


# (d) Preemption --------------------------------------------------------------------------------------
def test_sigterm_saves_skips_final_eval_and_marks_the_process_preempted(tmp_path):
  clear_preemption()
  config = TrainConfig(num_steps=6, learning_rate=1e-2, warmup_steps=0, checkpoint_every=0)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path), mesh=_mesh())
  evaluated = []

  def sigterm_at_2(step, metrics, batch):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  try:
    result = trainer.train(CountingIterator(), step_callback=sigterm_at_2,
                           eval_fn=lambda model, step: evaluated.append(step) or {"x": 0.0})
    assert result.preempted and result.step == 2
    assert evaluated == []  # no final eval after SIGTERM
    assert Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2
    assert was_preempted() and PREEMPTED_EXIT_CODE == 75
    with pytest.raises(Preempted, match="step 2"):
      raise_if_preempted()
    from persona_jax import main  # pylint: disable=g-import-not-at-top
    with pytest.raises(SystemExit) as exit_info:
      main.exit_if_preempted({"some": "job result"})
    assert exit_info.value.code == PREEMPTED_EXIT_CODE
  finally:
    clear_preemption()
  assert not was_preempted()
  raise_if_preempted()  # no-op when not preempted
