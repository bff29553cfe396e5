"""Per-user interaction histories: MovieLens (TFDS) and the Amazon Reviews 2023 slice.

A history is one user's interactions in time order. Two splits are applied, both deterministic:

  by time  each user's last `heldout_items` interactions go to `UserHistory.heldout` (the targets a
           method predicts); the earlier ones are `UserHistory.interactions` (the context);
  by user  users are assigned to "train" / "validation" / "test" by a hash of (seed, user id), so
           held-out users never appear in training, and the assignment does not depend on the
           order of the source rows or on which other users are present.

Sources:
  `load_movielens_histories(config)`  TFDS `movielens/<config>-ratings` (latest-small, 1m, 20m, 25m:
      the same code; every config has user_id, movie_id, movie_title, movie_genres, user_rating,
      timestamp). `load_movielens_catalog(config)` reads `movielens/<config>-movies` (every movie,
      also unrated ones: a candidate pool).
  `load_amazon_histories(directory)`  JSONL files `training.jsonl`, `validation.jsonl`,
      `test.jsonl`, one user a line (`user_id`, `category`, `history` [reviews], `heldout` [one
      review]); the files already split users, and `heldout` is the time split. A malformed row
      raises ValueError naming the file and the line.

`ItemVocabulary` maps string ids (items, genres, categories) to integer ids with an explicit
unknown-id policy. `render_history_text` writes a history as prompt text.

Nothing here knows about any method: it is the core's data about users.

Example:

  splits = load_movielens_histories("latest-small")      # {"train": [...], "validation": ..., "test": ...}
  user = splits["test"][0]
  user.interactions[-1]      # Interaction(item_id='1234', rating=4.0, timestamp=..., title=..., categories=(...))
  user.heldout               # (Interaction(...),): the user's last item
  items = ItemVocabulary.from_histories(splits["train"])
  items.encode([i.item_id for i in user.interactions])      # int32 [num_interactions]; unseen -> UNKNOWN_ID
  print(render_history_text(user, max_items=20))
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np
from persona_jax.errors import MissingFileError, UserError

SPLITS = ("train", "validation", "test")
MOVIELENS_CONFIGS = ("latest-small", "1m", "20m", "25m", "100k")
MOVIELENS_NO_GENRE = "(no genres listed)"
DEFAULT_AMAZON_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon" / \
    "amazon2023_user_histories"
# The title of an Amazon product whose metadata has none (74 reviews of the slice, all Prime Video).
MISSING_TITLE = "(untitled product)"
# File name -> split name, for the Amazon slice.
AMAZON_FILES = {"train": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


@dataclasses.dataclass(frozen=True)
class Interaction:
  """One interaction of a user with an item.

  Attributes:
    item_id: the item's id in its source (MovieLens movie id, Amazon parent ASIN).
    rating: the user's rating (MovieLens 0.5-5 in halves, Amazon 1-5).
    timestamp: seconds (MovieLens) or milliseconds (Amazon) since the epoch; only the order matters.
    title: the item's title (movie title with year; Amazon product title, or MISSING_TITLE where the
      product metadata has a null title).
    categories: the item's categories (MovieLens genres; Amazon product main category), may be empty.
    review_title: the user's review title ("" where the source has none, e.g. MovieLens).
    review_text: the user's review text ("" where the source has none).
  """
  item_id: str
  rating: float
  timestamp: int
  title: str
  categories: tuple[str, ...] = ()
  review_title: str = ""
  review_text: str = ""


@dataclasses.dataclass(frozen=True)
class UserHistory:
  """One user's interactions in time order (oldest first), split by time.

  Attributes:
    user_id: the user's id in its source.
    interactions: the context, oldest first. Can be empty (see `render_history_text` and the
      consumers' docs for what an empty history means to them).
    heldout: the user's last interactions (oldest first), held out as targets.
    domain: the source's grouping of the user ("movielens/latest-small", or the Amazon category).
  """
  user_id: str
  interactions: tuple[Interaction, ...]
  heldout: tuple[Interaction, ...]
  domain: str = ""

  def last(self, num_items: int) -> UserHistory:
    """The same user with only the `num_items` most recent context interactions (heldout kept)."""
    if num_items < 0:
      raise UserError(f"UserHistory.last: num_items must be >= 0, got {num_items}.")
    kept = self.interactions[len(self.interactions) - num_items:] if num_items else ()
    return dataclasses.replace(self, interactions=tuple(kept))


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------
def user_split(user_id: str, validation_fraction: float, test_fraction: float, seed: int = 0) -> str:
  """Which split ("train", "validation", "test") a user belongs to, from a hash of (seed, user id).

  Deterministic across runs, machines and source row order; each user independently lands in test
  with probability `test_fraction` and in validation with `validation_fraction`.
  """
  if validation_fraction < 0 or test_fraction < 0 or validation_fraction + test_fraction >= 1:
    raise UserError(f"user_split: need validation_fraction, test_fraction >= 0 with sum < 1, got "
                     f"{validation_fraction} and {test_fraction}.")
  digest = hashlib.sha256(f"{seed}:{user_id}".encode()).digest()
  unit = int.from_bytes(digest[:8], "big") / 2**64
  if unit < test_fraction:
    return "test"
  if unit < test_fraction + validation_fraction:
    return "validation"
  return "train"


def split_by_time(user_id: str, interactions: Sequence[Interaction], heldout_items: int,
                  domain: str = "") -> UserHistory:
  """Sorts interactions by (timestamp, item id) and holds out the last `heldout_items`.

  Raises:
    ValueError: the user has no more than `heldout_items` interactions (nothing would be left as
      context and the split would be meaningless); lower `heldout_items` or filter such users with
      `min_interactions`.
  """
  if heldout_items < 1:
    raise UserError(f"heldout_items must be >= 1, got {heldout_items}.")
  ordered = sorted(interactions, key=lambda item: (item.timestamp, item.item_id))
  if len(ordered) <= heldout_items:
    raise UserError(f"user {user_id!r} has {len(ordered)} interactions, not more than heldout_items="
                     f"{heldout_items}: the time split would leave no context. Fix: lower "
                     f"heldout_items or pass min_interactions={heldout_items + 1} to drop such users "
                     f"(the loader reports how many it dropped).")
  return UserHistory(user_id, tuple(ordered[:-heldout_items]), tuple(ordered[-heldout_items:]), domain)


# ------------------------------------------------------------------------------------------------
# MovieLens through TFDS
# ------------------------------------------------------------------------------------------------
def _check_movielens_config(config: str) -> None:
  if config not in MOVIELENS_CONFIGS:
    raise UserError(f"MovieLens config {config!r} is not one of {MOVIELENS_CONFIGS} (TFDS "
                     f"'movielens/<config>-ratings').")


def _read_tfds_table(tfds_name: str, data_dir: str | None, allow_download: bool
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Reads a whole TFDS MovieLens table into numpy columns; genres as a multi-hot [rows, genres]."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  from persona_jax.data.tasks import ensure_tfds_prepared

  ensure_tfds_prepared(tfds_name, data_dir, allow_download)
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  genre_names = list(builder.info.features["movie_genres"].feature.names)
  num_genres = len(genre_names)
  dataset = builder.as_dataset(split="train", shuffle_files=False)
  wanted = ("user_id", "movie_id", "movie_title", "user_rating", "timestamp")

  def flatten(example):
    # Genres are a variable-length list per row: a multi-hot row batches densely and fast.
    row = {key: example[key] for key in wanted if key in example}
    row["movie_genres"] = tf.reduce_max(tf.one_hot(example["movie_genres"], num_genres, dtype=tf.int8),
                                        axis=0)
    return row

  dataset = dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
  columns: dict[str, list[np.ndarray]] = {}
  for batch in tfds.as_numpy(dataset):
    for key, value in batch.items():
      columns.setdefault(key, []).append(value)
  return {key: np.concatenate(values) for key, values in columns.items()}, genre_names


def _text(value: bytes | str, where: str = "") -> str:
  if not isinstance(value, bytes):
    return str(value)
  try:
    return value.decode("utf-8")
  except UnicodeDecodeError as error:
    raise UserError(f"{where or 'a TFDS row'}: not UTF-8 (byte {value[error.start]:#04x} at offset "
                     f"{error.start} of {value[:60]!r}); re-encode the data set as UTF-8.") from None


@functools.lru_cache(maxsize=4)
def _movielens_interactions(config: str, data_dir: str | None, allow_download: bool
                            ) -> dict[str, tuple[Interaction, ...]]:
  columns, genre_names = _read_tfds_table(f"movielens/{config}-ratings", data_dir, allow_download)
  genre_tuples: dict[bytes, tuple[str, ...]] = {}
  by_user: dict[str, list[Interaction]] = {}
  for row in range(len(columns["user_id"])):
    flags = columns["movie_genres"][row]
    key = flags.tobytes()
    if key not in genre_tuples:
      genre_tuples[key] = tuple(name for name, flag in zip(genre_names, flags)
                                if flag and name != MOVIELENS_NO_GENRE)
    where = f"movielens/{config}-ratings row {row}"
    user = _text(columns["user_id"][row], where)
    rating = float(columns["user_rating"][row])
    if not MOVIELENS_RATING_RANGE[0] <= rating <= MOVIELENS_RATING_RANGE[1]:
      raise UserError(f"{where}: rating {rating:g} of user {user!r} is outside "
                       f"{MOVIELENS_RATING_RANGE[0]:g}..{MOVIELENS_RATING_RANGE[1]:g}; ratings are never clamped.")
    by_user.setdefault(user, []).append(Interaction(
        item_id=_text(columns["movie_id"][row], where), rating=rating,
        timestamp=int(columns["timestamp"][row]), title=_text(columns["movie_title"][row], where),
        categories=genre_tuples[key]))
  return {user: tuple(items) for user, items in by_user.items()}


def load_movielens_histories(config: str = "latest-small", *, heldout_items: int = 1,
                             validation_fraction: float = 0.1, test_fraction: float = 0.1,
                             min_interactions: int | None = None, seed: int = 0,
                             data_dir: str | None = None, allow_download: bool = False
                             ) -> dict[str, list[UserHistory]]:
  """MovieLens ratings as per-user histories, split by time and by user.

  Args:
    config: TFDS MovieLens config: "latest-small" (prepared in ../shared/tfds), "1m", "20m", "25m",
      "100k" (reads `movielens/<config>-ratings`).
    heldout_items: how many of each user's last interactions are held out (`UserHistory.heldout`).
    validation_fraction, test_fraction: expected fraction of users in each held-out user split.
    min_interactions: drop users with fewer interactions (and print how many were dropped). None
      keeps everyone and raises if a user has <= heldout_items interactions.
    seed: the user split's hash seed.
    data_dir: TFDS data dir (None: TFDS_DATA_DIR / TFDS's default).
    allow_download: let TFDS download and prepare the data set if it is missing (needs network).

  Returns:
    {"train", "validation", "test"} -> users sorted by user id; each history in time order.

  Raises:
    FileNotFoundError: the TFDS data set is not prepared (message says where it looked, and the fix).
    ValueError: bad config / fractions, or a user too short for the time split.
  """
  _check_movielens_config(config)
  by_user = _movielens_interactions(config, data_dir, allow_download)
  return _split_users(by_user, f"movielens/{config}", heldout_items, validation_fraction, test_fraction,
                      min_interactions, seed)


def _split_users(by_user: Mapping[str, Sequence[Interaction]], domain: str, heldout_items: int,
                 validation_fraction: float, test_fraction: float, min_interactions: int | None,
                 seed: int) -> dict[str, list[UserHistory]]:
  splits: dict[str, list[UserHistory]] = {name: [] for name in SPLITS}
  dropped = 0
  for user in sorted(by_user, key=lambda name: (len(name), name)):
    items = by_user[user]
    if min_interactions is not None and len(items) < min_interactions:
      dropped += 1
      continue
    split = user_split(user, validation_fraction, test_fraction, seed)
    splits[split].append(split_by_time(user, items, heldout_items, domain))
  if dropped:
    print(f"user_histories: dropped {dropped} {domain} users with fewer than {min_interactions} "
          f"interactions (min_interactions).")
  return splits


@functools.lru_cache(maxsize=4)
def load_movielens_catalog(config: str = "latest-small", *, data_dir: str | None = None,
                           allow_download: bool = False) -> dict[str, tuple[str, tuple[str, ...]]]:
  """Every movie of a MovieLens config (also unrated ones): movie id -> (title, genres).

  Reads TFDS `movielens/<config>-movies`. Useful as a candidate pool for ranking tasks.
  """
  _check_movielens_config(config)
  import tensorflow as tf
  import tensorflow_datasets as tfds

  from persona_jax.data.tasks import ensure_tfds_prepared

  name = f"movielens/{config}-movies"
  ensure_tfds_prepared(name, data_dir, allow_download)
  builder = tfds.builder(name, data_dir=data_dir)
  genre_names = list(builder.info.features["movie_genres"].feature.names)

  def flatten(example):
    return {"movie_id": example["movie_id"], "movie_title": example["movie_title"],
            "movie_genres": tf.reduce_max(tf.one_hot(example["movie_genres"], len(genre_names),
                                                     dtype=tf.int8), axis=0)}

  catalog = {}
  for batch in tfds.as_numpy(builder.as_dataset(split="train", shuffle_files=False)
                             .map(flatten).batch(8192)):
    for movie, title, flags in zip(batch["movie_id"], batch["movie_title"], batch["movie_genres"]):
      catalog[_text(movie)] = (_text(title), tuple(
          genre for genre, flag in zip(genre_names, flags) if flag and genre != MOVIELENS_NO_GENRE))
  return catalog


# ------------------------------------------------------------------------------------------------
# Amazon Reviews 2023 slice (JSONL)
# ------------------------------------------------------------------------------------------------
MOVIELENS_RATING_RANGE = (0.5, 5.0)
AMAZON_RATING_RANGE = (1.0, 5.0)  # stars


def _identifier(value: object, field: str, where: str) -> str:
  """A non-empty string id (null, numbers, blanks refused: null used to become the string 'None')."""
  if not isinstance(value, str) or not value.strip():
    raise UserError(f"{where}: field {field!r} must be a non-empty string id, got {value!r}.")
  return value


def _review(review: object, where: str) -> Interaction:
  """One review dict -> Interaction; raises ValueError naming `where` (file:line and field)."""
  if not isinstance(review, dict):
    raise UserError(f"{where}: a review must be a JSON object, got {type(review).__name__}.")
  missing = [key for key in ("parent_asin", "rating", "timestamp_ms", "product") if key not in review]
  if missing:
    raise UserError(f"{where}: review is missing field(s) {missing}; each review needs parent_asin, "
                     f"rating, timestamp_ms, product.title (see the data set's README.md).")
  product = review["product"]
  if not isinstance(product, dict) or not isinstance(product.get("title"), (str, type(None))):
    raise UserError(f"{where}: review field 'product' must be an object whose 'title' is a string or "
                     f"null.")
  rating = review["rating"]
  if isinstance(rating, bool) or not isinstance(rating, (int, float)):
    raise UserError(f"{where}: review field 'rating' must be a number, got {rating!r}.")
  if not AMAZON_RATING_RANGE[0] <= rating <= AMAZON_RATING_RANGE[1]:
    raise UserError(f"{where}: review field 'rating' is {rating!r}, outside {AMAZON_RATING_RANGE[0]:g}.."
                     f"{AMAZON_RATING_RANGE[1]:g} stars (ratings are never clamped).")
  timestamp = review["timestamp_ms"]
  if isinstance(timestamp, bool) or not isinstance(timestamp, int):
    raise UserError(f"{where}: review field 'timestamp_ms' must be an integer, got {timestamp!r}.")
  item_id = _identifier(review["parent_asin"], "parent_asin", where)
  category = product.get("main_category")
  return Interaction(
      item_id=item_id, rating=float(rating), timestamp=timestamp,
      title=product.get("title") or MISSING_TITLE, categories=(category,) if isinstance(category, str) and category else (),
      review_title=str(review.get("review_title") or ""),
      review_text=str(review.get("review_full") or review.get("review_excerpt") or ""))


def read_amazon_jsonl(path: str | os.PathLike, *, on_bad_row: str = "error") -> list[UserHistory]:
  """Reads one Amazon slice JSONL file: one user per line, `history` as context, `heldout` as target.

  Blank lines are allowed. History reviews are sorted by time (stable for ties). Every row is checked:
  UTF-8, valid JSON, the fields present, ids non-empty strings (never null), ratings within 1..5
  (never clamped), integer timestamps, and one row per (user, category) (a user may have a row in
  several categories).

  Args:
    on_bad_row: "error" (default): raise one ValueError naming every bad row as "<file>:<line>: ...";
      "skip": leave bad rows out, print how many of how many were skipped and each one's file:line.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: bad rows (with on_bad_row="error"); the message starts "<file>:<line>: ...".
  """
  if on_bad_row not in ("error", "skip"):
    raise UserError(f"read_amazon_jsonl: on_bad_row must be 'error' or 'skip', got {on_bad_row!r}.")
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"Amazon user histories file {path} not found (expected one of "
                            f"{sorted(AMAZON_FILES.values())} in ../shared/data/amazon/"
                            f"amazon2023_user_histories).")
  users = []
  bad: list[str] = []
  first_line_of: dict[tuple[str, str], int] = {}  # (user, category): the slice has a row per both
  num_rows = 0
  with open(path, "rb") as file:
    for line_number, raw in enumerate(file, start=1):
      where = f"{path}:{line_number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as error:
        num_rows += 1
        bad.append(f"{where}: not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}); "
                   "re-encode the file as UTF-8 or remove that line.")
        continue
      if not line.strip():
        continue
      num_rows += 1
      try:
        user = _amazon_row(line, where)
        key = (user.user_id, user.domain)
        if key in first_line_of:
          raise UserError(f"{where}: user {user.user_id!r} already has a row for category "
                           f"{user.domain!r} at line {first_line_of[key]}; each (user, category) must "
                           "appear once.")
      except ValueError as error:
        bad.append(str(error))
        continue
      first_line_of[key] = line_number
      users.append(user)
  report_bad_rows(bad, num_rows, path, on_bad_row, reader="user_histories")
  return users


def report_bad_rows(bad: Sequence[str], num_rows: int, path, on_bad_row: str, *, reader: str) -> None:
  """The readers' one rule for bad rows (each message already names `file:line`): with
  `on_bad_row='error'` raise a `UserError` that starts with the first and lists up to 20; with
  'skip' print how many of how many rows were skipped, and which. Never a silent skip."""
  if not bad:
    return
  listed = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more." if len(bad) > 20 else "")
  if on_bad_row == "error":
    more = f"\n({len(bad)} bad rows of {num_rows} in {path}:\n{listed})" if len(bad) > 1 else ""
    raise UserError(bad[0] + more)
  print(f"{reader}: skipped {len(bad)} bad row(s) of {num_rows} in {path} "
        f"(on_bad_row='skip'):\n{listed}", flush=True)


def _amazon_row(line: str, where: str) -> UserHistory:
  """One JSONL line -> UserHistory; raises ValueError starting with `where` (file:line)."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError as error:
    raise UserError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); fix or remove "
                     f"that line.") from None
  if not isinstance(row, dict):
    raise UserError(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
  missing = [key for key in ("user_id", "category", "history", "heldout") if key not in row]
  if missing:
    raise UserError(f"{where}: row is missing field(s) {missing} (each row needs user_id, category, "
                     f"history, heldout).")
  user_id = _identifier(row["user_id"], "user_id", where)
  category = _identifier(row["category"], "category", where)
  if not isinstance(row["history"], list):
    raise UserError(f"{where}: field 'history' must be a list of reviews.")
  history = [_review(review, f"{where} (history[{index}])") for index, review in enumerate(row["history"])]
  heldout = _review(row["heldout"], f"{where} (heldout)")
  history.sort(key=lambda item: item.timestamp)
  return UserHistory(user_id, tuple(history), (heldout,), category)


def load_amazon_histories(directory: str | os.PathLike | None = None) -> dict[str, list[UserHistory]]:
  """The Amazon Reviews 2023 slice: {"train", "validation", "test"} -> users in file order.

  The slice's files already split users (training.jsonl / validation.jsonl / test.jsonl) and hold
  each user's last review out (`heldout`), so no re-splitting happens here.

  Args:
    directory: the folder holding the three files; None: ../shared/data/amazon/amazon2023_user_histories
      beside the checkout.
  """
  directory = pathlib.Path(directory) if directory is not None else DEFAULT_AMAZON_DIR
  splits = {split: read_amazon_jsonl(directory / name) for split, name in AMAZON_FILES.items()}
  seen: dict[tuple[str, str], str] = {}
  for split, users in splits.items():
    for user in users:
      key = (user.user_id, user.domain)
      if key in seen:
        raise UserError(f"{directory / AMAZON_FILES[split]}: user {user.user_id!r} of category "
                         f"{user.domain!r} is also in {AMAZON_FILES[seen[key]]}; a (user, category) in "
                         "two splits leaks held-out data.")
      seen[key] = split
  return splits


# ------------------------------------------------------------------------------------------------
# Vocabulary of string ids
# ------------------------------------------------------------------------------------------------
class ItemVocabulary:
  """String ids (items, genres, categories) <-> integer ids, with an explicit unknown-id policy.

  Id 0 is padding (`PAD_ID`), id 1 is the unknown id (`UNKNOWN_ID`), known ids are 2, 3, ... in
  the order given. `unknown="map"` (default) encodes an id outside the vocabulary as `UNKNOWN_ID`
  (an item first seen after training, e.g. a new movie, still gets a learned "unknown" embedding);
  `unknown="error"` raises ValueError naming the id instead.
  """
  PAD_ID = 0
  UNKNOWN_ID = 1
  PAD = "<pad>"
  UNKNOWN = "<unk>"

  def __init__(self, ids: Iterable[str], unknown: str = "map"):
    if unknown not in ("map", "error"):
      raise UserError(f"ItemVocabulary: unknown must be 'map' or 'error', got {unknown!r}.")
    self.unknown = unknown
    self._ids = [self.PAD, self.UNKNOWN]
    self._index: dict[str, int] = {}
    for item in ids:
      if item in (self.PAD, self.UNKNOWN):
        raise UserError(f"ItemVocabulary: {item!r} is reserved.")
      if item not in self._index:
        self._index[item] = len(self._ids)
        self._ids.append(item)

  @classmethod
  def from_histories(cls, histories: Iterable[UserHistory], *, field: str = "item_id",
                     include_heldout: bool = False, min_count: int = 1, unknown: str = "map"
                     ) -> ItemVocabulary:
    """Vocabulary of `field` ("item_id" or "categories") over the histories, most frequent first.

    Build it from the training users only (their heldout items too with include_heldout=True) so
    that validation/test items unseen in training exercise the unknown-id policy, as in deployment.
    Ids seen fewer than `min_count` times are left out (they encode as unknown).
    """
    if field not in ("item_id", "categories"):
      raise UserError(f"ItemVocabulary.from_histories: field must be 'item_id' or 'categories', got "
                       f"{field!r}.")
    counts: dict[str, int] = {}
    for history in histories:
      items = history.interactions + (history.heldout if include_heldout else ())
      for item in items:
        for value in (item.categories if field == "categories" else (item.item_id,)):
          counts[value] = counts.get(value, 0) + 1
    ordered = sorted((value for value, count in counts.items() if count >= min_count),
                     key=lambda value: (-counts[value], value))
    return cls(ordered, unknown=unknown)

  def __len__(self) -> int:
    """Size including the padding and unknown ids (the embedding table size)."""
    return len(self._ids)

  def __contains__(self, item: str) -> bool:
    return item in self._index

  @property
  def ids(self) -> tuple[str, ...]:
    """All string ids, index = integer id (0 = "<pad>", 1 = "<unk>")."""
    return tuple(self._ids)

  def encode_one(self, item: str) -> int:
    """Integer id of `item`, or `UNKNOWN_ID` / ValueError for an unknown id (see `unknown`)."""
    index = self._index.get(item)
    if index is not None:
      return index
    if self.unknown == "error":
      raise UserError(f"item id {item!r} is not in the vocabulary ({len(self._index)} known ids). Fix: "
                       f"build the vocabulary with unknown='map' to encode it as the unknown id "
                       f"{self.UNKNOWN_ID}, or add it to the vocabulary.")
    return self.UNKNOWN_ID

  def encode(self, items: Sequence[str]) -> np.ndarray:
    """int32 [len(items)] ids."""
    return np.asarray([self.encode_one(item) for item in items], dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> list[str]:
    """String ids of integer ids (padding and unknown decode to "<pad>" / "<unk>")."""
    return [self._ids[int(index)] for index in ids]


# ------------------------------------------------------------------------------------------------
# Text rendering
# ------------------------------------------------------------------------------------------------
def _format_rating(rating: float) -> str:
  return f"{rating:g}"


def render_history_text(history: UserHistory | Sequence[Interaction], *, max_items: int | None = None,
                        fields: Sequence[str] = ("title", "categories", "rating"),
                        review_chars: int = 200, category_label: str = "genres",
                        empty_text: str = "The user has no interactions yet.") -> str:
  """A history as prompt text: one numbered line per interaction, oldest first.

  Example line: `3. Heat (1995) | genres: Action, Crime, Thriller | rating: 4/5`.

  Args:
    history: a UserHistory (its context `interactions` are rendered, never `heldout`) or a sequence
      of interactions.
    max_items: render only the most recent `max_items` interactions; when that drops older ones, a
      first line says so ("Showing the last 50 of 210 interactions."), so truncation is never silent.
    fields: which parts to write, in order: "title", "categories", "rating", "review_title",
      "review_text" (review text is cut to `review_chars` characters, marked with "...").
    review_chars: the longest review text written per interaction.
    category_label: the word before the categories ("genres" for MovieLens, "category" for Amazon).
    empty_text: what an empty history renders as.

  Returns:
    the text (no trailing newline).
  """
  interactions = tuple(history.interactions if isinstance(history, UserHistory) else history)
  known = ("title", "categories", "rating", "review_title", "review_text")
  unknown_fields = [name for name in fields if name not in known]
  if unknown_fields:
    raise UserError(f"render_history_text: unknown field(s) {unknown_fields}; choose from {known}.")
  if max_items is not None and max_items < 1:
    raise UserError(f"render_history_text: max_items must be >= 1 or None, got {max_items}.")
  if not interactions:
    return empty_text
  lines = []
  shown = interactions
  if max_items is not None and len(interactions) > max_items:
    shown = interactions[-max_items:]
    lines.append(f"Showing the last {max_items} of {len(interactions)} interactions.")
  for number, item in enumerate(shown, start=1):
    parts = []
    for name in fields:
      if name == "title":
        parts.append(item.title)
      elif name == "categories" and item.categories:
        parts.append(f"{category_label}: " + ", ".join(item.categories))
      elif name == "rating":
        parts.append(f"rating: {_format_rating(item.rating)}/5")
      elif name == "review_title" and item.review_title:
        parts.append(f"review title: {item.review_title}")
      elif name == "review_text" and item.review_text:
        text = item.review_text
        parts.append("review: " + (text if len(text) <= review_chars else text[:review_chars] + "..."))
    lines.append(f"{number}. " + " | ".join(parts))
  return "\n".join(lines)
