"""Generic RL for LLM policies (core; knows nothing of any method).

  * `rollout`: sample responses with the jit sampler (tokens + sampling log-probs + masks), score
    them under any policy (`score`), the shared batch layout.
  * `advantages`: REINFORCE (+ value baseline), RLOO, GRPO, GAE (turn- or token-level).
  * `losses`: policy gradient, PPO clip, KL (k1, k3), value loss, masked reductions; registries.
  * `policy`: `PolicyWithValue`, `make_loss_fn` (gin `rl.loss`) for the core `Trainer`,
    `RolloutBatches` feeding it, `ExampleCycler`, `sequence_batch`.
"""

from persona_jax.rl import advantages, losses
from persona_jax.rl.advantages import (SEQUENCE_ESTIMATORS, discounted_returns, gae_advantages,
                                       grpo_advantages, reinforce_advantages, rloo_advantages,
                                       sequence_advantages)
from persona_jax.rl.losses import (KL_ESTIMATORS, POLICY_LOSSES, REDUCTIONS, kl_divergence,
                                   kl_penalized_rewards, policy_gradient_loss, ppo_clipped_loss,
                                   reduce_masked, value_loss)
from persona_jax.rl.policy import (ExampleCycler, PolicyWithValue, RolloutBatches, make_loss_fn,
                                   sequence_batch)
from persona_jax.rl.rollout import (Rollout, response_hidden, response_logprobs, sample_rollouts,
                                    score)

__all__ = [
    "ExampleCycler", "KL_ESTIMATORS", "POLICY_LOSSES", "PolicyWithValue", "REDUCTIONS", "Rollout",
    "RolloutBatches", "SEQUENCE_ESTIMATORS", "advantages", "discounted_returns", "gae_advantages",
    "grpo_advantages", "kl_divergence", "kl_penalized_rewards", "losses", "make_loss_fn",
    "policy_gradient_loss", "ppo_clipped_loss", "reduce_masked", "reinforce_advantages",
    "response_hidden", "response_logprobs", "rloo_advantages", "sample_rollouts", "score",
    "sequence_advantages", "sequence_batch", "value_loss",
]
