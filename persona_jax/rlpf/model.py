"""RLPF's pieces: prompts, the frozen predictor, the reward.

Reference: Wu, Ning, Liu et al., "RLPF: Reinforcement Learning from Prediction Feedback for User
Summarization with LLMs" (arXiv 2409.04421). The policy (summarizer) reads a user's past activities
as text and writes a summary; a frozen predictor sees only the summary and answers a 4-way
multiple-choice question about the user's future; reward

    r = r_pred + w * min(C, beta * (L - len(summary)))

with r_pred = 1 if the predictor picks the right option (else 0), or the log-probability of the right
option among the options (`reward_kind='log_prob'`, floored at `log_prob_floor` so the minimum
exists). The length term acts only when the summary budget exceeds L (a summary longer than L costs).

The predictor scores each option as a continuation of its prompt: by default the MEAN of the option
tokens' log-probs (the sum favours short titles; `option_reduction='sum'` is the alternative, and
`Predictor.option_scores` returns both, see `persona_jax.evaluation.option_scoring`); its choice is
the argmax, and P(option | one of the options) = softmax over the option scores. A task has a fixed
number of options (4 for next item, the fixed list's size for genre / rating).
An empty summary (no token before the stop token, or only whitespace) gets the minimum reward the
configuration allows; it never reaches the predictor.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from persona_jax import rl
from persona_jax.evaluation.option_scoring import REDUCTIONS, option_scores, reduce_options
from persona_jax.sampling import pad_prompts, round_up

NUM_OPTIONS = 4  # the next-item tasks' options (fixed-list tasks have their list's size)


@dataclasses.dataclass
class TextCodec:
  """Text <-> ids for one model: a SeqIO vocabulary plus (optionally) its chat template.

  vocabulary: `seqio.Vocabulary` (`persona_jax.data.get_vocabulary(...)`).
  chat_template: jinja chat template (pretrained instruct models) or None (plain text prompts).
  stop_ids: ids that end a generated summary (default the vocabulary's eos).
  """
  vocabulary: object
  chat_template: str | None = None
  stop_ids: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.stop_ids is None:
      self.stop_ids = (int(self.vocabulary.eos_id),)

  @property
  def pad_id(self) -> int:
    return int(self.vocabulary.pad_id)

  def encode(self, text: str) -> list[int]:
    return [int(i) for i in self.vocabulary.encode(text)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocabulary.decode([int(i) for i in ids])

  def prompt(self, user_message: str, assistant_prefix: str = "") -> list[int]:
    """Ids of a one-turn prompt ending where the model's answer starts."""
    if self.chat_template is None:
      return self.encode(f"{user_message}\n{assistant_prefix}")
    from persona_jax.hf import apply_chat_template
    text = apply_chat_template(self.chat_template, [{"role": "user", "content": user_message}],
                               add_generation_prompt=True)
    return self.encode(text + assistant_prefix)

  def encode_answer(self, text: str, what: str) -> list[int]:
    """Ids of `" " + text.strip()` (an answer continuing a prompt); raises if `text` is blank or
    encodes to nothing or to the unknown token."""
    ids = self.encode(" " + text.strip()) if text.strip() else []
    unk = getattr(self.vocabulary, "unk_id", None)
    if not ids or (unk is not None and unk in ids and unk != self.pad_id):
      raise ValueError(f"{what} {text!r} cannot be tokenized by the predictor's vocabulary "
                       f"(ids {ids}): fix or drop this option in the data.")
    return ids


def summarizer_prompt(history_text: str, domain: str) -> str:
  return (f"Here is a user's {domain} history, oldest first:\n{history_text}\n\n"
          f"Summarize this user's {domain} preferences in a few short sentences.")


def predictor_message(context_name: str, context: str, question: str) -> str:
  return f"{context_name}:\n{context}\n\n{question}"


@dataclasses.dataclass
class Predictor:
  """The frozen predictor: scores the options of a question given a context (summary or history).

  decoder: its weights (frozen; shared with the reference policy when it is the same model).
  codec: its tokenizer.
  option_bucket / prompt_bucket / batch_bucket: padding multiples of the option width, the prompt
    width and the number of questions (fewer shapes, fewer compilations; padding rows repeat the
    last question and are dropped from the result).
  """
  decoder: object
  codec: TextCodec
  option_bucket: int = 16
  prompt_bucket: int = 64
  batch_bucket: int = 4

  def option_logprobs(self, contexts: Sequence[str], questions: Sequence[str],
                      options: Sequence[Sequence[str]], context_name: str = "User summary",
                      reduction: str = "mean") -> np.ndarray:
    """`[batch, options]` each option's mean (default) or summed token log-prob after the prompt."""
    return reduce_options(self.option_scores(contexts, questions, options, context_name), reduction)

  def option_scores(self, contexts: Sequence[str], questions: Sequence[str],
                    options: Sequence[Sequence[str]], context_name: str = "User summary"
                    ) -> dict[str, np.ndarray]:
    """{"mean", "sum", "num_tokens"}: `[batch, options]` per-option token log-prob reductions."""
    if not (len(contexts) == len(questions) == len(options)):
      raise ValueError(f"Predictor: {len(contexts)} contexts, {len(questions)} questions and "
                       f"{len(options)} option lists must match.")
    num_questions = len(contexts)
    if not num_questions:
      raise ValueError("Predictor.option_logprobs: no questions given.")
    num_options = len(options[0])
    padding = round_up(num_questions, self.batch_bucket) - num_questions
    contexts, questions, options = (list(x) + [x[-1]] * padding for x in (contexts, questions, options))
    prompts, answers = [], []
    for context, question, opts in zip(contexts, questions, options):
      if len(opts) != num_options or num_options < 2:
        raise ValueError(f"Predictor: every question of a batch needs the same number (>= 2) of "
                         f"options; got {len(opts)} and {num_options}.")
      prompt = self.codec.prompt(predictor_message(context_name, context, question))
      for option in opts:
        prompts.append(prompt)
        answers.append(self.codec.encode_answer(option, "Answer option"))
    width = round_up(max(len(a) for a in answers), self.option_bucket)
    prompt_tokens, prompt_mask = pad_prompts(prompts, pad_id=self.codec.pad_id,
                                             length_multiple=self.prompt_bucket)
    answer_tokens = np.full((len(answers), width), self.codec.pad_id, np.int32)
    answer_mask = np.zeros((len(answers), width), np.float32)
    for row, ids in enumerate(answers):
      answer_tokens[row, :len(ids)] = ids
      answer_mask[row, :len(ids)] = 1.0
    tokens = np.concatenate([prompt_tokens, answer_tokens], axis=1)
    input_mask = np.concatenate([prompt_mask, answer_mask > 0], axis=1)
    logprobs, _ = rl.score(self.decoder, tokens, input_mask, width)
    scores = option_scores(logprobs, answer_mask)
    return {name: value.reshape(-1, num_options)[:num_questions] for name, value in scores.items()}


def length_reward(lengths: np.ndarray, *, target_length: float, beta: float, cap: float) -> np.ndarray:
  """`min(C, beta * (L - len))` per summary: shorter than L earns up to C, longer costs."""
  return np.minimum(cap, beta * (target_length - np.asarray(lengths, np.float32)))


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """r = r_pred + length_weight * min(cap, beta * (target_length - len(summary tokens))).

  reward_kind: 'accuracy' (1 if the predictor picks the right option) or 'log_prob' (log P(right
    option | one of the options), floored at `log_prob_floor`).
  option_reduction: how the predictor scores an option: 'mean' (per token, default) or 'sum'.
  """
  reward_kind: str = "accuracy"
  length_weight: float = 0.0
  target_length: float = 48.0
  beta: float = 0.01
  cap: float = 0.2
  log_prob_floor: float = -10.0
  option_reduction: str = "mean"

  def __post_init__(self):
    if self.reward_kind not in ("accuracy", "log_prob"):
      raise ValueError(f"rlpf reward_kind={self.reward_kind!r}: choose 'accuracy' or 'log_prob'.")
    if self.option_reduction not in REDUCTIONS:
      raise ValueError(f"rlpf option_reduction={self.option_reduction!r}: choose one of "
                       f"{REDUCTIONS}.")

  def prediction_reward(self, option_logprobs: np.ndarray, answers: np.ndarray) -> np.ndarray:
    option_logprobs = np.asarray(option_logprobs, np.float64)
    answers = np.asarray(answers)
    if self.reward_kind == "accuracy":
      return (option_logprobs.argmax(-1) == answers).astype(np.float32)
    shifted = option_logprobs - option_logprobs.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = log_softmax[np.arange(len(answers)), answers]
    return np.maximum(picked, self.log_prob_floor).astype(np.float32)

  def minimum_reward(self, max_summary_tokens: int) -> float:
    floor = 0.0 if self.reward_kind == "accuracy" else self.log_prob_floor
    return float(floor + self.length_weight * length_reward(
        np.array([max_summary_tokens]), target_length=self.target_length, beta=self.beta,
        cap=self.cap)[0])

  def total(self, prediction: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return (np.asarray(prediction, np.float32) + self.length_weight * length_reward(
        lengths, target_length=self.target_length, beta=self.beta, cap=self.cap)).astype(np.float32)


def summary_rewards(summaries: Sequence[str], lengths: Sequence[int], rows: Sequence[dict],
                    predictor: Predictor, config: RewardConfig, max_summary_tokens: int
                    ) -> dict[str, np.ndarray]:
  """Rewards `[batch]` for summaries of `rows` (examples with question/options/answer_index).

  Returns {"rewards", "prediction_accuracy", "prediction_reward", "summary_tokens", "empty_summary"}.
  """
  lengths = np.asarray(lengths, np.float32)
  empty = np.array([not s.strip() for s in summaries])
  answers = np.array([int(r["answer_index"]) for r in rows])
  accuracy = np.zeros(len(rows), np.float32)
  prediction = np.full(len(rows), config.minimum_reward(max_summary_tokens), np.float32)
  rewards = np.full(len(rows), config.minimum_reward(max_summary_tokens), np.float32)
  scored = np.flatnonzero(~empty)
  if scored.size:
    option_logprobs = predictor.option_logprobs(
        [summaries[i] for i in scored], [rows[i]["question"] for i in scored],
        [rows[i]["options"] for i in scored], reduction=config.option_reduction)
    accuracy[scored] = (option_logprobs.argmax(-1) == answers[scored]).astype(np.float32)
    prediction[scored] = config.prediction_reward(option_logprobs, answers[scored])
    rewards[scored] = config.total(prediction[scored], lengths[scored])
  prediction[empty] = 0.0 if config.reward_kind == "accuracy" else config.log_prob_floor
  return {"rewards": rewards, "prediction_accuracy": accuracy, "prediction_reward": prediction,
          "summary_tokens": lengths, "empty_summary": empty.astype(np.float32)}
