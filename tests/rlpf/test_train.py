"""The RLPF job on a tiny random model: trains, checkpoints and resumes; frozen parts stay frozen."""

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax.rlpf import train as rlpf_train
from persona_jax.train import TrainConfig

EXAMPLES = [{"user_id": str(i), "history_text": f"1. Movie {i} | genres: Comedy | rating: 4/5",
             "question": "Which movie next?", "options": ["Heat", "Up", "Jaws", "Alien"],
             "answer_index": i % 4, "num_history_items": 1, "domain": "movie-watching"}
            for i in range(6)]


def _job(workdir, num_steps, **overrides):
  settings = dict(pretrained=None, model="tiny_llama", vocabulary="bytes", train_examples=EXAMPLES,
                  eval_examples=EXAMPLES[:2], max_summary_tokens=8, batch_size=2,
                  samples_per_prompt=2, estimator="rloo", lora_rank=4,
                  train_config=TrainConfig(num_steps=num_steps, warmup_steps=0, learning_rate=1e-2,
                                           checkpoint_every=1, async_checkpointing=False,
                                           log_every=100))
  settings.update(overrides)
  return rlpf_train.build_job(workdir, **settings)


def _params(module):
  return jax.tree.map(np.array, nnx.state(module, nnx.Param).to_pure_dict())


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_train_resume_and_frozen_predictor_and_reference(tmp_path):
  job = _job(str(tmp_path), num_steps=3)
  assert job.predictor.decoder is job.reference  # one model: reference policy = predictor weights
  frozen_before = _params(job.reference)

  def interrupt(step, metrics, batch):
    if step == 3:
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    job.trainer.train(job.batches, step_callback=interrupt)
  history = []
  resumed = _job(str(tmp_path), num_steps=3)
  result = resumed.trainer.train(resumed.batches,
                                 step_callback=lambda step, m, b: history.append(step))
  assert history == [3]  # resumed after the step-2 checkpoint
  assert resumed.batches.get_state() == {"examples": {"position": 6}, "count": 3}
  for name in ("reward", "prediction_accuracy", "summary_tokens", "kl_to_reference", "value_loss"):
    assert np.isfinite(result.metrics[name]), name
  # The predictor's and the reference's parameters never change (LoRA b stays 0 there) ...
  jax.tree.map(np.testing.assert_array_equal, frozen_before, _params(job.reference))
  # ... while the policy's adapters moved.
  adapters = nnx.state(resumed.trainer.model(), nnx.LoRAParam).to_pure_dict()
  assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(adapters)) > 0
  results = rlpf_train.evaluate(resumed)
  assert set(results) == {"full_history", "zero_shot_summary", "rlpf_summary"}
  assert all(0.0 <= row["accuracy"] <= 1.0 for row in results.values())
  table = rlpf_train.write_table(str(tmp_path), results, "tiny")
  assert "| rlpf_summary |" in table and (tmp_path / "eval_table.json").exists()


def test_bad_job_settings():
  with pytest.raises(ValueError, match="exactly one of `pretrained`"):
    rlpf_train.build_job(None, pretrained=None, model=None)
  with pytest.raises(ValueError, match="lora_rank must be >= 0"):
    _job(None, 1, lora_rank=-1)
  with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
    _job(None, 1, estimator="grpo", samples_per_prompt=1)
