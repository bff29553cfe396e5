"""User-LLM: user encoder, Perceiver resampler, gated cross-attention / soft prompt into a frozen decoder.

Methods (job.py): `user_encoder` (stage 1, the encoder's next-item pretraining) and `user_llm`
(stage 2, the LLM stage or the text-prompt baseline).
"""

from persona_jax.user_llm.model import (FUSIONS, INTEGRATIONS, STRATEGIES, GatedCrossAttention,
                                        PerceiverResampler, UserEncoder, UserEncoderConfig, UserLLM,
                                        next_item_loss)

__all__ = ["FUSIONS", "INTEGRATIONS", "STRATEGIES", "GatedCrossAttention", "PerceiverResampler",
           "UserEncoder", "UserEncoderConfig", "UserLLM", "next_item_loss"]
