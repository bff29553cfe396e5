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
                   f"--gin_bindings=pretrain.job.tfds_data_dir='{empty}'",
                   "--gin_bindings=TrainConfig.num_steps=2")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert re.search(r"error: MissingFileError: TFDS dataset 'tiny_shakespeare.*' is not prepared.*Fix:",
                   proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_pretrain_end_to_end_loss_goes_down(tmp_path):
  workdir = tmp_path / "run"
  proc = _run_main("--gin_file=gin/pretrain.gin", f"--workdir={workdir}",
                   "--gin_bindings=TrainConfig.num_steps=30", "--gin_bindings=TrainConfig.log_every=5",
                   "--gin_bindings=TrainConfig.eval_every=0", "--gin_bindings=TrainConfig.checkpoint_every=20",
                   "--gin_bindings=pretrain.job.sequence_length=64")
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"step (\d+)/30 \| loss ([\d.]+)", proc.stdout)}
  assert sorted(losses) == [5, 10, 15, 20, 25, 30]
  assert losses[30] < losses[5] - 0.5
  assert "Compile-time memory analysis" in proc.stdout
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 30 and final["eval"]["loss"] < math.log(259) - 1.0
  config = (workdir / "config.gin").read_text()
  assert "run.job = @train" in config and "run.method = 'pretrain'" in config
  assert "TrainConfig.num_steps = 30" in config
  assert "pretrain.job.sequence_length = 64" in config  # operative: what the job actually used
  # The decoder comes from the one DecoderSource the gin file binds (no per-method model bindings).
  assert "DecoderSource.preset = 'tiny_llama'" in config
  assert "DecoderSource.vocabulary = 'bytes'" in config
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "30"]


RAISING_GIN = "--gin_file=tests/main_raising_job.gin"


def test_a_bug_inside_a_job_keeps_its_traceback(tmp_path):
  """A non-UserError raised by a job is a bug: the full traceback, through the job's own frame."""
  proc = _run_main(RAISING_GIN, f"--workdir={tmp_path / 'run'}")
  assert proc.returncode != 0, proc.stderr[-3000:]  # Python's exit status for an uncaught exception
  assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
  assert "RuntimeError: deliberate bug inside a job" in proc.stderr
  assert re.search(r"main_raising_job\.py\", line \d+, in _raise_bug", proc.stderr), proc.stderr[-3000:]
  assert "(run with --traceback" not in proc.stderr  # not dressed up as a user's mistake


def test_a_user_error_inside_a_job_is_one_line_and_exit_1(tmp_path):
  proc = _run_main(RAISING_GIN, f"--workdir={tmp_path / 'run'}",
                   "--gin_bindings=raising_job.error = 'user'")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert errors == ["error: UserError: deliberate user mistake inside a job; fix: bind "
                    "raising_job.error = 'none'"], proc.stderr[-3000:]
  # --traceback shows it in full.
  proc = _run_main(RAISING_GIN, f"--workdir={tmp_path / 'run'}", "--traceback",
                   "--gin_bindings=raising_job.error = 'user'")
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


def test_the_raising_job_runs_when_told_not_to_raise(tmp_path):
  """The control: the same gin file and job succeed when the job raises nothing."""
  proc = _run_main(RAISING_GIN, f"--workdir={tmp_path / 'run'}",
                   "--gin_bindings=raising_job.error = 'none'")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
