"""RLPF's prediction tasks as SeqIO tasks over the core's user histories.

Each example is one user: the text of their last `num_history` activities (the summarizer's input)
and a multiple-choice question about their future (the predictor's task). The task designs are the
core's (`persona_jax.data.choice_tasks`), chosen so that answers using no personal information
score about chance (counted on the data by `benchmarks/rlpf_popularity_check.py`):

  * `movielens_future_movie`: which movie will the user rate next? 4 options: the held-out movie
    and 3 distractors from its popularity band (`PopularityBands` over the TRAIN users' rating
    counts; movies nobody in train rated count 0), never a movie the user has rated;
  * `movielens_favorite_genre`: which genre will dominate the user's next `future_items` movies?
    The same fixed options for everyone: the `num_genre_options` most frequent genres among TRAIN
    users, in a per-user shuffled order; label "count" (the most frequent of them) or "lift"
    (the one most over-represented relative to all train interactions; `genre_label`);
  * `amazon_future_category`: the main category of the user's next purchase; 3 distractor
    categories from the target's popularity band (TRAIN counts);
  * `amazon_future_rating`: the star rating of the user's next review, given the product's title;
    the fixed options "1 stars" .. "5 stars" (the majority class is the bar here, not chance).

Every example also carries what the calibration baselines (`persona_jax.evaluation.baselines`)
need: `label`, `option_popularity` (each option's TRAIN count: movie ratings, genre or category
occurrences, rating values) and `history_option_counts` (each option in the user's own shown
history: a movie option's mean count of its genres there; a genre, category or rating's count).

Users are split into train / validation / test by the core (`persona_jax.data.user_histories`):
held-out users never appear in training. Transfer evaluation = train on one data set's task,
evaluate on the other's.

Bad input: a user with fewer than `num_history` past activities keeps all they have (the example
records `num_history_items`; nothing is padded or dropped). Distractors and option orders are drawn
with generators seeded by (seed, user id), so examples are the same on every run and machine.

SeqIO: `rlpf_task(name, ...)` registers `rlpf.<name>.n<N>.<content hash>` through the core's
`register_in_memory_task` (string/int features, no tokenization: each model tokenizes prompts with
its own tokenizer) and `load_examples` reads a split as a list of dicts.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from persona_jax import data as pdata
from persona_jax.data import choice_tasks as ct
from persona_jax.data import user_histories as uh
from persona_jax.errors import UserError

TASKS = ("movielens_future_movie", "movielens_favorite_genre", "amazon_future_category",
         "amazon_future_rating")
DOMAIN_WORDS = {"movielens": "movie-watching", "amazon": "shopping"}
NUM_DISTRACTORS = 3
STAR_OPTIONS = tuple(f"{s} stars" for s in range(1, 6))


def _render_movies(user):
  return uh.render_history_text(user, fields=("title", "categories", "rating"))


def _render_products(user):
  return uh.render_history_text(user, fields=("title", "categories", "rating", "review_title"),
                                category_label="category")


def _example(user: uh.UserHistory, question: str, options: Sequence[str], answer_index: int,
             num_history: int, render: Callable[[uh.UserHistory], str], domain: str,
             option_popularity: Sequence[float], history_option_counts: Sequence[float]) -> dict:
  recent = user.last(num_history)
  return {"user_id": user.user_id, "history_text": render(recent), "question": question,
          "options": list(options), "answer_index": int(answer_index),
          "num_history_items": len(recent.interactions), "domain": domain,
          "label": options[answer_index],
          "option_popularity": [float(x) for x in option_popularity],
          "history_option_counts": [float(x) for x in history_option_counts]}


def movielens_future_movie_examples(users: Sequence[uh.UserHistory], bands: ct.PopularityBands,
                                    titles: Mapping[str, str], genres: Mapping[str, Sequence[str]],
                                    *, num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "which movie next": the held-out movie and 3 distractors from its popularity
  band, never one the user rated (and never one whose title the user rated: options are titles).

  bands: `PopularityBands` over TRAIN rating counts (+ the catalogue at count 0).
  titles / genres: movie id -> title / genres (the catalogue).
  """
  question = "Which of these movies will this user watch next?"
  examples = []
  for user in users:
    rng = ct.user_rng(seed, user.user_id, "movielens_future_movie")
    target = user.heldout[0]
    seen_titles = {i.title for i in user.interactions + user.heldout}
    excluded = {i.item_id for i in user.interactions + user.heldout}
    excluded |= {item for item in bands.counts if titles.get(item) in seen_titles}
    distractors = bands.sample(target.item_id, excluded=excluded, num=NUM_DISTRACTORS, rng=rng)
    ids, answer = ct.place_answer(target.item_id, distractors, rng)
    options = [target.title if i == target.item_id else titles[i] for i in ids]
    if len(set(options)) != len(options):
      raise UserError(f"rlpf.tasks: user {user.user_id!r}: duplicate option titles {options}.")
    recent = user.last(num_history).interactions
    history_genres = ct.category_counts(recent)
    item_genres = [tuple(target.categories) if i == target.item_id else tuple(genres.get(i, ()))
                   for i in ids]
    examples.append(_example(
        user, question, options, answer, num_history, _render_movies, DOMAIN_WORDS["movielens"],
        [bands.count(i) for i in ids],
        [np.mean([history_genres.get(g, 0) for g in gs]) if gs else 0.0 for gs in item_genres]))
  return examples


