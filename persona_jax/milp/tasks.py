"""MiLP data and metrics: users with a persona, a history and held-out responses, as SeqIO tasks.

A *user* is one speaker of one conversation:
  * Synthetic-Persona-Chat (`synthetic_persona_chat`): "User 2" of a conversation; persona = the
    "user 2 personas" sentences. Dev users come from the valid CSV, test users from the test CSV.
  * MathDial (`mathdial`): the student of a tutoring dialogue; persona = the `student_profile`
    sentences. Only test.jsonl exists: dev users are its first rows, test users its last rows.
The user's turns are cut at `history_fraction` of the conversation:
  * history (what the memory is trained on): the persona lines and every turn before the cut;
  * held-out examples: each of the user's own turns after the cut (at most `responses_per_user`, in
    order), with the `context_turns` turns before it as the prompt.

SeqIO tasks:
  * `milp.history.<user_id>.<path hash>.<vocabulary>`: a language-modelling task over the user's history
    (written to `<data_dir>/<user_id>.txt`, registered with `persona_jax.data.register_text_file_task`);
  * `milp.responses.<dataset>.<content hash>`: the held-out examples of the dataset's users, splits
    "dev" and "test", text features `user_id`, `prompt`, `response`, `persona` (persona facts joined
    by newlines), registered in memory (`persona_jax.data.register_in_memory_task`).

Metrics: ROUGE-L F-measure (`rouge_score`, stemming on) against the reference response, and
Persona-F1: the token-level F1 (SQuAD normalization: lowercase, no punctuation or articles) between the
response and each persona fact, maximised over the facts (a response voices one fact at a time).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import string
from typing import Sequence

import seqio
import tensorflow as tf

from persona_jax import data as pdata
from persona_jax.errors import MissingFileError, UserError

DATASETS = ("synthetic_persona_chat", "mathdial")
SPEAKERS = {"synthetic_persona_chat": ("User 2", "User 1"), "mathdial": ("Student", "Teacher")}


@dataclasses.dataclass(frozen=True)
class HeldOutExample:
  prompt: str  # the context turns, then "<user speaker>:" (the model continues with the response)
  response: str


@dataclasses.dataclass(frozen=True)
class User:
  """One user: id, persona facts, history turns ("Speaker: text"), held-out examples."""
  user_id: str
  persona: tuple[str, ...]
  history: tuple[str, ...]
  held_out: tuple[HeldOutExample, ...]
  speaker: str

  def history_text(self) -> str:
    """What the memory is trained on: persona lines, then the past turns, one per line."""
    return "\n".join([f"Persona: {fact}" for fact in self.persona] + list(self.history)) + "\n"


def _utf8_lines(path: pathlib.Path, bad: list[str]) -> list[str]:
  """The file's lines (newlines kept), decoded as UTF-8; a line that is not UTF-8 is named in `bad`
  (`<file>:<line>: not UTF-8 ...`) and decoded with replacement characters so the other rows are still
  checked (collect-then-raise, as `persona_jax.data.user_histories.read_amazon_jsonl`)."""
  lines = []
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, 1):
      try:
        lines.append(raw.decode("utf-8"))
      except UnicodeDecodeError as error:
        bad.append(f"{path}:{line_number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                   f"{error.start + 1}); re-encode the file as UTF-8 or remove that line.")
        lines.append(raw.decode("utf-8", errors="replace"))
  return lines


def _raise_bad_rows(path: pathlib.Path, bad: list[str], num_rows: int) -> None:
  """One UserError: the first bad row's message, then every bad row of the file (file:line each)."""
  if not bad:
    return
  listed = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more." if len(bad) > 20 else "")
  more = f"\n({len(bad)} bad rows of {num_rows} in {path}:\n{listed})" if len(bad) > 1 else ""
  raise UserError(bad[0] + more + "\nFix or remove these rows (nothing is skipped silently).")


