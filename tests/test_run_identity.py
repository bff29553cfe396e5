"""A run's identity (issue 19): a rerun that changes the model, the data or the base refuses before any
work or any write; allowed changes resume and keep both configs; bindings for another room refused;
gin parse errors name the binding; SIGTERM outside the training loop exits 75.

One tiny pretrain run (2 steps) is trained once per module; every test copies it into its own fresh
tmp workdir.
"""

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import gin
import pytest

from persona_jax import main
from persona_jax.train import run_identity

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["TrainConfig.num_steps = 2", "TrainConfig.checkpoint_every = 1", "TrainConfig.eval_every = 0",
        "TrainConfig.log_every = 1", "pretrain.job.sequence_length = 32", "pretrain.job.batch_size = 2",
        "pretrain.job.num_eval_batches = 1"]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("template") / "run"
  main.run_main(["gin/pretrain.gin"], TINY, str(workdir))
  gin.clear_config()
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(trained, copy)
  return copy


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_first_run_records_its_config_and_base(workdir):
  record = json.loads((workdir / "run_identity.json").read_text())
  (first,) = record["configs"]
  assert first["file"] == "config.gin" and first["step"] == 0
  assert first["bindings"]["TrainConfig.num_steps"] == "2"
  assert first["bindings"]["pretrain.job.sequence_length"] == "32"
  assert first["base"]["source"]["preset"] == "tiny_llama"
  assert "TrainConfig.num_steps = 2" in (workdir / "config.gin").read_text()


def test_rerun_with_changed_model_data_or_learning_rate_refuses_before_writing_anything(workdir):
  before = _snapshot(workdir)
  with pytest.raises(run_identity.ConfigChangedError) as error:
    main.run_main(["gin/pretrain.gin"], TINY + ["TrainConfig.learning_rate = 0.01",
                                                "pretrain.job.sequence_length = 64",
                                                "DecoderSource.preset = 'tiny_gemma2'",
                                                "TrainConfig.log_every = 5"], str(workdir))
  message = str(error.value)
  assert "TrainConfig.learning_rate: 0.003 -> 0.01" in message
  assert "pretrain.job.sequence_length: 32 -> 64" in message
  assert "DecoderSource.preset: 'tiny_llama' -> 'tiny_gemma2'" in message
  assert "(also changed, allowed: TrainConfig.log_every: 1 -> 5)" in message
  assert "--allow_config_change" in message and "Nothing was written" in message
  assert _snapshot(workdir) == before  # config.gin, record, checkpoints, events: byte for byte


def test_num_steps_may_grow_and_the_new_config_is_kept_beside_the_first(workdir, capsys):
  first_config = (workdir / "config.gin").read_text()
  main.run_main(["gin/pretrain.gin"], TINY + ["TrainConfig.num_steps = 3"], str(workdir))
  assert "config differs from config.gin (resuming from step 2): TrainConfig.num_steps: 2 -> 3" in \
      capsys.readouterr().out
  assert (workdir / "config.gin").read_text() == first_config  # never claims num_steps=3
  assert "TrainConfig.num_steps = 3" in (workdir / "config.step2.gin").read_text()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir())[-1] == "3"
  record = json.loads((workdir / "run_identity.json").read_text())
  assert [(c["file"], c["step"]) for c in record["configs"]] == [("config.gin", 0),
                                                                   ("config.step2.gin", 2)]


def test_num_steps_may_not_shrink(workdir):
  with pytest.raises(run_identity.ConfigChangedError, match=r"TrainConfig\.num_steps: 2 -> 1 "
                     r"\(num_steps may only grow"):
    main.run_main(["gin/pretrain.gin"], TINY + ["TrainConfig.num_steps = 1"], str(workdir))


