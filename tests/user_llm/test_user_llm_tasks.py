"""User-LLM tasks: examples, features (truncation, unknown items), SeqIO batches, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from persona_jax.data import get_vocabulary
from persona_jax.data import user_histories as uh
from persona_jax.user_llm import tasks

GENRES = ("Drama", "Comedy", "Action", "Horror", "Sci-Fi", "Romance")


def _user(name, num_items, offset=0):
  items = tuple(uh.Interaction(item_id=str(offset + i), rating=1.0 + (i % 5), timestamp=i, title=f"Movie {offset + i}",
                               categories=(GENRES[i % 3], GENRES[3 + (i % 2)])) for i in range(num_items))
  return uh.UserHistory(name, items[:-1], items[-1:])


CATALOG = {str(i): (f"Movie {i}", ("Drama",)) for i in range(200)}


def test_next_movie_examples_hold_the_real_next_item_at_the_label():
  users = [_user("u1", 12), _user("u2", 9, offset=50)]
  examples = tasks.next_movie_examples(users, CATALOG, num_options=5, examples_per_user=3, seed=0)
  assert len(examples) == 6
  for example in examples:
    user = users[0] if example.user_id == "u1" else users[1]
    sequence = user.interactions + user.heldout
    target = sequence[len(example.context)]
    assert example.options[example.label] == target.title
    seen_titles = {item.title for item in sequence}
    assert sum(option in seen_titles for option in example.options) == 1  # negatives never rated
  # Deterministic.
  assert examples == tasks.next_movie_examples(users, CATALOG, num_options=5, examples_per_user=3, seed=0)


def test_favorite_genre_labels_count_the_future_items():
  user = _user("u", 20)
  (example,) = tasks.favorite_genre_examples([user], GENRES, num_options=4, future_items=5, shuffle_options=False)
  future = (user.interactions + user.heldout)[-5:]
  counts = {genre: sum(genre in item.categories for item in future) for genre in GENRES[:4]}
  assert example.options == GENRES[:4]
  assert example.options[example.label] == max(GENRES[:4], key=lambda g: (counts[g], -GENRES.index(g)))
  assert len(example.context) == 15


def test_history_example_truncates_oldest_and_counts_unknown_items():
  user = _user("u", 12)
  items = uh.ItemVocabulary([str(i) for i in range(5)])  # items 5.. are unknown
  categories = uh.ItemVocabulary(GENRES)
  example = tasks.history_example(user.interactions, items, categories, max_length=8)
  assert int(example["num_truncated"]) == 3  # 11 context items, 8 kept: the 3 oldest dropped
  np.testing.assert_array_equal(example["item_ids"], [5, 6] + [uh.ItemVocabulary.UNKNOWN_ID] * 6)
  drama_scifi = (1 << categories.encode_one("Drama")) | (1 << categories.encode_one("Sci-Fi"))
  assert example["genre_bits"][0] == drama_scifi  # item 3's genres
  empty = tasks.history_example((), items, categories, max_length=8)
  assert empty["item_ids"].shape == (0,) and int(empty["num_truncated"]) == 0
  with pytest.raises(ValueError, match="item id '3' is not in the vocabulary"):
    tasks.history_example(user.interactions, uh.ItemVocabulary(["0"], unknown="error"), categories, 8)


def test_choice_task_batches_resume_and_reject_long_prompts():
  users = [_user(f"u{i}", 10 + i, offset=10 * i) for i in range(6)]
  examples = tasks.favorite_genre_examples(users, GENRES, num_options=4, shuffle_options=False)
  spec = tasks.ChoiceTaskSpec(items=uh.ItemVocabulary.from_histories(users),
                              categories=uh.ItemVocabulary(GENRES), max_length=6, text_history_items=3)
  name = tasks.register_choice_task("user_llm.test.genre", {"train": examples}, spec, "bytes")
  width = tasks.longest_prompt(name)
  batches = tasks.ChoiceBatches(name, "train", batch_size=2, max_length=6, max_prompt_length=width, seed=1)
  first = next(batches)
  assert first["prompt_tokens"].shape == (2, width) and first["item_ids"].shape == (2, 6)
  assert first["prompt_mask"][:, -1].all()  # left padded: the last token is real
  np.testing.assert_array_equal(first["options"][0], [ord(c) + 3 for c in "ABCD"])  # bytes: id = byte + 3
  state = batches.get_state()
  expected = next(batches)
  resumed = tasks.ChoiceBatches(name, "train", batch_size=2, max_length=6, max_prompt_length=width, seed=1)
  resumed.set_state(state)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])
  text = get_vocabulary("bytes").decode(first["prompt_tokens"][0][first["prompt_mask"][0]].tolist())
  assert text.startswith("The user's history") and "Showing the last 3 of" in text and text.endswith("Answer: ")
  with pytest.raises(ValueError, match="max_prompt_length"):
    list(tasks.ChoiceBatches(name, "train", batch_size=2, max_length=6, max_prompt_length=width - 1,
                             shuffle=False, repeat=False, drop_remainder=False))


def test_choice_metrics_by_hand():
  logits = np.asarray([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 4.0, 0.0]])
  metrics = tasks.choice_metrics(logits, np.asarray([0, 0, 1]), recall_at=(1, 2))
  assert metrics == {"accuracy": pytest.approx(1 / 3), "recall@1": pytest.approx(1 / 3),
                     "recall@2": pytest.approx(2 / 3)}
