"""MathDial (Macina et al. 2023, arXiv 2305.14536) as CURIO's education data: real teacher-student
tutoring dialogues whose student (an LLM prompted with a free-text profile) has a hidden type.

The file (`../shared/data/dialogue/mathdial/test.jsonl`: 599 dialogues, 142 distinct profiles) has
one dialogue per line: `student_profile` ("Mariana is a 7th grade student. She has difficulty
determining which pieces of information are relevant ..."), `conversation` ("Teacher: (focus)...
|EOM|Student: ...|EOM|..."; the student's turns are tagged "Student" or the student's first name).

Hidden type (`student_type`): the profile's stated difficulty. Every profile is "<Name> is a 7th
grade student." followed by one sentence naming one of six problem-solving difficulties (the
taxonomy MathDial prompted its student LLM with). We lower-case the profile and look for the key
phrase of each difficulty (`DIFFICULTIES`); exactly one must occur, otherwise the row is bad (named
by file:line). Counts in test.jsonl: principles 117, comprehension 105, relevance 103, operations
103, problem_type 88, procedures 83.

Turns: consecutive teacher segments form one teacher utterance (its move tag "(focus)",
"(probing)", ... is kept apart in `moves`), the student segments that follow form the reply; a
teacher utterance at the end gets the reply "".

Split (`split_by_dialogue`): whole dialogues go to training or held-out (a seeded permutation), so
the user model (trained on training dialogues' student replies -> type) and the simulated student
(`ReplayStudent`, which answers turn t with the recorded student reply of its dialogue) of held-out
users come from dialogues never trained on. The same student persona (name + difficulty) can
appear in both splits: MathDial has 142 profiles over 599 dialogues; a split by profile would be
stricter and is not done here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Sequence

import numpy as np

from persona_jax.curio import envs
from persona_jax.data import user_histories
from persona_jax.errors import UserError

DEFAULT_PATH = "../shared/data/dialogue/mathdial/test.jsonl"

# (type name, the key phrase of its difficulty in a lower-cased profile)
DIFFICULTIES = (
    ("principles", "understanding of underlying ideas and principles"),
    ("comprehension", "understanding what the problem is asking"),
    ("relevance", "which pieces of information are relevant"),
    ("operations", "determine the correct operation"),
    ("problem_type", "recognize the problem type"),
    ("procedures", "what steps or procedures are required"),
)
TYPE_NAMES = tuple(name for name, _ in DIFFICULTIES)
_PREAMBLE = re.compile(r"^\s*([A-Za-z][\w'-]*) is a 7th grade student\.\s*(.*)$", re.S)
_MOVE = re.compile(r"^\s*\(([a-z_ ]+)\)\s*")
REQUIRED = ("qid", "student_profile", "conversation", "question")


@dataclasses.dataclass(frozen=True)
class MathDialDialogue:
  """One tutoring dialogue: where it came from, the student's hidden type and the turns."""
  where: str  # "<file>:<line>"
  qid: int
  question: str
  profile_text: str
  student_name: str
  student_type: str  # one of TYPE_NAMES
  turns: tuple[tuple[str, str], ...]  # (teacher utterance, student reply)
  moves: tuple[str, ...]  # the teacher's move tag of each turn ("" when untagged)

  @property
  def type_index(self) -> int:
    return TYPE_NAMES.index(self.student_type)

  def profile(self) -> envs.UserProfile:
    """The hidden profile as the room's simulated users take it."""
    return envs.UserProfile(values={"student_profile": self.profile_text, "where": self.where},
                            user_type=self.student_type)


def student_type(profile: str, where: str = "") -> tuple[str, str]:
  """(student's first name, type name) from a free-text MathDial profile; ValueError naming `where`
  when the profile does not start "<Name> is a 7th grade student." or states no / several known
  difficulties."""
  match = _PREAMBLE.match(profile)
  if match is None:
    raise UserError(f"{where}: student_profile {profile[:80]!r} does not start with '<Name> is a 7th "
                    "grade student.'; the type is read from the difficulty stated after it.")
  name, rest = match.group(1), match.group(2).lower()
  found = [t for t, phrase in DIFFICULTIES if phrase in rest]
  if len(found) != 1:
    what = "no known difficulty" if not found else f"several difficulties ({', '.join(found)})"
    raise UserError(f"{where}: student_profile states {what}: {rest[:120]!r}; expected exactly one "
                    f"of: {'; '.join(p for _, p in DIFFICULTIES)}.")
  return name, found[0]


