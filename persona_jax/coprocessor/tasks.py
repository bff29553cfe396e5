"""The coprocessor's data: language-modelling SeqIO tasks (`persona_jax.data.lm_task`), packed rows
sharded over processes, a deterministic held-out iterator (every run scores the same tokens), the
general-text mixture, and GSM8K.

Data sets by name (`resolve_dataset`; anything else goes to `persona_jax.data.lm_task`):

  general_mixture        SeqIO mixture of the general text available offline, equal rates:
                         tiny_shakespeare (TFDS), Synthetic-Persona-Chat conversations, Amazon review
                         texts. Never GSM8K or MathDial (about 200 MathDial questions are GSM8K test
                         problems with their solutions).
  persona_chat           Synthetic-Persona-Chat conversations, one document each: train = the
                         published valid CSV (1,000), validation = the test CSV (968; held out).
  amazon_reviews         Amazon Reviews 2023 slice, one document per review ("title\\n\\ntext"):
                         train = training.jsonl (history + held-out review of 598 users),
                         validation = validation.jsonl (70 users; held out).
  wikitext2              WikiText-2 validation (split "validation" only): out of domain, never
                         trained on.
  gsm8k_train_solutions  TASK-SPECIFIC: GSM8K train problems as "Question: ...\\nAnswer: <solution>";
                         train = train.jsonl[:7000], validation = train.jsonl[7000:] (473). The test
                         split is never in it. Only for the row labelled task-specific.

GSM8K (`read_gsm8k`): `../shared/data/reasoning/gsm8k/{train,test}.jsonl`, one `{question, answer}` a
line; the answer is a worked solution whose last line is `#### <number>`. Prompts are
`gsm8k_prompt(question, exemplars)`: k exemplars "Question: q\\nAnswer: a" separated by blank lines,
then "Question: q\\nAnswer:"; the scored continuation is " " + the gold solution.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from persona_jax import data as pdata
from persona_jax.data import tasks as data_tasks
from persona_jax.errors import MissingFileError, UserError

DEFAULT_DATA_DIR = "../shared/data"
GENERAL_SOURCES = ("tiny_shakespeare", "persona_chat", "amazon_reviews")
GENERAL_MIXTURE = "general_mixture"
GSM8K_TRAIN_SOLUTIONS = "gsm8k_train_solutions"
NAMED_DATASETS = GENERAL_SOURCES + ("wikitext2", GENERAL_MIXTURE, GSM8K_TRAIN_SOLUTIONS)
# The held-out split each named data set is evaluated on.
EVAL_SPLITS = {"tiny_shakespeare": "validation", "persona_chat": "validation",
               "amazon_reviews": "validation", "wikitext2": "validation",
               GSM8K_TRAIN_SOLUTIONS: "validation"}
GSM8K_TRAIN_HELD_OUT_START = 7000  # train.jsonl[7000:] is the task-specific task's validation split


def train_iterator(task: str, *, sequence_length: int, batch_size: int, seed: int):
  """Packed training rows of `task` (this process's shard of the global `batch_size`)."""
  num_processes, index = jax.process_count(), jax.process_index()
  return pdata.make_iterator(task, split="train", sequence_length=sequence_length,
                             batch_size=batch_size // num_processes, seed=seed, pack=True,
                             shard_index=index, num_shards=num_processes)


def eval_iterator(task: str, split: str, *, sequence_length: int, batch_size: int, seed: int):
  """One unshuffled pass over `split` (this process's shard), the last batch kept."""
  num_processes, index = jax.process_count(), jax.process_index()
  return pdata.make_iterator(task, split=split, sequence_length=sequence_length,
                             batch_size=batch_size // num_processes, seed=seed, shuffle=False,
                             pack=True, num_epochs=1, drop_remainder=False, shard_index=index,
                             num_shards=num_processes)


# ------------------------------------------------------------------------------------------------
# Text sources
# ------------------------------------------------------------------------------------------------
def _require(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise MissingFileError(f"{path}: missing ({what}); point coprocessor.job.data_dir at the shared "
                           f"data folder (../shared/data, see its SOURCES.md).")
  return path


def persona_chat_texts(data_dir: str | os.PathLike, split: str) -> list[str]:
  """Synthetic-Persona-Chat conversations ("User 1: ...\\nUser 2: ..."), one string each.

  split "train" reads the published valid CSV, "validation" the test CSV (held out)."""
  name = {"train": "valid", "validation": "test"}.get(split)
  if name is None:
    raise UserError(f"persona_chat has splits train/validation, not {split!r}.")
  path = _require(pathlib.Path(data_dir) / "dialogue" / "synthetic_persona_chat" /
                  f"Synthetic-Persona-Chat_{name}.csv", "Synthetic-Persona-Chat")
  with open(path, newline="", encoding="utf-8") as file:
    rows = list(csv.DictReader(file))
  texts = [row.get("Best Generated Conversation", "").strip() for row in rows]
  if not rows or "Best Generated Conversation" not in rows[0]:
    raise UserError(f"{path}: no 'Best Generated Conversation' column; is it the published CSV?")
  return [text for text in texts if text]


def amazon_review_texts(data_dir: str | os.PathLike, split: str) -> list[str]:
  """Amazon review texts ("title\\n\\ntext"), one per review, from every user of the split's file
  (train: training.jsonl, history and held-out review; validation: validation.jsonl)."""
  name = {"train": "training", "validation": "validation"}.get(split)
  if name is None:
    raise UserError(f"amazon_reviews has splits train/validation, not {split!r}.")
  path = _require(pathlib.Path(data_dir) / "amazon" / "amazon2023_user_histories" / f"{name}.jsonl",
                  "Amazon Reviews 2023 slice")
  texts = []
  with open(path, encoding="utf-8") as file:
    for line_number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        user = json.loads(line)
        reviews = list(user["history"]) + ([user["heldout"]] if user.get("heldout") else [])
      except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path}:{line_number}: not a user row with 'history' ({error}).") from None
      for review in reviews:
        body = (review.get("review_full") or review.get("review_excerpt") or "").strip()
        title = (review.get("review_title") or "").strip()
        if body:
          texts.append(f"{title}\n\n{body}" if title else body)
  return texts


# ------------------------------------------------------------------------------------------------
# GSM8K
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GsmProblem:
  """One GSM8K problem.

  index: line number in its file, from 0 (the problem's id in the result rows).
  question: the word problem.
  solution: the published worked solution, its last line `#### <number>` included.
  final_answer: the number after `####`, normalized (`eval.normalize_number`).
  """
  index: int
  question: str
  solution: str
  final_answer: str


def read_gsm8k(data_dir: str | os.PathLike, split: str) -> list[GsmProblem]:
  """`<data_dir>/reasoning/gsm8k/<split>.jsonl` (split "train": 7,473 problems, "test": 1,319)."""
  from persona_jax.coprocessor import eval as eval_lib  # pylint: disable=g-import-not-at-top

  if split not in ("train", "test"):
    raise UserError(f"GSM8K has splits 'train' and 'test', not {split!r}.")
  path = _require(pathlib.Path(data_dir) / "reasoning" / "gsm8k" / f"{split}.jsonl", "GSM8K")
  problems = []
  with open(path, encoding="utf-8") as file:
    for line_number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        question, solution = row["question"].strip(), row["answer"].strip()
      except (json.JSONDecodeError, KeyError, AttributeError) as error:
        raise UserError(f"{path}:{line_number}: not a GSM8K row {{question, answer}} ({error}).") from None
      final = eval_lib.extract_final_answer(solution)
      if final is None:
        raise UserError(f"{path}:{line_number}: the answer does not end in '#### <number>'.")
      problems.append(GsmProblem(len(problems), question, solution, final))
  if not problems:
    raise UserError(f"{path}: no problems.")
  return problems


def gsm8k_exemplars(train: Sequence[GsmProblem], num_shots: int, seed: int = 1234) -> list[GsmProblem]:
  """`num_shots` train problems drawn once with `seed` (the same exemplars for every test problem)."""
  if num_shots == 0:
    return []
  if not 0 < num_shots <= len(train):
    raise UserError(f"num_shots={num_shots} must be in [0, {len(train)}].")
  order = np.random.default_rng(seed).permutation(len(train))[:num_shots]
  return [train[i] for i in order]


def gsm8k_prompt(question: str, exemplars: Sequence[GsmProblem] = ()) -> str:
  """k exemplars then the question; the prompt ends with "Answer:" (its last token is the first
  token the decoder feeds after the latents)."""
  shots = "".join(f"Question: {e.question}\nAnswer: {e.solution}\n\n" for e in exemplars)
  return f"{shots}Question: {question}\nAnswer:"


def gsm8k_continuation(problem: GsmProblem) -> str:
  """The scored continuation of a prompt: the gold worked solution after one space."""
  return " " + problem.solution


def gsm8k_generation_subset(num_problems: int, every: int = 6) -> list[int]:
  """The fixed generation subset: test problems 0, `every`, 2*`every`, ... (220 of 1,319 for 6)."""
  if every < 1:
    raise UserError(f"generation_every={every} must be >= 1.")
  return list(range(0, num_problems, every))


# ------------------------------------------------------------------------------------------------
# SeqIO registration
# ------------------------------------------------------------------------------------------------
def _text_task(prefix: str, texts_by_split: Mapping[str, Sequence[str]], vocabulary) -> str:
  """An in-memory LM task: each text one document, tokenized (no EOS), cut into chunks of the
  sequence length that never span two documents (packing fills the rows)."""
  rows = {split: [{"targets": text} for text in texts] for split, texts in texts_by_split.items()}
  return pdata.register_in_memory_task(
      f"{prefix}.{pdata.vocabulary_name(vocabulary)}", rows,
      {"targets": tf.TensorSpec((), tf.string)},
      output_features=data_tasks._output_features(vocabulary, False),  # pylint: disable=protected-access
      preprocessors=[seqio.preprocessors.tokenize,
                     functools.partial(data_tasks.chunk_tokens, concatenate_documents=False)])


def persona_chat_task(vocabulary, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
  return _text_task("coprocessor.persona_chat", {s: persona_chat_texts(data_dir, s)
                                                 for s in ("train", "validation")}, vocabulary)


def amazon_reviews_task(vocabulary, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
  return _text_task("coprocessor.amazon_reviews", {s: amazon_review_texts(data_dir, s)
                                                   for s in ("train", "validation")}, vocabulary)


def gsm8k_train_solutions_task(vocabulary, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
  """TASK-SPECIFIC data: GSM8K train problems with their solutions (never the test split)."""
  train = read_gsm8k(data_dir, "train")
  texts = [gsm8k_prompt(p.question) + gsm8k_continuation(p) for p in train]
  return _text_task("coprocessor.gsm8k_train_solutions",
                    {"train": texts[:GSM8K_TRAIN_HELD_OUT_START],
                     "validation": texts[GSM8K_TRAIN_HELD_OUT_START:]}, vocabulary)


def wikitext2_task(vocabulary, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
  path = _require(pathlib.Path(data_dir) / "text" / "wikitext2_valid.txt", "WikiText-2 validation")
  return pdata.lm_task(str(path), vocabulary)


def general_mixture(vocabulary, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *,
                    tfds_data_dir: str | None = None,
                    rates: Mapping[str, float] | None = None) -> str:
  """Registers (once) the general-text SeqIO mixture; returns its name.

  Args:
    rates: {source: rate} over `GENERAL_SOURCES` (relative numbers of chunks; default equal).
  """
  rates = dict(rates or {name: 1.0 for name in GENERAL_SOURCES})
  unknown = set(rates) - set(GENERAL_SOURCES)
  if unknown or not rates:
    raise UserError(f"general mixture rates name {sorted(unknown) or 'nothing'}; the sources are "
                    f"{GENERAL_SOURCES}.")
  tasks = {name: resolve_dataset(name, vocabulary, data_dir=data_dir, tfds_data_dir=tfds_data_dir)
           for name in rates}
  entries = [(tasks[name], float(rates[name])) for name in sorted(rates)]
  digest = hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:12]
  name = f"coprocessor.general_mixture.{pdata.vocabulary_name(vocabulary)}.{digest}"
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, entries)
  return name


def resolve_dataset(dataset: Any, vocabulary, *, data_dir: str | os.PathLike = DEFAULT_DATA_DIR,
                    tfds_data_dir: str | None = None) -> str:
  """The SeqIO task (or mixture) name of a data set: a `NAMED_DATASETS` entry, or whatever
  `persona_jax.data.lm_task` takes (a TFDS text data set name, a text file, a split->files map)."""
  if dataset == "tiny_shakespeare":
    return pdata.lm_task("tiny_shakespeare", vocabulary, tfds_data_dir=tfds_data_dir)
  builders = {"persona_chat": persona_chat_task, "amazon_reviews": amazon_reviews_task,
              "wikitext2": wikitext2_task, GSM8K_TRAIN_SOLUTIONS: gsm8k_train_solutions_task}
  if isinstance(dataset, str) and dataset in builders:
    return builders[dataset](vocabulary, data_dir)
  if dataset == GENERAL_MIXTURE:
    return general_mixture(vocabulary, data_dir, tfds_data_dir=tfds_data_dir)
  return pdata.lm_task(dataset, vocabulary, tfds_data_dir=tfds_data_dir)
