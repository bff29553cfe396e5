"""Per-user histories: time split, user split, Amazon JSONL errors, vocabulary policy, text rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from persona_jax.data import user_histories as uh


def _item(item_id, timestamp, rating=4.0, title=None, categories=("Drama",)):
  return uh.Interaction(item_id=str(item_id), rating=rating, timestamp=timestamp,
                        title=title or f"Movie {item_id}", categories=categories)


def _review(asin, timestamp, title="A product", rating=5.0):
  return {"parent_asin": asin, "rating": rating, "timestamp_ms": timestamp, "review_title": "ok",
          "review_full": "full text", "review_excerpt": "excerpt",
          "product": {"title": title, "brand": None, "price": None, "main_category": "Books"}}


def test_split_by_time_orders_and_holds_out_the_last_items():
  items = [_item("c", 30), _item("a", 10), _item("b", 20), _item("d", 40)]
  history = uh.split_by_time("u1", items, heldout_items=2)
  assert [i.item_id for i in history.interactions] == ["a", "b"]
  assert [i.item_id for i in history.heldout] == ["c", "d"]
  assert [i.item_id for i in history.last(1).interactions] == ["b"]
  assert history.last(0).interactions == ()


def test_split_by_time_rejects_a_user_too_short():
  with pytest.raises(ValueError, match="user 'u1' has 1 interactions.*min_interactions"):
    uh.split_by_time("u1", [_item("a", 1)], heldout_items=1)


def test_user_split_is_deterministic_and_near_the_fractions():
  names = [str(i) for i in range(4000)]
  splits = [uh.user_split(name, 0.1, 0.2, seed=0) for name in names]
  assert splits == [uh.user_split(name, 0.1, 0.2, seed=0) for name in reversed(names)][::-1]
  assert abs(splits.count("test") / 4000 - 0.2) < 0.03
  assert abs(splits.count("validation") / 4000 - 0.1) < 0.03
  assert splits != [uh.user_split(name, 0.1, 0.2, seed=1) for name in names]


def test_amazon_reader_reads_rows_and_sorts_history(tmp_path):
  path = tmp_path / "training.jsonl"
  row = {"user_id": "U", "category": "Books", "history": [_review("B2", 20), _review("B1", 10, title=None)],
         "heldout": _review("B3", 30)}
  path.write_text(json.dumps(row) + "\n\n")
  (user,) = uh.read_amazon_jsonl(path)
  assert [i.item_id for i in user.interactions] == ["B1", "B2"]
  assert user.interactions[0].title == uh.MISSING_TITLE
  assert user.heldout[0].item_id == "B3" and user.heldout[0].review_text == "full text"
  assert user.domain == "Books"


@pytest.mark.parametrize("line, message", [
    ("{not json", r"training.jsonl:2: malformed JSON"),
    (json.dumps({"user_id": "U", "category": "Books", "history": []}), r"training.jsonl:2: row is missing.*heldout"),
    (json.dumps({"user_id": "U", "category": "Books", "history": [{"parent_asin": "B"}],
                 "heldout": _review("B3", 30)}), r"training.jsonl:2 \(history\[0\]\): review is missing"),
])
def test_amazon_malformed_row_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "training.jsonl"
  good = {"user_id": "U", "category": "Books", "history": [_review("B1", 1)], "heldout": _review("B2", 2)}
  path.write_text(json.dumps(good) + "\n" + line + "\n")
  with pytest.raises(ValueError, match=message):
    uh.read_amazon_jsonl(path)


def test_amazon_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="training.jsonl"):
    uh.load_amazon_histories(tmp_path)


def test_item_vocabulary_unknown_policy():
  histories = [uh.UserHistory("u", (_item("a", 1), _item("b", 2), _item("a", 3)), (_item("z", 4),))]
  items = uh.ItemVocabulary.from_histories(histories)
  assert items.ids == ("<pad>", "<unk>", "a", "b")  # most frequent first; heldout excluded
  np.testing.assert_array_equal(items.encode(["a", "b", "z"]), [2, 3, uh.ItemVocabulary.UNKNOWN_ID])
  assert items.decode([2, 1, 0]) == ["a", "<unk>", "<pad>"]
  strict = uh.ItemVocabulary(["a"], unknown="error")
  with pytest.raises(ValueError, match="item id 'z' is not in the vocabulary"):
    strict.encode(["a", "z"])
  genres = uh.ItemVocabulary.from_histories(histories, field="categories")
  assert genres.ids == ("<pad>", "<unk>", "Drama")


def test_render_history_text_marks_truncation_and_empty_history():
  history = uh.UserHistory("u", tuple(_item(i, i, rating=3.5) for i in range(5)), (_item("h", 9),))
  text = uh.render_history_text(history, max_items=2)
  assert text.splitlines() == ["Showing the last 2 of 5 interactions.",
                               "1. Movie 3 | genres: Drama | rating: 3.5/5",
                               "2. Movie 4 | genres: Drama | rating: 3.5/5"]
  assert "Movie h" not in uh.render_history_text(history)  # heldout never rendered
  assert uh.render_history_text(uh.UserHistory("u", (), ())) == "The user has no interactions yet."
  with pytest.raises(ValueError, match="unknown field"):
    uh.render_history_text(history, fields=("plot",))


@pytest.mark.slow
def test_real_movielens_and_amazon(shared_dir):
  splits = uh.load_movielens_histories("latest-small")
  assert {name: len(users) for name, users in splits.items()} == {"train": 492, "validation": 66, "test": 52}
  ids = {name: {u.user_id for u in users} for name, users in splits.items()}
  assert not ids["train"] & ids["test"] and not ids["train"] & ids["validation"]
  for user in splits["test"]:
    times = [i.timestamp for i in user.interactions + user.heldout]
    assert times == sorted(times) and len(user.heldout) == 1
  assert sum(len(u.interactions) + 1 for users in splits.values() for u in users) == 100_836
  assert len(uh.load_movielens_catalog("latest-small")) == 9742
  amazon = uh.load_amazon_histories(shared_dir / "data" / "amazon" / "amazon2023_user_histories")
  assert {name: len(users) for name, users in amazon.items()} == {"train": 598, "validation": 70, "test": 23}