def favorite_genre(items: Sequence[uh.Interaction]) -> str | None:
  """Most frequent genre of `items` (ties: alphabetical); None if no item has a genre."""
  counts = ct.category_counts(items)
  if not counts:
    return None
  return min(counts, key=lambda g: (-counts[g], g))


def movielens_favorite_genre_examples(users: Sequence[uh.UserHistory], genre_options: Sequence[str],
                                      genre_counts: Mapping[str, int], *, num_history: int,
                                      label: str = "lift", seed: int = 0) -> list[dict]:
  """Examples for "which genre will dominate the next movies" (users' heldout = the future), with
  the same `genre_options` for everyone (shuffled per user). `genre_counts`: TRAIN genre counts.

  A user none of whose future movies has one of the option genres has no label: left out, and how
  many is printed.
  """
  if label == "lift":
    question = ("Compared with the average viewer, which of these genres will this user watch "
                "more of in their next movies?")
  else:
    question = "Which of these genres will this user watch most in their next movies?"
  global_shares = ct.shares(genre_counts, genre_options)
  examples, unlabeled = [], 0
  for user in users:
    correct = ct.favorite_category(user.heldout, genre_options, label=label,
                                   global_shares=global_shares)
    if correct is None:
      unlabeled += 1
      continue
    options, answer = ct.fixed_choice(correct, genre_options,
                                      ct.user_rng(seed, user.user_id, "movielens_favorite_genre"))
    history = ct.category_counts(user.last(num_history).interactions)
    examples.append(_example(user, question, options, answer, num_history, _render_movies,
                             DOMAIN_WORDS["movielens"], [genre_counts.get(o, 0) for o in options],
                             [history.get(o, 0) for o in options]))
  if unlabeled:
    print(f"rlpf.tasks: movielens_favorite_genre: left out {unlabeled} of {len(users)} users with "
          f"none of {list(genre_options)} in their future movies.")
  return examples


