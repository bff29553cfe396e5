"""Multiple-choice task designs that measure personalization, not a shortcut.

A multiple-choice question about a user's future is only a test of personalization when answers
that use no personal information score chance. Two designs fail that test and are replaced here:

  * next item with distractors drawn uniformly from the catalogue: the held-out item is drawn by
    users, so it is far more popular than a uniform distractor, and "pick the most-rated option"
    wins (0.67 on MovieLens latest-small held-out users, see docs/RESULTS.md). Here distractors
    come from the target's *popularity band* (`PopularityBands`: items of about the same number of
    ratings by TRAIN users), and never from items the user has seen;
  * favorite genre with distractors absent from the user's future: the distractors depend on the
    label, so "pick the globally most frequent genre" wins. Here every user gets the *same fixed
    option list* (`fixed_choice`), so the options carry no information about the label.

Also the paper-style generative next item: rank the whole catalogue, score Recall@K
(`persona_jax.evaluation.baselines.recall_at_k`), no options at all.

Everything is seeded by (seed, user id, salt): the same examples on every run, machine and user
order. Nothing here knows about a method; RLPF and User-LLM build their tasks from these pieces.

Example:

  counts = item_counts(splits["train"])                      # TRAIN users only
  bands = PopularityBands(counts, catalogue=catalogue_ids, min_band_size=50)
  rng = user_rng(seed, user.user_id, "next_item")
  seen = {i.item_id for i in user.interactions + user.heldout}
  distractors = bands.sample(target_id, excluded=seen, num=3, rng=rng)
  options, answer = place_answer(target_id, distractors, rng)
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np

from persona_jax.data.user_histories import Interaction, UserHistory
from persona_jax.errors import UserError


def user_rng(seed: int, user_id: str, salt: str = "") -> np.random.Generator:
  """A generator seeded by (seed, user id, salt): independent of user order and of other users."""
  digest = int.from_bytes(hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()[:8], "big")
  return np.random.default_rng([seed, digest])


def item_counts(users: Iterable[UserHistory], *, field: str = "item_id",
                include_heldout: bool = True) -> dict[str, int]:
  """How many interactions each id has among `users` (pass the TRAIN users only).

  field: "item_id" (one id per interaction) or "categories" (each category of each interaction).
  include_heldout: count the users' held-out interactions too (train users' futures are training
    data; never pass validation/test users here).
  """
  if field not in ("item_id", "categories"):
    raise UserError(f"item_counts: field must be 'item_id' or 'categories', got {field!r}.")
  counts: dict[str, int] = {}
  for user in users:
    for item in user.interactions + (user.heldout if include_heldout else ()):
      for value in (item.item_id,) if field == "item_id" else item.categories:
        counts[value] = counts.get(value, 0) + 1
  return counts


class PopularityBands:
  """The catalogue cut into bands of about equal popularity, for distractors that popularity
  cannot tell from the target.

  Items are sorted by their count among TRAIN users (catalogue items nobody in train rated count
  0). Bands are runs of consecutive counts, from the least popular up: a band closes once it holds
  `min_band_size` items, and never splits items of equal count (so all items of one count are in
  one band, and bands of rare items are single counts: popularity ties exactly there). The bands
  are fixed before any target is seen, so a target is not placed in the middle or at the edge of
  its band by construction.

  `sample(target, excluded, num, rng)` draws `num` distinct distractors uniformly from the target's
  band, never the target and never an excluded (seen) item; when the band has too few eligible
  items it takes all of them and draws the rest from the neighbouring bands (the nearer in count
  first).
  """

  def __init__(self, counts: Mapping[str, int], *, catalogue: Iterable[str] = (),
               min_band_size: int = 50):
    if min_band_size < 1:
      raise UserError(f"PopularityBands: min_band_size must be >= 1, got {min_band_size}.")
    self.counts = {item: int(count) for item, count in counts.items()}
    for item in catalogue:
      self.counts.setdefault(item, 0)
    if not self.counts:
      raise UserError("PopularityBands: an empty catalogue.")
    by_count: dict[int, list[str]] = {}
    for item, count in self.counts.items():
      by_count.setdefault(count, []).append(item)
    self.bands: list[tuple[str, ...]] = []
    self.band_low: list[int] = []  # smallest count of each band
    current: list[str] = []
    low = None
    for count in sorted(by_count):
      if low is None:
        low = count
      current.extend(sorted(by_count[count]))
      if len(current) >= min_band_size:
        self.bands.append(tuple(current))
        self.band_low.append(low)
        current, low = [], None
    if current:  # the most popular items: too few for a band of their own, join the band below
      if self.bands:
        self.bands[-1] = self.bands[-1] + tuple(current)
      else:
        self.bands.append(tuple(current))
        self.band_low.append(low)
    self._band_of = {item: index for index, band in enumerate(self.bands) for item in band}

  def count(self, item: str) -> int:
    return self.counts.get(item, 0)

  def band_of(self, item: str) -> int:
    """The band index of `item`; an item outside the catalogue counts 0 (the lowest band)."""
    if item in self._band_of:
      return self._band_of[item]
    return max(0, bisect.bisect_right(self.band_low, 0) - 1)

  def sample(self, target: str, *, excluded: Iterable[str] = (), num: int = 3,
             rng: np.random.Generator) -> list[str]:
    """`num` distinct distractors from `target`'s popularity band (see the class docstring)."""
    excluded = set(excluded) | {target}
    home = self.band_of(target)
    target_count = self.count(target)
    picked: list[str] = []
    below, above, band = home - 1, home + 1, home
    while True:
      eligible = [item for item in self.bands[band] if item not in excluded]
      wanted = num - len(picked)
      if len(eligible) <= wanted:
        picked.extend(eligible)
      else:
        picked.extend(eligible[i] for i in sorted(rng.choice(len(eligible), wanted, replace=False)))
      if len(picked) == num:
        return picked
      if below < 0 and above >= len(self.bands):
        raise UserError(f"PopularityBands.sample: only {len(picked)} items of the catalogue are "
                         f"neither {target!r} nor excluded; {num} distractors are needed.")
      take_below = above >= len(self.bands) or (
          below >= 0 and target_count - self.band_low[below] <= self.band_low[above] - target_count)
      if take_below:
        band, below = below, below - 1
      else:
        band, above = above, above + 1


