"""Bad rows in the data readers (issue 19): every bad row is named by file:line, nothing is clamped,
nothing is skipped silently. Each test writes its files into a fresh tmp dir."""

import json

import pytest

from persona_jax import data
from persona_jax.data import user_histories as uh


def _review(asin, timestamp, rating=5.0):
  return {"parent_asin": asin, "rating": rating, "timestamp_ms": timestamp, "review_title": "ok",
          "review_full": "full text", "product": {"title": "A product", "main_category": "Books"}}


def _row(user, **changes):
  row = {"user_id": user, "category": "Books", "history": [_review("B1", 1)], "heldout": _review("B2", 2)}
  row.update(changes)
  return json.dumps(row)


def _write(path, lines):
  path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
  return path


@pytest.mark.parametrize("bad_line, message", [
    (b'{"user_id": "\xff\xfe"}', r"training.jsonl:2: not UTF-8 \(byte 0xff at column 14\)"),
    (_row(None), r"training.jsonl:2: field 'user_id' must be a non-empty string id, got None"),
    (_row("U2", category=None), r"training.jsonl:2: field 'category' must be a non-empty string id"),
    (_row("U2", history=[_review(None, 1)]),
     r"training.jsonl:2 \(history\[0\]\): field 'parent_asin' must be a non-empty string id, got None"),
    (_row("U2", heldout=_review("B2", 2, rating=17)),
     r"training.jsonl:2 \(heldout\): review field 'rating' is 17, outside 1..5 stars \(ratings are never clamped\)"),
    (_row("U2", heldout=_review("B2", None)), r"training.jsonl:2 \(heldout\): .*'timestamp_ms' must be an integer"),
    (_row("U1"), r"training.jsonl:2: user 'U1' already has a row for category 'Books' at line 1"),
])
def test_amazon_bad_rows_are_named_by_file_and_line(tmp_path, bad_line, message):
  path = _write(tmp_path / "training.jsonl", [_row("U1"), bad_line])
  with pytest.raises(ValueError, match=message):
    uh.read_amazon_jsonl(path)


def test_amazon_every_bad_row_is_listed_and_skipping_is_counted(tmp_path, capsys):
  path = _write(tmp_path / "training.jsonl",
                [_row("U1"), b"\xff", _row(None), _row("U2"), _row("U1")])
  with pytest.raises(ValueError, match=r"(?s)training.jsonl:2: not UTF-8.*3 bad rows of 5 in .*training.jsonl:3.*"
                     r"training.jsonl:5: user 'U1' already has a row for category"):
    uh.read_amazon_jsonl(path)
  users = uh.read_amazon_jsonl(path, on_bad_row="skip")
  assert [u.user_id for u in users] == ["U1", "U2"]
  out = capsys.readouterr().out
  assert "skipped 3 bad row(s) of 5" in out and "training.jsonl:2" in out and "training.jsonl:5" in out


def test_amazon_same_user_in_another_category_is_fine(tmp_path):
  path = _write(tmp_path / "training.jsonl", [_row("U1"), _row("U1", category="Movies")])
  assert [u.domain for u in uh.read_amazon_jsonl(path)] == ["Books", "Movies"]


def test_amazon_user_in_two_split_files_is_an_error(tmp_path):
  _write(tmp_path / "training.jsonl", [_row("U1")])
  _write(tmp_path / "validation.jsonl", [_row("U2")])
  _write(tmp_path / "test.jsonl", [_row("U1")])
  with pytest.raises(ValueError, match=r"test.jsonl: user 'U1' of category 'Books' is also in training.jsonl"):
    uh.load_amazon_histories(tmp_path)


def test_non_utf8_text_file_is_named_with_its_line_when_the_task_is_registered(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_bytes(b"first line\nsecond caf\xe9 line\n")
  with pytest.raises(ValueError, match=r"corpus.txt:2: not UTF-8 \(byte 0xe9 at column 11\)"):
    data.lm_task(str(path), "bytes")


def test_tfds_bytes_that_are_not_utf8_name_the_row():
  with pytest.raises(ValueError, match=r"movielens/x-ratings row 7: not UTF-8"):
    uh._text(b"caf\xe9", "movielens/x-ratings row 7")