def parse_conversation(conversation: str, student_name: str, where: str = ""
                       ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
  """(turns, teacher moves) of a "|EOM|"-separated conversation (module docstring)."""
  turns, moves = [], []
  teacher, student, move = [], [], ""
  for index, segment in enumerate(conversation.split("|EOM|")):
    speaker, colon, text = segment.partition(":")
    speaker, text = speaker.strip(), text.strip()
    if not colon or speaker not in ("Teacher", "Student", student_name):
      raise UserError(f"{where}: conversation segment {index + 1} {segment[:60]!r} is not "
                      f"'Teacher: ...', 'Student: ...' or '{student_name}: ...'.")
    if speaker == "Teacher":
      if student:  # the previous turn is complete
        turns.append((" ".join(teacher), " ".join(student)))
        moves.append(move)
        teacher, student, move = [], [], ""
      tag = _MOVE.match(text)
      if tag is not None:
        move = move or tag.group(1).strip()
        text = text[tag.end():]
      teacher.append(text)
    else:
      if not teacher:
        raise UserError(f"{where}: conversation segment {index + 1} is the student's before any "
                        "teacher turn.")
      student.append(text)
  if teacher:
    turns.append((" ".join(teacher), " ".join(student)))
    moves.append(move)
  if not turns:
    raise UserError(f"{where}: empty conversation.")
  return tuple(turns), tuple(moves)


def _row(line: str, where: str) -> MathDialDialogue:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as error:
    raise UserError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); fix or remove "
                    "the line.") from None
  if not isinstance(row, dict):
    raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
  missing = [f for f in REQUIRED if f not in row]
  if missing:
    raise UserError(f"{where}: missing field(s) {', '.join(missing)}.")
  for field in ("student_profile", "conversation", "question"):
    if not isinstance(row[field], str) or not row[field].strip():
      raise UserError(f"{where}: {field} must be a non-empty string, got {row[field]!r:.60}.")
  if isinstance(row["qid"], bool) or not isinstance(row["qid"], int):
    raise UserError(f"{where}: qid must be an integer, got {row['qid']!r:.40}.")
  name, kind = student_type(row["student_profile"], where)
  turns, moves = parse_conversation(row["conversation"], name, where)
  return MathDialDialogue(where=where, qid=row["qid"], question=row["question"],
                          profile_text=row["student_profile"], student_name=name,
                          student_type=kind, turns=turns, moves=moves)


def read_mathdial(path: str | os.PathLike = DEFAULT_PATH, *, on_bad_row: str = "error"
                  ) -> list[MathDialDialogue]:
  """Reads a MathDial JSONL file (blank lines allowed). Every row is checked: UTF-8, a JSON object,
  the fields `qid` (int), `student_profile`, `conversation`, `question` (non-empty strings), a
  profile with exactly one known difficulty, a conversation of Teacher / student segments.

  on_bad_row: "error" (default): one UserError naming every bad row as "<file>:<line>: ...";
    "skip": leave them out and print how many of how many were skipped, each with its file:line.
  """
  if on_bad_row not in ("error", "skip"):
    raise UserError(f"read_mathdial: on_bad_row must be 'error' or 'skip', got {on_bad_row!r}.")
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"MathDial file {path} not found (expected {DEFAULT_PATH} from the repository "
                    "root, the MathDial test split as JSONL).")
  dialogues, bad, num_rows = [], [], 0
  with open(path, "rb") as file:
    for line_number, raw in enumerate(file, start=1):
      where = f"{path}:{line_number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as error:
        num_rows += 1
        bad.append(f"{where}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}).")
        continue
      if not line.strip():
        continue
      num_rows += 1
      try:
        dialogues.append(_row(line, where))
      except ValueError as error:
        bad.append(str(error))
  user_histories.report_bad_rows(bad, num_rows, path, on_bad_row, reader="mathdial")
  return dialogues


def split_by_dialogue(dialogues: Sequence[MathDialDialogue], held_out_fraction: float = 0.2,
                      seed: int = 0) -> tuple[list[MathDialDialogue], list[MathDialDialogue]]:
  """(training, held-out) whole dialogues, a seeded permutation; every type keeps a training
  dialogue."""
  if not 0.0 < held_out_fraction < 1.0:
    raise UserError(f"split_by_dialogue: held_out_fraction must be in (0, 1), got "
                    f"{held_out_fraction}.")
  order = np.random.default_rng(seed).permutation(len(dialogues))
  count = int(round(held_out_fraction * len(dialogues)))
  held_out = [dialogues[i] for i in sorted(order[:count])]
  training = [dialogues[i] for i in sorted(order[count:])]
  lost = set(d.student_type for d in dialogues) - set(d.student_type for d in training)
  if lost:
    raise UserError(f"split_by_dialogue: no training dialogue of type(s) {sorted(lost)}; lower "
                    "held_out_fraction.")
  return training, held_out


def user_model_examples(dialogues: Sequence[MathDialDialogue]) -> list[tuple[str, int]]:
  """(the student's words up to and including turn t, type index) for every turn t of every
  dialogue: what a user model reads (only the student's words, as `tasks.reply_features`)."""
  out = []
  for dialogue in dialogues:
    said = []
    for _, reply in dialogue.turns:
      said.append(reply)
      out.append((" ".join(said).strip(), dialogue.type_index))
  return out


class ReplayStudent:
  """A simulated student from real dialogues: answers the agent's turn t with the student reply
  recorded at turn t of the profile's dialogue ("" past its end). It ignores what the agent said,
  so it measures what a policy can learn from a real student's words, not a reactive student."""

  def __init__(self, dialogues: Sequence[MathDialDialogue]):
    self.by_where = {d.where: d for d in dialogues}

  def respond(self, profile: envs.UserProfile, utterance: str,
              history: Sequence[tuple[str, str]] = ()) -> str:
    del utterance
    dialogue = self.by_where[profile.values["where"]]
    turn = len(history)
    return dialogue.turns[turn][1] if turn < len(dialogue.turns) else ""
