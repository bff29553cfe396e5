"""User-LLM data: history features, multiple-choice tasks as SeqIO tasks, batching, metrics.

Tasks (all are "choose the right option" so quality is exact: accuracy and Recall@K over options):
  next_movie       MovieLens: which of `num_options` movies (the real next one + random movies the user
                   never rated) the user watches next. Training users give one example per cut point
                   (their last `examples_per_user` items); held-out users one (their held-out item).
  favorite_genre   MovieLens: the genre most frequent among the user's NEXT `future_items` items (the
                   held-out future), among `num_options` genres.
  amazon_rating    Amazon 2023 slice: the star rating (1-5) the user gives the held-out product.
  amazon_review    Amazon 2023 slice, GENERATION (not a choice): the user's held-out review (its title
                   by default, or its text: `review_field`) given the held-out product's title in the
                   prompt and the user's earlier reviews as history; ROUGE-Lsum (see ReviewExample).
  next_item        (user-encoder pretraining, no text) windows of `max_length` items of every training
                   user's full sequence; next-item cross-entropy per feature (see model.next_item_loss).

Every example holds the history features (model.py's module docstring), `prompt` (the question and
its lettered options; the text-prompt baseline puts the rendered history before it), `options`
(token id of each option's answer letter), `label` (index of the right option), `num_truncated`
(items dropped from the front of the history to fit `max_length`: truncation is counted, never silent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf

from persona_jax.data import register_in_memory_task
from persona_jax.data import user_histories as uh
from persona_jax.data.vocabularies import get_vocabulary, vocabulary_name
from persona_jax.errors import UserError
from persona_jax.user_llm.model import MAX_CATEGORIES

LETTERS = "ABCDEFGHIJ"
TASK_KINDS = ("next_movie", "favorite_genre", "amazon_rating", "amazon_review")
REVIEW_FIELDS = ("title", "text")
HISTORY_FEATURES = ("item_ids", "ratings", "genre_bits")


# ------------------------------------------------------------------------------------------------
# Users
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UserData:
  """Users split by user and time, and the vocabularies built on the training users."""
  users: dict[str, list[uh.UserHistory]]
  items: uh.ItemVocabulary
  categories: uh.ItemVocabulary
  catalog: dict[str, tuple[str, tuple[str, ...]]]
  name: str


def load_user_data(dataset: str = "movielens", *, movielens_config: str = "latest-small",
                   amazon_dir: str | None = None, tfds_data_dir: str | None = None,
                   seed: int = 0) -> UserData:
  """MovieLens (TFDS) or the Amazon 2023 slice as `UserData`.

  The item vocabulary holds the training users' items (their held-out items too); items only seen in
  held-out users encode as the unknown id. Categories: the 29 most frequent (others: unknown).
  """
  if dataset == "movielens":
    users = uh.load_movielens_histories(movielens_config, seed=seed, data_dir=tfds_data_dir)
    catalog = uh.load_movielens_catalog(movielens_config, data_dir=tfds_data_dir)
    name = f"movielens_{movielens_config.replace('-', '_')}"
  elif dataset == "amazon":
    users = uh.load_amazon_histories(amazon_dir)
    catalog = {item.item_id: (item.title, item.categories) for split in users.values()
               for user in split for item in user.interactions + user.heldout}
    name = "amazon2023"
  else:
    raise UserError(f"user_llm.data.dataset={dataset!r}; use 'movielens' or 'amazon'.")
  items = uh.ItemVocabulary.from_histories(users["train"], include_heldout=True)
  all_categories = uh.ItemVocabulary.from_histories(users["train"], field="categories",
                                                    include_heldout=True)
  categories = uh.ItemVocabulary(all_categories.ids[2:MAX_CATEGORIES])
  return UserData(users, items, categories, catalog, name)


def choice_examples(data: UserData, task_kind: str, *, num_options: int, examples_per_user: int,
                    seed: int, shuffle_options: bool = True) -> dict[str, list[ChoiceExample]]:
  """Examples of `task_kind` for each split (training users: `examples_per_user` cut points)."""
  if task_kind == "next_movie":
    return {split: next_movie_examples(users, data.catalog, num_options=num_options,
                                       examples_per_user=examples_per_user if split == "train" else 1,
                                       seed=seed)
            for split, users in data.users.items()}
  if task_kind == "favorite_genre":
    genres = list(data.categories.ids[2:])
    return {split: favorite_genre_examples(users, genres, num_options=num_options, seed=seed,
                                           shuffle_options=shuffle_options)
            for split, users in data.users.items()}
  if task_kind == "amazon_rating":
    return {split: amazon_rating_examples(users) for split, users in data.users.items()}
  raise UserError(f"user_llm.job.task={task_kind!r}; use one of {TASK_KINDS}.")


# ------------------------------------------------------------------------------------------------
# History features
# ------------------------------------------------------------------------------------------------
def rating_bucket(rating: float) -> int:
  """Rating 0.5..5 -> bucket 1..10 (0 is padding)."""
  return int(min(10, max(1, round(2 * rating))))


def history_example(interactions: Sequence[uh.Interaction], items: uh.ItemVocabulary,
                    categories: uh.ItemVocabulary, max_length: int) -> dict[str, np.ndarray]:
  """One history as encoder features, oldest first, at most `max_length` items.

  A longer history keeps its most recent `max_length` items (the oldest are dropped) and
  `num_truncated` says how many were dropped. An empty history gives length-0 arrays. Unknown items
  and categories follow the vocabularies' `unknown` policy (default: the unknown id 1).

  Returns:
    item_ids, ratings, genre_bits: int32 [min(len, max_length)]; num_truncated: int32 scalar.
  """
  if len(categories) > MAX_CATEGORIES:
    raise UserError(f"history_example: the category vocabulary has {len(categories)} ids, more than "
                     f"{MAX_CATEGORIES}; build it with min_count= so rare categories map to unknown.")
  dropped = max(0, len(interactions) - max_length)
  kept = interactions[dropped:]
  bits = []
  for item in kept:
    value = 0
    for category in item.categories:
      value |= 1 << categories.encode_one(category)
    bits.append(value)
  return {"item_ids": items.encode([item.item_id for item in kept]),
          "ratings": np.asarray([rating_bucket(item.rating) for item in kept], np.int32),
          "genre_bits": np.asarray(bits, np.int32), "num_truncated": np.int32(dropped)}


def pad_histories(examples: Sequence[dict], max_length: int) -> dict[str, np.ndarray]:
  """Stacks history features, right-padded with 0 to `[B, max_length]`, plus `history_mask`."""
  batch = {name: np.zeros((len(examples), max_length), np.int32) for name in HISTORY_FEATURES}
  batch["history_mask"] = np.zeros((len(examples), max_length), bool)
  for row, example in enumerate(examples):
    length = len(example["item_ids"])
    if length > max_length:
      raise UserError(f"pad_histories: a history has {length} items > max_length={max_length}; build it "
                       f"with history_example(max_length=...).")
    for name in HISTORY_FEATURES:
      batch[name][row, :length] = example[name]
    batch["history_mask"][row, :length] = True
  return batch


# ------------------------------------------------------------------------------------------------
# Multiple-choice prompts
# ------------------------------------------------------------------------------------------------
def answer_tokens(vocabulary: seqio.Vocabulary, num_options: int) -> tuple[str, np.ndarray]:
  """(prompt suffix, int32 [num_options] answer token ids).

  With a BPE tokenizer the answer is " A", " B", ... (one token each) after "Answer:"; with the byte
  vocabulary it is "A", "B", ... after "Answer: ".
  """
  if num_options > len(LETTERS):
    raise UserError(f"num_options={num_options} > {len(LETTERS)} letters.")
  for suffix, template in (("Answer:", " {}"), ("Answer: ", "{}")):
    ids = [vocabulary.encode(template.format(letter)) for letter in LETTERS[:num_options]]
    if all(len(tokens) == 1 for tokens in ids):
      return suffix, np.asarray([tokens[0] for tokens in ids], np.int32)
  raise UserError(f"vocabulary {vocabulary_name(vocabulary)} has no single-token answer letters.")


def choice_prompt(question: str, options: Sequence[str], suffix: str, history_text: str | None = None) -> str:
  """The prompt text; `history_text` (the text-prompt baseline) goes first."""
  lines = []
  if history_text is not None:
    lines += ["The user's history, oldest first:", history_text, ""]
  lines.append(question)
  lines += [f"{LETTERS[index]}. {option}" for index, option in enumerate(options)]
  lines.append(suffix)
  return "\n".join(lines)


def _rng(*parts) -> np.random.Generator:
  digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "big"))


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
  """One multiple-choice example before tokenization."""
  user_id: str
  context: tuple[uh.Interaction, ...]  # the history the model sees (oldest first)
  question: str
  options: tuple[str, ...]
  label: int


def next_movie_examples(users: Sequence[uh.UserHistory], catalog: dict[str, tuple[str, tuple[str, ...]]],
                        *, num_options: int = 5, examples_per_user: int = 1, seed: int = 0
                        ) -> list[ChoiceExample]:
  """Next-movie choice: the real next movie among `num_options` (others: catalog movies the user never
  rated, drawn deterministically from (seed, user, cut)).

  `examples_per_user` > 1 also cuts before each of the user's last context items (training data).
  """
  pool = sorted(catalog)
  examples = []
  for user in users:
    sequence = user.interactions + user.heldout
    seen = {item.item_id for item in sequence}
    first_cut = len(user.interactions)
    for cut in range(first_cut, max(first_cut - examples_per_user, 0), -1):
      target = sequence[cut]
      rng = _rng(seed, user.user_id, cut)
      negatives: list[str] = []
      while len(negatives) < num_options - 1:
        candidate = pool[int(rng.integers(len(pool)))]
        if candidate not in seen and candidate not in negatives:
          negatives.append(candidate)
      label = int(rng.integers(num_options))
      ids = negatives[:label] + [target.item_id] + negatives[label:]
      examples.append(ChoiceExample(user.user_id, sequence[:cut], "Which movie will the user watch next?",
                                    tuple(catalog[movie][0] if movie in catalog else target.title
                                          for movie in ids), label))
  return examples


def favorite_genre_examples(users: Sequence[uh.UserHistory], genres: Sequence[str], *, num_options: int = 5,
                            future_items: int = 5, shuffle_options: bool = True, seed: int = 0
                            ) -> list[ChoiceExample]:
  """Favorite genre of the user's next `future_items` items; the context is everything before them.

  shuffle_options=True: the favorite (most frequent; ties: alphabetical) among `num_options` genres,
  the others drawn from `genres`, in a random order. shuffle_options=False: the options are always
  the first `num_options` of `genres` in that order (a fixed-label classification), and the label is
  the option most frequent in the future items (ties: the earlier option); a user whose future items
  have none of those genres is left out, and the number left out is printed.
  """
  examples = []
  left_out = 0
  for user in users:
    sequence = user.interactions + user.heldout
    if len(sequence) <= future_items:
      raise UserError(f"favorite_genre: user {user.user_id!r} has {len(sequence)} items, not more than "
                       f"future_items={future_items}.")
    counts: dict[str, int] = {}
    for item in sequence[-future_items:]:
      for genre in item.categories:
        counts[genre] = counts.get(genre, 0) + 1
    question = "Which genre will the user watch most in their next movies?"
    if not shuffle_options:
      options = list(genres[:num_options])
      best = max(counts.get(genre, 0) for genre in options)
      if best == 0:
        left_out += 1
        continue
      label = next(index for index, genre in enumerate(options) if counts.get(genre, 0) == best)
      examples.append(ChoiceExample(user.user_id, sequence[:-future_items], question, tuple(options), label))
      continue
    if not counts:
      raise UserError(f"favorite_genre: user {user.user_id!r}'s last {future_items} items have no genres.")
    favorite = min(counts, key=lambda genre: (-counts[genre], genre))
    rng = _rng(seed, user.user_id, "genre")
    others = [genre for genre in genres if genre not in counts]
    if len(others) < num_options - 1:
      others += [genre for genre in sorted(counts) if genre != favorite]
    picked = [others[i] for i in rng.permutation(len(others))[:num_options - 1]]
    label = int(rng.integers(num_options))
    options = picked[:label] + [favorite] + picked[label:]
    examples.append(ChoiceExample(user.user_id, sequence[:-future_items], question, tuple(options), label))
  if left_out:
    print(f"favorite_genre: left out {left_out} of {len(users)} users whose next {future_items} items have "
          f"none of the {num_options} option genres.")
  return examples


def amazon_rating_examples(users: Sequence[uh.UserHistory]) -> list[ChoiceExample]:
  """The star rating (options "1 star" .. "5 stars") the user gives the held-out product."""
  examples = []
  for user in users:
    target = user.heldout[0]
    rating = int(round(target.rating))
    if not 1 <= rating <= 5:
      raise UserError(f"amazon_rating: user {user.user_id!r} held-out rating {target.rating} is not 1..5.")
    examples.append(ChoiceExample(user.user_id, user.interactions,
                                  f"How many stars will the user give \"{target.title}\"?",
                                  tuple(f"{stars} star{'s' if stars > 1 else ''}" for stars in range(1, 6)),
                                  rating - 1))
  return examples


@dataclasses.dataclass(frozen=True)
class ReviewExample:
  """One review-generation example before tokenization: `target` follows `prompt`."""
  user_id: str
  context: tuple[uh.Interaction, ...]  # the history the model sees (oldest first), never the held-out review
  prompt: str
  target: str


def review_prompt(product_title: str, field: str) -> str:
  """The prompt text (the text-prompt baseline puts the rendered history before it, as choice_prompt)."""
  return f"Product: {product_title}\nThe user's review {field}: "


def amazon_review_examples(users: Sequence[uh.UserHistory], field: str = "title") -> list[ReviewExample]:
  """The user's held-out review (`field`: its 'title' or its 'text') for the held-out product.

  Raises ValueError naming the user when that review's `field` is empty (nothing to generate or
  score): remove the row from the file or pick the other `field`.
  """
  if field not in REVIEW_FIELDS:
    raise UserError(f"amazon_review: review_field={field!r}; use one of {REVIEW_FIELDS}.")
  examples = []
  for user in users:
    target = user.heldout[0]
    text = (target.review_title if field == "title" else target.review_text).strip()
    if not text:
      raise UserError(f"amazon_review: user {user.user_id!r}'s held-out review has an empty {field}; remove "
                       f"that row or use review_field='{'text' if field == 'title' else 'title'}'.")
    examples.append(ReviewExample(user.user_id, user.interactions, review_prompt(target.title, field), text))
  return examples


# ------------------------------------------------------------------------------------------------
# SeqIO
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChoiceTaskSpec:
  """How examples become model inputs."""
  items: uh.ItemVocabulary
  categories: uh.ItemVocabulary
  max_length: int
  text_history_items: int | None = None  # text-prompt baseline: render this many items into the prompt
  history_items: int | None = None  # keep only each example's most recent items (history-length studies)
  history_fields: tuple[str, ...] = ("title", "categories", "rating")


def encode_example(example: ChoiceExample, spec: ChoiceTaskSpec, suffix: str, option_ids: np.ndarray
                   ) -> dict[str, np.ndarray | str]:
  """A ChoiceExample -> one SeqIO example (prompt still text)."""
  if spec.history_items is not None:
    example = dataclasses.replace(example, context=example.context[len(example.context) - spec.history_items:]
                                  if len(example.context) > spec.history_items else example.context)
  features = history_example(example.context, spec.items, spec.categories, spec.max_length)
  history_text = None
  if spec.text_history_items is not None:
    history_text = uh.render_history_text(example.context, max_items=spec.text_history_items,
                                          fields=spec.history_fields)
  return dict(features, prompt=choice_prompt(example.question, example.options, suffix, history_text),
              options=option_ids[:len(example.options)], label=np.int32(example.label))


def register_choice_task(prefix: str, examples_by_split: dict[str, Sequence[ChoiceExample]],
                         spec: ChoiceTaskSpec, vocabulary) -> str:
  """Registers a SeqIO task over in-memory examples (`prompt` tokenized by `vocabulary`) named
  `<prefix>.<vocabulary>.<content hash>` (the same examples give the same task). Returns the name;
  `longest_prompt(name)` gives its longest prompt in tokens."""
  vocabulary = get_vocabulary(vocabulary)
  num_options = {len(example.options) for examples in examples_by_split.values() for example in examples}
  suffix, option_ids = answer_tokens(vocabulary, max(num_options) if num_options else 2)
  encoded = {split: [encode_example(example, spec, suffix, option_ids) for example in examples]
             for split, examples in examples_by_split.items()}
  signature = {"prompt": tf.TensorSpec([], tf.string), "options": tf.TensorSpec([None], tf.int32),
               "label": tf.TensorSpec([], tf.int32), "num_truncated": tf.TensorSpec([], tf.int32),
               **{feature: tf.TensorSpec([None], tf.int32) for feature in HISTORY_FEATURES}}

  features = {"prompt": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)}
  return _register_prompt_task(prefix, encoded, signature, features, [seqio.preprocessors.tokenize],
                               vocabulary)


def _register_prompt_task(prefix: str, encoded: dict[str, list[dict]], signature: dict,
                          features: dict, preprocessors: list, vocabulary) -> str:
  """`persona_jax.data.register_in_memory_task` over rows `{split: [row, ...]}` with a text `prompt`
  (tokenized by the task); the name is `<prefix>.<vocabulary>.<hash of the rows>`. The task records
  `longest_prompt` (tokens of its longest prompt) for the batchers' length check."""
  name = register_in_memory_task(f"{prefix}.{vocabulary_name(vocabulary)}", encoded, signature,
                                 output_features=features, preprocessors=preprocessors)
  task = seqio.get_mixture_or_task(name)
  if not hasattr(task, "longest_prompt"):
    task.longest_prompt = max((len(vocabulary.encode(row["prompt"])) for rows in encoded.values()
                               for row in rows), default=0)
  return name


