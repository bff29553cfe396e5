"""MiLP's user memory: several LoRA modules injected into chosen layers of a frozen decoder.

Zhang et al., "Personalized LLM Response Generation with Parameterized Memory Injection" (2404.03565):
a user's history is stored as parameters, `num_modules` LoRA modules on the feed-forward (optionally
attention) projections of chosen layers; the layout is searched by Bayesian optimization.

A `MemoryLayout` names the layers (one module per layer: module `memory_<j>` on `layers[j]`), the
projections, the rank and the learning rate its memories are trained with. `inject_memory` adds
the modules to a decoder as named adapters of `persona_jax.nn.lora`; `B` starts at zero, so the
injected decoder computes exactly the base decoder's function until trained. `SearchSpace` is the set
of layouts the search may propose (gin `milp.SearchSpace.*`): per-layer on/off and size.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import gin
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.errors import UserError
from persona_jax.nn.lora import MLP_PROJECTIONS, PROJECTIONS

MEMORY_PREFIX = "memory_"


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
  """Where a user's memory lives and how it is trained.

  layers: one LoRA module per entry (module `memory_<j>` on decoder layer `layers[j]`); the number of
    modules is `len(layers)`.
  projections: projection names (`persona_jax.nn.lora.PROJECTIONS`) each module adapts.
  rank: LoRA rank of every module, or one rank per module (alpha = 2 * rank, scale 2, as is common
    for LoRA fine-tuning).
  learning_rate: peak learning rate of the memory's training.
  """
  layers: tuple[int, ...]
  projections: tuple[str, ...] = MLP_PROJECTIONS
  rank: int | tuple[int, ...] = 8
  learning_rate: float = 1e-3

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
    object.__setattr__(self, "projections", tuple(self.projections))
    if not self.layers:
      raise UserError("MemoryLayout.layers is empty: a memory needs at least one layer.")
    unknown = [p for p in self.projections if p not in PROJECTIONS]
    if unknown or not self.projections:
      raise UserError(f"MemoryLayout.projections {list(self.projections)}: unknown {unknown}; choose "
                       f"from {sorted(PROJECTIONS)}.")
    if not isinstance(self.rank, int):
      object.__setattr__(self, "rank", tuple(int(r) for r in self.rank))
      if len(self.rank) != len(self.layers):
        raise UserError(f"MemoryLayout: {len(self.rank)} ranks for {len(self.layers)} layers.")
    if min(self.ranks) <= 0 or self.learning_rate <= 0:
      raise UserError(f"MemoryLayout: rank={self.rank} and learning_rate={self.learning_rate} must be "
                       "positive.")

  @property
  def num_modules(self) -> int:
    return len(self.layers)

  @property
  def ranks(self) -> tuple[int, ...]:
    """The rank of each module."""
    return self.rank if isinstance(self.rank, tuple) else (self.rank,) * len(self.layers)

  @property
  def module_names(self) -> tuple[str, ...]:
    return tuple(f"{MEMORY_PREFIX}{j}" for j in range(self.num_modules))

  def check(self, num_layers: int) -> None:
    """Raises a clear error if a layer does not exist in a decoder of `num_layers` layers."""
    bad = [l for l in self.layers if not 0 <= l < num_layers]
    if bad:
      raise UserError(f"MemoryLayout.layers {list(self.layers)} names layer(s) {bad} that do not exist: "
                       f"the decoder has layers 0..{num_layers - 1}.")

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), layers=list(self.layers), projections=list(self.projections),
                rank=self.rank if isinstance(self.rank, int) else list(self.rank))

  @classmethod
  def from_json(cls, data: dict) -> "MemoryLayout":
    return cls(**data)


def inject_memory(decoder: pnn.Decoder, layout: MemoryLayout, seed: int = 0) -> list[str]:
  """Adds the layout's memory modules to `decoder` (in place); returns their adapter names."""
  layout.check(decoder.config.num_layers)
  for j, (name, layer, rank) in enumerate(zip(layout.module_names, layout.layers, layout.ranks)):
    pnn.inject_lora(decoder, layers=[layer], projections=layout.projections, rank=rank,
                    alpha=2.0 * rank, name=name, seed=seed + j)
  return list(layout.module_names)


