"""The decoder and its parts (Flax NNX)."""

from persona_jax.nn.attention import (cache_mask, causal_mask, init_cache, padded_causal_mask,
                                      positions_from_mask, segment_causal_mask)
from persona_jax.nn.config import PRESETS, DecoderConfig, get_config
from persona_jax.nn.decoder import Block, Decoder, DecoderOutput, build_decoder
from persona_jax.nn.lora import inject_lora, lora_sites, merge_lora

__all__ = [
    "Block", "Decoder", "DecoderConfig", "DecoderOutput", "PRESETS", "build_decoder", "cache_mask",
    "causal_mask", "get_config", "init_cache", "inject_lora", "lora_sites", "merge_lora",
    "padded_causal_mask", "positions_from_mask", "segment_causal_mask",
]