def longest_prompt(task: str) -> int:
  """Tokens in the longest prompt of a task registered by `register_choice_task`."""
  return seqio.get_mixture_or_task(task).longest_prompt


def register_next_item_task(prefix: str, users_by_split: dict[str, Sequence[uh.UserHistory]],
                            items: uh.ItemVocabulary, categories: uh.ItemVocabulary, max_length: int) -> str:
  """Encoder pretraining task: every user's full sequence (context + held-out) cut into consecutive
  windows of at most `max_length` items (the last window ends at the newest item), so no item is
  dropped; windows shorter than 2 items (nothing to predict) are left out, counted in the task's
  `dropped_windows` attribute. The name is `<prefix>.<content hash>`."""
  windows: dict[str, list[dict]] = {}
  dropped = 0
  for split, users in users_by_split.items():
    rows = []
    for user in users:
      sequence = user.interactions + user.heldout
      for end in range(len(sequence), 0, -max_length):
        window = sequence[max(0, end - max_length):end]
        if len(window) < 2:
          dropped += 1
          continue
        rows.append(history_example(window, items, categories, max_length))
    windows[split] = rows
  signature = {feature: tf.TensorSpec([None], tf.int32) for feature in HISTORY_FEATURES}
  signature["num_truncated"] = tf.TensorSpec([], tf.int32)
  name = register_in_memory_task(prefix, windows, signature)
  seqio.get_mixture_or_task(name).dropped_windows = dropped
  return name