def uniform_distractors(target: str, pool: Sequence[str], *, excluded: Iterable[str] = (),
                        num: int = 3, rng: np.random.Generator) -> list[str]:
  """`num` distractors uniform over `pool` minus the target and excluded items: the OLD design,
  kept to measure how much popularity alone wins under it (never use it for a new task)."""
  excluded = set(excluded) | {target}
  candidates = sorted({item for item in pool if item not in excluded})
  if len(candidates) < num:
    raise UserError(f"uniform_distractors: {len(candidates)} candidates for {num} distractors.")
  return [candidates[i] for i in rng.choice(len(candidates), num, replace=False)]


def place_answer(correct: str, distractors: Sequence[str], rng: np.random.Generator
                 ) -> tuple[list[str], int]:
  """Options with `correct` at a uniformly random position: (options, answer_index)."""
  answer_index = int(rng.integers(len(distractors) + 1))
  options = list(distractors[:answer_index]) + [correct] + list(distractors[answer_index:])
  return options, answer_index


def fixed_choice(label: str, option_list: Sequence[str], rng: np.random.Generator | None = None
                 ) -> tuple[list[str], int]:
  """The same options for every user (label-independent); shuffled per user when `rng` is given
  (the order then says nothing about the label either). Returns (options, answer_index)."""
  options = list(option_list)
  if len(set(options)) != len(options):
    raise UserError(f"fixed_choice: the option list has duplicates: {options}.")
  if label not in options:
    raise UserError(f"fixed_choice: label {label!r} is not one of the fixed options {options}.")
  if rng is not None:
    options = [options[i] for i in rng.permutation(len(options))]
  return options, options.index(label)


def top_values(counts: Mapping[str, int], num: int) -> list[str]:
  """The `num` most frequent ids (ties by id): e.g. a fixed genre option list from TRAIN counts."""
  if num < 2 or num > len(counts):
    raise UserError(f"top_values: need 2 <= num <= {len(counts)} values, got {num}.")
  return sorted(counts, key=lambda value: (-counts[value], value))[:num]


def category_counts(items: Sequence[Interaction], allowed: Iterable[str] | None = None
                    ) -> dict[str, int]:
  """How often each category (MovieLens genre, Amazon category) occurs among `items`."""
  allowed = set(allowed) if allowed is not None else None
  counts: dict[str, int] = {}
  for item in items:
    for category in item.categories:
      if allowed is None or category in allowed:
        counts[category] = counts.get(category, 0) + 1
  return counts


def favorite_category(items: Sequence[Interaction], options: Sequence[str], *,
                      label: str = "count", global_shares: Mapping[str, float] | None = None
                      ) -> str | None:
  """The user's favorite among `options` in `items` (their future); None when no item has one.

  label="count": the most frequent option (ties: the earlier option in `options`).
  label="lift": the option with the largest share among the items relative to its share among all
    train interactions (`global_shares`): "more than the average user" -- a label that the global
    majority does not predict, by construction.
  """
  counts = category_counts(items, options)
  if not counts:
    return None
  if label == "count":
    return max(options, key=lambda o: (counts.get(o, 0), -list(options).index(o)))
  if label == "lift":
    if global_shares is None:
      raise UserError("favorite_category(label='lift') needs global_shares (from TRAIN users).")
    total = sum(counts.values())
    return max(options, key=lambda o: (counts.get(o, 0) / total / max(global_shares[o], 1e-12),
                                       -list(options).index(o)))
  raise UserError(f"favorite_category: label must be 'count' or 'lift', got {label!r}.")


def shares(counts: Mapping[str, int], options: Sequence[str]) -> dict[str, float]:
  """Each option's share of the options' total count (e.g. genre shares among train interactions)."""
  total = sum(counts.get(o, 0) for o in options)
  if total <= 0:
    raise UserError(f"shares: none of {list(options)} occurs in the counts.")
  return {o: counts.get(o, 0) / total for o in options}
