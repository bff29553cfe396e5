"""Building blocks of the decoder: RMSNorm, rotary embedding, a LoRA-capable linear, the gated MLP.

Every parameter carries logical axis names (`out_sharding` metadata) that
`persona_jax.train.partitioning` maps onto mesh axes; nothing here knows about meshes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.sharding import with_logical_constraint


def logical_param(value: jax.Array, axes: Sequence[str | None], kind=nnx.Param) -> nnx.Variable:
  """A variable annotated with logical axis names (no mesh is needed to create it)."""
  return kind(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in fp32: `x / rms(x) * (offset + scale)`.

  Llama uses offset 0 with scale initialized to 1; Gemma stores `scale` around 0 and multiplies by
  `1 + scale`.
  """

  def __init__(self, dim: int, *, eps: float, offset: float = 0.0, param_dtype=jnp.float32):
    self.eps = eps
    self.offset = offset
    self.scale = logical_param(jnp.full((dim,), 1.0 - offset, param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, rope_scaling=None) -> jax.Array:
  """Inverse frequencies `[head_dim // 2]`, with Llama-3 long-context scaling when configured."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if rope_scaling is None:
    return inv_freq
  scaling = dict(rope_scaling)
  if scaling.get("rope_type", "default") == "default":
    return inv_freq
  factor = scaling["factor"]
  low_freq_factor = scaling["low_freq_factor"]
  high_freq_factor = scaling["high_freq_factor"]
  old_context = scaling["original_max_position_embeddings"]
  low_freq_wavelen = old_context / low_freq_factor
  high_freq_wavelen = old_context / high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the half-rotation layout of Hugging Face.

  Args:
    x: `[batch, seq, heads, head_dim]`.
    positions: `[batch, seq]` integer positions.
    inv_freq: `[head_dim // 2]`.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim // 2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class LoRA(nnx.Module):
  """A low-rank update `x @ a @ b * (alpha / rank)`; `b` starts at zero so the sum starts unchanged.

  Parameters are `nnx.LoRAParam`, so a filter on that type selects exactly the adapters.
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               in_axis: str | None, out_axis: str | None, rngs: nnx.Rngs, param_dtype=jnp.float32):
    if rank <= 0:
      raise UserError(f"LoRA rank must be positive, got {rank}.")
    self.rank = rank
    self.alpha = alpha
    init = jax.nn.initializers.he_uniform()
    self.a = logical_param(init(rngs.params(), (in_features, rank), param_dtype), (in_axis, None),
                           kind=nnx.LoRAParam)
    self.b = logical_param(jnp.zeros((rank, out_features), param_dtype), (None, out_axis),
                           kind=nnx.LoRAParam)

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def __call__(self, x: jax.Array) -> jax.Array:
    return (x @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype) * self.scaling

  def delta(self) -> jax.Array:
    """The dense update `[in, out]` this adapter adds to the kernel."""
    return (self.a[...].astype(jnp.float32) @ self.b[...].astype(jnp.float32)) * self.scaling


class Linear(nnx.Module):
  """`y = x @ kernel` with a `[in, out]` kernel and optional LoRA adapters added to its output.

  `adapters` is an `nnx.Dict` of named `LoRA` modules (see `persona_jax.nn.lora`), empty by default,
  so several independent memories can sit on one projection.

  Decode weights (`persona_jax.nn.quantization`) may store the kernel in bf16, or in int8 with a
  `kernel_scale: [1, out]` attribute: `x @ (q * s) == (x @ q) * s` per output channel, so the scale is
  applied to the (small) output instead of dequantizing the (large) kernel.
  """

  def __init__(self, in_features: int, out_features: int, *, in_axis: str | None,
               out_axis: str | None, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               init_scale: float = 1.0):
    init = jax.nn.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal")
    self.in_features = in_features
    self.out_features = out_features
    self.in_axis = in_axis
    self.out_axis = out_axis
    self.dtype = dtype
    self.kernel = logical_param(init(rngs.params(), (in_features, out_features), param_dtype),
                                (in_axis, out_axis))
    self.adapters = nnx.Dict()

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    kernel_scale = getattr(self, "kernel_scale", None)
    if kernel_scale is not None:  # int8 weight-only kernel, per-output-channel scales `[1, out]`
      y = y * kernel_scale[...].astype(self.dtype)
    for adapter in self.adapters.values():
      y = y + adapter(x)
    return y


def activation_fn(name: str):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise UserError(f"Unknown activation {name!r}; use 'silu' or 'gelu_tanh'.")


class GatedMLP(nnx.Module):
  """`down(act(gate(x)) * up(x))`: SwiGLU for llama, GeGLU (tanh GELU) for gemma."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, activation: str, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.activation = activation
    self.gate_proj = Linear(embed_dim, mlp_dim, in_axis="embed", out_axis="mlp", **kw)
    self.up_proj = Linear(embed_dim, mlp_dim, in_axis="embed", out_axis="mlp", **kw)
    self.down_proj = Linear(mlp_dim, embed_dim, in_axis="mlp", out_axis="embed", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation_fn(self.activation)
    hidden = act(self.gate_proj(x)) * self.up_proj(x)
    if hidden.ndim == 3:
      hidden = with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    return self.down_proj(hidden)