def memory_filter(names: Sequence[str]):
  """NNX filter selecting exactly the LoRA parameters of the adapters called `names`."""
  names = frozenset(names)
  return nnx.All(nnx.LoRAParam, lambda path, value: any(part in names for part in path))


def merged(decoder: pnn.Decoder) -> pnn.Decoder:
  """A copy with every adapter folded into the kernels: the same function with the base decoder's
  graph, so generation compiles once for all layouts and users (weights are jit arguments)."""
  copy = nnx.clone(decoder)
  pnn.merge_lora(copy)
  return copy


@gin.configurable(module="milp")
@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The layouts the search may propose: every layer of the decoder on or off, each with its own size.

  As in the paper's public search (per-layer on/off and size), not a progression of a few modules: a
  point has one integer `layer_<l>` per decoder layer l in 0..num_layers-1 (the space is built from
  the decoder's own depth, so every named layer exists), 0 = no module on that layer and k >= 1 = a
  module of rank `rank_choices[k - 1]` (ordinal, so the GP sees "bigger" as a direction), plus
  `anchor_layer` in 0..num_layers-1: a layer that always holds a module (of the smallest rank when its
  own `layer_<l>` is 0), and the learning rate (log scale) when `learning_rate` is a range.

  So every point of the space is a memory (at least one module, all on existing layers): there is no
  infeasible point to score, and nothing for a surrogate to fit but real measurements. (The search
  still prunes, without a value, any point a space maps to no memory: see `Milp.search`.)

  rank_choices: the module sizes a layer may get (increasing).
  learning_rate: (low, high) searched on a log scale, or a single float: fixed, not searched.
  projections: what each module adapts (`persona_jax.nn.lora.PROJECTIONS`).
  """
  rank_choices: tuple[int, ...] = (2, 4, 8, 16)
  learning_rate: tuple[float, float] | float = (3e-4, 1e-2)
  projections: tuple[str, ...] = MLP_PROJECTIONS

  @staticmethod
  def layer_param(layer: int) -> str:
    return f"layer_{layer:02d}"

  @property
  def searches_learning_rate(self) -> bool:
    return not isinstance(self.learning_rate, (int, float))

  def distributions(self, num_layers: int) -> dict:
    import optuna  # pylint: disable=g-import-not-at-top
    space = {self.layer_param(l): optuna.distributions.IntDistribution(0, len(self.rank_choices))
             for l in range(num_layers)}
    space["anchor_layer"] = optuna.distributions.IntDistribution(0, num_layers - 1)
    if self.searches_learning_rate:
      space["learning_rate"] = optuna.distributions.FloatDistribution(*self.learning_rate, log=True)
    return space

  def layout(self, params: dict, num_layers: int) -> MemoryLayout:
    """The layout of a point (never empty: the anchor layer always holds a module)."""
    choices = [int(params[self.layer_param(l)]) for l in range(num_layers)]
    anchor = int(params["anchor_layer"])
    if not 0 <= anchor < num_layers:
      raise UserError(f"milp.SearchSpace: anchor_layer {anchor} is not a layer of a {num_layers}-layer "
                      "decoder.")
    choices[anchor] = max(choices[anchor], 1)
    layers = tuple(l for l, choice in enumerate(choices) if choice > 0)
    learning_rate = (params["learning_rate"] if self.searches_learning_rate
                     else float(self.learning_rate))
    return MemoryLayout(layers=layers, projections=self.projections,
                        rank=tuple(self.rank_choices[choices[l] - 1] for l in layers),
                        learning_rate=learning_rate)

  def check(self) -> None:
    """Raises a clear error for unusable sizes or learning rates."""
    ranks = list(self.rank_choices)
    if not ranks or any(r <= 0 for r in ranks) or ranks != sorted(set(ranks)):
      raise UserError(f"milp.SearchSpace.rank_choices={tuple(ranks)}: need positive, increasing "
                      "ranks.")
    rates = (self.learning_rate if self.searches_learning_rate else (self.learning_rate,) * 2)
    if len(rates) != 2 or not 0 < rates[0] <= rates[1]:
      raise UserError(f"milp.SearchSpace.learning_rate={self.learning_rate}: need a positive rate "
                      "or a range 0 < low <= high.")

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))