def test_allow_config_change_continues_and_keeps_both_configs(workdir):
  first_config = (workdir / "config.gin").read_text()
  main.run_main(["gin/pretrain.gin"], TINY + ["TrainConfig.learning_rate = 0.01"], str(workdir),
                allow_config_change=True)
  assert (workdir / "config.gin").read_text() == first_config
  assert "TrainConfig.learning_rate = 0.01" in (workdir / "config.step2.gin").read_text()
  record = json.loads((workdir / "run_identity.json").read_text())
  assert record["configs"][-1]["allowed_by_flag"] is True
  gin.clear_config()
  # The next rerun compares with the last recorded config: the same settings now resume quietly.
  before = _snapshot(workdir)
  main.run_main(["gin/pretrain.gin"], TINY + ["TrainConfig.learning_rate = 0.01"], str(workdir))
  after = _snapshot(workdir)
  assert {k for k in after if k.endswith(".gin")} == {"config.gin", "config.step2.gin"}
  assert after["config.gin"] == before["config.gin"] and after["run_identity.json"] == before["run_identity.json"]


def test_evaluate_does_not_overwrite_config_gin(workdir):
  before = _snapshot(workdir)
  main.run_main(["gin/pretrain.gin"], TINY + ["run.job = @evaluate"], str(workdir))
  after = _snapshot(workdir)
  assert after["config.gin"] == before["config.gin"]
  assert after["run_identity.json"] == before["run_identity.json"]
  assert not [name for name in after if name.startswith("config.step")]


def test_a_different_base_of_the_same_shape_behind_the_same_path_is_refused(tmp_path):
  # Run identity at the unit level: a fake Hugging Face directory stands for the base (only its
  # files are hashed, nothing is loaded) and a step directory for a trained checkpoint.
  base = tmp_path / "base"
  base.mkdir()
  (base / "config.json").write_text("{}")
  (base / "model.safetensors").write_bytes(b"\x00" * 64)
  workdir = tmp_path / "run"
  workdir.mkdir()
  bindings = ["run.method = 'pretrain'", "run.job = @train", "DecoderSource.preset = None",
              f"DecoderSource.pretrained = '{base}'"]
  main.import_job_modules()
  gin.parse_config(bindings)
  decision = run_identity.check(str(workdir))
  assert decision.config_file == "config.gin"
  run_identity.write(str(workdir), decision, gin.config_str())
  (workdir / "checkpoints" / "5").mkdir(parents=True)  # the first run trained up to step 5
  recorded = json.loads((workdir / "run_identity.json").read_text())["configs"][0]["base"]
  assert recorded["files"]["model.safetensors"]["sha256"] == hashlib.sha256(b"\x00" * 64).hexdigest()
  assert run_identity.check(str(workdir)).config_file is None  # unchanged: resume, write nothing
  (base / "model.safetensors").write_bytes(b"\x01" * 64)  # same size (same shape), other weights
  with pytest.raises(run_identity.ConfigChangedError,
                     match=r"base weights file model.safetensors: sha256 \w{12} -> \w{12} \(another "
                           r"model behind the same name\)"):
    run_identity.check(str(workdir))
  assert run_identity.check(str(workdir), allow_change=True).config_file == "config.step5.gin"


def test_binding_for_another_rooms_job_is_refused_naming_it_and_the_method(tmp_path):
  with pytest.raises(main.UserError, match=r"Binding milp\.job\.num_test_users configures method 'milp' "
                     r"\(persona_jax\.milp\), but run\.method = 'pretrain'"):
    main.run_main(["gin/pretrain.gin"], TINY + ["milp.job.num_test_users = 3"], str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.gin").exists()


def test_gin_parse_error_names_the_binding(tmp_path):
  with pytest.raises(main.UserError, match=r"--gin_bindings='TrainConfig\.num_steps=' failed: "
                     r"Unable to parse value"):
    main.run_main(["gin/pretrain.gin"], ["TrainConfig.num_steps=3", "TrainConfig.num_steps="],
                  str(tmp_path / "run"))


@pytest.mark.slow
def test_sigterm_before_the_training_loop_exits_75(tmp_path):
  """SIGTERM while the job is still importing and loading (before the Trainer's own handler exists):
  exit status 75, not death by the default signal action."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
  process = subprocess.Popen(
      [sys.executable, "-u", "-m", "persona_jax.main", "--gin_file=gin/pretrain.gin",
       f"--workdir={tmp_path / 'run'}"] + [f"--gin_bindings={b}" for b in TINY],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = process.stdout.readline()  # "workdir: ..." is printed before the rooms are imported
  assert first.startswith("workdir:")
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 75, stderr
  assert "SIGTERM received outside the training loop" in stderr
  assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before the loop
