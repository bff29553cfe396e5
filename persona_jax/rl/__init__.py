"""Generic RL for LLM policies (core; knows nothing of any method).

  * `rollout`: sample responses with the jit sampler (tokens + sampling log-probs + masks), score
    them under any policy (`score`), the shared batch layout.
  * `advantages`: REINFORCE (+ value baseline), RLOO, GRPO (`@register_estimator`), GAE.
  * `losses`: policy gradient, PPO clip (`@register_policy_loss`), KL k1/k3
    (`@register_kl_estimator`), value loss, masked reductions, PPO diagnostics.
  * `policy`: `PolicyWithValue`, `make_loss_fn` (gin `rl.loss`) for the core `Trainer`,
    `sequence_batch`.
  * `learner`: `Learner` (gin `rl.learner`): rollout -> reward -> advantages -> `num_epochs` passes of
    minibatch updates on the core `Trainer`; `RolloutSource` (what a method supplies),
    `PromptRollouts` (one reward per sampled response), `ExampleCycler`.
"""

from persona_jax.rl import advantages, losses
from persona_jax.rl.advantages import (SEQUENCE_ESTIMATORS, discounted_returns, gae_advantages,
                                       grpo_advantages, register_estimator, reinforce_advantages,
                                       rloo_advantages, sequence_advantages)
from persona_jax.rl.learner import (ExampleCycler, Learner, LearnerConfig, PromptRollouts,
                                    RolloutSource, current_policy)
from persona_jax.rl.losses import (KL_ESTIMATORS, POLICY_LOSSES, REDUCTIONS, kl_divergence,
                                   kl_penalized_rewards, policy_gradient_loss, ppo_clipped_loss,
                                   ratio_metrics, reduce_masked, register_kl_estimator,
                                   register_policy_loss, value_loss)
from persona_jax.rl.policy import PolicyWithValue, make_loss_fn, sequence_batch
from persona_jax.rl.rollout import (Rollout, response_hidden, response_logprobs, sample_rollouts,
                                    score)

__all__ = [
    "ExampleCycler", "KL_ESTIMATORS", "Learner", "LearnerConfig", "POLICY_LOSSES",
    "PolicyWithValue", "PromptRollouts", "REDUCTIONS", "Rollout", "RolloutSource",
    "SEQUENCE_ESTIMATORS", "advantages", "current_policy", "discounted_returns", "gae_advantages",
    "grpo_advantages", "kl_divergence", "kl_penalized_rewards", "losses", "make_loss_fn",
    "policy_gradient_loss", "ppo_clipped_loss", "ratio_metrics", "reduce_masked",
    "register_estimator", "register_kl_estimator", "register_policy_loss", "reinforce_advantages",
    "response_hidden", "response_logprobs", "rloo_advantages", "sample_rollouts", "score",
    "sequence_advantages", "sequence_batch", "value_loss",
]
