"""MiLP's data readers (issue 19): every bad row named by file:line, nothing skipped silently.

Each test writes its own small files into a fresh tmp directory laid out as `milp.job.data_dir`
expects (synthetic_persona_chat/..._valid.csv, mathdial/test.jsonl).
"""

import json
import re

import pytest

from persona_jax.errors import UserError
from persona_jax.milp import tasks

HEADER = "user 1 personas,user 2 personas,Best Generated Conversation\n"
CONVERSATION = "User 1: Hi there.\nUser 2: Hello, I love hiking.\nUser 1: Nice!\nUser 2: Mountains are great."


def _persona_chat(tmp_path, body: bytes) -> str:
  directory = tmp_path / "synthetic_persona_chat"
  directory.mkdir()
  (directory / "Synthetic-Persona-Chat_valid.csv").write_bytes(HEADER.encode() + body)
  return str(directory / "Synthetic-Persona-Chat_valid.csv")


def _row(persona="I like hiking.", conversation=CONVERSATION) -> bytes:
  return f'"p1","{persona}","{conversation}"\n'.encode()


def _mathdial_row(**overrides) -> dict:
  row = {"qid": 7, "student_profile": "Cody likes math. Cody is careful.",
         "conversation": "Teacher: (generic)Hi|EOM|Student: Hello|EOM|Teacher: (focus)Why?|EOM|"
                         "Student: Because."}
  row.update(overrides)
  return row


def _mathdial(tmp_path, lines: list) -> str:
  directory = tmp_path / "mathdial"
  directory.mkdir()
  data = b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                  for line in lines)
  (directory / "test.jsonl").write_bytes(data)
  return str(directory / "test.jsonl")


def test_persona_chat_short_row_is_named_by_file_and_line(tmp_path):
  # Line 1 is the header; row 1 spans lines 2-5 (a quoted multi-line conversation); the short row is
  # on line 6. Before: AttributeError: 'NoneType' object has no attribute 'splitlines'.
  path = _persona_chat(tmp_path, _row() + b'"p1","I am short"\n')
  with pytest.raises(UserError, match=re.escape(f"{path}:6: short row") + r".*2 of the header's 3 "
                     r"fields.*Best Generated Conversation"):
    tasks.load_users("synthetic_persona_chat", tmp_path, "dev", 1)


def test_persona_chat_every_bad_row_is_listed(tmp_path):
  # Lines: 2-5 good row, 6-9 its exact duplicate, 10 non-UTF-8 (a one-line row), 11 a row with 4 cells.
  body = _row() + _row() + b'"p1","caf\xe9 lover","User 1: a\\nUser 2: b"\n' + b'"a","b","c","d"\n'
  path = _persona_chat(tmp_path, body)
  with pytest.raises(UserError) as error:
    tasks.load_users("synthetic_persona_chat", tmp_path, "dev", 1)
  message = str(error.value)
  assert message.startswith(f"{path}:10: not UTF-8 (byte 0xe9")
  assert f"{path}:6: duplicate of the row at line 2" in message
  assert f"{path}:11: row has 4 fields, the header has 3" in message
  assert "3 bad rows of 4" in message


def test_persona_chat_one_turn_user_is_counted_and_reported_not_skipped_silently(tmp_path, capsys):
  # Row 1 (line 2): one turn only -> no held-out response; rows 2, 3 are full users.
  path = _persona_chat(tmp_path, _row(conversation="User 2: Hi.") + _row("A") + _row("B"))
  users = tasks.load_users("synthetic_persona_chat", tmp_path, "dev", 2)
  assert [user.persona for user in users] == [("A",), ("B",)]
  out = capsys.readouterr().out
  assert "skipped 1 of the 3 users read" in out
  assert f"{path}:2 (spc_valid_0: no history before the cut)" in out


def test_persona_chat_too_few_users_says_how_many_were_skipped(tmp_path):
  _persona_chat(tmp_path, _row(conversation="User 2: Hi.") + _row("A"))
  with pytest.raises(UserError, match=r"only 1 users .* \(1 skipped\), 2 requested"):
    tasks.load_users("synthetic_persona_chat", tmp_path, "dev", 2)


def test_mathdial_null_conversation_is_named_by_file_and_line(tmp_path):
  # Before: AttributeError: 'NoneType' object has no attribute 'split'.
  path = _mathdial(tmp_path, [_mathdial_row(), _mathdial_row(qid=8, conversation=None)])
  with pytest.raises(UserError, match=re.escape(f"{path}:2: field 'conversation' must be a string, "
                                                "got None")):
    tasks.load_users("mathdial", tmp_path, "dev", 1)


def test_mathdial_every_bad_row_is_listed(tmp_path):
  lines = [_mathdial_row(),                                   # 1 good
           _mathdial_row(),                                   # 2 exact duplicate of line 1
           b'{"qid": 9, "student_profile": "caf\xe9", "conversation": "x"}',  # 3 not UTF-8
           _mathdial_row(qid=-3),                             # 4 qid out of range
           _mathdial_row(qid="ten", student_profile=None),    # 5 two problems in one row
           {"qid": 11, "conversation": "Teacher: hi"},        # 6 a field missing
           b"{not json"]                                      # 7
  path = _mathdial(tmp_path, lines)
  with pytest.raises(UserError) as error:
    tasks.load_users("mathdial", tmp_path, "dev", 1)
  message = str(error.value)
  assert message.startswith(f"{path}:3: not UTF-8 (byte 0xe9")
  for expected in (f"{path}:2: duplicate of the row at line 1",
                   f"{path}:4: field 'qid' must be an integer >= 0, got -3",
                   f"{path}:5: field 'student_profile' must be a string, got None; field 'qid' must "
                   "be an integer >= 0, got 'ten'",
                   f"{path}:6: not a MathDial row: missing field(s) ['student_profile']",
                   f"{path}:7: malformed JSON"):
    assert expected in message
  assert "6 bad rows of 7" in message


def test_mathdial_conversations_sharing_a_question_get_distinct_user_ids(tmp_path):
  # The real test.jsonl has 205 rows whose qid an earlier row already has (599 rows, 394 qids); the
  # user id was "mathdial_<qid>" for both, so two users shared one id (and one history task).
  _mathdial(tmp_path, [_mathdial_row(), _mathdial_row(student_profile="Ann guesses."),
                       _mathdial_row(student_profile="Bo counts.")])
  users = tasks.load_users("mathdial", tmp_path, "dev", 3)
  assert [user.user_id for user in users] == ["mathdial_7", "mathdial_7_2", "mathdial_7_3"]
