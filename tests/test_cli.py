"""`python -m persona_jax.main --list_jobs` / `--describe=<method>`: what a researcher reads before
writing a gin file.

Checked against things the listing does not produce itself: the registry's method names and class
docstrings, gin's own parser (every printed binding must parse and name a real argument), and the
dataclasses' own defaults (a config built from the printed bindings equals the default one).
"""

import inspect
import os
import subprocess
import sys

import gin
import pytest

from persona_jax import main as main_lib
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.train import method as method_lib
from persona_jax.train.trainer import TrainConfig


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _bindings(text: str) -> list[str]:
  """The `name.arg = value` lines of a --describe output, comments stripped."""
  lines = []
  for line in text.splitlines():
    if not line or line.startswith("#"):
      continue
    lines.append(line.split("  # ", 1)[0])
  return lines


def test_list_jobs_names_every_registered_method_with_its_summary():
  text = main_lib.describe_jobs()
  names = method_lib.discover_methods()
  assert {"coprocessor", "curio", "milp", "pretrain", "rlpf", "user_llm"} <= set(names)
  methods_part, jobs_part = text.split("Generic jobs")
  listed = [line.split()[0] for line in methods_part.splitlines()[1:]]
  assert listed == names  # one line per method, sorted, nothing else
  for name in names:
    first_line = inspect.getdoc(method_lib.get_method(name)).splitlines()[0]
    assert f"{name}  " in methods_part and first_line in methods_part
  assert [line.split()[0] for line in jobs_part.splitlines()[1:]] == ["evaluate", "train"]


def test_describe_prints_bindings_gin_accepts_with_the_real_defaults():
  text = main_lib.describe_jobs("coprocessor")
  bindings = _bindings(text)
  # Hand-checked lines (the defaults of Coprocessor.__init__, TrainConfig and DecoderSource).
  for expected in ("run.method = 'coprocessor'", "coprocessor.job.variant = 'full'",
                   "coprocessor.job.num_latents = 8", "TrainConfig.num_steps = 100",
                   "DecoderSource.pretrained = 'smollm2-135m-instruct'", "run.job = %gin.REQUIRED"):
    assert expected in bindings, expected
  assert "coprocessor.job.variant = 'full'  # \"full\", \"lora\"" in text  # the docstring's meaning
  # No other method's configurables, but the core ones every run takes.
  assert not any(line.startswith(("milp.", "user_llm.", "curio.", "rlpf.job")) for line in bindings)
  assert any(line.startswith("rl.loss.") for line in bindings)
  # gin parses every printed line (an unknown configurable or argument would raise) ...
  gin.parse_config([line for line in bindings if "%gin.REQUIRED" not in line])
  # ... and they are the defaults: configs built under them equal the unconfigured ones.
  bound_train, bound_source = TrainConfig(), DecoderSource()
  gin.clear_config()
  assert bound_train == TrainConfig() and bound_source == DecoderSource()


def test_describe_covers_a_methods_other_configurables():
  bindings = _bindings(main_lib.describe_jobs("user_llm"))
  assert "user_llm.encoder.embed_dim = 64" in bindings  # user_llm.encoder, shared by both stages
  assert any(line.startswith("user_llm.data.") for line in bindings)
  # user_encoder is another registered method in the same room: listed under its own name only.
  assert not any(line.startswith("user_llm.encoder_job.") for line in bindings)
  assert any(line.startswith("user_llm.encoder_job.")
             for line in _bindings(main_lib.describe_jobs("user_encoder")))


def test_describe_unknown_method_names_the_registered_ones():
  with pytest.raises(UserError, match=r"--describe=nope: no such method; registered: \[.*'coprocessor'"):
    main_lib.describe_jobs("nope")


@pytest.mark.slow
def test_command_line_flags(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  listed = subprocess.run([sys.executable, "-m", "persona_jax.main", "--list_jobs"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
  assert listed.returncode == 0, listed.stderr
  assert "coprocessor" in listed.stdout and "Generic jobs" in listed.stdout
  assert not (tmp_path / "runs").exists()  # listing runs nothing and creates no workdir
  bad = subprocess.run([sys.executable, "-m", "persona_jax.main", "--describe=nope"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 1 and "no such method" in bad.stderr and "Traceback" not in bad.stderr
