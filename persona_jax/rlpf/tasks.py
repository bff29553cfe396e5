"""RLPF's prediction tasks as SeqIO tasks over the core's user histories.

Each example is one user: the text of their last `num_history` activities (the summarizer's input)
and a 4-way multiple-choice question about their future (the predictor's task):

  * `movielens_future_movie`: which movie will the user rate next? (the held-out next movie and 3
    distractor movies drawn from the training users' movies that this user never rated);
  * `movielens_favorite_genre`: which genre will dominate the user's next `future_items` movies?
    (the most frequent genre among them; 3 distractor genres that none of them has when possible);
  * `amazon_future_category`: the main category of the user's next purchase (3 other categories of
    the slice);
  * `amazon_future_rating`: the star rating of the user's next review, given the product's title
    (4 of the 5 star values, always including the right one).

Users are split into train / validation / test by the core (`persona_jax.data.user_histories`):
test users never appear in training. Transfer evaluation = train on one data set's task, evaluate on
the other's (`benchmarks/rlpf_eval.py`).

Bad input: a user with fewer than `num_history` past activities keeps all they have (the example
records `num_history_items`; nothing is padded or dropped). Distractors are sampled with a generator
seeded by (seed, user id), so examples are the same on every run and machine.

SeqIO: `rlpf_task(name, ...)` registers `rlpf.<name>.n<N>.<content hash>` through the core's
`register_in_memory_task` (string/int features, no tokenization: each model tokenizes prompts with
its own tokenizer) and `load_examples` reads a split as a list of dicts.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from persona_jax import data as pdata
from persona_jax.data import user_histories as uh

TASKS = ("movielens_future_movie", "movielens_favorite_genre", "amazon_future_category",
         "amazon_future_rating")
DOMAIN_WORDS = {"movielens": "movie-watching", "amazon": "shopping"}


def _rng(seed: int, user_id: str) -> np.random.Generator:
  digest = int.from_bytes(hashlib.sha256(user_id.encode()).digest()[:8], "big")
  return np.random.default_rng([seed, digest])


def _multiple_choice(user: uh.UserHistory, correct: str, distractor_pool: Sequence[str],
                     excluded: set[str], question: str, seed: int, num_history: int,
                     render: Callable[[uh.UserHistory], str], domain: str) -> dict:
  rng = _rng(seed, user.user_id)
  candidates = [c for c in distractor_pool if c != correct and c not in excluded]
  if len(candidates) < 3:
    candidates = [c for c in distractor_pool if c != correct]
  candidates = sorted(set(candidates))
  if len(candidates) < 3:
    raise ValueError(f"rlpf.tasks: user {user.user_id!r} has fewer than 3 distractors for {correct!r} "
                     f"(pool of {len(distractor_pool)}); the data set is too small for 4 options.")
  distractors = [candidates[i] for i in rng.choice(len(candidates), 3, replace=False)]
  answer_index = int(rng.integers(4))
  options = distractors[:answer_index] + [correct] + distractors[answer_index:]
  recent = user.last(num_history)
  return {"user_id": user.user_id, "history_text": render(recent), "question": question,
          "options": options, "answer_index": answer_index,
          "num_history_items": len(recent.interactions), "domain": domain}


def _render_movies(user):
  return uh.render_history_text(user, fields=("title", "categories", "rating"))


def _render_products(user):
  return uh.render_history_text(user, fields=("title", "categories", "rating", "review_title"),
                                category_label="category")


def movielens_future_movie_examples(users: Sequence[uh.UserHistory], movie_pool: Sequence[str], *,
                                    num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "which movie next"; `movie_pool`: candidate distractor titles."""
  question = "Which of these movies will this user watch next?"
  examples = []
  for user in users:
    seen = {i.title for i in user.interactions + user.heldout}
    examples.append(_multiple_choice(user, user.heldout[0].title, movie_pool, seen, question, seed,
                                     num_history, _render_movies, DOMAIN_WORDS["movielens"]))
  return examples


def favorite_genre(items: Sequence[uh.Interaction]) -> str | None:
  """Most frequent genre of `items` (ties: alphabetical); None if no item has a genre."""
  counts: dict[str, int] = {}
  for item in items:
    for genre in item.categories:
      counts[genre] = counts.get(genre, 0) + 1
  if not counts:
    return None
  return min(counts, key=lambda g: (-counts[g], g))


