"""The decoder a run is built on, configured once for every method.

Gin binds it in one place (`DecoderSource.pretrained = ...`), so `gin/models/*.gin` are a few lines
that name a model and every room picks it up:

  DecoderSource.pretrained = 'google/gemma-2-2b-it'   # or None with a random preset:
  DecoderSource.preset = None                         # 'tiny_llama', 'tiny_gemma2', ...
  DecoderSource.vocabulary = None                     # default: the pretrained model's tokenizer,
                                                      # 'bytes' with a preset
  DecoderSource.dtype = 'float32'                     # storage dtype of the (frozen) base

A room's job takes `decoder: DecoderSource | None = None` (None: `DecoderSource()` with its gin
bindings) and calls `source.load("<room>.job", vocab_size=...)`.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.hf.pretrained import JobDecoder, load_job_decoder


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderSource:
  """Where the decoder comes from: pretrained weights XOR a random preset (see the module doc).

  Attributes:
    pretrained: anything `load_pretrained` takes (a short name such as 'smollm2-135m-instruct', a
      Hugging Face dir or hub id, a .gguf file), or None.
    preset: a `persona_jax.nn.PRESETS` name (randomly initialized; tests and smoke configs), or None.
    vocabulary: the tokenizer of the data (default: the pretrained model's own; 'bytes' for presets).
    dtype: storage dtype of the loaded weights ('float32', 'bfloat16'): a frozen base stored in the
      compute dtype takes half the memory and is never cast inside the step.
  """
  pretrained: str | None = "smollm2-135m-instruct"
  preset: str | None = None
  vocabulary: str | None = None
  dtype: str = "float32"

  def __post_init__(self):
    if (self.pretrained is None) == (self.preset is None):
      raise UserError("DecoderSource: set exactly one of `pretrained` (e.g. 'smollm2-135m-instruct') "
                      f"or `preset` (e.g. 'tiny_llama'); got pretrained={self.pretrained!r}, "
                      f"preset={self.preset!r}. A gin/models/*.gin file sets both.")
    try:
      jnp.dtype(self.dtype)
    except TypeError as error:
      raise UserError(f"DecoderSource.dtype={self.dtype!r} is not a dtype; use 'float32' or "
                      "'bfloat16'.") from error

  def vocabulary_source(self) -> str:
    """What `persona_jax.data.get_vocabulary` takes for this decoder's data."""
    if self.vocabulary is not None:
      return self.vocabulary
    return self.pretrained if self.pretrained is not None else "bytes"

  def load(self, job: str, *, vocab_size: int | None = None, seed: int = 0,
           with_tokenizer: bool = False) -> JobDecoder:
    """The decoder (pretrained weights or a random preset of `vocab_size` rows) in `dtype`."""
    dtype = jnp.dtype(self.dtype)
    loaded = load_job_decoder(job, self.pretrained, self.preset, vocab_size=vocab_size, seed=seed,
                              with_tokenizer=with_tokenizer, dtype=dtype)
    if self.preset is not None and dtype != jnp.float32:
      state = nnx.state(loaded.decoder)
      nnx.update(loaded.decoder, jax.tree.map(
          lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))
    loaded.base["dtype"] = self.dtype
    return loaded

  def describe(self) -> str:
    return self.pretrained if self.pretrained is not None else f"random {self.preset}"
