"""SeqIO vocabularies: a Hugging Face `tokenizers` tokenizer, and bytes for tiny tests.

SeqIO reserves id 0 for padding: the feature converters give loss weight 0 to target id 0 and use it
as the beginning-of-sequence input. A Hugging Face tokenizer keeps its own ids unchanged here (the
decoder's embedding table is indexed by them), so its id 0 doubles as padding. For SmolLM2 id 0 is
`<|endoftext|>`, which plain text never produces, so nothing real is lost; the end-of-sequence id must
therefore not be 0 (see `HFTokenizerVocabulary`).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import Any, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf
import tokenizers
from persona_jax.errors import MissingFileError, UserError

# End-of-sequence candidates tried in order when none is given. `<|endoftext|>` comes before
# `<|im_end|>` but is skipped when it is id 0 (SmolLM2), since id 0 is padding to SeqIO.
EOS_TOKEN_CANDIDATES = ("</s>", "<eos>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>")

VocabularySource = Union[str, os.PathLike, tokenizers.Tokenizer, seqio.Vocabulary]


def _sanitize(text: str) -> str:
  """A fragment usable in a SeqIO task name (`[\\w.:#]`): other characters become `_`."""
  return re.sub(r"[^\w]+", "_", text).strip("_").lower() or "x"


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A `seqio.Vocabulary` over a Hugging Face `tokenizers.Tokenizer`, ids unchanged.

  Text is encoded without the tokenizer's own special-token post-processing (SeqIO appends EOS
  itself). Decoding drops padding (id 0) and EOS and keeps every other token, so
  `decode(encode(s)) == s` for a byte-level BPE such as SmolLM2's.

  Args:
    tokenizer: a `tokenizers.Tokenizer`, a path to a `tokenizer.json`, or a model source for
      `persona_jax.hf.load_tokenizer` (e.g. "smollm2-135m-instruct", a local HF dir, a hub id). A
      model source is loaded lazily, on first use, so registering tasks costs nothing.
    eos_token: the end-of-sequence token string. None picks the model source's declared eos_token
      (e.g. GGUF metadata: `<|im_end|>` for SmolLM2-Instruct), else the first of
      `EOS_TOKEN_CANDIDATES` in the vocabulary; never id 0 (padding).
    name: a short stable name used in task names; default: derived from the model source, or
      `tok_<hash of the tokenizer json>`.
  """

  def __init__(self, tokenizer: str | os.PathLike | tokenizers.Tokenizer, *,
               eos_token: str | None = None, name: str | None = None):
    super().__init__(extra_ids=0)
    self._eos_token_arg = eos_token
    self._lock = threading.Lock()
    self._tokenizer: tokenizers.Tokenizer | None = None
    self._model_source: str | None = None
    self._fingerprint: str | None = None
    self._special_tokens: dict[str, str] = {}  # From the model source (e.g. GGUF eos_token), if any.
    if isinstance(tokenizer, tokenizers.Tokenizer):
      self._tokenizer = tokenizer
    elif isinstance(tokenizer, (str, os.PathLike)):
      path = os.fspath(tokenizer)
      if path.endswith(".json"):
        if not os.path.isfile(path):
          raise MissingFileError(f"Tokenizer file {path!r} does not exist: pass the path of a "
                                  "Hugging Face tokenizer.json, a tokenizers.Tokenizer, or a model source.")
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
      else:
        self._model_source = path
    else:
      raise TypeError(f"HFTokenizerVocabulary needs a tokenizers.Tokenizer, a tokenizer.json path or a "
                      f"model source string, got {type(tokenizer).__name__}.")
    if name is not None:
      self._name = _sanitize(name)
    elif self._model_source is not None:
      self._name = _sanitize(os.path.basename(self._model_source.rstrip("/")) or self._model_source)
    else:
      self._name = f"tok_{self.fingerprint[:10]}"

  # -- loading -----------------------------------------------------------------------------------
  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped tokenizer (loaded from the model source on first use)."""
    if self._tokenizer is None:
      with self._lock:
        if self._tokenizer is None:
          try:
            from persona_jax.hf import load_tokenizer  # Lazy: the hf package pulls in gguf/transformers.
          except ImportError as error:
            raise ImportError(f"Loading the tokenizer of model source {self._model_source!r} needs "
                              f"persona_jax.hf.load_tokenizer, which failed to import ({error}). Pass a "
                              "tokenizer.json path or a tokenizers.Tokenizer instead.") from error
          loaded = load_tokenizer(self._model_source)
          # load_tokenizer gives (tokenizer, chat template, special tokens) or just a tokenizer.
          if isinstance(loaded, tuple):
            loaded, _, special_tokens = loaded
            self._special_tokens = dict(special_tokens or {})
          if not isinstance(loaded, tokenizers.Tokenizer):
            raise UserError(f"Model source {self._model_source!r} has no Hugging Face tokenizer "
                             "(no tokenizer.json / GGUF tokenizer metadata): pass a tokenizer.json path.")
          self._tokenizer = loaded
    return self._tokenizer

  @property
  def name(self) -> str:
    """Short stable name (`[a-z0-9_]`), used in task names."""
    return self._name

  @property
  def fingerprint(self) -> str:
    """sha256 of the tokenizer's JSON and the EOS choice: equal fingerprints tokenize identically."""
    if self._fingerprint is None:
      digest = hashlib.sha256(self.tokenizer.to_str().encode("utf-8"))
      digest.update(self.eos_token.encode("utf-8"))
      self._fingerprint = digest.hexdigest()
    return self._fingerprint

  # -- special ids -------------------------------------------------------------------------------
  @property
  def eos_token(self) -> str:
    if self._eos_token_arg is not None:
      return self._eos_token_arg
    tokenizer = self.tokenizer  # Loads a model source, which may declare its eos_token.
    declared = self._special_tokens.get("eos_token")
    for candidate in ((declared,) if declared else ()) + EOS_TOKEN_CANDIDATES:
      token_id = tokenizer.token_to_id(candidate)
      if token_id is not None and token_id != self.pad_id:
        return candidate
    raise UserError(f"Tokenizer {self.name!r} has none of the end-of-sequence tokens "
                     f"{EOS_TOKEN_CANDIDATES} at an id other than 0: pass eos_token=... explicitly.")

  @property
  def eos_id(self) -> int:
    token_id = self.tokenizer.token_to_id(self.eos_token)
    if token_id is None:
      raise UserError(f"eos_token {self.eos_token!r} is not in the vocabulary of tokenizer "
                       f"{self.name!r}: pass an eos_token that the tokenizer knows.")
    if token_id == self.pad_id:
      raise UserError(f"eos_token {self.eos_token!r} has id 0, which SeqIO reserves for padding "
                       "(its loss weight would be 0): choose another eos_token.")
    return token_id

  @property
  def bos_id(self) -> int:
    # SeqIO's decoder feature converter starts every sequence with id 0.
    return self.pad_id

  @property
  def unk_id(self) -> int | None:
    unk_token = getattr(self.tokenizer.model, "unk_token", None)
    return self.tokenizer.token_to_id(unk_token) if unk_token else None

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  # -- python ------------------------------------------------------------------------------------
  def _encode(self, s: str | bytes) -> list[int]:
    if isinstance(s, (bytes, np.bytes_)):
      s = s.decode("utf-8")
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    eos_id = self.eos_id
    kept = [int(i) for i in ids if int(i) != self.pad_id and int(i) != eos_id]
    return self.tokenizer.decode(kept, skip_special_tokens=False)

  # -- tensorflow --------------------------------------------------------------------------------
  def _encode_numpy(self, text: np.ndarray | bytes) -> np.ndarray:
    # Eager numpy_function passes a 0-d object array, graph mode a bytes object.
    return np.asarray(self._encode(np.asarray(text).item()), dtype=np.int32)

  def _encode_batch_numpy(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    encodings = self.tokenizer.encode_batch([t.decode("utf-8") for t in texts.tolist()],
                                            add_special_tokens=False)
    lengths = np.asarray([len(e.ids) for e in encodings], dtype=np.int64)
    values = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=int(lengths.sum()))
    return values, lengths

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """Scalar string -> ids [num_tokens] int32; strings [n] -> ragged ids [n, None] int32."""
    s = tf.convert_to_tensor(s, dtype=tf.string)
    if s.shape.rank == 0:
      ids = tf.numpy_function(self._encode_numpy, [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids
    if s.shape.rank == 1:
      values, lengths = tf.numpy_function(self._encode_batch_numpy, [s], [tf.int32, tf.int64],
                                          stateful=False)
      values.set_shape([None])
      lengths.set_shape(s.shape)
      return tf.RaggedTensor.from_row_lengths(values, lengths)
    raise UserError(f"HFTokenizerVocabulary.encode_tf takes a scalar or a vector of strings, got "
                     f"rank {s.shape.rank}: reshape to [-1] first.")

  def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
    return np.asarray([self._decode(row).encode("utf-8") for row in ids.tolist()], dtype=object)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """ids [..., seq] int -> strings [...] (a scalar for [seq])."""
    ids = tf.convert_to_tensor(ids)
    outer_shape = tf.shape(ids)[:-1]
    rows = tf.reshape(tf.cast(ids, tf.int32), [-1, tf.shape(ids)[-1]])
    texts = tf.numpy_function(self._decode_numpy, [rows], tf.string, stateful=False)
    texts = tf.reshape(texts, outer_shape)
    texts.set_shape(ids.shape[:-1])
    return texts

  # -- identity, pickling ------------------------------------------------------------------------
  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, HFTokenizerVocabulary):
      return False
    if self._model_source is not None and self._model_source == other._model_source:
      return self._eos_token_arg == other._eos_token_arg  # Same source: equal without loading it.
    return self.fingerprint == other.fingerprint

  def __hash__(self) -> int:
    # Equal vocabularies may carry different names (a model source vs its tokenizer.json), so the
    # hash cannot use more than the type without loading the tokenizer.
    return hash(type(self).__name__)

  def __getstate__(self) -> dict[str, Any]:
    # The tokenizer travels as its JSON (always picklable); a not-yet-loaded source stays lazy.
    return {"tokenizer_json": None if self._tokenizer is None else self._tokenizer.to_str(),
            "model_source": self._model_source, "eos_token": self._eos_token_arg, "name": self._name,
            "fingerprint": self._fingerprint, "special_tokens": self._special_tokens}

  def __setstate__(self, state: dict[str, Any]) -> None:
    super().__init__(extra_ids=0)
    self._lock = threading.Lock()
    json_text = state["tokenizer_json"]
    self._tokenizer = None if json_text is None else tokenizers.Tokenizer.from_str(json_text)
    self._model_source = state["model_source"]
    self._eos_token_arg = state["eos_token"]
    self._name = state["name"]
    self._fingerprint = state["fingerprint"]
    self._special_tokens = dict(state.get("special_tokens") or {})

  def __repr__(self) -> str:
    return f"HFTokenizerVocabulary(name={self._name!r}, eos_token={self._eos_token_arg!r})"


def vocabulary_name(vocabulary: seqio.Vocabulary) -> str:
  """The short stable name of a vocabulary, used to build task names."""
  if isinstance(vocabulary, HFTokenizerVocabulary):
    return vocabulary.name
  if isinstance(vocabulary, seqio.ByteVocabulary):
    return "bytes" if not vocabulary.extra_ids else f"bytes_x{vocabulary.extra_ids}"
  name = getattr(vocabulary, "name", None)
  if isinstance(name, str) and name:
    return _sanitize(name)
  raise UserError(f"Vocabulary {vocabulary!r} has no stable name for task names: use "
                   "HFTokenizerVocabulary / 'bytes', or give the vocabulary a `name` attribute.")


_VOCABULARY_CACHE: dict[tuple[str, str | None], seqio.Vocabulary] = {}
_VOCABULARY_CACHE_LOCK = threading.Lock()


def get_vocabulary(source: VocabularySource, *, eos_token: str | None = None) -> seqio.Vocabulary:
  """The vocabulary for `source`, one shared instance per string source.

  Args:
    source: "bytes" (`seqio.ByteVocabulary`: 0 pad, 1 EOS, 2 UNK, byte b -> b + 3, vocab size 259);
      a `seqio.Vocabulary` (returned as is); a `tokenizers.Tokenizer`; a path to a tokenizer.json;
      or a model source for `persona_jax.hf.load_tokenizer` ("smollm2-135m-instruct", a local HF
      dir, a hub id), loaded lazily.
    eos_token: end-of-sequence token for a Hugging Face tokenizer (see `HFTokenizerVocabulary`).

  Returns:
    A `seqio.Vocabulary`.
  """
  if isinstance(source, seqio.Vocabulary):
    return source
  if isinstance(source, tokenizers.Tokenizer):
    return HFTokenizerVocabulary(source, eos_token=eos_token)
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"Vocabulary source must be 'bytes', a path, a model source, a tokenizers.Tokenizer "
                    f"or a seqio.Vocabulary, got {type(source).__name__}.")
  key = (os.fspath(source), eos_token)
  with _VOCABULARY_CACHE_LOCK:
    if key not in _VOCABULARY_CACHE:
      if key[0] == "bytes":
        if eos_token is not None:
          raise UserError("The 'bytes' vocabulary has a fixed EOS (id 1): do not pass eos_token.")
        _VOCABULARY_CACHE[key] = seqio.ByteVocabulary()
      else:
        _VOCABULARY_CACHE[key] = HFTokenizerVocabulary(key[0], eos_token=eos_token)
    return _VOCABULARY_CACHE[key]
