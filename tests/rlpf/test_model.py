"""RLPF reward, predictor and tasks: closed forms and bad inputs."""

import dataclasses

import numpy as np
import pytest

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax import rl
from persona_jax.data import user_histories as uh
from persona_jax.errors import UserError
from persona_jax.rlpf import tasks
from persona_jax.rlpf.model import (Predictor, RewardConfig, TextCodec, length_reward,
                                    predictor_message, summary_rewards)
from persona_jax.rlpf.job import make_reward_fn


@pytest.fixture(scope="module")
def codec():
  return TextCodec(pdata.get_vocabulary("bytes"))


@pytest.fixture(scope="module")
def predictor(codec):
  config = pnn.get_config("tiny_llama", vocab_size=259)
  return Predictor(pnn.build_decoder(config, 0), codec)


ROW = {"question": "Which next?", "options": ["Heat", "Up", "Jaws", "Alien"], "answer_index": 2}


def test_length_reward_and_prediction_reward_closed_forms():
  np.testing.assert_allclose(length_reward([10, 40, 60], target_length=48, beta=0.01, cap=0.2),
                             [0.2, 0.08, -0.12], rtol=1e-6)
  scores = np.array([[-1.0, -2.0, -3.0, -4.0], [-5.0, -1.0, -1.0, -20.0]])
  accuracy = RewardConfig("accuracy").prediction_reward(scores, np.array([0, 2]))
  np.testing.assert_array_equal(accuracy, [1.0, 0.0])  # row 2: tie -> first max (index 1) chosen
  log_prob = RewardConfig("log_prob").prediction_reward(scores, np.array([0, 3]))
  expected0 = -1.0 - np.log(np.exp([-1.0, -2.0, -3.0, -4.0]).sum())
  np.testing.assert_allclose(log_prob, [expected0, -10.0], rtol=1e-6)  # row 2 floored at -10
  config = RewardConfig("accuracy", length_weight=2.0, target_length=48, beta=0.01, cap=0.2)
  np.testing.assert_allclose(config.total([1.0], [40]), [1.0 + 2 * 0.08], rtol=1e-6)
  assert config.minimum_reward(64) == pytest.approx(2 * 0.01 * (48 - 64))
  with pytest.raises(ValueError, match="reward_kind='f1'"):
    RewardConfig("f1")


class _NoEmptyPredictor:
  def option_logprobs(self, contexts, questions, options, context_name="User summary",
                      reduction="mean"):
    assert all(c.strip() for c in contexts), "an empty summary reached the predictor"
    return np.tile(np.array([[0.0, 0.0, 1.0, 0.0]]), (len(contexts), 1))


def test_empty_or_all_stop_summary_gets_the_minimum_reward(codec):
  config = RewardConfig("accuracy", length_weight=1.0, target_length=16, beta=0.1, cap=0.5)
  out = summary_rewards(["", "   \n", "likes thrillers"], [0, 3, 15], [ROW] * 3, _NoEmptyPredictor(),
                        config, max_summary_tokens=16)
  minimum = config.minimum_reward(16)
  np.testing.assert_allclose(out["rewards"], [minimum, minimum, 1.0 + 0.1], rtol=1e-6)
  assert out["rewards"][:2].max() <= out["rewards"].min()
  np.testing.assert_array_equal(out["empty_summary"], [1, 1, 0])
  # Through the RL reward function: a rollout whose every token is the stop token (eos).
  eos = codec.stop_ids[0]
  rollout = rl.Rollout(
      tokens=np.array([[5, 6, eos, 0], [5, 6, 70, eos]]), input_mask=np.array([[1, 1, 1, 0], [1] * 4], bool),
      response_mask=np.array([[1, 0], [1, 1]], np.float32), sampling_logprobs=np.zeros((2, 2), np.float32),
      response_lengths=np.array([1, 2]), done=np.array([True, True]), prompt_length=2, group_size=1)
  rewards = make_reward_fn(_NoEmptyPredictor(), codec, config, 16)([ROW, ROW], rollout)
  assert rewards["rewards"][0] == pytest.approx(minimum)
  assert rewards["summary_tokens"].tolist() == [0, 1]


