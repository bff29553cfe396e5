"""Calibration baselines and option scoring against closed forms and hand-made cases."""

import math

import numpy as np
import pytest

from persona_jax.errors import UserError
from persona_jax.evaluation import baselines, stats
from persona_jax.evaluation.option_scoring import option_scores, reduce_options


def test_argmax_correct_gives_fractional_credit_for_ties():
  scores = [[3, 1, 2, 0], [5, 5, 1, 0], [5, 5, 1, 0], [1, 1, 1, 1], [0, 2]]
  answers = [0, 1, 2, 3, 0]
  np.testing.assert_allclose(baselines.argmax_correct(scores, answers), [1, 0.5, 0, 0.25, 0])
  with pytest.raises(UserError, match="outside"):
    baselines.argmax_correct([[1, 2]], [2])


def test_prior_baselines_on_a_hand_made_case():
  options = [["Heat", "Up", "Jaws", "Alien"], ["Up", "Heat", "Jaws", "Alien"], ["Jaws", "Up"]]
  answers = [1, 0, 0]
  np.testing.assert_allclose(baselines.chance(options), [0.25, 0.25, 0.5])
  counts = [[10, 50, 3, 3], [9, 50, 1, 1], [7, 7]]
  np.testing.assert_allclose(baselines.popularity(counts, answers), [1, 0, 0.5])
  np.testing.assert_allclose(
      baselines.majority_class(["Up", "Up", "Heat", "Jaws"], options, answers), [1, 1, 0])
  np.testing.assert_allclose(baselines.history_majority([[0, 2, 2, 0], [1, 0, 0, 0], [0, 1]],
                                                        answers), [0.5, 1, 0])


def test_truncation_keeps_the_most_recent_tokens():
  assert baselines.truncate_to_tokens([1, 2, 3, 4, 5], 2) == [4, 5]
  assert baselines.truncate_to_tokens([1, 2], 5) == [1, 2]
  assert baselines.truncate_to_tokens([1, 2], 0) == []
  text = baselines.truncate_text_to_tokens("abcdef", 3, lambda s: list(s.encode()),
                                           lambda ids: bytes(ids).decode())
  assert text == "def"


def test_recall_at_k_and_the_popularity_ranking():
  counts = {"a": 9, "b": 7, "c": 7, "d": 1}
  assert baselines.popularity_ranking(counts, excluded={"a"}, k=2) == ["b", "c"]
  ranked = [["b", "c", "d"], ["b", "c", "d"], ["a", "b"]]
  np.testing.assert_allclose(baselines.recall_at_k(ranked, ["c", "d", {"b", "z"}], k=2),
                             [1, 0, 0.5])


def test_comparison_table_matches_the_statistics_library():
  rng = np.random.default_rng(0)
  method = (rng.random(400) < 0.6).astype(float)
  chance_row = np.full(400, 0.25)
  markdown, result = baselines.comparison_table({"chance": chance_row, "method": method},
                                                reference="chance", title="toy")
  estimate = stats.mean_ci(method)
  assert result["rows"]["method"]["mean"]["value"] == pytest.approx(method.mean())
  assert result["rows"]["method"]["mean"]["low"] == pytest.approx(estimate.low)
  difference = result["rows"]["method"]["minus_reference"]
  assert difference["value"] == pytest.approx(method.mean() - 0.25)
  assert difference["p_value"] < 0.01
  # The bootstrap CI of a 0/1 mean against the closed form (normal approximation), n = 400.
  half_width = 1.96 * math.sqrt(method.mean() * (1 - method.mean()) / 400)
  assert (estimate.high - estimate.low) / 2 == pytest.approx(half_width, rel=0.1)
  assert "| method |" in markdown and "400 examples" in markdown
  with pytest.raises(UserError, match="same examples"):
    baselines.comparison_table({"a": [1, 0], "b": [1]})


def test_option_scores_mean_and_sum_closed_form():
  logprobs = np.array([[[-1.0, -1.0, -1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]])
  mask = np.array([[[1, 1, 1, 0], [1, 0, 0, 0]]])
  scores = option_scores(logprobs, mask)
  np.testing.assert_allclose(scores["sum"], [[-3.0, -2.0]])
  np.testing.assert_allclose(scores["mean"], [[-1.0, -2.0]])
  np.testing.assert_allclose(scores["num_tokens"], [[3, 1]])
  # The sum favours the short option, the mean the long one with the likelier tokens.
  assert reduce_options(scores, "sum").argmax(-1)[0] == 1
  assert reduce_options(scores, "mean").argmax(-1)[0] == 0
  with pytest.raises(UserError, match="no token"):
    option_scores(np.zeros((1, 2)), np.zeros((1, 2)))
  with pytest.raises(UserError, match="reduction"):
    reduce_options(scores, "max")
