"""RLPF: RL from prediction feedback (Wu et al. 2024): a summarizer whose user summaries must let a
frozen predictor answer a question about the user's future, while staying short."""

from persona_jax.rlpf.model import (Predictor, RewardConfig, TextCodec, length_reward,
                                    summarizer_prompt, summary_rewards)

__all__ = ["Predictor", "RewardConfig", "TextCodec", "length_reward", "summarizer_prompt",
           "summary_rewards"]
