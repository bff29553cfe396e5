"""MiLP's user memory: several LoRA modules injected into chosen layers of a frozen decoder.

Zhang et al., "Personalized LLM Response Generation with Parameterized Memory Injection" (2404.03565):
a user's history is stored as parameters, `num_modules` LoRA modules on the feed-forward (optionally
attention) projections of chosen layers; the layout is searched by Bayesian optimization.

A `MemoryLayout` names the layers (one module per layer: module `memory_<j>` on `layers[j]`), the
projections, the rank and the learning rate its memories are trained with. `inject_memory` adds
the modules to a decoder as named adapters of `persona_jax.nn.lora`; `B` starts at zero, so the
injected decoder computes exactly the base decoder's function until trained. `SearchSpace` is the set
of layouts the Bayesian search may propose (gin `milp.SearchSpace.*`).
"""

from __future__ import annotations

import dataclasses
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
      raise UserError("MemoryLayout.layers is empty: a memory needs at least one layer.")
    unknown = [p for p in self.projections if p not in PROJECTIONS]
    if unknown or not self.projections:
      raise UserError(f"MemoryLayout.projections {list(self.projections)}: unknown {unknown}; choose "
                       f"from {sorted(PROJECTIONS)}.")
    if self.rank <= 0 or self.learning_rate <= 0:
      raise UserError(f"MemoryLayout: rank={self.rank} and learning_rate={self.learning_rate} must be "
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
      raise UserError(f"MemoryLayout.layers {list(self.layers)} names layer(s) {bad} that do not exist: "
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


def merged(decoder: pnn.Decoder) -> pnn.Decoder:
  """A copy with every adapter folded into the kernels: the same function with the base decoder's
  graph, so generation compiles once for all layouts and users (weights are jit arguments)."""
  copy = nnx.clone(decoder)
  pnn.merge_lora(copy)
  return copy


@gin.configurable(module="milp")
@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The layouts the search may propose; each field is an inclusive (low, high) range.

  A point (num_modules k, first_layer f, layer_stride s, rank, learning_rate) is the layout with
  modules on layers f, f + s, ..., f + (k - 1) s; points whose last layer does not exist are
  infeasible (told to the sampler as a violated constraint and never trained).
  """
  num_modules: tuple[int, int] = (1, 4)
  first_layer: tuple[int, int] = (0, 29)
  layer_stride: tuple[int, int] = (1, 8)
  rank: tuple[int, int] = (2, 16)
  learning_rate: tuple[float, float] = (3e-4, 1e-2)
  projections: tuple[str, ...] = MLP_PROJECTIONS

  def distributions(self) -> dict:
    import optuna  # pylint: disable=g-import-not-at-top
    ints = {name: optuna.distributions.IntDistribution(*getattr(self, name))
            for name in ("num_modules", "first_layer", "layer_stride")}
    return dict(ints, rank=optuna.distributions.IntDistribution(*self.rank, log=True),
                learning_rate=optuna.distributions.FloatDistribution(*self.learning_rate, log=True))

  def layout(self, params: dict) -> MemoryLayout:
    layers = tuple(params["first_layer"] + j * params["layer_stride"]
                   for j in range(params["num_modules"]))
    return MemoryLayout(layers=layers, projections=self.projections, rank=params["rank"],
                        learning_rate=params["learning_rate"])

  def check(self, num_layers: int) -> None:
    """Raises a clear error for an empty range or a space with no feasible layout."""
    for name in ("num_modules", "first_layer", "layer_stride", "rank", "learning_rate"):
      low, high = getattr(self, name)
      if low > high or low < 0 or (name != "first_layer" and low <= 0):
        raise UserError(f"milp.SearchSpace.{name}=({low}, {high}) is not a valid range: need "
                        f"{'0 <=' if name == 'first_layer' else '0 <'} low <= high.")
    lowest_last = self.first_layer[0] + (self.num_modules[0] - 1) * self.layer_stride[0]
    if lowest_last >= num_layers:
      raise UserError(
          f"milp.SearchSpace has no valid point: even num_modules={self.num_modules[0]}, "
          f"first_layer={self.first_layer[0]}, layer_stride={self.layer_stride[0]} needs layer "
          f"{lowest_last}, but the decoder has layers 0..{num_layers - 1}; lower first_layer / "
          "num_modules / layer_stride.")

  def to_json(self) -> dict:
    return {name: list(value) for name, value in dataclasses.asdict(self).items()}
