"""Helpers for the train tests: subprocesses share a persistent XLA compilation cache, so the same tiny
train step is compiled once per test session rather than once per process."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory):
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
      PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
      JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture
def run_script(subprocess_env):
  """`run_script(name, *args)` runs tests/train/<name> in a fresh Python; fails the test if it fails."""

  def run(name, *args, timeout=300):
    proc = subprocess.run([sys.executable, str(HERE / name), *map(str, args)], env=subprocess_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
      raise AssertionError(f"{name} {args} failed with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return proc

  return run