def movielens_favorite_genre_examples(users: Sequence[uh.UserHistory], genres: Sequence[str], *,
                                      num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "which genre will dominate the next movies" (users' heldout = the future)."""
  question = "Which genre will this user watch most in their next movies?"
  examples = []
  for user in users:
    correct = favorite_genre(user.heldout)
    if correct is None:
      raise ValueError(f"rlpf.tasks: MovieLens user {user.user_id!r} has no genre in their "
                       f"{len(user.heldout)} future movies; raise future_items.")
    future_genres = {g for i in user.heldout for g in i.categories}
    examples.append(_multiple_choice(user, correct, genres, future_genres, question, seed,
                                     num_history, _render_movies, DOMAIN_WORDS["movielens"]))
  return examples


def amazon_future_category_examples(users: Sequence[uh.UserHistory], categories: Sequence[str], *,
                                    num_history: int, seed: int = 0) -> list[dict]:
  """Examples for "the category of the next purchase" (main category of the held-out review).

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
    examples.append(_multiple_choice(user, future.categories[0], categories, set(), question, seed,
                                     num_history, _render_products, DOMAIN_WORDS["amazon"]))
  if unlabeled:
    print(f"rlpf.tasks: amazon_future_category: left out {unlabeled} of {len(users)} users whose "
          "held-out product has no main_category.")
  return examples


def amazon_future_rating_examples(users: Sequence[uh.UserHistory], *, num_history: int,
                                  seed: int = 0) -> list[dict]:
  """Examples for "how many stars will the user give their next product"."""
  stars = [f"{s} stars" for s in range(1, 6)]
  examples = []
  for user in users:
    future = user.heldout[0]
    correct = f"{int(round(future.rating))} stars"
    question = f"How many stars (1-5) will this user give their next product, \"{future.title}\"?"
    examples.append(_multiple_choice(user, correct, stars, set(), question, seed, num_history,
                                     _render_products, DOMAIN_WORDS["amazon"]))
  return examples


@functools.lru_cache(maxsize=16)
def build_examples(name: str, split: str, *, num_history: int = 10, future_items: int = 10,
                   seed: int = 0, amazon_dir: str | None = None) -> tuple[dict, ...]:
  """All examples of task `name` for `split` ("train", "validation", "test"), users in order."""
  if name not in TASKS:
    raise ValueError(f"Unknown RLPF task {name!r}; choose one of {TASKS}.")
  if split not in uh.SPLITS:
    raise ValueError(f"Unknown split {split!r}; choose one of {uh.SPLITS}.")
  if num_history < 1:
    raise ValueError(f"rlpf num_history must be >= 1, got {num_history}.")
  if name.startswith("movielens"):
    heldout_items = 1 if name == "movielens_future_movie" else future_items
    splits = uh.load_movielens_histories("latest-small", heldout_items=heldout_items,
                                         min_interactions=heldout_items + 1, seed=seed)
    users = splits[split]
    if name == "movielens_future_movie":
      pool = sorted({i.title for u in splits["train"] for i in u.interactions})
      return tuple(movielens_future_movie_examples(users, pool, num_history=num_history, seed=seed))
    genres = sorted({g for u in splits["train"] for i in u.interactions for g in i.categories})
    return tuple(movielens_favorite_genre_examples(users, genres, num_history=num_history, seed=seed))
  splits = uh.load_amazon_histories(amazon_dir)
  users = splits[split]
  if name == "amazon_future_category":
    categories = sorted({c for u in splits["train"] for i in u.interactions + u.heldout
                         for c in i.categories})
    return tuple(amazon_future_category_examples(users, categories, num_history=num_history,
                                                 seed=seed))
  return tuple(amazon_future_rating_examples(users, num_history=num_history, seed=seed))


FEATURES = {"user_id": tf.TensorSpec((), tf.string), "history_text": tf.TensorSpec((), tf.string),
            "question": tf.TensorSpec((), tf.string), "options": tf.TensorSpec((4,), tf.string),
            "answer_index": tf.TensorSpec((), tf.int32),
            "num_history_items": tf.TensorSpec((), tf.int32), "domain": tf.TensorSpec((), tf.string)}


def rlpf_task(name: str, *, num_history: int = 10, future_items: int = 10, seed: int = 0) -> str:
  """Registers (once) and returns the SeqIO task `rlpf.<name>.n<num_history>.<content hash>` over the
  examples of every split (`persona_jax.data.register_in_memory_task`)."""
  kwargs = dict(num_history=num_history, future_items=future_items, seed=seed)
  rows = {split: [{key: example[key] for key in FEATURES}
                  for example in build_examples(name, split, **kwargs)] for split in uh.SPLITS}
  return pdata.register_in_memory_task(f"rlpf.{name}.n{num_history}", rows, FEATURES)


def load_examples(task_name: str, split: str, limit: int | None = None) -> list[dict]:
  """A split of a registered RLPF SeqIO task as python dicts (strings decoded), in user order."""
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
        "num_history_items": int(row["num_history_items"]), "domain": row["domain"].decode()})
  return examples
