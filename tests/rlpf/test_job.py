"""The RLPF method on a tiny random model: the learner trains, checkpoints and resumes; the frozen
predictor / reference stay frozen (one decoder); restore, the held-out table, periodic eval."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax import rl
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.rlpf.job import RLPF
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")
EXAMPLES = [{"user_id": str(i), "history_text": f"1. Movie {i} | genres: Comedy | rating: 4/5",
             "question": "Which movie next?", "options": ["Heat", "Up", "Jaws", "Alien"],
             "answer_index": i % 4, "num_history_items": 1, "domain": "movie-watching"}
            for i in range(6)]


def _method(**overrides):
  settings = dict(decoder=TINY, train_examples=EXAMPLES, eval_examples=EXAMPLES[:2],
                  max_summary_tokens=8, target_length=4, batch_size=2, samples_per_prompt=2, estimator="rloo",
                  lora_rank=4, eval_batch_size=2, learner=rl.LearnerConfig(num_epochs=2))
  settings.update(overrides)
  method = RLPF(**settings)
  method.setup(None)
  return method


def _run(workdir, num_steps):
  return Run(workdir=workdir, config=TrainConfig(
      num_steps=num_steps, warmup_steps=0, learning_rate=1e-2, checkpoint_every=1,
      async_checkpointing=False, log_every=100))


def _params(module, what=nnx.Param):
  return jax.tree.map(np.array, nnx.state(module, what).to_pure_dict())


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_fit_resume_restore_and_frozen_predictor_and_reference(tmp_path):
  workdir = str(tmp_path)
  method = _method()
  assert method.predictor.decoder is method.decoder  # one model: reference = predictor weights
  assert method.rollout_source().reference is method.decoder
  assert method.model().decoder is method.decoder
  frozen_before = _params(method.decoder)

  def interrupt(step, metrics, batch):
    if step == 2:  # the step-1 checkpoint (mid-rollout: 2 updates per rollout) is on disk
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    method.learner(_run(workdir, 3)).train(step_callback=interrupt)
  resumed = _method()
  fit = resumed.fit(_run(workdir, 3))
  assert [h["step"] for h in fit.result.history] == [2, 3]  # resumed after the step-1 checkpoint
  for name in ("reward", "prediction_accuracy", "summary_tokens", "kl_to_reference", "value_loss",
               "ratio_mean", "approx_kl"):
    assert np.isfinite(fit.result.metrics[name]), name
  # The predictor's and the reference's parameters never change (LoRA b stays 0 there) ...
  jax.tree.map(np.testing.assert_array_equal, frozen_before, _params(method.decoder))
  jax.tree.map(np.testing.assert_array_equal, frozen_before, _params(resumed.decoder))
  # ... while the policy's adapters moved.
  adapters = _params(fit.model, nnx.LoRAParam)
  assert max(np.abs(x).max() for x in jax.tree.leaves(adapters)) > 0
  evaluation = resumed.evaluate(fit.model, fit.result.step)
  results = evaluation.results["eval_table"]
  assert set(results) == {"no_context", "full_history", "zero_shot_summary", "rlpf_summary",
                          "truncated_history@zero_shot_summary", "truncated_history@rlpf_summary"}
  assert all(0.0 <= row["accuracy"] <= 1.0 for row in results.values())
  assert all(len(row["correct"]) == 2 and len(row["correct_sum"]) == 2 for row in results.values())
  # The truncated history gets each user's summary token count (never more).
  for name in ("zero_shot_summary", "rlpf_summary"):
    assert all(t <= s for t, s in zip(results[f"truncated_history@{name}"]["token_counts"],
                                      results[name]["token_counts"]))
  assert "mean [95% CI]" in evaluation.tables["eval_table"]
  assert "| rlpf_summary |" in evaluation.tables["eval_table"]
  assert evaluation.metrics["rlpf_summary_accuracy"] == results["rlpf_summary"]["accuracy"]

  # Restore (parameters only) into a fresh policy; the reference keeps its weights.
  restored, step = resumed.restore(Run(workdir=workdir, config=TrainConfig()))
  assert step == 3 and restored.decoder is not resumed.decoder
  jax.tree.map(np.testing.assert_array_equal, _params(fit.model, resumed.trainable_filter()),
               _params(restored, resumed.trainable_filter()))
  jax.tree.map(np.testing.assert_array_equal, frozen_before, _params(resumed.decoder))
  assert resumed.evaluate(restored, step).results == evaluation.results


def test_bad_job_settings():
  with pytest.raises(UserError, match="lora_rank must be >= 0"):
    RLPF(lora_rank=-1)
  with pytest.raises(UserError, match="samples_per_prompt >= 2"):
    RLPF(estimator="grpo", samples_per_prompt=1)
  with pytest.raises(UserError, match="estimator='ppo' is unknown"):
    RLPF(estimator="ppo")
  with pytest.raises(UserError, match="task='netflix' is unknown"):
    RLPF(task="netflix")
  with pytest.raises(UserError, match="length reward never penalizes"):
    RLPF(max_summary_tokens=48, target_length=48)
  with pytest.raises(UserError, match="eval_split='train'"):
    RLPF(eval_split="train")
  with pytest.raises(UserError, match="transfer_tasks"):
    RLPF(transfer_tasks=("netflix",))
  with pytest.raises(UserError, match="exactly one of `pretrained`"):
    DecoderSource(pretrained=None, preset=None)


@pytest.mark.slow
def test_smoke_gin_trains_with_ppo_epochs_and_honours_eval_every(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "persona_jax.main", "--gin_file=gin/rlpf_smoke.gin",
             f"--workdir={workdir}"]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "eval at step 2: " in result.stdout  # TrainConfig.eval_every = 2 honoured
  assert "| rlpf_summary |" in result.stdout
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["method"] == "rlpf" and final["step"] == 4
  assert 0.0 <= final["periodic_eval"]["eval/rlpf_summary_accuracy"] <= 1.0
  assert "clip_fraction" in final["train"] and "ratio_mean" in final["train"]
  table = json.loads((workdir / "eval_table.json").read_text())
  assert {"chance", "popularity", "majority_class", "history_majority", "no_context",
          "full_history", "zero_shot_summary", "rlpf_summary",
          "truncated_history@rlpf_summary"} <= set(table)
  assert (workdir / "eval_table.md").exists()
