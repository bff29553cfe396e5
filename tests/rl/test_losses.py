"""Losses against closed forms; gradient sign and magnitude on a two-action toy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import rl


def test_reductions_by_hand():
  x = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
  mask = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
  assert float(rl.reduce_masked(x, mask, "token_mean")) == pytest.approx(7 / 3)
  assert float(rl.reduce_masked(x, mask, "sequence_sum")) == pytest.approx((3 + 4) / 2)
  assert float(rl.reduce_masked(x, mask, "sequence_mean")) == pytest.approx((1.5 + 4) / 2)
  with pytest.raises(ValueError, match="Unknown reduction"):
    rl.reduce_masked(x, mask, "mean")


def test_policy_gradient_and_ppo_values():
  logprobs = np.log(np.array([[0.5, 0.25]]))
  advantages = np.array([[2.0, -1.0]])
  mask = np.ones((1, 2))
  loss, _ = rl.policy_gradient_loss(logprobs, advantages, mask)
  assert float(loss) == pytest.approx(-(2 * np.log(0.5) - np.log(0.25)) / 2)
  # ratios: 0.5/0.25 = 2 (A>0: clipped to 1.2), 0.25/0.5 = 0.5 (A<0: min(-0.5, -0.8) = -0.8)
  old = np.log(np.array([[0.25, 0.5]]))
  loss, metrics = rl.ppo_clipped_loss(logprobs, advantages, mask, old_logprobs=old, clip_epsilon=0.2)
  assert float(loss) == pytest.approx(-(1.2 * 2.0 + 0.8 * -1.0) / 2)
  assert float(metrics["clip_fraction"]) == pytest.approx(1.0)


def test_kl_estimators_are_exact_in_expectation():
  # Categorical pi, ref: E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly.
  pi = np.array([0.6, 0.3, 0.1])
  ref = np.array([0.2, 0.5, 0.3])
  kl = np.sum(pi * np.log(pi / ref))
  for name in ("k1", "k3"):
    per_action = np.asarray(rl.kl_divergence(np.log(pi)[None], np.log(ref)[None], name))[0]
    assert np.sum(pi * per_action) == pytest.approx(kl, rel=1e-5)
  k3 = np.asarray(rl.kl_divergence(np.log(pi)[None], np.log(ref)[None], "k3"))
  assert (k3 >= 0).all()  # k3 is non-negative per sample; k1 is not
  with pytest.raises(ValueError, match="Unknown KL estimator"):
    rl.kl_divergence(pi, ref, "k2")


def test_value_loss_and_clipping():
  mask = np.ones((1, 2))
  assert float(rl.value_loss([[1.0, 3.0]], [[0.0, 1.0]], mask)) == pytest.approx(0.5 * (1 + 4) / 2)
  # old 0, new 1, clip 0.2 -> clipped 0.2; target 2: max((1-2)^2, (0.2-2)^2) = 3.24
  got = rl.value_loss([[1.0]], [[2.0]], np.ones((1, 1)), old_values=[[0.0]], clip_epsilon=0.2)
  assert float(got) == pytest.approx(0.5 * 3.24)


def test_kl_penalized_rewards():
  got = rl.kl_penalized_rewards([1.0], [[-1.0, -2.0, -9.0]], [[-1.5, -1.0, 0.0]],
                                [[1.0, 1.0, 0.0]], 0.1)
  np.testing.assert_allclose(got, [1.0 - 0.1 * (0.5 - 1.0)])


def _two_action_grad(loss_name, action, advantage, logits, old_logits=None):
  def loss(logits):
    logp = jax.nn.log_softmax(logits)[action][None, None]
    old = (jax.nn.log_softmax(old_logits)[action][None, None] if old_logits is not None
           else jax.lax.stop_gradient(logp))
    value, _ = rl.POLICY_LOSSES[loss_name](logp, jnp.array([[advantage]]), jnp.ones((1, 1)),
                                            old_logprobs=old, clip_epsilon=0.2)
    return value
  return np.asarray(jax.grad(loss)(jnp.asarray(logits, jnp.float32)))


@pytest.mark.parametrize("loss_name", ["policy_gradient", "ppo"])
def test_two_action_gradient_sign_and_magnitude(loss_name):
  logits = np.array([0.3, -0.2])
  p = np.exp(logits) / np.exp(logits).sum()
  for action, advantage in [(0, 1.5), (0, -1.5), (1, 0.7)]:
    grad = _two_action_grad(loss_name, action, advantage, logits)
    # d(-A log p_a)/d logits = -A (onehot(a) - p): a descent step raises p_a iff A > 0.
    expected = -advantage * (np.eye(2)[action] - p)
    np.testing.assert_allclose(grad, expected, rtol=1e-5)
    stepped = logits - 0.1 * grad
    new_p = np.exp(stepped[action]) / np.exp(stepped).sum()
    assert (new_p > p[action]) == (advantage > 0)


def test_ppo_gradient_vanishes_outside_the_clip():
  # p_new(0) = 0.731, p_old(0) = 0.269: ratio 2.7 > 1.2 with A > 0, the clipped term is flat.
  grad = _two_action_grad("ppo", 0, 1.0, np.array([1.0, 0.0]), old_logits=np.array([-1.0, 0.0]))
  np.testing.assert_allclose(grad, 0.0, atol=1e-7)
  # Inside the clip (same policy) the gradient is the policy gradient's.
  grad = _two_action_grad("ppo", 0, 1.0, np.array([1.0, 0.0]), old_logits=np.array([1.0, 0.0]))
  assert grad[0] < 0 < grad[1]
