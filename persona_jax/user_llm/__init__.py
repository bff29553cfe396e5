"""User-LLM: user encoder, Perceiver resampler, gated cross-attention / soft prompt into a frozen decoder."""

from persona_jax.user_llm.model import (FUSIONS, INTEGRATIONS, STRATEGIES, GatedCrossAttention,
                                        PerceiverResampler, UserEncoder, UserEncoderConfig, UserLLM,
                                        next_item_loss)

__all__ = ["FUSIONS", "INTEGRATIONS", "STRATEGIES", "GatedCrossAttention", "PerceiverResampler",
           "UserEncoder", "UserEncoderConfig", "UserLLM", "next_item_loss"]
