"""Cache coprocessor: deliberation in latent space via differentiable cache augmentation."""

from persona_jax.coprocessor.model import VARIANTS, CacheCoprocessor, SoftTokens, generate

__all__ = ["VARIANTS", "CacheCoprocessor", "SoftTokens", "generate"]
