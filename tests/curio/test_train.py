"""The RL batch layout, the user model's training, and the smoke job end to end."""

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import pytest

from persona_jax import rl
from persona_jax.curio import tasks
from persona_jax.curio import eval as eval_lib
from persona_jax.curio import train as train_lib
from persona_jax.train.trainer import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _job(**overrides):
  settings = dict(model="tiny_llama", pretrained=None, batch_size=16, user_model_dialogues=256,
                  user_model_steps=60, user_model_learning_rate=1e-2, imitation_dialogues=16,
                  imitation_steps=1, eval_users=16,
                  train_config=TrainConfig(num_steps=1, checkpoint_every=0, log_every=100))
  settings.update(overrides)
  return train_lib.build_job(None, **settings)


@pytest.fixture(scope="module")
def job():
  job = _job()
  job.user_model_trainer.train(job.user_model_data)
  return job


def test_user_model_learns_the_type_from_the_users_answers(job):
  population = job.population
  full_info = tasks.scripted_dialogues(job.domain, population, count=64, turn_cap=8,
                                       random_ask_prob=0.0, seed=5)
  batch = tasks.user_model_batch(job.vocab, job.domain, full_info, num_turns=8)
  untrained = train_lib.UserModel(job.vocab.vocab_size, job.domain.num_types, seed=0)
  trained_beliefs = np.asarray(job.user_model().beliefs(batch["features"]))
  untrained_beliefs = np.asarray(untrained.beliefs(batch["features"]))
  rows = np.arange(64)
  final_trained = trained_beliefs[rows, -1, batch["user_type"]]
  final_untrained = untrained_beliefs[rows, -1, batch["user_type"]]
  # After all five decisive answers the trained model puts far more mass on the true type.
  assert final_trained.mean() > final_untrained.mean() + 0.2
  accuracy = (trained_beliefs[:, -1].argmax(-1) == batch["user_type"]).mean()
  assert accuracy > (untrained_beliefs[:, -1].argmax(-1) == batch["user_type"]).mean() + 0.2


def test_rollout_batch_layout_logprobs_and_advantages(job):
  policy = job.imitation_trainer.model()
  profiles = job.population.sample_many(0, "train", 16)
  dialogues = eval_lib.play_dialogues(policy.decoder, job.fmt, job.domain, job.user, profiles,
                                      turn_cap=8, max_utterance_tokens=3, temperature=1.0,
                                      rng=jax.random.key(0))
  # Scripted successes make sure the batch holds both outcomes.
  dialogues += tasks.scripted_dialogues(job.domain, job.population, count=2, turn_cap=8,
                                        random_ask_prob=0.0, seed=0)
  for d in dialogues[-2:]:
    d.agent_ids = [job.fmt.encode(u) + [job.fmt.stop_id] for u, _ in d.turns]
    d.agent_logprobs = [[0.0] * len(ids) for ids in d.agent_ids]
  settings = dataclasses.replace(job.settings, reward="none")
  batch = train_lib.dialogue_batch(settings, job.fmt, job.domain, job.user_model(), job.vocab,
                                   dialogues, policy, policy.decoder)
  mask = batch["response_mask"]
  assert mask.sum() == sum(len(ids) for d in dialogues for ids in d.agent_ids)
  # The sampler's log-probs equal teacher-forced scoring of the whole dialogue (sampled rows).
  scored, _ = rl.score(policy.decoder, batch["tokens"], batch["input_mask"], mask.shape[1])
  np.testing.assert_allclose(batch["sampling_logprobs"][:16] * mask[:16], scored[:16] * mask[:16],
                             atol=2e-4)
  np.testing.assert_allclose(batch["reference_logprobs"], scored * mask, atol=1e-6)
  # Extrinsic only, gamma 1, value head 0: every agent token's advantage is the dialogue's outcome.
  success = np.array([d.success for d in dialogues], np.float32)
  assert success[-2:].all()
  np.testing.assert_allclose(batch["advantages"], success[:, None] * mask, atol=1e-6)
  assert batch["value_mask"].sum() == sum(len(d.turns) for d in dialogues)

  # DiffLogAcc with gamma 1 telescopes to log b_T(u*) - log b_0(u*) per dialogue.
  curious = dataclasses.replace(job.settings, reward="diff_log_acc", gamma=1.0)
  batch = train_lib.dialogue_batch(curious, job.fmt, job.domain, job.user_model(), job.vocab,
                                   dialogues, policy, policy.decoder)
  beliefs = eval_lib.dialogue_beliefs(job.user_model(), job.vocab, dialogues, 8)
  types = np.array([job.domain.type_index(d.profile.user_type) for d in dialogues])
  ends = np.array([len(d.turns) for d in dialogues])
  rows = np.arange(len(dialogues))
  expected = np.log(beliefs[rows, ends, types]) - np.log(beliefs[rows, 0, types])
  np.testing.assert_allclose(batch["metric/intrinsic_return"], expected, rtol=1e-4, atol=1e-5)


def test_bad_job_settings_name_the_field():
  with pytest.raises(ValueError, match="curio.job.reward='curious'"):
    train_lib.build_job(None, model="tiny_llama", pretrained=None, reward="curious")
  with pytest.raises(ValueError, match="curio.job.estimator"):
    train_lib.build_job(None, model="tiny_llama", pretrained=None, estimator="ppo")
  with pytest.raises(ValueError, match="unknown domain 'cooking'"):
    train_lib.build_job(None, model="tiny_llama", pretrained=None, domain="cooking")


@pytest.mark.slow
def test_smoke_job_trains_checkpoints_and_restores(tmp_path):
  from persona_jax import main as main_lib

  workdir = str(tmp_path / "run")
  gin.clear_config()
  main_lib.import_job_modules()
  gin.parse_config_file(os.path.join(REPO, "gin", "curio_smoke.gin"))
  try:
    results = train_lib.train(workdir)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      summary = json.load(f)
    assert summary["step"] == 3 and set(summary["after_rl"]) >= {"success_rate", "turns_to_identify"}
    for stage in ("user_model", "imitation"):
      assert os.path.isdir(os.path.join(workdir, stage, "checkpoints"))
    # A fresh job restores the RL stage's trained policy (what export does).
    job = train_lib.build_job(workdir)
    assert job.trainer.restore() == {"count": 3}
    trained = results["history"]
    assert len(trained) == 3
    restored = job.trainer.model()
    assert job.evaluate(restored) == results["after_rl"]
  finally:
    gin.clear_config()