def _persona_chat_rows(path: pathlib.Path) -> list[dict]:
  """Synthetic-Persona-Chat CSV rows -> {"id", "persona", "turns", "where"}. Every bad row (not UTF-8,
  too few or too many fields, a persona or conversation cell that is not text, an exact duplicate of
  an earlier row) is named as `<file>:<line>` in one UserError; an empty conversation is not an error
  (its user has no turns: `load_users` counts and reports it as skipped)."""
  bad: list[str] = []
  lines = _utf8_lines(path, bad)
  reader = csv.DictReader(lines)
  needed = ("user 2 personas", "Best Generated Conversation")
  header = reader.fieldnames or []
  if not set(needed) <= set(header):
    raise UserError(f"{path}: columns {sorted(header)} lack {sorted(set(needed) - set(header))}; "
                    "expected the Synthetic-Persona-Chat CSV.")
  rows, first_line_of = [], {}
  previous_end, num_rows = reader.line_num, 0
  for index, row in enumerate(reader):
    num_rows += 1
    line_number, previous_end = previous_end + 1, reader.line_num  # a quoted cell spans lines
    where = f"{path}:{line_number}"
    if None in row:  # more cells than the header: csv puts the rest under the key None
      bad.append(f"{where}: row has {len(header) + len(row[None])} fields, the header has "
                 f"{len(header)}; a cell with a comma or newline must be quoted.")
      continue
    short = [name for name in header if row.get(name) is None]
    if short:
      bad.append(f"{where}: short row: it has {len(header) - len(short)} of the header's "
                 f"{len(header)} fields (missing {short}).")
      continue
    key = (row["user 2 personas"], row["Best Generated Conversation"])
    if key in first_line_of and key[1].strip():
      bad.append(f"{where}: duplicate of the row at line {first_line_of[key]} (same persona and "
                 "conversation); remove one.")
      continue
    first_line_of.setdefault(key, line_number)
    rows.append({"id": f"spc_{path.stem.split('_')[-1]}_{index}", "where": where,
                 "persona": [s.strip() for s in row["user 2 personas"].splitlines() if s.strip()],
                 "turns": [t.strip() for t in row["Best Generated Conversation"].splitlines()
                           if t.strip()]})
  _raise_bad_rows(path, bad, num_rows)
  return rows


