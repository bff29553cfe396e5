"""Intrinsic rewards on hand-made belief sequences, and the shaping identity (Ng et al. 1999): with
phi = 0 at termination, the shaped returns of any two complete dialogues with the same user differ
exactly by their extrinsic returns."""

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
    # Terminal zeroing (the default): the last turn pays -phi(b_{T-1}); the sum is -phi(b_0).
    ("diff_acc", 1.0, [0.25, -0.5]),
    ("diff_acc", 0.9, [0.9 * 0.5 - 0.25, -0.5]),
    ("diff_log_acc", 1.0, [math.log(2), -math.log(0.5)]),
    ("diff_log_acc", 0.5, [0.5 * math.log(0.5) - math.log(0.25), -math.log(0.5)]),
    ("diff_ent", 1.0, [H0 - H1, H1]),
    # The paper's form: every difference kept.
    ("diff_acc_paper", 1.0, [0.25, 0.4]),
    ("diff_acc_paper", 0.9, [0.9 * 0.5 - 0.25, 0.9 * 0.9 - 0.5]),
    ("diff_log_acc_paper", 1.0, [math.log(2), math.log(0.9 / 0.5)]),
    ("diff_log_acc_paper", 0.5, [0.5 * math.log(0.5) - math.log(0.25),
                                 0.5 * math.log(0.9) - math.log(0.5)]),
    ("diff_ent_paper", 1.0, [H0 - H1, H1 - H2]),
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
  out = rewards.intrinsic_rewards("diff_acc_paper", batch, np.array([0, 3]))
  np.testing.assert_allclose(out, [[0.25, 0.4], [0.25, 0.4]])


@pytest.mark.parametrize("name", ["diff_acc", "diff_log_acc", "diff_ent"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_paper_form_telescopes_to_the_final_potential(name, gamma):
  rng = np.random.default_rng(0)
  beliefs = rng.dirichlet(np.ones(8), size=7)  # T = 6 turns
  r = rewards.intrinsic_rewards(name + "_paper", beliefs, 5, gamma)
  phi = rewards.POTENTIALS[name](beliefs, 5)
  discounted = sum(gamma ** t * r[t] for t in range(6))
  np.testing.assert_allclose(discounted, gamma ** 6 * phi[-1] - phi[0], rtol=1e-9)


def _random_dialogue(rng, prior, cap, num_types):
  """(beliefs [cap + 1, K] starting at `prior`, rows after the end repeating the last, turns n)."""
  n = int(rng.integers(1, cap + 1))
  beliefs = np.empty((cap + 1, num_types))
  beliefs[0] = prior
  beliefs[1:n + 1] = rng.dirichlet(rng.uniform(0.05, 2.0, num_types), size=n)
  beliefs[n + 1:] = beliefs[n]
  return beliefs, n


def _discounted(rewards_row, gamma):
  return float(np.sum(rewards_row * gamma ** np.arange(len(rewards_row))))


@pytest.mark.parametrize("name", ["diff_acc", "diff_log_acc", "diff_ent"])
def test_shaped_returns_differ_exactly_by_the_extrinsic_returns(name):
  """Property over 200 random pairs of complete dialogues with one user (same u*, same b_0), random
  lengths, outcomes, discounts and coefficients: total return difference = extrinsic difference, and
  each dialogue's intrinsic return is the constant -phi(b_0)."""
  rng = np.random.default_rng(1)
  for _ in range(200):
    num_types, cap = int(rng.integers(2, 9)), int(rng.integers(1, 9))
    gamma, coefficient = float(rng.choice([1.0, rng.uniform(0.5, 1.0)])), float(rng.uniform(0.1, 3))
    user = int(rng.integers(num_types))
    prior = rng.dirichlet(np.ones(num_types))
    pair = [_random_dialogue(rng, prior, cap, num_types) for _ in range(2)]
    beliefs = np.stack([b for b, _ in pair])
    turns = np.array([n for _, n in pair])
    total, extrinsic, intrinsic = rewards.turn_rewards(
        name, beliefs, np.array([user, user]), turns, rng.random(2) < 0.5, turn_cap=cap,
        gamma=gamma, intrinsic_coefficient=coefficient)
    returns = [_discounted(row, gamma) for row in total]
    extrinsic_returns = [_discounted(row, gamma) for row in extrinsic]
    np.testing.assert_allclose(returns[0] - returns[1], extrinsic_returns[0] - extrinsic_returns[1],
                               atol=1e-9)
    phi0 = rewards.POTENTIALS[name](prior[None], user)[0]
    for row in intrinsic:
      np.testing.assert_allclose(_discounted(row, gamma), -phi0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["diff_acc", "diff_log_acc", "diff_ent"])
def test_the_paper_form_pays_for_a_confident_user_model(name):
  """The identity above fails for the paper's form: two failed dialogues, one that leaves the user
  model sure of the true type and one that leaves it at the prior, get different returns."""
  prior = np.full(4, 0.25)
  sure = np.array([0.97, 0.01, 0.01, 0.01])
  beliefs = np.stack([np.stack([prior, prior, sure, sure]), np.stack([prior] * 4)])
  turns, failed = np.array([3, 3]), np.array([False, False])
  for variant, gap in ((name, 0.0), (name + "_paper", None)):
    total, _, _ = rewards.turn_rewards(variant, beliefs, np.array([0, 0]), turns, failed, turn_cap=3)
    difference = total[0].sum() - total[1].sum()
    if gap is not None:
      np.testing.assert_allclose(difference, gap, atol=1e-12)
    else:
      phi = rewards.POTENTIALS[name]
      np.testing.assert_allclose(difference, phi(sure[None], 0)[0] - phi(prior[None], 0)[0])
      assert difference > 0.5


def test_an_informative_three_turn_dialogue_under_the_paper_diff_log_acc():
  """The issue's figure: a 3-turn dialogue that takes b(u*) from 1/8 to 0.95 earns
  log(0.95 * 8) = 2.03 under the paper's DiffLogAcc (twice the task reward of 1), 0 when shaped."""
  b = np.array([[1 / 8] * 8, [0.3] + [0.1] * 7, [0.6] + [0.4 / 7] * 7, [0.95] + [0.05 / 7] * 7])
  paper = rewards.intrinsic_rewards("diff_log_acc_paper", b, 0).sum()
  shaped = rewards.intrinsic_rewards("diff_log_acc", b, 0).sum()
  np.testing.assert_allclose(paper, math.log(0.95 * 8))
  np.testing.assert_allclose(shaped, -math.log(1 / 8))  # = -phi(b_0), the same for every dialogue
  assert round(paper, 2) == 2.03


def test_terminal_zeroing_uses_each_dialogues_own_end():
  """A dialogue that ended at turn 1 of 3 gets -phi(b_0) at turn 0 and nothing after."""
  out = rewards.intrinsic_rewards("diff_acc", np.stack([BELIEFS] * 2), 0, 1.0, np.array([1, 2]))
  np.testing.assert_allclose(out, [[-0.25, 0.0], [0.25, -0.5]])
  with pytest.raises(ValueError, match="num_turns must be in 0..2"):
    rewards.intrinsic_rewards("diff_acc", BELIEFS, 0, 1.0, 3)


def test_unknown_reward_and_extrinsic_reward():
  with pytest.raises(ValueError, match="unknown intrinsic reward 'curious'"):
    rewards.intrinsic_rewards("curious", BELIEFS, 0)
  np.testing.assert_array_equal(rewards.extrinsic_rewards(3, True, length=5), [0, 0, 1, 0, 0])
  np.testing.assert_array_equal(rewards.extrinsic_rewards(3, False), [0, 0, 0])
