"""MathDial reader: the type derived from the profile's stated difficulty, turns, bad rows named by
file:line, the split by dialogue and the replay student, on hand-made rows."""

import json
import os

import pytest

from persona_jax.curio import mathdial
from persona_jax.errors import UserError

REAL = "/work/shared/data/dialogue/mathdial/test.jsonl"


def _row(profile="Mariana is a 7th grade student. She has difficulty determining which pieces of "
         "information are relevant and which are irrelevant to solving the problem.",
         conversation="Teacher: (generic)Hi Mariana, talk me through it|EOM|Student: I added 5."
         "|EOM|Teacher: (focus)Why add?|EOM|Teacher: Think again.|EOM|Mariana: Oh, subtract."
         "|EOM|Teacher: (generic)Yes", qid=7, **extra):
  row = {"qid": qid, "question": "How many spoons?", "student_profile": profile,
         "conversation": conversation}
  row.update(extra)
  return row


def _write(tmp_path, rows, name="dial.jsonl"):
  path = tmp_path / name
  with open(path, "wb") as f:
    for row in rows:
      f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())
  return str(path)


@pytest.mark.parametrize("sentence,expected", [
    ("He has problem with understanding of underlying ideas and principles and a recognition of "
     "when to apply them.", "principles"),
    ("She struggle most with understanding what the problem is asking them to do.", "comprehension"),
    ("He has difficulty determining which pieces of information are relevant and which are "
     "irrelevant to solving the problem.", "relevance"),
    ("They struggle to put the numbers in the correct order in the equation or determine the "
     "correct operation to use.", "operations"),
    ("He struggle to recognize the problem type and therefore do not know what strategy to use to "
     "solve it.", "problem_type"),
    ("She has problem with understanding of what steps or procedures are required to solve a "
     "problem.", "procedures"),
])
def test_type_from_the_stated_difficulty(sentence, expected):
  assert mathdial.student_type(f"Riya is a 7th grade student. {sentence}") == ("Riya", expected)


def test_profiles_without_exactly_one_known_difficulty_are_refused():
  with pytest.raises(UserError, match="f.jsonl:3: student_profile states no known difficulty"):
    mathdial.student_type("Riya is a 7th grade student. She likes football.", "f.jsonl:3")
  both = ("Riya is a 7th grade student. She cannot recognize the problem type nor see which pieces "
          "of information are relevant.")
  with pytest.raises(UserError, match="several difficulties \\(relevance, problem_type\\)"):
    mathdial.student_type(both, "f.jsonl:4")
  with pytest.raises(UserError, match="does not start with '<Name> is a 7th grade student.'"):
    mathdial.student_type("A student who struggles to recognize the problem type.", "f.jsonl:5")


def test_reader_turns_moves_and_student_name_segments(tmp_path):
  dialogues = mathdial.read_mathdial(_write(tmp_path, [_row(), b"\n"]))
  (d,) = dialogues
  assert d.where.endswith("dial.jsonl:1") and d.student_type == "relevance" and d.qid == 7
  assert d.turns == (("Hi Mariana, talk me through it", "I added 5."),
                     ("Why add? Think again.", "Oh, subtract."), ("Yes", ""))
  assert d.moves == ("generic", "focus", "generic")
  assert d.profile().user_type == "relevance"


def test_every_bad_row_is_named_by_file_and_line(tmp_path):
  rows = [_row(),
          b"{not json\n",
          _row(profile="Seth is a 7th grade student. He is bored."),
          _row(conversation="Teacher: hi|EOM|Coach: hello"),
          _row(qid="7"),
          b"\xff\xfe bad bytes\n",
          {"qid": 1, "student_profile": "x"},
          _row(conversation="Student: I start|EOM|Teacher: ok")]
  path = _write(tmp_path, rows)
  with pytest.raises(UserError) as error:
    mathdial.read_mathdial(path)
  message = str(error.value)
  assert message.startswith(f"{path}:2: malformed JSON")
  assert "7 bad rows of 8" in message
  for line, text in ((3, "states no known difficulty"), (4, "segment 2 'Coach: hello'"),
                     (5, "qid must be an integer"), (6, "not UTF-8 (byte 0xff"),
                     (7, "missing field(s) conversation, question"),
                     (8, "the student's before any teacher turn")):
    assert f"{path}:{line}: " in message and text in message, (line, text)
  kept = mathdial.read_mathdial(path, on_bad_row="skip")
  assert [d.where for d in kept] == [f"{path}:1"]
  with pytest.raises(UserError, match="not found"):
    mathdial.read_mathdial(tmp_path / "missing.jsonl")


def test_split_by_dialogue_and_the_replay_student(tmp_path):
  kinds = [s for s, _ in mathdial.DIFFICULTIES]
  phrases = dict(mathdial.DIFFICULTIES)
  rows = [_row(profile=f"Ann is a 7th grade student. She fails at {phrases[kinds[i % 6]]}.", qid=i,
               conversation=f"Teacher: q{i}|EOM|Ann: a{i}|EOM|Teacher: r{i}|EOM|Student: b{i}")
          for i in range(30)]
  dialogues = mathdial.read_mathdial(_write(tmp_path, rows))
  training, held_out = mathdial.split_by_dialogue(dialogues, 0.2, seed=1)
  assert len(held_out) == 6 and len(training) == 24
  assert not {d.where for d in training} & {d.where for d in held_out}
  assert (training, held_out) == mathdial.split_by_dialogue(dialogues, 0.2, seed=1)
  assert held_out != mathdial.split_by_dialogue(dialogues, 0.2, seed=2)[1]
  student = mathdial.ReplayStudent(held_out)
  d = held_out[0]
  assert student.respond(d.profile(), "anything") == f"a{d.qid}"
  assert student.respond(d.profile(), "x", [("q", "a")]) == f"b{d.qid}"
  assert student.respond(d.profile(), "x", [("q", "a")] * 2) == ""
  examples = mathdial.user_model_examples([d])
  assert examples == [(f"a{d.qid}", d.type_index), (f"a{d.qid} b{d.qid}", d.type_index)]


@pytest.mark.skipif(not os.path.exists(REAL), reason="MathDial data not present")
def test_the_real_file_reads_without_bad_rows():
  dialogues = mathdial.read_mathdial(REAL)
  assert len(dialogues) == 599
  counts = {t: sum(d.student_type == t for d in dialogues) for t in mathdial.TYPE_NAMES}
  assert counts == {"principles": 117, "comprehension": 105, "relevance": 103, "operations": 103,
                    "problem_type": 88, "procedures": 83}
  assert len({d.profile_text for d in dialogues}) == 142