def _mathdial_rows(path: pathlib.Path) -> list[dict]:
  """MathDial JSONL rows -> {"id", "persona", "turns", "where"}. Every bad row (not UTF-8, not JSON, a
  field missing or null or of the wrong type, a qid that is not an integer >= 0, an exact duplicate
  of an earlier row) is named as `<file>:<line>` in one UserError. Several conversations may share a
  question (qid): the first keeps the id `mathdial_<qid>`, later ones get `mathdial_<qid>_<n>`."""
  bad: list[str] = []
  rows, first_line_of, seen_qids = [], {}, collections.Counter()
  num_rows = 0
  for line_number, line in enumerate(_utf8_lines(path, bad), 1):
    if not line.strip():
      continue
    num_rows += 1
    where = f"{path}:{line_number}"
    if "\ufffd" in line and any(entry.startswith(where + ":") for entry in bad):
      continue  # named above as not UTF-8
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      bad.append(f"{where}: malformed JSON ({error.msg} at column {error.colno}); fix or remove that "
                 "line.")
      continue
    if not isinstance(row, dict):
      bad.append(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
      continue
    missing = [key for key in ("student_profile", "conversation", "qid") if key not in row]
    if missing:
      bad.append(f"{where}: not a MathDial row: missing field(s) {missing}; expected JSON with "
                 "student_profile, conversation and qid.")
      continue
    problems = [f"field {key!r} must be a string, got {row[key]!r}"
                for key in ("student_profile", "conversation") if not isinstance(row[key], str)]
    qid = row["qid"]
    if isinstance(qid, bool) or not isinstance(qid, int) or qid < 0:
      problems.append(f"field 'qid' must be an integer >= 0, got {qid!r}")
    if problems:
      bad.append(f"{where}: " + "; ".join(problems) + ".")
      continue
    key = (qid, row["student_profile"], row["conversation"])
    if key in first_line_of:
      bad.append(f"{where}: duplicate of the row at line {first_line_of[key]} (same qid, "
                 "student_profile and conversation); remove one.")
      continue
    first_line_of[key] = line_number
    seen_qids[qid] += 1
    persona = [s.strip() + "." for s in row["student_profile"].split(".") if s.strip()]
    # Turns look like "Teacher: (generic)Hi ..."; drop the move annotation in parentheses.
    turns = [re.sub(r"^(Teacher|Student):\s*\([a-z]+\)", r"\1: ", t.strip()).replace(":  ", ": ")
             for t in row["conversation"].split("|EOM|") if t.strip()]
    suffix = "" if seen_qids[qid] == 1 else f"_{seen_qids[qid]}"
    rows.append({"id": f"mathdial_{qid}{suffix}", "where": where, "persona": persona, "turns": turns})
  _raise_bad_rows(path, bad, num_rows)
  return rows


def _make_user(row: dict, speaker: str, history_fraction: float, context_turns: int,
               responses_per_user: int) -> User:
  turns = row["turns"]
  cut = int(round(len(turns) * history_fraction))
  held_out = []
  for index in range(cut, len(turns)):
    if len(held_out) == responses_per_user:
      break
    if turns[index].startswith(speaker + ":") and index > 0:
      response = turns[index][len(speaker) + 1:].strip()
      if response:
        context = turns[max(0, index - context_turns):index]
        held_out.append(HeldOutExample(prompt="\n".join(context) + f"\n{speaker}:", response=response))
  return User(user_id=row["id"], persona=tuple(row["persona"]), history=tuple(turns[:cut]),
              held_out=tuple(held_out), speaker=speaker)


def load_users(dataset: str, data_dir: str | os.PathLike, split: str, num_users: int, *,
               history_fraction: float = 0.5, context_turns: int = 2, responses_per_user: int = 2
               ) -> list[User]:
  """The first `num_users` users of `split` ("dev" or "test") that have held-out responses.

  Args:
    dataset: one of `DATASETS`.
    data_dir: the folder holding `synthetic_persona_chat/` and `mathdial/` (../shared/data/dialogue).
    split: "dev" or "test" (see the module docstring for where each comes from).
    num_users: how many users.
    history_fraction: the share of each conversation's turns that is history (the rest is held out).
    context_turns: turns before a held-out response that form its prompt.
    responses_per_user: held-out responses per user (the first ones after the cut).
  """
  if dataset not in DATASETS:
    raise UserError(f"milp dataset {dataset!r} is unknown; choose from {DATASETS}.")
  if split not in ("dev", "test"):
    raise UserError(f"milp split {split!r} is unknown; use 'dev' or 'test'.")
  if not 0.0 < history_fraction < 1.0:
    raise UserError(f"milp history_fraction={history_fraction} must be in (0, 1).")
  root = pathlib.Path(data_dir).expanduser()
  if dataset == "synthetic_persona_chat":
    name = {"dev": "valid", "test": "test"}[split]
    path = root / "synthetic_persona_chat" / f"Synthetic-Persona-Chat_{name}.csv"
    reader = _persona_chat_rows
  else:
    path = root / "mathdial" / "test.jsonl"
    reader = _mathdial_rows
  if not path.is_file():
    raise MissingFileError(f"{path}: missing; point milp.job.data_dir at the dialogue folder "
                            "(../shared/data/dialogue) holding synthetic_persona_chat/ and mathdial/.")
  rows = reader(path)
  if dataset == "mathdial" and split == "test":
    rows = rows[::-1]  # dev users from the front, test users from the back: disjoint for small counts
  speaker = SPEAKERS[dataset][0]
  users, skipped = [], []
  for row in rows:
    if len(users) == num_users:
      break
    user = _make_user(row, speaker, history_fraction, context_turns, responses_per_user)
    if user.held_out and user.history:
      users.append(user)
    else:  # never skipped silently: counted and reported below
      why = ("no turns" if not row["turns"] else "no history before the cut" if not user.history
             else f"no {speaker} turn after the cut")
      skipped.append(f"{row['where']} ({row['id']}: {why})")
  if skipped:
    listed = "; ".join(skipped[:10]) + (f"; ... and {len(skipped) - 10} more" if len(skipped) > 10
                                        else "")
    print(f"milp: {dataset} {split}: skipped {len(skipped)} of the {len(users) + len(skipped)} users "
          f"read (no held-out response or no history at history_fraction={history_fraction}): "
          f"{listed}", flush=True)
  if len(users) < num_users:
    raise UserError(f"{path}: only {len(users)} users with history and held-out responses for split "
                     f"{split!r} ({len(skipped)} skipped), {num_users} requested; lower num_users.")
  return users


def check_history(user: User) -> None:
  if not user.persona and not user.history:
    raise UserError(f"milp user {user.user_id!r} has no history (no persona facts and no past turns): "
                     "there is nothing to store in a memory; drop the user or lower history_fraction's cut.")


def history_task(user: User, vocabulary, data_dir: str | os.PathLike) -> str:
  """Registers (once) the SeqIO LM task over `user`'s history; returns its name."""
  check_history(user)
  vocab = pdata.get_vocabulary(vocabulary)
  path = pathlib.Path(data_dir) / f"{user.user_id}.txt"
  path.parent.mkdir(parents=True, exist_ok=True)
  text = user.history_text()
  if not path.is_file() or path.read_text() != text:
    path.write_text(text)
  # The file's path in the name: another workdir in the same process is another task.
  where = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
  name = f"milp.history.{user.user_id}.{where}.{pdata.vocabulary_name(vocab)}"
  # Each history is one short document (never cut at blank lines); chunks are packed into rows.
  return pdata.register_text_file_task(name, {"train": str(path)}, vocab, add_eos=True,
                                       lines_per_document=10_000, concatenate_documents=False)


def history_iterator(user: User, vocabulary, data_dir: str | os.PathLike, *, sequence_length: int,
                     batch_size: int, seed: int):
  """Packed training rows `[batch_size, sequence_length]` of `user`'s history (repeating, resumable)."""
  task = history_task(user, vocabulary, data_dir)
  return pdata.make_iterator(task, split="train", sequence_length=sequence_length,
                             batch_size=batch_size, seed=seed, pack=True)


RESPONSE_FEATURES = ("user_id", "prompt", "response", "persona")


def responses_task(dataset: str, users_by_split: dict[str, Sequence[User]]) -> str:
  """Registers the held-out responses of these users (splits as given, e.g. dev / test); returns the
  task name `milp.responses.<dataset>.<content hash>` (`persona_jax.data.register_in_memory_task`)."""
  rows = {split: [{"user_id": u.user_id, "prompt": ex.prompt, "response": ex.response,
                   "persona": "\n".join(u.persona)} for u in users for ex in u.held_out]
          for split, users in users_by_split.items()}
  signature = {name: tf.TensorSpec((), tf.string) for name in RESPONSE_FEATURES}
  return pdata.register_in_memory_task(f"milp.responses.{dataset}", rows, signature)


def held_out_examples(task_name: str, split: str) -> list[dict[str, str]]:
  """The rows of a `responses_task` split, in order: [{user_id, prompt, response, persona}]."""
  dataset = seqio.get_mixture_or_task(task_name).get_dataset(None, split=split, shuffle=False)
  return [{k: v.decode() for k, v in row.items()} for row in dataset.as_numpy_iterator()]


# Metrics -----------------------------------------------------------------------------------------
def _normalize_tokens(text: str) -> list[str]:
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return text.split()


def token_f1(prediction: str, reference: str) -> float:
  """SQuAD-style token F1 between two strings."""
  pred, ref = _normalize_tokens(prediction), _normalize_tokens(reference)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def persona_f1(response: str, persona: Sequence[str]) -> float:
  """Token F1 of `response` against each persona fact, maximised over the facts."""
  return max((token_f1(response, fact) for fact in persona), default=0.0)


def rouge_l(prediction: str, reference: str) -> float:
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  return _scorer(rouge_scorer).score(reference, prediction)["rougeL"].fmeasure


_SCORER = []


def _scorer(rouge_scorer):
  if not _SCORER:
    _SCORER.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
  return _SCORER[0]
