"""The evaluation library's statistics against closed forms on toy cases."""

import math

import numpy as np
import pytest

from persona_jax.evaluation import stats


def test_bootstrap_ci_of_a_proportion_matches_the_normal_approximation():
  # 120 of 400 correct: the normal interval is p +- 1.96 sqrt(p (1 - p) / n).
  values = np.array([1.0] * 120 + [0.0] * 280)
  estimate = stats.mean_ci(values, resamples=20000)
  p, n = 0.3, 400
  half = 1.96 * math.sqrt(p * (1 - p) / n)
  assert estimate.value == pytest.approx(p)
  assert estimate.low == pytest.approx(p - half, abs=0.006)
  assert estimate.high == pytest.approx(p + half, abs=0.006)
  assert estimate.count == n


def test_bootstrap_is_reproducible_and_narrows_with_more_data():
  rng = np.random.default_rng(3)
  small, large = rng.normal(size=50), rng.normal(size=5000)
  assert stats.mean_ci(small) == stats.mean_ci(small)
  width = lambda e: e.high - e.low
  assert width(stats.mean_ci(large)) < width(stats.mean_ci(small)) / 5


def test_sign_flip_p_value_is_exact_for_small_samples():
  # Four positive differences of equal size: only the all-positive and all-negative flips are as
  # extreme, so the two-sided p is 2 / 2^4.
  assert stats.sign_flip_p_value(np.ones(4)) == pytest.approx(2 / 16)
  assert stats.sign_flip_p_value(np.array([1.0, -1.0, 1.0, -1.0])) == pytest.approx(1.0)


def test_paired_difference_sees_what_unpaired_means_hide():
  rng = np.random.default_rng(0)
  difficulty = rng.normal(scale=5.0, size=300)           # per-example noise shared by both systems
  a, b = difficulty + 0.2, difficulty
  paired = stats.paired_difference(a, b)
  assert paired.value == pytest.approx(0.2)
  assert paired.low == pytest.approx(0.2) and paired.high == pytest.approx(0.2)
  assert paired.p_value < 0.01
  unpaired_a, unpaired_b = stats.mean_ci(a), stats.mean_ci(b)
  assert unpaired_a.low < unpaired_b.high  # the independent intervals overlap
  with pytest.raises(ValueError, match="same examples"):
    stats.paired_difference(a, b[:-1])


def test_across_seeds_is_the_student_t_interval():
  values = np.array([0.50, 0.55, 0.60])
  estimate = stats.across_seeds(values)
  half = 4.303 * values.std(ddof=1) / math.sqrt(3)
  assert estimate.value == pytest.approx(0.55)
  assert (estimate.low, estimate.high) == pytest.approx((0.55 - half, 0.55 + half))


def test_relative_perplexity_change_is_exp_of_the_mean_nll_difference():
  base = np.full(100, 2.0)
  augmented = base - 0.1
  estimate = stats.relative_perplexity_change(augmented, base)
  assert estimate.value == pytest.approx(math.expm1(-0.1))
  assert estimate.low == pytest.approx(math.expm1(-0.1)) and estimate.p_value < 0.01


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="no values"):
    stats.mean_ci([])
  with pytest.raises(ValueError, match="non-finite"):
    stats.mean_ci([1.0, float("nan")])
