"""The CURIO method: the user model learns, the RL batch layout, the rollout source, bad settings,
and the smoke config end to end (periodic eval, stage checkpoints, restore)."""

import dataclasses
import json
import os

import gin
import jax
import numpy as np
import pytest

from persona_jax import rl
from persona_jax.curio import eval as eval_lib
from persona_jax.curio import job as job_lib
from persona_jax.curio import tasks
from persona_jax.curio.model import UserModel
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="words")
CONFIG = TrainConfig(num_steps=1, checkpoint_every=0, log_every=100, async_checkpointing=False)


def _method(**overrides):
  settings = dict(decoder=TINY, batch_size=16, user_model_dialogues=256, user_model_steps=60,
                  user_model_learning_rate=1e-2, imitation_dialogues=16, imitation_steps=1,
                  eval_users=16)
  settings.update(overrides)
  method = job_lib.Curio(**settings)
  method.setup(None)
  return method


@pytest.fixture(scope="module")
def method():
  method = _method()
  method.train_user_model(Run(workdir=None, config=CONFIG))
  return method


def test_user_model_learns_the_type_from_the_users_answers(method):
  full_info = tasks.scripted_dialogues(method.domain, method.population, count=64, turn_cap=8,
                                       random_ask_prob=0.0, seed=5)
  batch = tasks.user_model_batch(method.vocab, method.domain, full_info, num_turns=8)
  untrained = UserModel(method.vocab.vocab_size, method.domain.num_types, seed=0)
  trained_beliefs = np.asarray(method.trained_user_model.beliefs(batch["features"]))
  untrained_beliefs = np.asarray(untrained.beliefs(batch["features"]))
  rows = np.arange(64)
  final_trained = trained_beliefs[rows, -1, batch["user_type"]]
  final_untrained = untrained_beliefs[rows, -1, batch["user_type"]]
  # After all five decisive answers the trained model puts far more mass on the true type.
  assert final_trained.mean() > final_untrained.mean() + 0.2
  accuracy = (trained_beliefs[:, -1].argmax(-1) == batch["user_type"]).mean()
  assert accuracy > (untrained_beliefs[:, -1].argmax(-1) == batch["user_type"]).mean() + 0.2


def test_rollout_batch_layout_logprobs_and_advantages(method):
  policy = method.policy
  profiles = method.population.sample_many(0, "train", 16)
  dialogues = eval_lib.play_dialogues(policy.decoder, method.fmt, method.domain, method.user,
                                      profiles, turn_cap=8, max_utterance_tokens=3,
                                      temperature=1.0, rng=jax.random.key(0))
  # Scripted successes make sure the batch holds both outcomes.
  dialogues += tasks.scripted_dialogues(method.domain, method.population, count=2, turn_cap=8,
                                        random_ask_prob=0.0, seed=0)
  for d in dialogues[-2:]:
    d.agent_ids = [method.fmt.encode(u) + [method.fmt.stop_id] for u, _ in d.turns]
    d.agent_logprobs = [[0.0] * len(ids) for ids in d.agent_ids]
  user_model = method.trained_user_model
  settings = dataclasses.replace(method.settings, reward="none")
  batch = job_lib.dialogue_batch(settings, method.fmt, method.domain, user_model, method.vocab,
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
  np.testing.assert_allclose(batch["metric/success"], success)

  # DiffLogAcc with gamma 1: shaped (phi = 0 at the end) it sums to -log b_0(u*) per dialogue; the
  # paper's form telescopes to log b_T(u*) - log b_0(u*).
  beliefs = eval_lib.dialogue_beliefs(user_model, method.vocab, dialogues, 8)
  types = np.array([method.domain.type_index(d.profile.user_type) for d in dialogues])
  ends = np.array([len(d.turns) for d in dialogues])
  rows = np.arange(len(dialogues))
  for reward, expected in (
      ("diff_log_acc", -np.log(beliefs[rows, 0, types])),
      ("diff_log_acc_paper", np.log(beliefs[rows, ends, types]) - np.log(beliefs[rows, 0, types]))):
    curious = dataclasses.replace(method.settings, reward=reward, gamma=1.0)
    batch = job_lib.dialogue_batch(curious, method.fmt, method.domain, user_model, method.vocab,
                                   dialogues, policy, policy.decoder)
    np.testing.assert_allclose(batch["metric/intrinsic_return"], expected, rtol=1e-4, atol=1e-5)


def test_dialogue_rollouts_is_a_resumable_rollout_source(method):
  source = method.rollouts(method.policy.decoder)
  first = source(method.policy, jax.random.key(3))
  assert source.get_state() == {"count": 1}
  again = method.rollouts(method.policy.decoder)
  again.set_state({"count": 0})
  repeat = again(method.policy, jax.random.key(3))
  for name in first:
    np.testing.assert_array_equal(first[name], repeat[name], err_msg=name)
  second = source(method.policy, jax.random.key(3))  # next users, same key
  assert not np.array_equal(first["tokens"], second["tokens"])


def test_bad_job_settings_name_the_field():
  with pytest.raises(UserError, match="curio.job.reward='curious'"):
    job_lib.Curio(decoder=TINY, reward="curious")
  with pytest.raises(UserError, match="curio.job.estimator"):
    job_lib.Curio(decoder=TINY, estimator="ppo")
  with pytest.raises(UserError, match="unknown domain 'cooking'"):
    job_lib.Curio(decoder=TINY, domain="cooking")
  with pytest.raises(UserError, match="curio.job.simulated_user"):
    job_lib.Curio(decoder=TINY, simulated_user="robot")
  with pytest.raises(UserError, match="DecoderSource.vocabulary = 'words'"):
    job_lib.Curio(decoder=dataclasses.replace(TINY, vocabulary="bytes")).setup(None)
  with pytest.raises(UserError, match="needs a pretrained decoder"):
    job_lib.Curio(decoder=TINY, simulated_user="llm").setup(None)


def _parse_smoke(*bindings):
  from persona_jax import main as main_lib

  gin.clear_config()
  main_lib.import_job_modules()
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin", "curio_smoke.gin")], bindings)


@pytest.mark.slow
def test_smoke_job_evaluates_periodically_checkpoints_and_restores(tmp_path, capsys):
  from persona_jax.train import jobs

  workdir = str(tmp_path / "run")
  try:
    _parse_smoke()
    summary = jobs.run(workdir)
    # TrainConfig.eval_every = 2 of 3 RL updates: held-out dialogues at update 2, then the final.
    assert "eval at step 2" in capsys.readouterr().out
    assert set(summary["periodic_eval"]) >= {"eval/success_rate", "eval/turns_to_identify"}
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      final = json.load(f)
    assert final["step"] == 3 and set(final["eval"]) >= {"success_rate", "turns_to_identify"}
    with open(os.path.join(workdir, "eval_table.md")) as f:
      table = f.read()
    assert "warm start (before RL)" in table and "after RL (step 3)" in table
    for stage in ("user_model", "imitation"):
      assert os.path.isdir(os.path.join(workdir, stage, "checkpoints"))
    # A fresh method restores the RL policy, the user model and the warm start: same numbers.
    _parse_smoke("run.job = @evaluate")
    restored = jobs.run(workdir)
    assert restored["step"] == 3 and restored["eval"] == summary["eval"]
    assert os.path.isfile(os.path.join(workdir, "eval_table_restored.md"))
    # Rerunning the finished training resumes every stage and trains nothing more.
    _parse_smoke()
    again = jobs.run(workdir)
    assert again["step"] == 3 and again["eval"] == summary["eval"]
  finally:
    gin.clear_config()
