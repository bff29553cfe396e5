"""End-to-end User-LLM methods on the Amazon 2023 slice with tiny models (slow: they train).

Both stages run through the generic `train` job (`run.method = 'user_encoder'` / `'user_llm'`) on
their smoke configs, with periodic evaluation on (`TrainConfig.eval_every`), and the stage-2 run is
restored by the generic `evaluate` job in a fresh method object.
"""

from __future__ import annotations

import json
import pathlib

import gin
import numpy as np
import pytest
from flax import nnx

from persona_jax import main as main_lib
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.train import checkpointing
from persona_jax.user_llm import job as job_lib
from persona_jax.user_llm import model as model_lib

GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"
TINY = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _table(workdir, name="eval_table"):
  return json.loads((workdir / f"{name}.json").read_text())


@pytest.mark.slow
def test_smoke_run_evaluates_periodically_beats_the_untrained_model_and_restores(tmp_path, shared_dir,
                                                                                 capsys):
  del shared_dir  # the Amazon slice lives there
  workdir = tmp_path / "run"
  bindings = ["TrainConfig.num_steps = 20", "TrainConfig.eval_every = 10"]
  main_lib.run_main([str(GIN / "user_llm_smoke.gin")], bindings, str(workdir))
  assert "eval at step 10:" in capsys.readouterr().out  # TrainConfig.eval_every is honoured
  metrics = json.loads((workdir / "final_metrics.json").read_text())
  assert metrics["method"] == "user_llm" and metrics["step"] == 20
  assert set(metrics["periodic_eval"]) >= {"eval/accuracy", "eval/choice_ce"}
  columns = _table(workdir)["columns"]
  assert metrics["eval"] == columns["step 20"]
  assert metrics["eval"]["choice_ce"] < columns["untrained"]["choice_ce"]
  assert columns["chance"]["accuracy"] == pytest.approx(0.2)  # 5 star ratings
  assert "| accuracy |" in (workdir / "eval_table.md").read_text()
  # The evaluate job restores the checkpoint into a freshly built model and gets the same numbers.
  gin.clear_config()
  restored = main_lib.run_main([str(GIN / "user_llm_smoke.gin")], bindings + ["run.job = @evaluate"],
                               str(workdir))
  assert restored["step"] == 20
  assert restored["eval"]["accuracy"] == metrics["eval"]["accuracy"]
  assert restored["eval"]["choice_ce"] == pytest.approx(metrics["eval"]["choice_ce"], rel=1e-5)
  assert _table(workdir, "eval_table_restored")["columns"]["untrained"] == pytest.approx(
      columns["untrained"])


@pytest.mark.slow
def test_encoder_pretraining_learns_evaluates_periodically_and_is_restored_into_the_user_llm(
    tmp_path, shared_dir, capsys):
  del shared_dir
  encoder_dir = tmp_path / "encoder"
  main_lib.run_main([str(GIN / "user_encoder_pretrain_smoke.gin")],
                    ["TrainConfig.num_steps = 10", "TrainConfig.eval_every = 5"], str(encoder_dir))
  assert "eval at step 5:" in capsys.readouterr().out
  metrics = json.loads((encoder_dir / "final_metrics.json").read_text())
  assert metrics["method"] == "user_encoder" and "eval/rating_ce" in metrics["periodic_eval"]
  columns = _table(encoder_dir)["columns"]
  assert columns["step 10"]["loss"] < columns["untrained"]["loss"]
  assert columns["step 10"]["rating_ce"] < columns["untrained"]["rating_ce"]

  # Stage 2 (same data and encoder settings) restores exactly the stage-1 encoder.
  gin.clear_config()
  gin.parse_config_files_and_bindings([str(GIN / "user_llm_smoke.gin")], [])
  stage1 = job_lib.UserEncoderPretraining()
  stage1.setup(None)
  assert checkpointing.restore_trainable(str(encoder_dir), stage1.encoder, nnx.Param) == 10
  method = job_lib.UserLLMMethod(encoder_workdir=str(encoder_dir), data=stage1.data)
  method.setup(str(tmp_path / "llm"))
  restored = dict(nnx.to_flat_state(nnx.state(method.model().user_encoder)))
  for path, value in nnx.to_flat_state(nnx.state(stage1.encoder)):
    np.testing.assert_array_equal(np.asarray(restored[path].get_value()),
                                  np.asarray(value.get_value()))
  empty = job_lib.UserLLMMethod(encoder_workdir=str(tmp_path / "empty"), data=stage1.data)
  with pytest.raises(UserError, match="holds no checkpoint"):
    empty.setup(None)


def test_the_jobs_reject_bad_settings_before_loading_anything():
  with pytest.raises(UserError, match="user_llm.job.method='prompt'"):
    job_lib.UserLLMMethod(decoder=TINY, method="prompt")
  with pytest.raises(UserError, match="user_llm.job.task='genre'"):
    job_lib.UserLLMMethod(decoder=TINY, task="genre")
  with pytest.raises(UserError, match="strategy 'full' or 'lora'"):
    job_lib.UserLLMMethod(decoder=TINY, method="text_prompt", strategy="enc")
  with pytest.raises(UserError, match="batch_size=0"):
    job_lib.UserEncoderPretraining(batch_size=0)
  assert set(model_lib.STRATEGIES) == {"full", "lora", "enc", "proj"}
