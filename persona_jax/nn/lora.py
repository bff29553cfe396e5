"""LoRA adapters on the decoder's projections: inject, select, merge.

Adapters are `persona_jax.nn.layers.LoRA` modules stored by name in `Linear.adapters`; their
parameters are `nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` trains only them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.decoder import Decoder
from persona_jax.nn.layers import LoRA, Linear

# Projection names as a method names them -> path inside a Block.
PROJECTIONS = {
    "q_proj": ("attention", "q_proj"),
    "k_proj": ("attention", "k_proj"),
    "v_proj": ("attention", "v_proj"),
    "o_proj": ("attention", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def get_projection(decoder: Decoder, layer: int, name: str) -> Linear:
  if name not in PROJECTIONS:
    raise UserError(f"Unknown projection {name!r}; choose from {sorted(PROJECTIONS)}.")
  module = decoder.layers[layer]
  for attr in PROJECTIONS[name]:
    module = getattr(module, attr)
  return module


def inject_lora(decoder: Decoder, *, layers: Iterable[int] | None = None,
                projections: Sequence[str] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS, rank: int = 8,
                alpha: float | None = None, name: str = "lora", seed: int = 0) -> list[tuple[int, str]]:
  """Adds a LoRA adapter called `name` to the chosen projections of the chosen layers.

  Args:
    layers: layer indices (default: all).
    projections: names from `PROJECTIONS`.
    rank, alpha: LoRA rank and scale numerator (default alpha = rank, i.e. scale 1).
    name: the adapter's key in `Linear.adapters`; distinct names stack several adapters.
  Returns:
    The (layer, projection) pairs that received an adapter.
  """
  num_layers = decoder.config.num_layers
  layers = list(range(num_layers)) if layers is None else list(layers)
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad:
    raise UserError(f"LoRA layers {bad} do not exist: the decoder has layers 0..{num_layers - 1}.")
  alpha = float(rank if alpha is None else alpha)
  rngs = nnx.Rngs(seed)
  placed = []
  for layer in layers:
    for proj in projections:
      linear = get_projection(decoder, layer, proj)
      if name in linear.adapters:
        raise UserError(f"Layer {layer} {proj} already has an adapter named {name!r}.")
      linear.adapters[name] = LoRA(
          linear.in_features, linear.out_features, rank=rank, alpha=alpha, in_axis=linear.in_axis,
          out_axis=linear.out_axis, rngs=rngs, param_dtype=linear.kernel[...].dtype)
      placed.append((layer, proj))
  return placed


def lora_sites(decoder: Decoder, name: str | None = None) -> list[tuple[int, str, str, LoRA]]:
  """All (layer, projection, adapter name, module) with an adapter (of `name`, if given)."""
  sites = []
  for layer in range(decoder.config.num_layers):
    for proj in PROJECTIONS:
      for key, adapter in get_projection(decoder, layer, proj).adapters.items():
        if name is None or key == name:
          sites.append((layer, proj, key, adapter))
  return sites


def merge_lora(decoder: Decoder, name: str | None = None) -> int:
  """Folds adapters (all, or those called `name`) into the kernels and removes them.

  Returns the number of adapters merged. The merged decoder computes the same function.
  """
  sites = lora_sites(decoder, name)
  for layer, proj, key, adapter in sites:
    linear = get_projection(decoder, layer, proj)
    kernel = linear.kernel[...]
    linear.kernel[...] = (kernel.astype(jnp.float32) + adapter.delta()).astype(kernel.dtype)
    del linear.adapters[key]
  return len(sites)