class ChoiceBatches(Iterator[dict[str, np.ndarray]]):
  """Batches of a registered task: history features `[B, max_length]` and `history_mask`; prompts
  left-padded to `[B, max_prompt_length]` (`prompt_tokens`, `prompt_mask`); `options` [B, C];
  `label` [B]; `num_truncated` [B]. Resumable: `get_state()` / `set_state()` (examples consumed).

  A prompt longer than `max_prompt_length` raises ValueError (never cut silently).
  """

  def __init__(self, task: str, split: str, *, batch_size: int, max_length: int, max_prompt_length: int | None,
               seed: int = 0, shuffle: bool = True, repeat: bool = True, drop_remainder: bool = True):
    self.task, self.split, self.batch_size = task, split, batch_size
    self.max_length, self.max_prompt_length = max_length, max_prompt_length
    self.seed, self.shuffle, self.repeat, self.drop_remainder = seed, shuffle, repeat, drop_remainder
    self.consumed = 0
    self._iterator = self._build()

  def _build(self):
    dataset = seqio.get_mixture_or_task(self.task).get_dataset(
        sequence_length=None, split=self.split, shuffle=self.shuffle, seed=self.seed,
        num_epochs=None if self.repeat else 1)
    return iter(dataset.skip(self.consumed).as_numpy_iterator())

  def get_state(self) -> dict:
    return {"examples_consumed": self.consumed}

  def set_state(self, state: dict) -> None:
    self.consumed = int(state["examples_consumed"])
    self._iterator = self._build()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for row in self._iterator:
      rows.append(row)
      if len(rows) == self.batch_size:
        break
    if not rows or (self.drop_remainder and len(rows) < self.batch_size):
      raise StopIteration
    self.consumed += len(rows)
    return self._collate(rows)

  def _collate(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    return collate(rows, self.max_length, self.max_prompt_length)


def collate(rows: Sequence[dict], max_length: int, max_prompt_length: int | None, choices: bool = True
            ) -> dict[str, np.ndarray]:
  """Rows of a task's numpy dataset -> one batch (see ChoiceBatches); `choices=False`: no options/label
  (review generation)."""
  batch = pad_histories(rows, max_length)
  batch["num_truncated"] = np.asarray([row["num_truncated"] for row in rows], np.int32)
  if "prompt" in rows[0]:
    longest = max(len(row["prompt"]) for row in rows)
    width = longest if max_prompt_length is None else max_prompt_length
    if longest > width:
      raise UserError(f"a prompt has {longest} tokens > max_prompt_length={width}: raise "
                       f"max_prompt_length (prompts are never cut).")
    batch["prompt_tokens"] = np.zeros((len(rows), width), np.int32)
    batch["prompt_mask"] = np.zeros((len(rows), width), bool)
    for index, row in enumerate(rows):
      length = len(row["prompt"])
      if length:
        batch["prompt_tokens"][index, -length:] = row["prompt"]
        batch["prompt_mask"][index, -length:] = True
    if choices:
      batch["options"] = np.stack([row["options"] for row in rows]).astype(np.int32)
      batch["label"] = np.asarray([row["label"] for row in rows], np.int32)
  return batch


# ------------------------------------------------------------------------------------------------
# Review generation (amazon_review)
# ------------------------------------------------------------------------------------------------
def register_review_task(prefix: str, examples_by_split: dict[str, Sequence[ReviewExample]], spec: ChoiceTaskSpec,
                         vocabulary) -> str:
  """Registers a SeqIO task over in-memory review examples: `prompt` tokenized without EOS, `target`
  tokenized with EOS (so the model learns to stop); the untokenized target stays as
  `target_pretokenized` (the ROUGE reference). Named as `register_choice_task`; returns the name."""
  vocabulary = get_vocabulary(vocabulary)
  encoded = {}
  for split, examples in examples_by_split.items():
    rows = []
    for example in examples:
      context = example.context
      if spec.history_items is not None:
        context = context[max(0, len(context) - spec.history_items):]
      prompt = example.prompt
      if spec.text_history_items is not None:
        history_text = uh.render_history_text(context, max_items=spec.text_history_items,
                                              fields=spec.history_fields)
        prompt = f"The user's history, oldest first:\n{history_text}\n\n{prompt}"
      rows.append(dict(history_example(context, spec.items, spec.categories, spec.max_length), prompt=prompt,
                       target=example.target))
    encoded[split] = rows
  signature = {"prompt": tf.TensorSpec([], tf.string), "target": tf.TensorSpec([], tf.string),
               "num_truncated": tf.TensorSpec([], tf.int32),
               **{feature: tf.TensorSpec([None], tf.int32) for feature in HISTORY_FEATURES}}

  features = {"prompt": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
              "target": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)}
  return _register_prompt_task(
      prefix, encoded, signature, features,
      [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos], vocabulary)


