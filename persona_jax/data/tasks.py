"""Language-modelling SeqIO tasks: TFDS `tiny_shakespeare` and local text files.

Every task here has one output feature, `targets`, and the same preprocessing chain:

  source text (one long string per file / TFDS example)
    -> `split_documents`: consecutive documents of >= `lines_per_document` lines, cut at blank lines
    -> `seqio.preprocessors.tokenize` (no EOS)                      [offline cache point]
    -> `chunk_tokens`: optional EOS per document, then chunks of `sequence_length["targets"]` tokens

Why documents: TFDS `tiny_shakespeare` stores each split as ONE example (the whole text), and a text
file is one long stream too. Cutting it at blank lines every few dozen lines (a speech or paragraph
never straddles two documents) gives the tokenizer pieces of bounded size and gives
`concatenate_documents=False` natural units; the cut depends only on the text, so it is
deterministic, and the documents concatenate back to the text exactly.

Why chunks: by default (`concatenate_documents=True`) the tokens of all documents form one stream
cut into consecutive rows of exactly the sequence length, as GPT-style language modelling on a
continuous corpus does: every row is full and every token is a target exactly once per epoch, so the
feature converter never truncates anything. Chunks (not documents) are what is shuffled, sharded
across hosts and, with `concatenate_documents=False`, packed. No EOS is added by default: these
corpora are continuous texts whose cuts are ours, not the author's.

Task names: `lm_task(dataset, vocabulary)` registers (once) and returns
`lm.<dataset>.<vocabulary name>[.<hash of non-default options>]`, e.g.
`lm.tiny_shakespeare.smollm2_135m_instruct` or `lm.text_wikitext2_valid_1a2b3c4d.bytes`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import threading
from typing import Any, Mapping, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from persona_jax.data.vocabularies import VocabularySource, get_vocabulary, vocabulary_name, _sanitize
from persona_jax.errors import MissingFileError, UserError

DEFAULT_LINES_PER_DOCUMENT = 64
# Large enough to shuffle every chunk of tiny_shakespeare / WikiText-2 in one buffer.
DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000

PathsBySplit = Mapping[str, Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]]


@dataclasses.dataclass(frozen=True)
class TfdsTextDataset:
  """A TFDS data set whose examples hold long text in one string feature."""
  tfds_name: str  # name:version
  text_feature: str
  splits: tuple[str, ...]


# Data sets `lm_task` knows by name.
TFDS_TEXT_DATASETS: dict[str, TfdsTextDataset] = {
    "tiny_shakespeare": TfdsTextDataset("tiny_shakespeare:1.0.0", "text", ("train", "validation", "test")),
}


# ------------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------------
def split_into_documents(text: str, lines_per_document: int = DEFAULT_LINES_PER_DOCUMENT) -> list[str]:
  """Cuts text into consecutive documents of at least `lines_per_document` lines, at blank lines.

  Once a document holds `lines_per_document` lines, the next paragraph (a non-blank line after a
  blank one) starts a new document; blank lines stay with the paragraph before them. So paragraphs
  and speeches stay whole, no document is whitespace only, and `"".join(documents) == text`.

  Args:
    text: the whole text.
    lines_per_document: minimum number of lines in a document (except the last).

  Returns:
    The documents, in order ([] for empty text).
  """
  if lines_per_document < 1:
    raise UserError(f"lines_per_document must be >= 1, got {lines_per_document}.")
  documents: list[str] = []
  current: list[str] = []
  has_content = previous_blank = False
  for line in text.splitlines(keepends=True):
    blank = not line.strip()
    if not blank and previous_blank and has_content and len(current) >= lines_per_document:
      documents.append("".join(current))
      current, has_content = [], False
    current.append(line)
    has_content |= not blank
    previous_blank = blank
  if current:
    documents.append("".join(current))
  return documents


def split_documents(dataset: tf.data.Dataset, lines_per_document: int = DEFAULT_LINES_PER_DOCUMENT,
                    text_feature: str = "text") -> tf.data.Dataset:
  """SeqIO preprocessor: {text_feature: long text} -> one example {"targets": document} per document."""

  def documents_numpy(text: bytes) -> np.ndarray:
    documents = split_into_documents(text.decode("utf-8"), lines_per_document)
    return np.asarray([d.encode("utf-8") for d in documents], dtype=object).reshape([-1])

  def to_documents(example: Mapping[str, tf.Tensor]) -> tf.data.Dataset:
    documents = tf.numpy_function(documents_numpy, [example[text_feature]], tf.string, stateful=False)
    documents.set_shape([None])
    return tf.data.Dataset.from_tensor_slices({"targets": documents})

  return dataset.flat_map(to_documents)


def chunk_tokens(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                 output_features: Mapping[str, seqio.Feature],
                 concatenate_documents: bool = True) -> tf.data.Dataset:
  """SeqIO preprocessor: documents' `targets` -> chunks of at most `sequence_length["targets"]` tokens.

  EOS is appended to every document first when the `targets` feature has `add_eos`. Then either
    concatenate_documents=True: the documents' tokens form one stream, cut into consecutive chunks of
      exactly the sequence length (only the split's last chunk is shorter), so rows are full;
    concatenate_documents=False: each document is cut on its own, so a chunk never spans two
      documents and every document's last chunk is shorter (packing then fills rows).
  Either way every token is a target exactly once per epoch: nothing is truncated. Without a
  sequence length (e.g. SeqIO inspecting the task) each document stays one example.
  """
  feature = output_features["targets"]
  if feature.add_eos:
    eos = tf.constant([feature.vocabulary.eos_id], tf.int32)
    dataset = dataset.map(lambda ex: dict(ex, targets=tf.concat([tf.cast(ex["targets"], tf.int32), eos], 0)))
  if sequence_length is None or sequence_length.get("targets") is None:
    return dataset
  chunk_length = int(sequence_length["targets"])
  if concatenate_documents:
    stream = dataset.map(lambda ex: ex["targets"]).unbatch()
    return stream.batch(chunk_length).map(lambda chunk: {"targets": chunk})

  def split(example: Mapping[str, tf.Tensor]) -> tf.data.Dataset:
    tokens = example["targets"]
    starts = tf.range(0, tf.size(tokens, out_type=tf.int64), chunk_length, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({"targets": tf.RaggedTensor.from_row_starts(tokens, starts)})

  return dataset.flat_map(split)


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------
_PREPARED: set[tuple[str, str | None]] = set()


def ensure_tfds_prepared(tfds_name: str, data_dir: str | None = None, allow_download: bool = False) -> None:
  """Raises one clear error when a TFDS data set is not prepared (unless download is allowed).

  Args:
    tfds_name: "name:version" (or "name/config:version").
    data_dir: the TFDS data dir; None means TFDS's default (TFDS_DATA_DIR when TFDS was imported,
      else ~/tensorflow_datasets).
    allow_download: download and prepare the data set when it is missing (needs network).
  """
  if (tfds_name, data_dir) in _PREPARED:
    return
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    if not allow_download:
      if data_dir:
        where = f"data dir {data_dir} (tfds_data_dir)"
      elif os.environ.get("TFDS_DATA_DIR"):
        where = f"data dir {os.environ['TFDS_DATA_DIR']} (TFDS_DATA_DIR)"
      else:
        where = "TFDS's default data dir (TFDS_DATA_DIR is not set)"
      raise MissingFileError(
          f"TFDS dataset {tfds_name!r} is not prepared in {where}: {builder.data_dir} holds no prepared "
          f"copy. Fix: set TFDS_DATA_DIR (before TensorFlow Datasets is imported) or "
          f"pass tfds_data_dir= to a data dir where it is prepared (e.g. ../shared/tfds), or allow the "
          f"download with allow_download=True on a machine with network access.")
    builder.download_and_prepare()
  _PREPARED.add((tfds_name, data_dir))


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """`seqio.TfdsDataSource` that checks the data set is prepared before reading it."""

  def __init__(self, tfds_name: str, splits: Sequence[str], tfds_data_dir: str | None = None,
               allow_download: bool = False):
    super().__init__(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir, splits=splits)
    self._checked_name = tfds_name
    self._checked_data_dir = tfds_data_dir
    self._allow_download = allow_download

  def get_dataset(self, split: str | None = None, shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **kwargs) -> tf.data.Dataset:
    ensure_tfds_prepared(self._checked_name, self._checked_data_dir, self._allow_download)
    return super().get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info, **kwargs)

  def num_input_examples(self, split: str) -> int | None:
    ensure_tfds_prepared(self._checked_name, self._checked_data_dir, self._allow_download)
    return super().num_input_examples(split)


def _read_text_files(split: str, shuffle_files: bool, seed: int | None = None, *,
                     files_by_split: Mapping[str, tuple[str, ...]]) -> tf.data.Dataset:
  """One example {"text": whole file} per file, in the given order (files are never shuffled)."""
  del shuffle_files, seed  # Order is fixed; chunks are shuffled later, with the seed.
  files = tf.data.Dataset.from_tensor_slices(list(files_by_split[split]))
  return files.map(lambda path: {"text": tf.io.read_file(path)})


def _expand_paths(paths_by_split: PathsBySplit) -> dict[str, tuple[str, ...]]:
  """Split -> absolute file paths (globs expanded, sorted); one clear error for a missing file."""
  if not paths_by_split:
    raise UserError("paths_by_split is empty: give at least one split, e.g. {'validation': 'a.txt'}.")
  files_by_split = {}
  for split, paths in paths_by_split.items():
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    files: list[str] = []
    for pattern in paths:
      pattern = os.path.abspath(os.fspath(pattern))
      matches = sorted(tf.io.gfile.glob(pattern))
      if not matches:
        raise MissingFileError(f"Text file {pattern!r} (split {split!r}) does not exist: give the path "
                                "of an existing .txt file (or a glob that matches some).")
      files.extend(matches)
    for file in files:
      check_utf8_text_file(file)
    files_by_split[str(split)] = tuple(files)
  return files_by_split


def check_utf8_text_file(path: str) -> None:
  """Raises ValueError naming `<file>:<line>` of the first line that is not UTF-8 (checked when the
  task is registered: inside the input pipeline the same error would name no file)."""
  with tf.io.gfile.GFile(path, "rb") as file:
    for line_number, raw in enumerate(file, start=1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError as error:
        raise UserError(f"{path}:{line_number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                         f"{error.start + 1}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t "
                         "utf-8) or remove that line.") from None


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
_REGISTRATION_LOCK = threading.Lock()
_FINGERPRINT_ATTRIBUTE = "_persona_jax_fingerprint"


def _register_task(name: str, fingerprint: str, build: Any) -> str:
  """Registers `build()` as `name` once; the same name with other settings is an error."""
  with _REGISTRATION_LOCK:
    if name in seqio.TaskRegistry.names():
      existing = getattr(seqio.TaskRegistry.get(name), _FINGERPRINT_ATTRIBUTE, None)
      if existing != fingerprint:
        raise UserError(f"SeqIO task {name!r} is already registered with other settings "
                         f"({existing}) than now ({fingerprint}): choose another task name.")
      return name
    task = build()
    setattr(task, _FINGERPRINT_ATTRIBUTE, fingerprint)
    seqio.TaskRegistry.add_provider(name, task)
    return name


def register_in_memory_task(prefix: str, rows_by_split: Mapping[str, Sequence[Mapping[str, Any]]],
                            signature: Mapping[str, tf.TensorSpec], *,
                            output_features: Mapping[str, seqio.Feature] | None = None,
                            preprocessors: Sequence[Any] = (), fingerprint: str | None = None,
                            shuffle_buffer_size: int | None = 10_000) -> str:
  """Registers a SeqIO task over rows held in memory; returns its name `<prefix>.<content hash>`.

  The one in-memory registration of the code base (method rooms build their examples in Python and
  register them here). The name carries a hash of the rows (or of `fingerprint` when given), so the
  same rows always give the same task and other rows a new one: under the core's fingerprint rule
  a name is never re-registered with other contents, and nothing is ever replaced under a reader.

  Args:
    prefix: e.g. "rlpf.movielens_future_movie".
    rows_by_split: {split: [row, ...]}, each row {feature: value} matching `signature`.
    signature: {feature: tf.TensorSpec} of one row.
    output_features / preprocessors: the SeqIO task's (e.g. a tokenized "prompt" feature and
      `seqio.preprocessors.tokenize`).
    fingerprint: what identifies the rows (default: a hash of their JSON form).
  """
  if fingerprint is None:
    fingerprint = json.dumps({split: list(rows) for split, rows in rows_by_split.items()},
                             sort_keys=True, default=_json_default)
  digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
  name = f"{prefix}.{digest}"
  rows = {str(split): list(split_rows) for split, split_rows in rows_by_split.items()}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory "file"; the task shuffles examples
    split_rows = rows[split]
    return tf.data.Dataset.from_generator(lambda: iter(split_rows), output_signature=dict(signature))

  def build():
    source = seqio.FunctionDataSource(dataset_fn, splits=tuple(rows),
                                      num_input_examples={s: len(r) for s, r in rows.items()})
    return seqio.Task(name, source=source, output_features=dict(output_features or {}),
                      preprocessors=list(preprocessors), shuffle_buffer_size=shuffle_buffer_size)

  return _register_task(name, digest, build)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  raise TypeError(f"register_in_memory_task: cannot fingerprint a {type(value).__name__}; pass "
                  "fingerprint= explicitly.")


def _lm_preprocessors(lines_per_document: int, concatenate_documents: bool, text_feature: str) -> list[Any]:
  return [
      functools.partial(split_documents, lines_per_document=lines_per_document, text_feature=text_feature),
      seqio.preprocessors.tokenize,
      # Tokenized documents do not depend on the sequence length, so they can be cached offline.
      seqio.CacheDatasetPlaceholder(),
      functools.partial(chunk_tokens, concatenate_documents=concatenate_documents),
  ]


def _output_features(vocabulary: seqio.Vocabulary, add_eos: bool) -> dict[str, seqio.Feature]:
  return {"targets": seqio.Feature(vocabulary=vocabulary, add_eos=add_eos, dtype=tf.int32)}


def register_text_file_task(name: str, paths_by_split: PathsBySplit, vocabulary: VocabularySource, *,
                            add_eos: bool = False,
                            lines_per_document: int = DEFAULT_LINES_PER_DOCUMENT,
                            concatenate_documents: bool = True,
                            shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE) -> str:
  """Registers a language-modelling task over local text files (idempotent); returns its name.

  Args:
    name: the SeqIO task name (`[\\w.:#]+`).
    paths_by_split: split name -> a path, a glob, or a list of them, e.g.
      {"validation": "../shared/data/text/wikitext2_valid.txt"}. Each file is read whole and cut into
      documents (see the module docstring); files follow each other in the given order.
    vocabulary: anything `get_vocabulary` takes ("bytes", a tokenizer.json, a model source, ...).
    add_eos: append the vocabulary's EOS to every document (off by default: the documents here are
      cuts of one continuous text, and an EOS at a cut would be a token the text never had).
    lines_per_document: minimum lines per document.
    concatenate_documents: cut the stream of all documents into full rows (True), or each document
      on its own (False; see `chunk_tokens`).
    shuffle_buffer_size: shuffle buffer of the task (in chunks).

  Returns:
    `name`. Registering the same name again with the same settings is a no-op; with other settings
    it is an error.
  """
  vocabulary = get_vocabulary(vocabulary)
  files_by_split = _expand_paths(paths_by_split)
  fingerprint = json.dumps({"kind": "text", "files": files_by_split, "vocabulary": vocabulary_name(vocabulary),
                            "add_eos": add_eos, "lines_per_document": lines_per_document,
                            "concatenate_documents": concatenate_documents}, sort_keys=True)

  def build() -> seqio.Task:
    source = seqio.FunctionDataSource(
        dataset_fn=functools.partial(_read_text_files, files_by_split=files_by_split),
        splits=tuple(files_by_split), num_input_examples={s: len(f) for s, f in files_by_split.items()})
    return seqio.Task(name, source=source, output_features=_output_features(vocabulary, add_eos),
                      preprocessors=_lm_preprocessors(lines_per_document, concatenate_documents, "text"),
                      shuffle_buffer_size=shuffle_buffer_size)

  return _register_task(name, fingerprint, build)


def register_tfds_text_task(name: str, dataset: TfdsTextDataset, vocabulary: VocabularySource, *,
                            add_eos: bool = False,
                            lines_per_document: int = DEFAULT_LINES_PER_DOCUMENT,
                            concatenate_documents: bool = True,
                            tfds_data_dir: str | None = None, allow_download: bool = False,
                            shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE) -> str:
  """Registers a language-modelling task over a TFDS text data set (idempotent); returns its name.

  Nothing is read at registration; reading first checks that the data set is prepared in
  `tfds_data_dir` (None: TFDS_DATA_DIR / TFDS's default) and raises one clear error if not. Other
  args: see `register_text_file_task`.
  """
  vocabulary = get_vocabulary(vocabulary)
  fingerprint = json.dumps({"kind": "tfds", "dataset": dataclasses.asdict(dataset),
                            "vocabulary": vocabulary_name(vocabulary), "add_eos": add_eos,
                            "lines_per_document": lines_per_document,
                            "concatenate_documents": concatenate_documents, "tfds_data_dir": tfds_data_dir,
                            "allow_download": allow_download}, sort_keys=True)

  def build() -> seqio.Task:
    source = PreparedTfdsDataSource(dataset.tfds_name, splits=dataset.splits, tfds_data_dir=tfds_data_dir,
                                    allow_download=allow_download)
    return seqio.Task(name, source=source, output_features=_output_features(vocabulary, add_eos),
                      preprocessors=_lm_preprocessors(lines_per_document, concatenate_documents,
                                                      dataset.text_feature),
                      shuffle_buffer_size=shuffle_buffer_size)

  return _register_task(name, fingerprint, build)


def _options_suffix(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
  changed = {k: v for k, v in options.items() if v != defaults[k]}
  if not changed:
    return ""
  return "." + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]


def lm_task(dataset: str | os.PathLike | PathsBySplit, vocabulary: VocabularySource, *,
            add_eos: bool = False, lines_per_document: int = DEFAULT_LINES_PER_DOCUMENT,
            concatenate_documents: bool = True, tfds_data_dir: str | None = None,
            allow_download: bool = False) -> str:
  """Registers (once) the language-modelling task for a data set and vocabulary; returns its name.

  Args:
    dataset: a name in `TFDS_TEXT_DATASETS` ("tiny_shakespeare": splits train/validation/test); or
      a text file path (its one split is called "validation": a held-out file to evaluate on); or a
      mapping split -> path(s), e.g. {"train": "a.txt", "validation": "b.txt"}.
    vocabulary: anything `get_vocabulary` takes: "bytes", a tokenizer.json path, a model source such
      as "smollm2-135m-instruct", a `tokenizers.Tokenizer` or a `seqio.Vocabulary`.
    add_eos: append EOS at the end of every document.
    lines_per_document: minimum lines per document (see the module docstring).
    concatenate_documents: full rows from the stream of documents (True) or chunks that never span
      two documents (False).
    tfds_data_dir: TFDS data dir for TFDS data sets (None: TFDS_DATA_DIR or TFDS's default).
    allow_download: let TFDS download and prepare a missing data set (needs network).

  Returns:
    The task name, `lm.<dataset>.<vocabulary name>[.<hash of non-default options>]`; calling again
    with the same arguments returns the same name without registering anything.
  """
  vocabulary = get_vocabulary(vocabulary)
  vocab_name = vocabulary_name(vocabulary)
  options = {"add_eos": add_eos, "lines_per_document": lines_per_document,
             "concatenate_documents": concatenate_documents}
  defaults = {"add_eos": False, "lines_per_document": DEFAULT_LINES_PER_DOCUMENT, "concatenate_documents": True}
  if isinstance(dataset, str) and dataset in TFDS_TEXT_DATASETS:
    options.update(tfds_data_dir=tfds_data_dir, allow_download=allow_download)
    defaults.update(tfds_data_dir=None, allow_download=False)
    name = f"lm.{dataset}.{vocab_name}{_options_suffix(options, defaults)}"
    return register_tfds_text_task(name, TFDS_TEXT_DATASETS[dataset], vocabulary, add_eos=add_eos,
                                   lines_per_document=lines_per_document,
                                   concatenate_documents=concatenate_documents,
                                   tfds_data_dir=tfds_data_dir, allow_download=allow_download)
  if isinstance(dataset, (str, os.PathLike)):
    path = os.fspath(dataset)
    if not (os.path.exists(path) or tf.io.gfile.glob(path)):
      raise UserError(f"Dataset {path!r} is neither a known TFDS text data set "
                       f"{sorted(TFDS_TEXT_DATASETS)} nor an existing text file: fix the name or the path.")
    paths_by_split: PathsBySplit = {"validation": path}
  elif isinstance(dataset, Mapping):
    paths_by_split = dataset
  else:
    raise TypeError(f"dataset must be a TFDS text data set name, a path or a split->paths mapping, got "
                    f"{type(dataset).__name__}.")
  files_by_split = _expand_paths(paths_by_split)
  first_file = next(iter(files_by_split.values()))[0]
  stem = os.path.splitext(os.path.basename(first_file))[0]
  digest = hashlib.sha256(json.dumps(files_by_split, sort_keys=True).encode()).hexdigest()[:8]
  name = f"lm.text_{_sanitize(stem)}_{digest}.{vocab_name}{_options_suffix(options, defaults)}"
  return register_text_file_task(name, files_by_split, vocabulary, add_eos=add_eos,
                                 lines_per_document=lines_per_document,
                                 concatenate_documents=concatenate_documents)
