"""Decode weights: a copy of a decoder whose weights are stored smaller, for sampling and rollouts.

Decoding one token reads every weight once, so at small batch it is bound by memory bandwidth, not
FLOPs; smaller weights decode faster. Formats (`DECODE_WEIGHT_FORMATS`):
  * `'float32'`: the decoder as it is (no copy).
  * `'bfloat16'`: every weight matrix (projections, MLP, embedding / output head) cast to bf16; the
    compute dtype (activations, norms, attention softmax, logits) stays the config's.
  * `'int8'`: weight-only int8 with per-output-channel absmax scales, computed by Qwix (Google's JAX
    quantization library, `qwix.quantize`). Projections keep `kernel: int8 [in, out]` plus
    `kernel_scale: [1, out]`; the tied embedding keeps `embedding: int8 [vocab, embed]` plus
    `embedding_scale: [vocab, 1]` (one scale per row serves both the lookup and the output head).
    Activations stay in the compute dtype; the scale multiplies the matmul's output.
Norm scales, LoRA adapters and method modules are left as they are.

This is separate from the training compute dtype (`DecoderConfig.dtype`): it changes only the
stored weights of the copy used to decode. Convert once per set of weights (after each policy
update in RL), not per call: `convert_decoder_weights` is one jit-compiled pass over the weights.
What it costs in accuracy is measured by `benchmarks/decoder_vs_hf.py` (logit difference vs fp32 and
greedy agreement) and bounded in tests/nn/test_quantization.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.layers import Linear, logical_param

DECODE_WEIGHT_FORMATS = ("float32", "bfloat16", "int8")


@functools.partial(jax.jit, static_argnames="channel_axis")
def quantize_int8(weight: jax.Array, channel_axis: int) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax int8 with one scale per index of `channel_axis` (Qwix does the numerics).

  Returns `(values int8 same shape, scale float32 with size 1 on every other axis)`;
  `values * scale` approximates `weight`.
  """
  import qwix  # pylint: disable=g-import-not-at-top
  qarray = qwix.quantize(weight.astype(jnp.float32), jnp.int8, channelwise_axes=[channel_axis],
                         scale_dtype=jnp.float32)
  return qarray.qvalue, qarray.scale


_to_bfloat16 = jax.jit(lambda weight: weight.astype(jnp.bfloat16))


def _convert_in_place(decoder, weight_format: str) -> None:
  """Rewrites the weight variables of `decoder` (a fresh copy) in `weight_format`."""
  for _, module in decoder.iter_modules():
    if isinstance(module, Linear):
      kernel = module.kernel[...]
      axes = (module.in_axis, module.out_axis)
      if weight_format == "bfloat16":
        module.kernel = logical_param(_to_bfloat16(kernel), axes)
      else:
        values, scale = quantize_int8(kernel, channel_axis=1)
        module.kernel = logical_param(values, axes)
        module.kernel_scale = logical_param(scale, (None, module.out_axis))
  table = decoder.embedding[...]
  if weight_format == "bfloat16":
    decoder.embedding = logical_param(_to_bfloat16(table), ("vocab", "embed"))
  else:
    values, scale = quantize_int8(table, channel_axis=0)
    decoder.embedding = logical_param(values, ("vocab", "embed"))
    decoder.embedding_scale = logical_param(scale, ("vocab", None))
  if decoder.lm_head is not None:
    head = decoder.lm_head[...]
    if weight_format == "bfloat16":
      decoder.lm_head = logical_param(_to_bfloat16(head), ("embed", "vocab"))
    else:
      values, scale = quantize_int8(head, channel_axis=1)
      decoder.lm_head = logical_param(values, ("embed", "vocab"))
      decoder.lm_head_scale = logical_param(scale, (None, "vocab"))


def convert_decoder_weights(decoder, weight_format: str):
  """A copy of `decoder` with its weights stored in `weight_format` (`DECODE_WEIGHT_FORMATS`).

  `'float32'` returns `decoder` itself. The copy shares nothing mutable with the original: train the
  original, convert again. Each weight is converted by a jit-compiled function (one compilation per
weight shape), so a conversion is one pass over the weights.
  """
  if weight_format not in DECODE_WEIGHT_FORMATS:
    raise UserError(f"decode weights {weight_format!r} are not supported; use one of "
                     f"{DECODE_WEIGHT_FORMATS}.")
  if weight_format == "float32":
    return decoder
  if getattr(decoder, "embedding_scale", None) is not None or decoder.embedding[...].dtype != jnp.float32:
    raise UserError("convert_decoder_weights: the decoder's weights are already converted "
                     f"({decoder.embedding[...].dtype}); convert the float32 original instead.")
  copy = nnx.clone(decoder)
  _convert_in_place(copy, weight_format)
  return copy


def weight_bytes(decoder) -> int:
  """Bytes of every parameter array of `decoder` (what one batch-1 decode step reads at least)."""
  state = nnx.state(decoder, nnx.Param)
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)))
