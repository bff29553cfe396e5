"""Workdirs may be bucket URLs: they must reach Orbax and the file writers unchanged."""

import os

from persona_jax.main import prepare_workdir
from persona_jax.train import workdir as workdir_lib


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  assert workdir_lib.resolve("gs://bucket/runs/copro") == "gs://bucket/runs/copro"
  assert workdir_lib.join("gs://bucket/runs", "config.gin") == "gs://bucket/runs/config.gin"
  monkeypatch.chdir(tmp_path)
  assert workdir_lib.resolve("runs/x") == str(tmp_path / "runs" / "x")
  # os.path.abspath would have turned the URL into the local directory ./gs:/bucket/...
  assert not os.path.isabs(workdir_lib.resolve("gs://bucket/x"))


def test_prepare_workdir_and_writes_are_local_files(tmp_path):
  workdir = prepare_workdir(str(tmp_path / "a" / "b"))
  workdir_lib.write_json(workdir_lib.join(workdir, "m.json"), {"x": 1})
  assert workdir_lib.read_text(os.path.join(workdir, "m.json")).strip().startswith("{")
  assert not os.path.exists(os.path.join(workdir, ".write_test"))
