"""Statistics every claim is held to: bootstrap confidence intervals, paired comparisons, seeds.

All functions take per-example values (one number per scored example: 0/1 correctness, a token's
NLL, a ROUGE score), so two systems scored on the same examples can be compared *paired*, which is
far tighter than comparing two independent means.

  mean_ci(values)                     mean and percentile-bootstrap 95% CI
  paired_difference(a, b)             mean(a - b), its paired-bootstrap CI and a two-sided p-value
                                      (paired sign-flip permutation test)
  across_seeds(means)                 mean over seeds with a t-interval (seeds are few: no bootstrap)
  ratio_ci(num, den)                  e.g. perplexity change exp(mean nll_a - mean nll_b) - 1, paired

Bootstrap resampling draws examples with replacement (numpy's PCG64 with a fixed seed), so the same
inputs give the same interval.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from persona_jax.errors import UserError

DEFAULT_RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A point estimate with a confidence interval."""
  value: float
  low: float
  high: float
  count: int
  p_value: float | None = None

  def format(self, digits: int = 3, percent: bool = False) -> str:
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = (f"{self.value * scale:.{digits}f}{suffix} "
            f"[{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]")
    return text

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
  array = np.asarray(values, dtype=np.float64).reshape(-1)
  if array.size == 0:
    raise UserError(f"{name}: no values to estimate from.")
  if not np.all(np.isfinite(array)):
    raise UserError(f"{name}: {int(np.sum(~np.isfinite(array)))} non-finite values.")
  return array


def bootstrap_means(values: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
  """Means of `resamples` bootstrap resamples of `values` (`[resamples]`)."""
  rng = np.random.default_rng(seed)
  indices = rng.integers(0, values.size, size=(resamples, values.size))
  return values[indices].mean(axis=1)


def mean_ci(values: Sequence[float], *, confidence: float = 0.95,
            resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
  """Mean of `values` with a percentile-bootstrap confidence interval."""
  array = _as_array(values, "mean_ci")
  means = bootstrap_means(array, resamples, seed)
  alpha = (1.0 - confidence) / 2
  return Estimate(float(array.mean()), float(np.quantile(means, alpha)),
                  float(np.quantile(means, 1 - alpha)), int(array.size))


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
  """mean(a - b) over the same examples, a paired-bootstrap CI, and a two-sided p-value.

  The p-value is a paired sign-flip permutation test of "no difference" (each example's difference
  is equally likely to have either sign): exact over all 2^n flips for n <= 16, else `resamples`
  random flips (with the observed one counted, so p is never 0).
  """
  first, second = _as_array(a, "paired_difference a"), _as_array(b, "paired_difference b")
  if first.shape != second.shape:
    raise UserError(f"paired_difference: {first.size} vs {second.size} values; a paired comparison "
                     "needs both systems scored on the same examples.")
  differences = first - second
  estimate = mean_ci(differences, confidence=confidence, resamples=resamples, seed=seed)
  return dataclasses.replace(estimate, p_value=sign_flip_p_value(differences, resamples, seed))


def sign_flip_p_value(differences: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> float:
  """Two-sided p-value of mean(differences) = 0 by sign flips (see `paired_difference`)."""
  differences = np.asarray(differences, np.float64)
  observed = abs(differences.mean())
  n = differences.size
  if n <= 16:
    signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
    flipped = np.abs((signs * differences).mean(axis=1))
    return float(np.mean(flipped >= observed - 1e-12))
  rng = np.random.default_rng(seed + 1)
  signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, n))
  flipped = np.abs((signs * differences).mean(axis=1))
  return float((np.sum(flipped >= observed - 1e-12) + 1) / (resamples + 1))


def relative_perplexity_change(nll_a: Sequence[float], nll_b: Sequence[float], *,
                               confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                               seed: int = 0) -> Estimate:
  """exp(mean nll_a - mean nll_b) - 1 over the same tokens (a's perplexity relative to b's), with a
  paired-bootstrap CI (the same resampled tokens for both) and the sign-flip p-value."""
  first, second = _as_array(nll_a, "nll_a"), _as_array(nll_b, "nll_b")
  if first.shape != second.shape:
    raise UserError("relative_perplexity_change: both systems must be scored on the same tokens.")
  differences = first - second
  means = bootstrap_means(differences, resamples, seed)
  alpha = (1.0 - confidence) / 2
  return Estimate(float(math.expm1(differences.mean())),
                  float(math.expm1(np.quantile(means, alpha))),
                  float(math.expm1(np.quantile(means, 1 - alpha))), int(differences.size),
                  sign_flip_p_value(differences, resamples, seed))


# Student t quantiles (two-sided 95%) for small numbers of seeds; normal beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064,
        29: 2.045}


def t_quantile_95(degrees_of_freedom: int) -> float:
  if degrees_of_freedom < 1:
    raise UserError("t_quantile_95: need at least 2 seeds for an interval.")
  known = [d for d in _T95 if d <= degrees_of_freedom]
  return _T95[max(known)] if degrees_of_freedom <= 29 else 1.96


def across_seeds(per_seed: Sequence[float]) -> Estimate:
  """Mean over seeds (one number per seed) with a two-sided 95% Student-t interval."""
  array = _as_array(per_seed, "across_seeds")
  if array.size == 1:
    value = float(array[0])
    return Estimate(value, float("nan"), float("nan"), 1)
  half = t_quantile_95(array.size - 1) * array.std(ddof=1) / math.sqrt(array.size)
  return Estimate(float(array.mean()), float(array.mean() - half), float(array.mean() + half),
                  int(array.size))


def pooled_over_seeds(per_seed_values: Sequence[Sequence[float]], *, confidence: float = 0.95,
                      resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
  """Mean over seeds of per-example values, with a two-level bootstrap CI (resample seeds, then
  examples within each drawn seed), so both the seed-to-seed and the example noise count."""
  runs = [_as_array(v, "pooled_over_seeds") for v in per_seed_values]
  if not runs:
    raise UserError("pooled_over_seeds: no seeds.")
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  for r in range(resamples):
    drawn = rng.integers(0, len(runs), size=len(runs))
    means[r] = np.mean([runs[i][rng.integers(0, runs[i].size, runs[i].size)].mean() for i in drawn])
  alpha = (1.0 - confidence) / 2
  return Estimate(float(np.mean([r.mean() for r in runs])), float(np.quantile(means, alpha)),
                  float(np.quantile(means, 1 - alpha)), int(sum(r.size for r in runs)))
