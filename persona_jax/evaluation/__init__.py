"""The core evaluation library: per-example results, confidence intervals, paired tests, seeds,
and reductions across processes. Methods report through it; shortcut baselines are added here, never
copied into a room."""

from persona_jax.evaluation.distributed import gather_rows, sum_across_processes
from persona_jax.evaluation.loss import mean_loss_metrics
from persona_jax.evaluation.stats import (Estimate, across_seeds, mean_ci, paired_difference,
                                          pooled_over_seeds, relative_perplexity_change,
                                          sign_flip_p_value)

__all__ = [
    "Estimate", "across_seeds", "gather_rows", "mean_ci", "mean_loss_metrics", "paired_difference", "pooled_over_seeds",
    "relative_perplexity_change", "sign_flip_p_value", "sum_across_processes",
]
