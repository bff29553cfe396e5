"""MiLP's user memory: several LoRA modules injected into chosen layers of a frozen decoder.

Zhang et al., "Personalized LLM Response Generation with Parameterized Memory Injection" (2404.03565):
a user's history is stored as parameters, `num_modules` LoRA modules on the feed-forward (optionally
attention) projections of chosen layers; the layout is searched by Bayesian optimization.

A `MemoryLayout` names the layers (one module per layer: module `memory_<j>` on `layers[j]`), the
projections, the rank and the learning rate its memories are trained with. `inject_memory` adds
the modules to a decoder as named adapters of `persona_jax.nn.lora`; `B` starts at zero, so the
injected decoder computes exactly the base decoder's function until trained.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from flax import nnx

from persona_jax import nn as pnn
from persona_jax.nn.lora import MLP_PROJECTIONS, PROJECTIONS

MEMORY_PREFIX = "memory_"


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
  """Where a user's memory lives and how it is trained.

  layers: one LoRA module per entry (module `memory_<j>` on decoder layer `layers[j]`); the number of
    modules is `len(layers)`.
  projections: projection names (`persona_jax.nn.lora.PROJECTIONS`) each module adapts.
  rank: LoRA rank of every module (alpha = 2 * rank, scale 2, as is common for LoRA fine-tuning).
  learning_rate: peak learning rate of the memory's training.
  """
  layers: tuple[int, ...]
  projections: tuple[str, ...] = MLP_PROJECTIONS
  rank: int = 8
  learning_rate: float = 1e-3

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
    object.__setattr__(self, "projections", tuple(self.projections))
    if not self.layers:
      raise ValueError("MemoryLayout.layers is empty: a memory needs at least one layer.")
    unknown = [p for p in self.projections if p not in PROJECTIONS]
    if unknown or not self.projections:
      raise ValueError(f"MemoryLayout.projections {list(self.projections)}: unknown {unknown}; choose "
                       f"from {sorted(PROJECTIONS)}.")
    if self.rank <= 0 or self.learning_rate <= 0:
      raise ValueError(f"MemoryLayout: rank={self.rank} and learning_rate={self.learning_rate} must be "
                       "positive.")

  @property
  def num_modules(self) -> int:
    return len(self.layers)

  @property
  def module_names(self) -> tuple[str, ...]:
    return tuple(f"{MEMORY_PREFIX}{j}" for j in range(self.num_modules))

  def check(self, num_layers: int) -> None:
    """Raises a clear error if a layer does not exist in a decoder of `num_layers` layers."""
    bad = [l for l in self.layers if not 0 <= l < num_layers]
    if bad:
      raise ValueError(f"MemoryLayout.layers {list(self.layers)} names layer(s) {bad} that do not exist: "
                       f"the decoder has layers 0..{num_layers - 1}.")

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), layers=list(self.layers), projections=list(self.projections))

  @classmethod
  def from_json(cls, data: dict) -> "MemoryLayout":
    return cls(**data)


def inject_memory(decoder: pnn.Decoder, layout: MemoryLayout, seed: int = 0) -> list[str]:
  """Adds the layout's memory modules to `decoder` (in place); returns their adapter names."""
  layout.check(decoder.config.num_layers)
  for j, (name, layer) in enumerate(zip(layout.module_names, layout.layers)):
    pnn.inject_lora(decoder, layers=[layer], projections=layout.projections, rank=layout.rank,
                    alpha=2.0 * layout.rank, name=name, seed=seed + j)
  return list(layout.module_names)


def memory_filter(names: Sequence[str]):
  """NNX filter selecting exactly the LoRA parameters of the adapters called `names`."""
  names = frozenset(names)
  return nnx.All(nnx.LoRAParam, lambda path, value: any(part in names for part in path))
