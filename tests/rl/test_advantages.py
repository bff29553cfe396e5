"""Advantage estimators against closed forms computed by hand."""

import numpy as np
import pytest

from persona_jax import rl


def test_reinforce_subtracts_the_baseline():
  np.testing.assert_allclose(rl.reinforce_advantages([1.0, 0.0, 0.5], [0.25, 0.5, 0.5]),
                             [0.75, -0.5, 0.0])
  np.testing.assert_allclose(rl.reinforce_advantages([1.0, 0.0]), [1.0, 0.0])


def test_rloo_leave_one_out_by_hand():
  # group 1: [1, 2, 6]: 1-(2+6)/2=-3, 2-(1+6)/2=-1.5, 6-(1+2)/2=4.5 ; group 2: [0, 0, 3]: -1.5, -1.5, 3
  got = rl.rloo_advantages(np.array([1, 2, 6, 0, 0, 3], np.float32), group_size=3)
  np.testing.assert_allclose(got, [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_grpo_group_normalized_by_hand():
  # group [1, 3]: mean 2, unbiased std sqrt(2); group [5, 5, ...] would be 0/eps.
  got = rl.grpo_advantages(np.array([1.0, 3.0, 4.0, 4.0]), group_size=2, epsilon=0.0 + 1e-8)
  np.testing.assert_allclose(got, [-1 / np.sqrt(2), 1 / np.sqrt(2), 0.0, 0.0], atol=1e-6)


def test_registry_and_bad_groups():
  np.testing.assert_allclose(rl.sequence_advantages("rloo", [1.0, 0.0], None, 2), [1.0, -1.0])
  with pytest.raises(ValueError, match="Unknown advantage estimator 'ppo'"):
    rl.sequence_advantages("ppo", [1.0], None, 1)
  with pytest.raises(ValueError, match="group_size >= 2"):
    rl.rloo_advantages([1.0, 2.0], group_size=1)
  with pytest.raises(ValueError, match="not a multiple"):
    rl.grpo_advantages([1.0, 2.0, 3.0], group_size=2)


def test_gae_two_steps_by_hand():
  gamma, lam = 0.9, 0.8
  rewards = np.array([[1.0, 2.0]])
  values = np.array([[0.5, 1.5]])
  # delta_1 = 2 - 1.5 = 0.5 ; delta_0 = 1 + 0.9*1.5 - 0.5 = 1.85 ; A_0 = 1.85 + 0.72*0.5 = 2.21
  advantages, returns = rl.gae_advantages(rewards, values, np.ones((1, 2)), gamma=gamma, lam=lam)
  np.testing.assert_allclose(advantages, [[2.21, 0.5]], rtol=1e-6)
  np.testing.assert_allclose(returns, [[2.71, 2.0]], rtol=1e-6)


def test_gae_skips_masked_steps_and_stops_at_padding():
  # Acting steps 0 and 2 (step 1 is a user's turn, step 3 padding). lam=1, gamma=0.5:
  # A_2 = r_2 - V_2 = 4 - 1 = 3 ; A_0 = r_0 + 0.5*V_2 - V_0 + 0.5*A_2 = 1 + 0.5 - 2 + 1.5 = 1.0
  rewards = np.array([[1.0, 100.0, 4.0, 100.0]])
  values = np.array([[2.0, 100.0, 1.0, 100.0]])
  mask = np.array([[1.0, 0.0, 1.0, 0.0]])
  advantages, returns = rl.gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
  np.testing.assert_allclose(advantages, [[1.0, 0.0, 3.0, 0.0]])
  np.testing.assert_allclose(returns, [[3.0, 0.0, 4.0, 0.0]])


def test_gae_lambda_one_is_monte_carlo_minus_value_and_bootstrap():
  rewards = np.array([[0.0, 0.0, 1.0]])
  mask = np.ones((1, 3))
  np.testing.assert_allclose(rl.discounted_returns(rewards, mask, gamma=0.5), [[0.25, 0.5, 1.0]])
  advantages, _ = rl.gae_advantages(rewards, np.zeros((1, 3)), mask, gamma=1.0, lam=0.0,
                                    last_values=np.array([2.0]))
  np.testing.assert_allclose(advantages, [[0.0, 0.0, 3.0]])
  with pytest.raises(ValueError, match="must all be"):
    rl.gae_advantages(rewards, np.zeros((1, 2)), mask)
