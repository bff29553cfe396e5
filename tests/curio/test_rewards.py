"""Intrinsic rewards on hand-made belief sequences, and the shaping identity."""

import math

import numpy as np
import pytest

from persona_jax.curio import rewards

# Three beliefs over 4 types, true type 0: uniform, then leaning to 0, then almost sure.
BELIEFS = np.array([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125], [0.9, 0.05, 0.03, 0.02]])
H0 = math.log(4)
H1 = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25) + 2 * 0.125 * math.log(0.125))
H2 = -(0.9 * math.log(0.9) + 0.05 * math.log(0.05) + 0.03 * math.log(0.03) + 0.02 * math.log(0.02))


@pytest.mark.parametrize("name,gamma,expected", [
    ("diff_acc", 1.0, [0.25, 0.4]),
    ("diff_acc", 0.9, [0.9 * 0.5 - 0.25, 0.9 * 0.9 - 0.5]),
    ("diff_log_acc", 1.0, [math.log(2), math.log(0.9 / 0.5)]),
    ("diff_log_acc", 0.5, [0.5 * math.log(0.5) - math.log(0.25), 0.5 * math.log(0.9) - math.log(0.5)]),
    ("diff_ent", 1.0, [H0 - H1, H1 - H2]),
    ("acc", 0.9, [0.5, 0.9]),
    ("ent", 0.9, [-H1, -H2]),
    ("info_gain", 1.0, [0.5 * math.log(2) + 0.25 * 0 + 2 * 0.125 * math.log(0.5),
                        0.9 * math.log(1.8) + 0.05 * math.log(0.2) + 0.03 * math.log(0.24)
                        + 0.02 * math.log(0.16)]),
])
def test_each_intrinsic_reward_on_a_hand_made_belief_sequence(name, gamma, expected):
  np.testing.assert_allclose(rewards.intrinsic_rewards(name, BELIEFS, 0, gamma), expected, rtol=1e-9)


def test_batched_rewards_use_each_rows_true_type():
  batch = np.stack([BELIEFS, BELIEFS[:, ::-1]])
  out = rewards.intrinsic_rewards("diff_acc", batch, np.array([0, 3]))
  np.testing.assert_allclose(out, [[0.25, 0.4], [0.25, 0.4]])


@pytest.mark.parametrize("name", ["diff_acc", "diff_log_acc", "diff_ent"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_potential_based_shaping_telescopes(name, gamma):
  rng = np.random.default_rng(0)
  beliefs = rng.dirichlet(np.ones(8), size=7)  # T = 6 turns
  r = rewards.intrinsic_rewards(name, beliefs, 5, gamma)
  phi = rewards.POTENTIALS[name](beliefs, 5)
  discounted = sum(gamma ** t * r[t] for t in range(6))
  np.testing.assert_allclose(discounted, gamma ** 6 * phi[-1] - phi[0], rtol=1e-9)


def test_unknown_reward_and_extrinsic_reward():
  with pytest.raises(ValueError, match="unknown intrinsic reward 'curious'"):
    rewards.intrinsic_rewards("curious", BELIEFS, 0)
  np.testing.assert_array_equal(rewards.extrinsic_rewards(3, True, length=5), [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(rewards.extrinsic_rewards(3, False), [0, 0, 0])
