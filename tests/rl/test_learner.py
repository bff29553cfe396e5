"""`rl.Learner`: several epochs of minibatch updates per rollout, PPO's ratio and clip acting, resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import rl
from persona_jax.train import TrainConfig, Trainer


def test_ppo_second_epoch_moves_the_ratio_and_clips(toy):
  # 2 epochs over each rollout, one minibatch: updates 1, 3 see a fresh rollout, 2, 4 the same again.
  _, _, learner = toy.job(num_steps=4, learning_rate=1e-2, learner=rl.LearnerConfig(num_epochs=2),
                       policy_loss="ppo", clip_epsilon=0.2)
  seen = []
  history = learner.train(step_callback=lambda step, m, batch: seen.append(batch["tokens"])).history
  assert learner.rollouts == 2 and learner.position == 2
  np.testing.assert_array_equal(seen[0], seen[1])  # epoch 2 = the same rollout
  assert not np.array_equal(seen[1], seen[2])  # then a new one
  for fresh in (history[0], history[2]):  # first update on a rollout: the policy sampled it
    assert fresh["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert fresh["approx_kl"] == pytest.approx(0.0, abs=1e-5)
    assert fresh["clip_fraction"] == 0.0
  second = history[1]
  assert abs(second["ratio_mean"] - 1.0) > 1e-3, second
  assert second["clip_fraction"] > 0.0 and second["approx_kl"] > 1e-4, second


def test_minibatches_partition_each_epoch_and_reshuffle(toy):
  _, _, learner = toy.job(num_steps=4, learner=rl.LearnerConfig(num_epochs=2, num_minibatches=2,
                                                             seed=3))
  seen = []
  learner.train(step_callback=lambda step, m, batch: seen.append(batch))
  rollout = learner.batch
  rows = lambda batch: sorted(map(tuple, np.concatenate(
      [batch["tokens"], batch["advantages"]], axis=1).tolist()))
  assert all(b["tokens"].shape[0] == 4 for b in seen)
  for epoch in (0, 1):  # each epoch's two minibatches are the rollout's 8 rows, once each
    both = {k: np.concatenate([seen[2 * epoch][k], seen[2 * epoch + 1][k]]) for k in rollout}
    assert rows(both) == rows(rollout)
  assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(seen[:2], seen[2:]))


def test_learner_state_is_json_and_settings_are_checked(toy):
  _, _, learner = toy.job(num_steps=1, learner=rl.LearnerConfig(num_minibatches=3))
  with pytest.raises(ValueError, match="8 rows cannot be split into rl.learner.num_minibatches=3"):
    next(learner)
  with pytest.raises(ValueError, match="rl.learner.num_epochs=0"):
    rl.LearnerConfig(num_epochs=0)
  _, _, learner = toy.job(num_steps=1, learner=rl.LearnerConfig(num_epochs=2))
  next(learner)
  state = json.loads(json.dumps(learner.get_state()))
  assert state["rollouts"] == 1 and state["position"] == 1
  restored = toy.job(num_steps=1, learner=rl.LearnerConfig(num_epochs=2))[2]
  restored.set_state(state)
  for name, value in learner.batch.items():
    np.testing.assert_array_equal(restored.batch[name], value)
    assert restored.batch[name].dtype == value.dtype


def test_rollouts_use_the_compute_dtype(toy):
  trainer = Trainer(rl.PolicyWithValue(toy.decoder()), rl.make_loss_fn(),
                    TrainConfig(num_steps=1, compute_dtype="bfloat16"))
  policy = rl.current_policy(trainer)
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(policy, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  # The trainer's own fp32 master copy is untouched.
  assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {jnp.dtype(jnp.float32)}


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_resume_mid_rollout_equals_an_uninterrupted_run(toy, tmp_path):
  # 4 updates per rollout; the run is cut after the step-2 checkpoint, in the middle of rollout 1.
  config = rl.LearnerConfig(num_epochs=2, num_minibatches=2)
  settings = dict(num_steps=6, checkpoint_every=1, learner=config, policy_loss="ppo")
  _, straight, learner = toy.job(str(tmp_path / "straight"), **settings)
  learner.train()

  def stop(step, metrics, batch):
    if step == 3:  # the checkpoint of step 2 is on disk; step 3's update is lost
      raise _Interrupt()

  _, _, first = toy.job(str(tmp_path / "resumed"), **settings)
  with pytest.raises(_Interrupt):
    first.train(step_callback=stop)
  _, second, resumed = toy.job(str(tmp_path / "resumed"), **settings)
  result = resumed.train()
  assert result.history[0]["step"] == 3  # resumed, not restarted
  assert resumed.get_state()["rollouts"] == 2 and resumed.position == 2
  assert resumed.get_state()["source"] == learner.get_state()["source"]
  jax.tree.map(np.testing.assert_array_equal, straight.state.params, second.state.params)
