"""Reading a llama-architecture GGUF file: config, dequantized weights, tokenizer, chat template.

Uses the `gguf` package (`gguf.GGUFReader`, `gguf.quants.dequantize`); weights come back in PyTorch
row layout `[out, in]`, Q/K rows still in llama.cpp's interleaved-rotary order (the mapping table's
`GGUF_QUERY` / `GGUF_KEY` transforms undo it).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from persona_jax.errors import UserError
from persona_jax.nn.config import DecoderConfig

INSTALL_GGUF = "pip install gguf"
_ARRAY_KEYS_NEEDED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def _gguf():
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"Reading .gguf files needs the `gguf` package: {INSTALL_GGUF}") from None
  return gguf


class GGUFFile:
  """An opened GGUF file: `metadata` (key -> Python value) and lazily dequantized tensors."""

  def __init__(self, path: pathlib.Path):
    gguf = _gguf()
    self.path = path
    size = path.stat().st_size
    try:
      self.reader = gguf.GGUFReader(str(path))
    except Exception as error:  # the reader fails with reshape/index errors on a cut-off file
      raise UserError(f"{path}: not a complete GGUF file ({type(error).__name__}: {error}); the file "
                       "is truncated or corrupt: download it again.") from None
    end = max((t.data_offset + t.n_bytes for t in self.reader.tensors), default=0)
    if end > size:
      raise UserError(f"{path}: truncated GGUF file ({size} bytes, its tensors need {end}); download it "
                       "again.")
    self.metadata: dict[str, Any] = {}
    for key, field in self.reader.fields.items():
      if key.startswith("GGUF."):
        continue
      if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and key not in _ARRAY_KEYS_NEEDED \
          and len(field.data) > 64:
        continue  # large arrays we do not use (e.g. scores): skip converting them to Python
      self.metadata[key] = field.contents()
    self.tensors = {t.name: t for t in self.reader.tensors}

  def tensor(self, name: str) -> np.ndarray:
    """Dequantized fp32 tensor in numpy (row-major, `[out, in]`) layout."""
    gguf = _gguf()
    info = self.tensors[name]
    values = gguf.quants.dequantize(info.data, info.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(info.shape)))

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(self.tensors[name].shape))

  def decoder_config(self, dtype: str = "float32") -> DecoderConfig:
    """`DecoderConfig` from the `llama.*` metadata (the only architecture supported)."""
    meta = self.metadata
    architecture = meta.get("general.architecture")
    if architecture != "llama":
      raise UserError(f"{self.path}: GGUF architecture {architecture!r} is not supported; only 'llama' "
                       "(Llama, SmolLM2) GGUF files can be loaded. Load the Hugging Face checkpoint instead.")
    if "rope_freqs.weight" in self.tensors or meta.get("llama.rope.scaling.type", "none") not in ("none",):
      raise UserError(f"{self.path}: rope-scaled GGUF files (rope_freqs / llama.rope.scaling) are not "
                       "supported; load the Hugging Face checkpoint (config.json rope_scaling) instead.")
    required = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count")
    missing = [key for key in required if key not in meta]
    if missing:
      raise UserError(f"{self.path}: GGUF metadata lacks {missing}; cannot build the decoder config.")
    num_heads = int(meta["llama.attention.head_count"])
    embed_dim = int(meta["llama.embedding_length"])
    vocab_size = meta.get("llama.vocab_size")
    if vocab_size is None:
      vocab_size = self.shape("token_embd.weight")[0]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return DecoderConfig(
        family="llama", vocab_size=int(vocab_size), num_layers=int(meta["llama.block_count"]),
        embed_dim=embed_dim, mlp_dim=int(meta["llama.feed_forward_length"]), num_heads=num_heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get("llama.attention.key_length", embed_dim // num_heads)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10_000.0)),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in self.tensors,
        max_positions=int(meta.get("llama.context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos,
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"), dtype=dtype, param_dtype=dtype)
