"""Task designs that measure personalization: popularity-band distractors, fixed option lists."""

import numpy as np
import pytest

from persona_jax.data import choice_tasks as ct
from persona_jax.data.user_histories import Interaction, UserHistory
from persona_jax.errors import UserError
from persona_jax.evaluation import baselines


def _counts_in_tiers():
  """20 items rated 100 times, 200 rated 10 times, 2000 rated once."""
  counts = {f"hit{i}": 100 for i in range(20)}
  counts.update({f"mid{i}": 10 for i in range(200)})
  counts.update({f"rare{i}": 1 for i in range(2000)})
  return counts


def _popularity_accuracy(counts, targets, distractor_fn):
  option_counts, answers = [], []
  for user, target in enumerate(targets):
    rng = ct.user_rng(0, str(user), "test")
    options, answer = ct.place_answer(target, distractor_fn(target, rng), rng)
    option_counts.append([counts.get(o, 0) for o in options])
    answers.append(answer)
  return baselines.popularity(option_counts, answers).mean()


def test_bands_make_popularity_chance_where_uniform_distractors_let_it_win():
  counts = _counts_in_tiers()
  pool = sorted(counts)
  bands = ct.PopularityBands(counts, min_band_size=20)
  assert [len(b) for b in bands.bands] == [2000, 200, 20]
  # Every target is one of the most popular items (held-out items are drawn by users).
  targets = [f"hit{i % 20}" for i in range(400)]
  uniform = _popularity_accuracy(
      counts, targets, lambda t, rng: ct.uniform_distractors(t, pool, num=3, rng=rng))
  banded = _popularity_accuracy(counts, targets, lambda t, rng: bands.sample(t, num=3, rng=rng))
  assert uniform > 0.95  # the old design: popularity alone answers almost everything
  assert banded == pytest.approx(0.25)  # same band = same count: exact ties, chance


def test_bands_with_distinct_counts_keep_popularity_near_chance():
  # Item i has count i + 1 (every count distinct); targets drawn proportionally to popularity,
  # as held-out items are. Narrow bands leave popularity close to chance, uniform ones do not.
  counts = {f"item{i:04d}": i + 1 for i in range(2000)}
  items = sorted(counts)
  weights = np.array([counts[i] for i in items], np.float64)
  targets = list(np.random.default_rng(1).choice(items, 1000, p=weights / weights.sum()))
  bands = ct.PopularityBands(counts, min_band_size=10)
  uniform = _popularity_accuracy(
      counts, targets, lambda t, rng: ct.uniform_distractors(t, items, num=3, rng=rng))
  banded = _popularity_accuracy(counts, targets, lambda t, rng: bands.sample(t, num=3, rng=rng))
  # Closed form of the old design: target density 2x on [0, 1], P(target beats 3 uniform
  # distractors) = E[x^3] = integral of 2x * x^3 = 2/5.
  assert uniform == pytest.approx(0.4, abs=0.04)
  estimate = abs(banded - 0.25)
  assert estimate < 0.06, banded  # within noise of chance (1000 examples: sd ~0.014)


def test_band_sampling_excludes_seen_items_and_widens_to_the_nearer_band():
  counts = {"a": 1, "b": 1, "c": 1, "d": 5, "e": 5, "f": 5, "g": 50, "h": 50, "i": 50}
  bands = ct.PopularityBands(counts, catalogue=["z"], min_band_size=3)
  # "z" (never rated: count 0) is too few for a band alone and joins the 1s.
  assert bands.bands == [("z", "a", "b", "c"), ("d", "e", "f"), ("g", "h", "i")]
  rng = np.random.default_rng(0)
  for _ in range(20):
    picked = bands.sample("e", excluded={"d"}, num=3, rng=rng)
    assert len(set(picked)) == 3 and "e" not in picked and "d" not in picked
    # Band {d,e,f} has one eligible item (f, always taken); the rest from the nearer band by count,
    # the 0/1s (|5 - 0| < |50 - 5|).
    assert "f" in picked and set(picked) <= {"f", "a", "b", "c", "z"}
  # Same seed, same user: the same distractors.
  first = bands.sample("h", num=2, rng=ct.user_rng(3, "u1", "x"))
  assert first == bands.sample("h", num=2, rng=ct.user_rng(3, "u1", "x"))
  assert set(first) <= {"g", "i"}
  with pytest.raises(UserError, match="neither"):
    bands.sample("a", excluded=set(counts) | {"z"}, num=3, rng=rng)


def test_unknown_target_counts_zero_and_gets_never_rated_distractors():
  counts = {f"r{i}": 3 for i in range(10)}
  bands = ct.PopularityBands(counts, catalogue=[f"z{i}" for i in range(10)], min_band_size=5)
  picked = bands.sample("brand_new", num=3, rng=np.random.default_rng(0))
  assert all(p.startswith("z") for p in picked)


def test_fixed_option_list_is_the_same_for_everyone_and_label_independent():
  genres = ["Drama", "Comedy", "Action", "Thriller"]
  answers = []
  for user in range(200):
    label = genres[user % 3]  # labels never include Thriller: the options must not care
    options, answer = ct.fixed_choice(label, genres, ct.user_rng(0, str(user)))
    assert sorted(options) == sorted(genres) and options[answer] == label
    answers.append(answer)
  assert len(set(answers)) == 4  # the label's position is shuffled, not fixed
  with pytest.raises(UserError, match="not one of the fixed options"):
    ct.fixed_choice("Horror", genres)
  # With a fixed list, the majority-class baseline is the majority label's share (closed form).
  labels = ["Drama"] * 60 + ["Comedy"] * 30 + ["Action"] * 10
  rows = [ct.fixed_choice(l, genres, ct.user_rng(0, str(i))) for i, l in enumerate(labels)]
  accuracy = baselines.majority_class(labels, [r[0] for r in rows], [r[1] for r in rows])
  assert accuracy.mean() == pytest.approx(0.6)


def _item(genres):
  return Interaction("m", 4.0, 0, "t", tuple(genres))


def test_favorite_category_count_and_lift_labels():
  future = [_item(["Drama"]), _item(["Drama", "Horror"]), _item(["Horror"]), _item(["Drama"])]
  options = ["Drama", "Horror", "Comedy"]
  assert ct.favorite_category(future, options) == "Drama"
  shares = {"Drama": 0.7, "Horror": 0.1, "Comedy": 0.2}
  # Drama 3/5 of the user's vs 0.7 overall (lift 0.86); Horror 2/5 vs 0.1 (lift 4): Horror.
  assert ct.favorite_category(future, options, label="lift", global_shares=shares) == "Horror"
  assert ct.favorite_category([_item([])], options) is None
  counts = ct.item_counts([UserHistory("u", tuple(future[:2]), tuple(future[2:]))],
                          field="categories")
  assert counts == {"Drama": 3, "Horror": 2}
  assert ct.top_values({"a": 3, "b": 5, "c": 5}, 2) == ["b", "c"]
  assert ct.shares({"a": 1, "b": 3}, ["a", "b"]) == {"a": 0.25, "b": 0.75}