def test_predictor_scores_options_as_continuations(codec, predictor):
  contexts = ["likes sharks", "x"]
  options = [ROW["options"], ["a", "bb", "ccc", "dddd"]]
  both = predictor.option_scores(contexts, ["Which next?"] * 2, options)
  scores = predictor.option_logprobs(contexts, ["Which next?"] * 2, options, reduction="sum")
  assert scores.shape == (2, 4)
  np.testing.assert_allclose(predictor.option_logprobs(contexts, ["Which next?"] * 2, options),
                             both["mean"])  # the default is the mean per option token
  # Independent check: RIGHT-padded rows (no mask, default positions; padding after a row cannot
  # change its earlier logits under the causal mask), summing each option's token log-probs.
  rows, spans = [], []
  for context, opts in zip(contexts, options):
    prompt = codec.prompt(predictor_message("User summary", context, "Which next?"))
    for option in opts:
      answer = codec.encode(" " + option)
      rows.append(prompt + answer)
      spans.append((len(prompt), answer))
  width = max(len(r) for r in rows)
  tokens = np.array([r + [0] * (width - len(r)) for r in rows])
  logits = np.asarray(predictor.decoder(tokens).logits, np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  expected = [sum(log_probs[i, start - 1 + k, t] for k, t in enumerate(answer))
              for i, (start, answer) in enumerate(spans)]
  np.testing.assert_allclose(scores.reshape(-1), expected, atol=2e-3)
  lengths = [len(answer) for _, answer in spans]
  np.testing.assert_allclose(both["mean"].reshape(-1), np.array(expected) / lengths, atol=2e-3)


class _UnknownVocabulary:
  """A vocabulary that maps 'ÿ' to its unknown id (as WordPiece-style tokenizers do)."""
  pad_id, eos_id, unk_id = 0, 1, 2

  def encode(self, text):
    return [2 if ch == "ÿ" else ord(ch) % 200 + 3 for ch in text]

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


def test_untokenizable_option_raises_a_clear_error(predictor):
  with pytest.raises(ValueError, match="Answer option '   ' cannot be tokenized"):
    predictor.option_logprobs(["ctx"], ["q?"], [["Heat", "   ", "Jaws", "Up"]])
  unknown = Predictor(predictor.decoder, TextCodec(_UnknownVocabulary()))
  with pytest.raises(ValueError, match="Answer option 'ÿÿ' cannot be tokenized"):
    unknown.option_logprobs(["ctx"], ["q?"], [["Heat", "ÿÿ", "Jaws", "Up"]])
  with pytest.raises(ValueError, match="same number"):
    predictor.option_logprobs(["ctx", "c"], ["q?", "q"], [["Heat", "Up"], ["a", "b", "c"]])


def _movie(item, title, genres, t):
  return uh.Interaction(item_id=item, rating=4.0, timestamp=t, title=title, categories=genres)


def test_tasks_short_history_band_options_and_determinism():
  from persona_jax.data import choice_tasks as ct
  short = uh.UserHistory("u1", (_movie("1", "Heat", ("Crime",), 1),),
                         (_movie("2", "Jaws", ("Horror",), 2),), "movielens")
  full = uh.UserHistory("u2", tuple(_movie(str(i), f"M{i}", ("Drama",), i) for i in range(10, 20)),
                        (_movie("30", "Up", ("Comedy",), 30),), "movielens")
  # Popularity: "2" (Jaws) and "30" (Up) sit in the 50-count band with a..d; the rest is rarer.
  counts = {"1": 1, "2": 50, "30": 50, "a": 50, "b": 50, "c": 50, "d": 50, "e": 1, "f": 1}
  counts.update({str(i): 1 for i in range(10, 20)})
  titles = {"1": "Heat", "2": "Jaws", "30": "Up", "a": "A", "b": "B", "c": "C", "d": "D", "e": "E",
            "f": "F", **{str(i): f"M{i}" for i in range(10, 20)}}
  genres = {item: ("Drama",) for item in titles}
  bands = ct.PopularityBands(counts, min_band_size=5)
  examples = tasks.movielens_future_movie_examples([short, full], bands, titles, genres,
                                                   num_history=5, seed=0)
  first, second = examples
  # Fewer activities than N: all of them, counted; nothing padded or dropped.
  assert first["num_history_items"] == 1 and first["history_text"].startswith("1. Heat")
  assert second["num_history_items"] == 5 and "M19" in second["history_text"]
  assert "M14" not in second["history_text"]
  assert first["options"][first["answer_index"]] == "Jaws" == first["label"]
  for example in examples:  # distractors from the target's band: all as popular as the target
    assert set(example["options"]) - {example["label"]} <= {"A", "B", "C", "D", "Up", "Jaws"}
    assert example["option_popularity"] == [50.0] * 4 and len(set(example["options"])) == 4
  assert "Heat" not in first["options"]  # a movie the user already saw is no distractor
  # The content baseline's counts: Drama is in all of u2's shown movies (5), the target is Comedy.
  assert second["history_option_counts"][second["answer_index"]] == 0.0
  assert sorted(second["history_option_counts"]) == [0.0, 5.0, 5.0, 5.0]
  again = tasks.movielens_future_movie_examples([short, full], bands, titles, genres,
                                                num_history=5, seed=0)
  assert again == examples
  assert tasks.favorite_genre([_movie("1", "a", ("B", "A"), 1), _movie("2", "b", ("A",), 2)]) == "A"


def test_favorite_genre_options_are_fixed_for_everyone():
  users = [uh.UserHistory(f"u{k}", (_movie("1", "Heat", ("Crime",), 1),),
                          tuple(_movie(str(t), "x", (g,), t) for t, g in
                                enumerate([g1, g1, g2], start=2)), "movielens")
           for k, (g1, g2) in enumerate([("Horror", "Drama"), ("Drama", "Crime"),
                                         ("Western", "Western")])]
  options = ["Drama", "Comedy", "Horror", "Crime"]
  counts = {"Drama": 40, "Comedy": 30, "Horror": 20, "Crime": 10}
  examples = tasks.movielens_favorite_genre_examples(users, options, counts, num_history=3,
                                                     label="count")
  assert len(examples) == 2  # u2's future has none of the option genres: left out
  assert [e["label"] for e in examples] == ["Horror", "Drama"]
  for example in examples:
    assert sorted(example["options"]) == sorted(options)
    assert example["options"][example["answer_index"]] == example["label"]
    assert example["option_popularity"] == [counts[o] for o in example["options"]]
    assert example["history_option_counts"] == [float(o == "Crime") for o in example["options"]]
  # "lift": u0 Horror (2/3 of its future vs a 0.2 share); u1 Crime (1/3 vs 0.1 beats 2/3 vs 0.4).
  lift = tasks.movielens_favorite_genre_examples(users, options, counts, num_history=3)
  assert [e["label"] for e in lift] == ["Horror", "Crime"]
  with pytest.raises(UserError, match="Unknown RLPF task"):
    tasks.build_examples("netflix", "test")
  with pytest.raises(UserError, match="num_history must be >= 1"):
    tasks.build_examples("movielens_future_movie", "test", num_history=0)


def test_amazon_rating_examples():
  review = dataclasses.replace(_movie("p", "Soap", ("Beauty",), 5), rating=2.0)
  user = uh.UserHistory("a1", (_movie("q", "Comb", ("Beauty",), 1),), (review,), "All_Beauty")
  example = tasks.amazon_future_rating_examples([user], {"5 stars": 9, "2 stars": 1},
                                                num_history=4)[0]
  assert example["options"][example["answer_index"]] == "2 stars"
  assert sorted(example["options"]) == sorted(tasks.STAR_OPTIONS)  # the fixed 5 options
  assert example["option_popularity"][example["options"].index("5 stars")] == 9
  assert example["history_option_counts"][example["options"].index("4 stars")] == 1
  assert '"Soap"' in example["question"] and example["domain"] == "shopping"


@pytest.mark.slow
def test_movielens_seqio_task_holds_out_users(shared_dir):
  del shared_dir
  name = tasks.rlpf_task("movielens_future_movie", num_history=5)
  test = tasks.load_examples(name, "test", limit=5)
  train_users = {e["user_id"] for e in tasks.build_examples("movielens_future_movie", "train",
                                                            num_history=5)}
  assert len(test) == 5 and not {e["user_id"] for e in test} & train_users
  for example in test:
    assert example["options"][example["answer_index"]] not in example["history_text"]
    assert example["num_history_items"] <= 5


def test_amazon_seqio_tasks_on_the_real_slice(shared_dir, capsys):
  del shared_dir
  for task_name in ("amazon_future_category", "amazon_future_rating"):
    name = tasks.rlpf_task(task_name, num_history=4)
    examples = tasks.load_examples(name, "test")
    assert examples, task_name
    for example in examples:
      assert len(set(example["options"])) == (5 if task_name.endswith("rating") else 4), example
      assert 0 <= example["answer_index"] < len(example["options"])
      assert example["num_history_items"] == 4  # each slice user has 4 reviews of context
  # The test split has one user whose held-out product has no main category: left out, and said so.
  assert "left out 1 of 23 users" in capsys.readouterr().out