class ReviewBatches(ChoiceBatches):
  """Batches of a task registered by `register_review_task`: history features and `history_mask`
  `[B, max_length]`; `prompt_tokens` / `prompt_mask` `[B, max_prompt_length]` LEFT-padded;
  `target_tokens` / `target_mask` `[B, max_target_length]` RIGHT-padded (EOS included);
  `target_truncated` [B] bool; `num_truncated` [B]; with `references=True` also `references`, a list
  of the B full target strings (keep it out of training batches: it is not an array).

  So `concatenate([prompt_tokens, target_tokens], 1)` is one contiguous sequence per row. A prompt
  longer than `max_prompt_length` raises (never cut). A target longer than `max_target_length` keeps
  its first `max_target_length` tokens and is flagged in `target_truncated` (counted in the
  evaluation's `targets_truncated`); ROUGE still scores against the full reference.
  """

  def __init__(self, task: str, split: str, *, max_target_length: int, references: bool = False, **kwargs):
    self.max_target_length, self.references = max_target_length, references
    super().__init__(task, split, **kwargs)

  def _collate(self, rows: Sequence[dict]) -> dict:
    targets = [row["target"] for row in rows]
    batch = collate(rows, self.max_length, self.max_prompt_length, choices=False)
    batch["target_tokens"] = np.zeros((len(rows), self.max_target_length), np.int32)
    batch["target_mask"] = np.zeros((len(rows), self.max_target_length), bool)
    for index, target in enumerate(targets):
      kept = target[:self.max_target_length]
      batch["target_tokens"][index, :len(kept)] = kept
      batch["target_mask"][index, :len(kept)] = True
    batch["target_truncated"] = np.asarray([len(target) > self.max_target_length for target in targets])
    if self.references:
      batch["references"] = [row["target_pretokenized"].decode("utf-8") for row in rows]
    return batch


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def choice_metrics(option_logits: np.ndarray, labels: np.ndarray, recall_at: Sequence[int] = (1, 3)
                   ) -> dict[str, float]:
  """accuracy and Recall@K over options. option_logits `[B, C]`, labels `[B]`."""
  option_logits = np.asarray(option_logits, np.float64)
  true = np.take_along_axis(option_logits, np.asarray(labels)[:, None], 1)
  rank = (option_logits > true).sum(1)
  metrics = {"accuracy": float(np.mean(rank == 0))}
  for k in recall_at:
    metrics[f"recall@{k}"] = float(np.mean(rank < k))
  return metrics


def rouge_lsum(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean ROUGE-Lsum F-measure (rouge-score's `RougeScorer(["rougeLsum"])`, defaults: no stemming;
  sentences are split on newlines) of predictions against references, in [0, 1]."""
  from rouge_score import rouge_scorer

  if len(predictions) != len(references) or not predictions:
    raise UserError(f"rouge_lsum: {len(predictions)} predictions for {len(references)} references.")
  scorer = rouge_scorer.RougeScorer(["rougeLsum"])
  return float(np.mean([scorer.score(reference, prediction)["rougeLsum"].fmeasure
                        for prediction, reference in zip(predictions, references)]))


def describe(task: str) -> str:
  """A one-line JSON summary of a task's splits (for logs)."""
  provider = seqio.get_mixture_or_task(task)
  return json.dumps({split: provider.num_input_examples(split) for split in provider.splits})
