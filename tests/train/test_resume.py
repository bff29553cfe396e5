"""Preemption: SIGKILL mid-run then restart, and SIGTERM, end where an uninterrupted run ends."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from persona_jax.train import Checkpointer

SCRIPT = str(pathlib.Path(__file__).with_name("resume_script.py"))
NUM_STEPS = 8


def _records(path):
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start(workdir, sleep, record, params, env):
  return subprocess.Popen([sys.executable, SCRIPT, str(workdir), str(NUM_STEPS), str(sleep), str(record),
                           str(params)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, record, start_count, step, checkpoint_dir=None, timeout=240):
  """Waits until the run has recorded `step` (after `start_count` earlier lines) and, if given,
  `checkpoint_dir` is complete (Orbax renames it into place when the write finished)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (any(r["step"] >= step for r in _records(record)[start_count:]) and
        (checkpoint_dir is None or checkpoint_dir.is_dir())):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f"run did not reach step {step} in {timeout} s")


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_like_an_uninterrupted_run(tmp_path, subprocess_env):
  env = subprocess_env
  # Reference: never interrupted.
  ref_record, ref_params = tmp_path / "ref.jsonl", tmp_path / "ref.npz"
  ref = _start(tmp_path / "ref", 0, ref_record, ref_params, env)
  _, err = ref.communicate(timeout=300)
  assert ref.returncode == 0, err[-3000:]

  workdir, record, params = tmp_path / "run", tmp_path / "run.jsonl", tmp_path / "run.npz"
  # 1. SIGKILL after step 3 once step 2's checkpoint is complete (a later one may be half written).
  proc = _start(workdir, 0.3, record, params, env)
  _wait_for_step(proc, record, 0, 3, checkpoint_dir=workdir / "checkpoints" / "2")
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(r["step"] for r in _records(record))
  latest_after_kill = Checkpointer(str(workdir / "checkpoints")).latest_step()
  assert latest_after_kill is not None and latest_after_kill < killed_at + 1

  # 2. Restart; it resumes from the checkpoint. SIGTERM it after step 5: it saves and exits cleanly.
  seen = len(_records(record))
  proc = _start(workdir, 0.3, record, params, env)
  _wait_for_step(proc, record, seen, 5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] and summary["final_step"] < NUM_STEPS
  resumed_steps = [r["step"] for r in _records(record)[seen:]]
  assert resumed_steps[0] == latest_after_kill + 1  # continued right after the restored checkpoint
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == summary["final_step"]

  # 3. A checkpoint directory whose write never finished (newer step number) must be ignored.
  unfinished = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "garbage").write_text("half-written")
  seen = len(_records(record))
  proc = _start(workdir, 0, record, params, env)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert _records(record)[seen]["step"] == summary["final_step"] + 1

  # Same examples in the same order: the last record of every step matches the reference's.
  reference = {r["step"]: r["batch"] for r in _records(ref_record)}
  interrupted = {}
  for r in _records(record):
    interrupted[r["step"]] = r["batch"]
  assert sorted(reference) == list(range(1, NUM_STEPS + 1))
  assert interrupted == reference
  # Steps redone after the SIGKILL saw the same batches as before it.
  first_seen = {}
  for r in _records(record):
    assert first_seen.setdefault(r["step"], r["batch"]) == r["batch"]
  # Same final parameters.
  ref_values, run_values = np.load(ref_params), np.load(params)
  assert sorted(ref_values.files) == sorted(run_values.files)
  for name in ref_values.files:
    np.testing.assert_array_equal(run_values[name], ref_values[name], err_msg=name)


def test_unfinished_checkpoint_is_never_restored(tmp_path):
  import jax.numpy as jnp
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  state = {"w": jnp.arange(4.0)}
  checkpointer.save(1, state, {"index": 1})
  checkpointer.wait()
  (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
  checkpointer.close()
  reopened = Checkpointer(str(tmp_path / "checkpoints"))
  assert reopened.latest_step() == 1
  restored, data_state, meta = reopened.restore(1, state)
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  assert data_state == {"index": 1} and meta["step"] == 1
  reopened.close()
