"""Small named transforms between a checkpoint's tensor layout and the decoder's parameter layout.

Each `Transform` is a pair of functions `load(tensor, config)` (checkpoint layout -> ours) and
`save(param, config)` (ours -> checkpoint layout); `save(load(x)) == x`. The mapping tables in
`persona_jax.hf.mapping` name one transform per tensor, so a reader sees every layout change in one
place. The functions work on numpy and JAX arrays alike (only reshape / swapaxes / transpose).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from persona_jax.errors import UserError
from persona_jax.nn.config import DecoderConfig

Array = Any  # numpy.ndarray or jax.Array


def transpose(weight):
  """`[out, in]` (PyTorch `nn.Linear.weight`, GGUF rows) <-> `[in, out]` (our `Linear.kernel`)."""
  if weight.ndim != 2:
    raise UserError(f"transpose expects a matrix, got shape {tuple(weight.shape)}.")
  return weight.T


def gguf_permute_rotary(weight, num_heads: int):
  """Half-rotation rows -> interleaved-pair rows, per head (what llama.cpp's converter writes).

  Hugging Face rotates the pair (x[j], x[j + d/2]) of each head; llama.cpp rotates (x[2j], x[2j+1]).
  Its converter therefore reorders the output rows of Q and K so that row 2j holds HF row j and row
  2j+1 holds HF row j + d/2. `weight`: `[num_heads * head_dim, in]` (PyTorch / GGUF row layout).
  """
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise UserError(f"gguf_permute_rotary: {rows} rows do not split into {num_heads} heads of even width.")
  half = rows // num_heads // 2
  return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_unpermute_rotary(weight, num_heads: int):
  """Inverse of `gguf_permute_rotary`: interleaved-pair rows (GGUF) -> half-rotation rows (HF)."""
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise UserError(f"gguf_unpermute_rotary: {rows} rows do not split into {num_heads} heads of even width.")
  half = rows // num_heads // 2
  return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclasses.dataclass(frozen=True)
class Transform:
  """A named, invertible layout change: `load` (checkpoint -> ours) and `save` (ours -> checkpoint)."""
  name: str
  load: Callable[[Array, DecoderConfig], Array]
  save: Callable[[Array, DecoderConfig], Array]


IDENTITY = Transform("identity", lambda w, cfg: w, lambda w, cfg: w)
TRANSPOSE = Transform("transpose", lambda w, cfg: transpose(w), lambda w, cfg: transpose(w))
# GGUF Q/K: undo llama.cpp's interleaved-rotary row order, then transpose to `[in, out]`. Q rows are
# grouped by query heads, K rows by key/value heads (as the converter permuted them).
GGUF_QUERY = Transform(
    "gguf_unpermute_rotary(num_heads) + transpose",
    lambda w, cfg: transpose(gguf_unpermute_rotary(w, cfg.num_heads)),
    lambda w, cfg: gguf_permute_rotary(transpose(w), cfg.num_heads))
GGUF_KEY = Transform(
    "gguf_unpermute_rotary(num_kv_heads) + transpose",
    lambda w, cfg: transpose(gguf_unpermute_rotary(w, cfg.num_kv_heads)),
    lambda w, cfg: gguf_permute_rotary(transpose(w), cfg.num_kv_heads))