def amazon_future_category_examples(users: Sequence[uh.UserHistory], bands: ct.PopularityBands, *,
                                    num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "the category of the next purchase" (main category of the held-out review); 3
  distractor categories from its popularity band (`bands` over TRAIN category counts).

  A user whose held-out product has no main category in its metadata (12 of the 691 users of the
  shared slice) has no label: such users are left out, and how many is printed.
  """
  question = "In which category will this user's next purchase be?"
  examples, unlabeled = [], 0
  for user in users:
    future = user.heldout[0]
    if not future.categories:
      unlabeled += 1
      continue
    rng = ct.user_rng(seed, user.user_id, "amazon_future_category")
    correct = future.categories[0]
    options, answer = ct.place_answer(correct, bands.sample(correct, num=NUM_DISTRACTORS, rng=rng),
                                      rng)
    history = ct.category_counts(user.last(num_history).interactions)
    examples.append(_example(user, question, options, answer, num_history, _render_products,
                             DOMAIN_WORDS["amazon"], [bands.count(o) for o in options],
                             [history.get(o, 0) for o in options]))
  if unlabeled:
    print(f"rlpf.tasks: amazon_future_category: left out {unlabeled} of {len(users)} users whose "
          "held-out product has no main_category.")
  return examples


def _stars(rating: float) -> str:
  return f"{int(round(rating))} stars"


def amazon_future_rating_examples(users: Sequence[uh.UserHistory], rating_counts: Mapping[str, int]
                                  | None = None, *, num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "how many stars will the user give their next product": the fixed options
  "1 stars" .. "5 stars" (shuffled per user). `rating_counts`: TRAIN counts of each option."""
  rating_counts = rating_counts or {}
  examples = []
  for user in users:
    future = user.heldout[0]
    question = f"How many stars (1-5) will this user give their next product, \"{future.title}\"?"
    options, answer = ct.fixed_choice(_stars(future.rating), STAR_OPTIONS,
                                      ct.user_rng(seed, user.user_id, "amazon_future_rating"))
    history: dict[str, int] = {}
    for item in user.last(num_history).interactions:
      history[_stars(item.rating)] = history.get(_stars(item.rating), 0) + 1
    examples.append(_example(user, question, options, answer, num_history, _render_products,
                             DOMAIN_WORDS["amazon"], [rating_counts.get(o, 0) for o in options],
                             [history.get(o, 0) for o in options]))
  return examples


@functools.lru_cache(maxsize=4)
def _movielens(heldout_items: int, seed: int):
  return uh.load_movielens_histories("latest-small", heldout_items=heldout_items,
                                     min_interactions=heldout_items + 1, seed=seed)


@functools.lru_cache(maxsize=32)
def build_examples(name: str, split: str, *, num_history: int = 50, future_items: int = 10,
                   seed: int = 0, amazon_dir: str | None = None, band_size: int = 50,
                   num_genre_options: int = 4, genre_label: str = "lift") -> tuple[dict, ...]:
  """All examples of task `name` for `split` ("train", "validation", "test"), users in order.

  band_size: `PopularityBands.min_band_size` of the next-movie task (categories: 4).
  num_genre_options / genre_label: the favorite-genre task's fixed option list and label.
  """
  if name not in TASKS:
    raise UserError(f"Unknown RLPF task {name!r}; choose one of {TASKS}.")
  if split not in uh.SPLITS:
    raise UserError(f"Unknown split {split!r}; choose one of {uh.SPLITS}.")
  if num_history < 1:
    raise UserError(f"rlpf num_history must be >= 1, got {num_history}.")
  if name.startswith("movielens"):
    heldout_items = 1 if name == "movielens_future_movie" else future_items
    splits = _movielens(heldout_items, seed)
    users = splits[split]
    if name == "movielens_future_movie":
      catalog = uh.load_movielens_catalog("latest-small")
      titles = {item: title for item, (title, _) in catalog.items()}
      genres = {item: g for item, (_, g) in catalog.items()}
      for user in splits["train"]:  # a rated movie missing from the catalogue keeps its own title
        for i in user.interactions + user.heldout:
          titles.setdefault(i.item_id, i.title)
          genres.setdefault(i.item_id, i.categories)
      bands = ct.PopularityBands(ct.item_counts(splits["train"]), catalogue=titles,
                                 min_band_size=band_size)
      return tuple(movielens_future_movie_examples(users, bands, titles, genres,
                                                   num_history=num_history, seed=seed))
    genre_counts = ct.item_counts(splits["train"], field="categories")
    return tuple(movielens_favorite_genre_examples(
        users, ct.top_values(genre_counts, num_genre_options), genre_counts,
        num_history=num_history, label=genre_label, seed=seed))
  splits = uh.load_amazon_histories(amazon_dir)
  users = splits[split]
  if name == "amazon_future_category":
    counts = ct.item_counts(splits["train"], field="categories")
    return tuple(amazon_future_category_examples(
        users, ct.PopularityBands(counts, min_band_size=4), num_history=num_history, seed=seed))
  rating_counts: dict[str, int] = {}
  for user in splits["train"]:
    for item in user.interactions + user.heldout:
      rating_counts[_stars(item.rating)] = rating_counts.get(_stars(item.rating), 0) + 1
  return tuple(amazon_future_rating_examples(users, rating_counts, num_history=num_history,
                                             seed=seed))


def heldout_examples(name: str, **kwargs) -> list[dict]:
  """Every held-out user's example: validation then test (both are unseen in training)."""
  return [dict(e, split=split) for split in ("validation", "test")
          for e in build_examples(name, split, **kwargs)]


FEATURES = {"user_id": tf.TensorSpec((), tf.string), "history_text": tf.TensorSpec((), tf.string),
            "question": tf.TensorSpec((), tf.string), "options": tf.TensorSpec((None,), tf.string),
            "answer_index": tf.TensorSpec((), tf.int32),
            "num_history_items": tf.TensorSpec((), tf.int32), "domain": tf.TensorSpec((), tf.string),
            "label": tf.TensorSpec((), tf.string),
            "option_popularity": tf.TensorSpec((None,), tf.float32),
            "history_option_counts": tf.TensorSpec((None,), tf.float32)}


def rlpf_task(name: str, *, num_history: int = 50, future_items: int = 10, seed: int = 0,
              **options) -> str:
  """Registers (once) and returns the SeqIO task `rlpf.<name>.n<num_history>.<content hash>` over the
  examples of every split (`persona_jax.data.register_in_memory_task`). `options`: the task design
  settings of `build_examples` (band_size, num_genre_options, genre_label, amazon_dir)."""
  kwargs = dict(num_history=num_history, future_items=future_items, seed=seed, **options)
  rows = {split: [{key: example[key] for key in FEATURES}
                  for example in build_examples(name, split, **kwargs)] for split in uh.SPLITS}
  return pdata.register_in_memory_task(f"rlpf.{name}.n{num_history}", rows, FEATURES)


HELDOUT = "heldout"  # validation + test users together


def load_examples(task_name: str, split: str, limit: int | None = None) -> list[dict]:
  """A split of a registered RLPF SeqIO task as python dicts (strings decoded), in user order.
  split "heldout": the validation users then the test users (`limit` applies to the total)."""
  if split == HELDOUT:
    rows = load_examples(task_name, "validation") + load_examples(task_name, "test")
    return rows if limit is None else rows[:limit]
  dataset = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False)
  if limit is not None:
    dataset = dataset.take(limit)
  examples = []
  for row in dataset.as_numpy_iterator():
    examples.append({
        "user_id": row["user_id"].decode(), "history_text": row["history_text"].decode(),
        "question": row["question"].decode(),
        "options": [o.decode() for o in row["options"]], "answer_index": int(row["answer_index"]),
        "num_history_items": int(row["num_history_items"]), "domain": row["domain"].decode(),
        "label": row["label"].decode(),
        "option_popularity": [float(x) for x in row["option_popularity"]],
        "history_option_counts": [float(x) for x in row["history_option_counts"]],
        "split": split})
  return examples
