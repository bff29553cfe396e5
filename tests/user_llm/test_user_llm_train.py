"""End-to-end User-LLM jobs on the Amazon 2023 slice with tiny models (slow: they train)."""

from __future__ import annotations

import json
import os
import pathlib

import gin
import numpy as np
import pytest
from flax import nnx

from persona_jax import main as main_lib
from persona_jax.user_llm import train as train_lib

GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.slow
def test_smoke_run_beats_the_untrained_model(tmp_path, shared_dir):
  del shared_dir  # the Amazon slice lives there
  workdir = tmp_path / "run"
  main_lib.run_main([str(GIN / "user_llm_smoke.gin")], ["TrainConfig.num_steps = 30"], str(workdir))
  metrics = json.loads((workdir / "final_metrics.json").read_text())
  assert metrics["step"] == 30
  assert metrics["eval"]["choice_ce"] < metrics["untrained"]["choice_ce"]
  assert metrics["eval"]["accuracy"] > metrics["untrained"]["accuracy"]
  # The eval job restores the checkpoint into a freshly built model and gets the same numbers.
  gin.clear_config()
  restored = main_lib.run_main([str(GIN / "user_llm_smoke.gin")],
                               ["TrainConfig.num_steps = 30", "run.job = @user_llm.evaluate"], str(workdir))
  assert restored["accuracy"] == metrics["eval"]["accuracy"]
  assert restored["choice_ce"] == pytest.approx(metrics["eval"]["choice_ce"], rel=1e-5)


@pytest.mark.slow
def test_encoder_pretraining_learns_and_is_restored_into_the_user_llm(tmp_path, shared_dir):
  del shared_dir
  gin.parse_config_files_and_bindings([str(GIN / "user_encoder_pretrain_smoke.gin")], [])
  encoder_dir = str(tmp_path / "encoder")
  job = train_lib.build_encoder_job(encoder_dir)
  before = job.trainer.evaluate(job.eval_batches())
  job.trainer.train(job.train_data)
  after = job.trainer.evaluate(job.eval_batches())
  total = lambda metrics: metrics["item_ce"] + metrics["rating_ce"] + metrics["genre_ce"]
  assert total(after) < total(before)
  assert after["rating_ce"] < before["rating_ce"]
  trained = nnx.state(job.trainer.model())

  gin.clear_config()
  gin.parse_config_files_and_bindings([str(GIN / "user_llm_smoke.gin")], [])
  llm_job = train_lib.build_job(str(tmp_path / "llm"), encoder_workdir=encoder_dir, data=job.data)
  restored = dict(nnx.to_flat_state(nnx.state(llm_job.trainer.model().user_encoder)))
  for path, value in nnx.to_flat_state(trained):
    np.testing.assert_array_equal(np.asarray(restored[path].get_value()), np.asarray(value.get_value()))
  with pytest.raises(ValueError, match="holds no checkpoint"):
    train_lib.build_job(str(tmp_path / "llm2"), encoder_workdir=os.fspath(tmp_path / "empty"), data=job.data)
