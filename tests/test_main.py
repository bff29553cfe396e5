"""persona_jax.main: gin parsing, config written to the workdir, one clear message per user error."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import gin
import pytest

from persona_jax import main

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  return env


def _run_main(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "persona_jax.main", *args], cwd=REPO_ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def test_missing_gin_file_names_the_file_and_the_fix(tmp_path):
  with pytest.raises(main.UserError, match=r"--gin_file=gin/nope\.gin: file not found.*Fix the path"):
    main.run_main(["gin/nope.gin"], [], str(tmp_path))


def test_unknown_binding_is_one_clear_error(tmp_path):
  with pytest.raises(main.UserError, match=r"(?s)num_stepz.*Fix the binding"):
    main.run_main(["gin/pretrain.gin"], ["TrainConfig.num_stepz = 3"], str(tmp_path))
  gin.clear_config()
  with pytest.raises(main.UserError, match=r"No configurable matching 'no_such_job'"):
    main.run_main([], ["no_such_job.steps = 3"], str(tmp_path))


def test_no_job_selected(tmp_path):
  with pytest.raises(main.UserError, match=r"No job selected.*run\.job"):
    main.run_main([], ["TrainConfig.num_steps = 3"], str(tmp_path))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(main.UserError, match=r"cannot be written.*choose a directory"):
    main.run_main(["gin/pretrain.gin"], [], str(blocker / "run"))


@pytest.mark.slow
def test_user_errors_exit_nonzero_without_traceback(tmp_path):
  """Through the real command line: an unprepared TFDS data set -> the data layer's message, exit 1."""
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  proc = _run_main("--gin_file=gin/pretrain.gin", f"--workdir={tmp_path / 'run'}",
                   f"--gin_bindings=pretrain.train.tfds_data_dir='{empty}'",
                   "--gin_bindings=TrainConfig.num_steps=2")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert re.search(r"error: FileNotFoundError: TFDS dataset 'tiny_shakespeare.*' is not prepared.*Fix:",
                   proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_pretrain_end_to_end_loss_goes_down(tmp_path):
  workdir = tmp_path / "run"
  proc = _run_main("--gin_file=gin/pretrain.gin", f"--workdir={workdir}",
                   "--gin_bindings=TrainConfig.num_steps=30", "--gin_bindings=TrainConfig.log_every=5",
                   "--gin_bindings=TrainConfig.eval_every=0", "--gin_bindings=TrainConfig.checkpoint_every=20",
                   "--gin_bindings=pretrain.train.sequence_length=64")
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"step (\d+)/30 \| loss ([\d.]+)", proc.stdout)}
  assert sorted(losses) == [5, 10, 15, 20, 25, 30]
  assert losses[30] < losses[5] - 0.5
  assert "Compile-time memory analysis" in proc.stdout
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 30 and final["eval"]["eval/loss"] < math.log(259) - 1.0
  config = (workdir / "config.gin").read_text()
  assert "run.job = @pretrain.train" in config and "TrainConfig.num_steps = 30" in config
  assert "train.sequence_length = 64" in config  # operative: what the job actually used
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]
