"""Tracking: a smoke run's TensorBoard events hold the learning rate, the throughput, an eval metric
and the run's hparams (read back with TensorBoard's own event reader); wandb in offline mode gets the
same scalars; the tensorboardX fallback writes the same layout."""

import glob
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from persona_jax.train import TrainConfig, Trainer, learning_rate_schedule, lm_loss, make_mesh  # noqa: E402
from persona_jax.train import metrics as metrics_lib  # noqa: E402
from tiny import CountingIterator, tiny_model  # noqa: E402


def _read_events(logdir):
  """{tag: {step: value}} for scalars, and the hparams plugin's session-start hparams."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util

  scalars, hparams = {}, {}
  for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
    # The legacy loader converts old-style `simple_value` scalars (tensorboardX) to tensors as well.
    for event in event_file_loader.LegacyEventFileLoader(path).Load():
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if plugin == "hparams":
          data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
          if data.HasField("session_start_info"):
            for name, hparam in data.session_start_info.hparams.items():
              hparams[name] = hparam.WhichOneof("kind") and getattr(hparam, hparam.WhichOneof("kind"))
        elif value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        elif value.HasField("tensor"):
          scalars.setdefault(value.tag, {})[event.step] = float(tensor_util.make_ndarray(value.tensor))
  return scalars, hparams


def _smoke_run(tmp_path, **config_overrides):
  config = TrainConfig(num_steps=4, learning_rate=1e-2, warmup_steps=2, checkpoint_every=0,
                       log_every=1, eval_every=2, num_eval_batches=1, **config_overrides)
  trainer = Trainer(tiny_model(), lm_loss, config, workdir=str(tmp_path),
                    mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                    checkpoint_metadata={"base": "tiny_llama seed 0"})
  trainer.train(CountingIterator(), eval_batches=lambda: CountingIterator(seed=1))
  return config


def test_tensorboard_events_of_a_smoke_run_hold_lr_throughput_eval_and_hparams(tmp_path):
  pytest.importorskip("tensorboard")
  config = _smoke_run(tmp_path)
  scalars, hparams = _read_events(str(tmp_path / "tensorboard"))

  schedule = learning_rate_schedule(config.learning_rate, config.num_steps, config.warmup_steps,
                                    config.final_learning_rate_fraction)
  assert sorted(scalars["train/learning_rate"]) == [1, 2, 3, 4]
  for step, value in scalars["train/learning_rate"].items():
    np.testing.assert_allclose(value, float(schedule(step - 1)), rtol=1e-6)
  assert scalars["train/learning_rate"][1] == 0.0  # warmup starts at 0
  # Throughput is measured from the first step after compilation: steps 2.. have it.
  for name in ("train/steps_per_second", "train/tokens_per_second"):
    assert sorted(scalars[name]) == [2, 3, 4] and all(v > 0 for v in scalars[name].values())
  ratio = scalars["train/tokens_per_second"][4] / scalars["train/steps_per_second"][4]
  np.testing.assert_allclose(ratio, 4 * 16, rtol=1e-3)  # tokens per step of CountingIterator
  assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
  assert sorted(scalars["eval/loss"]) == [2, 4] and all(np.isfinite(list(scalars["eval/loss"].values())))
  assert hparams["learning_rate"] == pytest.approx(0.01) and hparams["num_steps"] == 4
  assert hparams["base"] == "tiny_llama seed 0"
  assert hparams["metrics_writers"] == "('tensorboard',)"


def test_tensorboardx_fallback_writes_the_same_tags(tmp_path, monkeypatch):
  pytest.importorskip("tensorboard")  # to read the events back
  monkeypatch.setattr(metrics_lib, "_tensorboard_writer", metrics_lib._TensorboardXWriter)
  writer = metrics_lib.MetricsWriter(str(tmp_path), hparams={"learning_rate": 0.5, "name": "x"})
  writer.write(3, {"learning_rate": 0.25, "eval/accuracy": 0.75})
  writer.close()
  scalars, hparams = _read_events(str(tmp_path))
  assert scalars == {"train/learning_rate": {3: 0.25}, "eval/accuracy": {3: 0.75}}
  assert hparams == {"learning_rate": 0.5, "name": "x"}


def test_wandb_offline_run_gets_the_scalars_and_config(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_PROJECT", "persona_jax_test")
  writer = metrics_lib.MetricsWriter(str(tmp_path / "tensorboard"), writers=("wandb",),
                                     hparams={"learning_rate": 0.5, "model": {"layers": 2}})
  backend = writer._writer._writers[0]
  run = backend.run
  assert run.settings.mode == "offline" or run.offline
  writer.write(1, {"loss": 2.0, "learning_rate": 0.25})
  writer.write(2, {"loss": 1.5, "eval/loss": 1.75})
  assert dict(run.config)["learning_rate"] == 0.5 and dict(run.config)["model.layers"] == 2
  writer.write(3, {"loss": 1.25})  # wandb commits a step's row when the next step is logged
  assert run.summary["train/loss"] == 1.5 and run.summary["eval/loss"] == 1.75
  assert run.summary["train/learning_rate"] == 0.25
  writer.close()
  # The offline run lies in <logdir>/wandb, ready for `wandb sync`.
  assert glob.glob(str(tmp_path / "tensorboard" / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))
  del wandb


def test_unknown_writer_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="unknown writer.*'tensorbord'.*metrics_writers"):
    metrics_lib.MetricsWriter(str(tmp_path), writers=("tensorbord",))


def test_progress_line_rates():
  progress = metrics_lib.ProgressLine(num_steps=10)
  progress.update(1, tokens=64)  # compilation step: starts the clock
  assert progress.rates(1) == {}
  progress.update(2, tokens=64)
  rates = progress.rates(2)
  assert rates["tokens_per_second"] / rates["steps_per_second"] == pytest.approx(64)
  assert "steps/s" in progress.line(2, 1.0)
