"""RLPF's method (`run.method = 'rlpf'`, see gin/rlpf.gin).

Policy: the summarizer (`rl.PolicyWithValue` over the decoder, LoRA by default) writes a summary of
a user's last `num_history` activities (50 by default: a history that needs compressing); the frozen
predictor scores the options of the task's question from the summary alone (mean log-prob per
option token by default, `option_reduction`); reward `r_pred + w * min(C, beta * (L - len))` (see
`rlpf.model`), minus `kl_reward_coefficient * KL(policy || initial policy)` (k1 summed over the
summary, the paper's KL-to-anchor term). Advantages: REINFORCE with the learned value baseline by
default, RLOO / GRPO with `estimator=` and `samples_per_prompt >= 2`.

Training is the core RL learner (`rl.Learner`, gin `rl.learner.*`): each rollout (the summaries of
`batch_size` users, sampled with the current policy in the compute dtype, scored, advantages
computed) gives `num_epochs * num_minibatches` updates of the core Trainer's step with
`rl.make_loss_fn` (gin `rl.loss.*`; `policy_loss='ppo'` for several epochs). The rollouts' sampling
keys come from `rl.learner.seed`.

The predictor is frozen and separate from the policy: the module handed to the Trainer keeps its
initial weights (the Trainer trains a copy of the trainable part), and that initial decoder is the
reference policy for the KL and the predictor -- one load of the model; with LoRA the base arrays
are shared and LoRA's `b` stays 0 there, so the predictor computes the base model whatever the
policy learns. `predictor=DecoderSource(...)` loads a different frozen model as the predictor.

Evaluation: all held-out users (`eval_split='heldout'`: validation + test) in one table with 95%
CIs and paired differences from the zero-shot summary: chance / popularity / majority class /
history majority, no context, full history, zero-shot summary, RLPF summary, and the history
truncated to each summary's per-user token count, plus the context reduction
(`<workdir>/eval_table.{md,json}`); the same for each of `transfer_tasks` (the summarizer trained on
`task`, evaluated on another, e.g. the Amazon tasks). Every `TrainConfig.eval_every` updates, the RLPF
summary's accuracy and length alone (the other rows do not change during training).
"""

from __future__ import annotations

from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax import rl
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.rlpf import eval as eval_lib
from persona_jax.rlpf import tasks
from persona_jax.rlpf.model import Predictor, RewardConfig, TextCodec, summary_rewards
from persona_jax.train.method import Evaluation, FitResult, Method, Run, register_method


def make_reward_fn(predictor: Predictor, codec: TextCodec, reward_config: RewardConfig,
                   max_summary_tokens: int):
  """`reward_fn(rows, rollout)` for `rl.PromptRollouts`: decode the summaries, score them."""

  def reward_fn(rows: Sequence[dict], rollout: rl.Rollout) -> dict[str, np.ndarray]:
    ids = rollout.response_token_lists(stop_tokens=codec.stop_ids)
    summaries = [codec.decode(row) for row in ids]
    return summary_rewards(summaries, [len(row) for row in ids], rows, predictor, reward_config,
                           max_summary_tokens)

  return reward_fn


@register_method("rlpf")
@gin.configurable("job", module="rlpf")
class RLPF(Method):
  """RL from prediction feedback: a summarizer trained so that a frozen predictor can answer.

  Args:
    decoder: the summarizer's and predictor's decoder (default `DecoderSource()` with its gin
      bindings).
    predictor: a separate frozen predictor model (None: the initial weights of `decoder`).
    task: one of `rlpf.tasks.TASKS` (SeqIO task over the core's user histories).
    num_history: N, past activities shown to the summarizer. future_items: the genre task's future.
    band_size / num_genre_options / genre_label: the task designs (`rlpf.tasks.build_examples`).
    num_train_users / num_eval_users: first users of the train / `eval_split` split (None: all).
    eval_split: 'heldout' (validation + test users), 'validation' or 'test'.
    transfer_tasks: other tasks to evaluate the same summarizers on (their held-out users).
    option_reduction: the predictor's option score, 'mean' (per token) or 'sum'.
    train_examples / eval_examples: examples given directly (tests), instead of `task`.
    max_summary_tokens: summary budget (the length reward's minimum is taken at this length); it
      must exceed target_length when length_weight > 0, so that the length reward acts.
    batch_size: users per rollout; samples_per_prompt: summaries per user (>= 2 for rloo/grpo).
    estimator: 'reinforce' (value baseline), 'rloo' or 'grpo' (`rl.SEQUENCE_ESTIMATORS`).
    lora_rank: LoRA rank on every projection (0: full fine-tuning).
    temperature: sampling temperature of the rollouts.
    kl_reward_coefficient: KL-to-initial-policy penalty in the reward.
    reward_kind / length_weight / target_length / length_beta / length_cap: `RewardConfig` (w, L,
      beta, C).
    eval_batch_size: rows per generation / predictor call in the evaluation.
    learner: `rl.LearnerConfig` (default: its gin bindings `rl.learner.*`).
    seed: data order, LoRA init.
  """

  def __init__(self, *, decoder: DecoderSource | None = None,
               predictor: DecoderSource | None = None,
               task: str = "movielens_future_movie", num_history: int = 50, future_items: int = 10,
               band_size: int = 50, num_genre_options: int = 4, genre_label: str = "lift",
               num_train_users: int | None = None, num_eval_users: int | None = None,
               eval_split: str = "heldout", transfer_tasks: Sequence[str] = (),
               num_transfer_users: int | None = None, option_reduction: str = "mean",
               train_examples: Sequence[dict] | None = None,
               eval_examples: Sequence[dict] | None = None, max_summary_tokens: int = 128,
               batch_size: int = 4, samples_per_prompt: int = 1, estimator: str = "reinforce",
               lora_rank: int = 16, temperature: float = 1.0, kl_reward_coefficient: float = 0.01,
               reward_kind: str = "accuracy", length_weight: float = 1.0,
               target_length: float = 64.0, length_beta: float = 0.01, length_cap: float = 0.2,
               eval_batch_size: int = 8, learner: rl.LearnerConfig | None = None, seed: int = 0):
    if lora_rank < 0:
      raise UserError(f"rlpf.job.lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}.")
    if batch_size < 1 or max_summary_tokens < 1 or eval_batch_size < 1:
      raise UserError(f"rlpf.job: batch_size ({batch_size}), max_summary_tokens "
                      f"({max_summary_tokens}) and eval_batch_size ({eval_batch_size}) must be >= 1.")
    if estimator not in rl.SEQUENCE_ESTIMATORS:
      raise UserError(f"rlpf.job.estimator={estimator!r} is unknown; choose one of "
                      f"{sorted(rl.SEQUENCE_ESTIMATORS)}.")
    if estimator != "reinforce" and samples_per_prompt < 2:
      raise UserError(f"rlpf.job.estimator={estimator!r} compares summaries of the same user: set "
                      f"rlpf.job.samples_per_prompt >= 2 (got {samples_per_prompt}).")
    if task not in tasks.TASKS and (train_examples is None or eval_examples is None):
      raise UserError(f"rlpf.job.task={task!r} is unknown; choose one of {tasks.TASKS}.")
    unknown = [t for t in transfer_tasks if t not in tasks.TASKS]
    if unknown:
      raise UserError(f"rlpf.job.transfer_tasks: {unknown} unknown; choose from {tasks.TASKS}.")
    if eval_split not in ("heldout", "validation", "test"):
      raise UserError(f"rlpf.job.eval_split={eval_split!r}: choose 'heldout' (validation + test), "
                      "'validation' or 'test'.")
    if length_weight > 0 and target_length >= max_summary_tokens:
      raise UserError(f"rlpf.job.target_length={target_length:g} >= max_summary_tokens="
                      f"{max_summary_tokens}: every summary fits the target, so the length reward "
                      "never penalizes. Fix: a budget above the target (e.g. max_summary_tokens=128, "
                      "target_length=64).")
    self.source = decoder or DecoderSource()
    self.predictor_source = predictor
    self.task, self.num_history, self.future_items = task, num_history, future_items
    self.task_options = dict(band_size=band_size, num_genre_options=num_genre_options,
                             genre_label=genre_label)
    self.transfer_tasks, self.num_transfer_users = tuple(transfer_tasks), num_transfer_users
    self.num_train_users, self.num_eval_users, self.eval_split = (num_train_users, num_eval_users,
                                                                  eval_split)
    self._given_train, self._given_eval = train_examples, eval_examples
    self.max_summary_tokens, self.batch_size = max_summary_tokens, batch_size
    self.samples_per_prompt, self.estimator, self.lora_rank = samples_per_prompt, estimator, lora_rank
    self.temperature, self.kl_reward_coefficient = temperature, kl_reward_coefficient
    self.reward_config = RewardConfig(reward_kind=reward_kind, length_weight=length_weight,
                                      target_length=target_length, beta=length_beta, cap=length_cap,
                                      option_reduction=option_reduction)
    self.eval_batch_size, self.seed = eval_batch_size, seed
    self.learner_config = learner or rl.LearnerConfig()
    self._known: dict[str, dict] = {}  # per task: the rows that never change during training

  # Set up ---------------------------------------------------------------------------------------
  def setup(self, workdir):
    del workdir
    vocabulary = pdata.get_vocabulary(self.source.vocabulary_source())
    loaded = self.source.load("rlpf.job", vocab_size=vocabulary.vocab_size, seed=self.seed,
                              with_tokenizer=self.source.pretrained is not None)
    if loaded.decoder.config.vocab_size < vocabulary.vocab_size:
      raise UserError(f"rlpf.job: vocabulary {pdata.vocabulary_name(vocabulary)} has "
                      f"{vocabulary.vocab_size} ids but the decoder has "
                      f"{loaded.decoder.config.vocab_size} rows: use the model's own tokenizer as "
                      "DecoderSource.vocabulary.")
    chat_template = loaded.pretrained.chat_template if loaded.pretrained is not None else None
    self.codec = TextCodec(vocabulary, chat_template)
    self.base = loaded.base
    self.decoder = loaded.decoder  # the reference policy and the predictor (never trained)
    if self.lora_rank:
      pnn.inject_lora(self.decoder, rank=self.lora_rank, seed=self.seed)
    if self.predictor_source is None:
      self.predictor = Predictor(self.decoder, self.codec)
    else:
      self.predictor = self._load_predictor(self.predictor_source)
    self.policy = rl.PolicyWithValue(self.decoder)
    train_examples, eval_examples = self._given_train, self._given_eval
    if train_examples is None or eval_examples is None:
      task_name = self._task_name(self.task)
      if train_examples is None:
        train_examples = tasks.load_examples(task_name, "train", limit=self.num_train_users)
      if eval_examples is None:
        eval_examples = tasks.load_examples(task_name, self.eval_split, limit=self.num_eval_users)
    if not train_examples or not eval_examples:
      raise UserError(f"rlpf.job: {len(train_examples)} train and {len(eval_examples)} eval "
                      f"examples of task {self.task!r}: both must be non-empty.")
    self.train_examples = [dict(e, prompt_tokens=p) for e, p in
                           zip(train_examples, eval_lib.summarizer_prompts(self.codec,
                                                                           train_examples))]
    self.eval_examples = list(eval_examples)
    self.train_labels = [e["label"] for e in train_examples if "label" in e] or None
    self.transfer_examples: dict[str, list[dict]] = {}
    self.transfer_labels: dict[str, list[str]] = {}
    for name in self.transfer_tasks:
      task_name = self._task_name(name)
      self.transfer_examples[name] = tasks.load_examples(task_name, self.eval_split,
                                                         limit=self.num_transfer_users)
      self.transfer_labels[name] = [e["label"] for e in tasks.load_examples(task_name, "train")]
    self._known = {}

  def _task_name(self, name: str) -> str:
    return tasks.rlpf_task(name, num_history=self.num_history, future_items=self.future_items,
                           seed=self.seed, **self.task_options)

  def _load_predictor(self, source: DecoderSource) -> Predictor:
    """A separate frozen predictor with its own tokenizer (never trained, never the policy)."""
    vocabulary = pdata.get_vocabulary(source.vocabulary_source())
    loaded = source.load("rlpf.job.predictor", vocab_size=vocabulary.vocab_size, seed=self.seed,
                         with_tokenizer=source.pretrained is not None)
    chat_template = loaded.pretrained.chat_template if loaded.pretrained is not None else None
    return Predictor(loaded.decoder, TextCodec(vocabulary, chat_template))

  def description(self) -> str:
    return (f"{self.task}, N={self.num_history}, {len(self.train_examples)} train users, "
            f"summary budget {self.max_summary_tokens} (target {self.reward_config.target_length:g}), "
            f"option scoring {self.reward_config.option_reduction}, "
            f"estimator={self.estimator}, lora_rank={self.lora_rank}, "
            f"reward={self.reward_config.reward_kind}, w={self.reward_config.length_weight}, "
            f"{self.learner_config.num_epochs} epoch(s) x {self.learner_config.num_minibatches} "
            f"minibatch(es) per rollout ({self.source.describe()})")

  # The policy and its training ------------------------------------------------------------------
  def model(self) -> rl.PolicyWithValue:
    return self.policy

  def trainable_filter(self):
    return rl.PolicyWithValue.trainable_filter(lora=self.lora_rank > 0)

  def loss_fn(self):
    return rl.make_loss_fn()

  def checkpoint_metadata(self) -> dict:
    return {"base": self.base, "task": self.task, "lora_rank": self.lora_rank}

  def rollout_source(self) -> rl.PromptRollouts:
    """RLPF's summary rollouts: `batch_size` users x `samples_per_prompt` summaries, scored by the
    frozen predictor, KL to the reference (the same decoder) in the reward."""
    return rl.PromptRollouts(
        rl.ExampleCycler(self.train_examples, self.batch_size, seed=self.seed),
        make_reward_fn(self.predictor, self.codec, self.reward_config, self.max_summary_tokens),
        reference=self.decoder, estimator=self.estimator,
        samples_per_prompt=self.samples_per_prompt, max_new_tokens=self.max_summary_tokens,
        temperature=self.temperature, stop_tokens=self.codec.stop_ids, pad_id=self.codec.pad_id,
        kl_reward_coefficient=self.kl_reward_coefficient)

  def learner(self, run: Run) -> rl.Learner:
    """The RL learner over the run's Trainer (every process samples the same global rollout)."""
    trainer = run.trainer(self.model(), self.loss_fn(), self.trainable_filter(),
                          checkpoint_metadata=self.checkpoint_metadata(),
                          process_local_batches=False)
    return rl.Learner(trainer, self.rollout_source(), self.learner_config)

  def fit(self, run: Run) -> FitResult:
    learner = self.learner(run)
    result = learner.train(eval_fn=run.eval_fn)
    return FitResult(result=result, model=learner.trainer.model())

  def restore(self, run: Run):
    """The trained policy (parameters only) on a fresh copy of the trainable part, so the reference
    and predictor (`self.decoder`) keep their initial weights."""
    from persona_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

    graphdef, trainable, rest = nnx.split(self.policy, self.trainable_filter(), ...)
    policy = nnx.merge(graphdef, jax.tree.map(jnp.copy, trainable), rest)
    step = checkpointing.restore_trainable(run.workdir, policy, self.trainable_filter(), run.step)
    if step is None:
      raise UserError(f"rlpf: no checkpoint in {run.workdir}/checkpoints; train first "
                      "(run.job = @train).")
    return policy, step

  # Evaluation -----------------------------------------------------------------------------------
  def evaluate(self, model: rl.PolicyWithValue, step: int) -> Evaluation:
    """Held-out users: the calibration baselines, no context, full history, zero-shot summary, RLPF
    summary and the truncated histories, with 95% CIs (and the same for each transfer task)."""
    suites = {self.task: (self.eval_examples, self.train_labels)}
    suites.update({f"{name} (transfer)": (self.transfer_examples[name], self.transfer_labels[name])
                   for name in self.transfer_tasks})
    tables, results, metrics = {}, {}, {}
    for index, (name, (examples, labels)) in enumerate(suites.items()):
      known = self._known.get(name, {})
      rows = eval_lib.evaluate_contexts(
          self.predictor, self.codec, examples,
          {"zero_shot_summary": self.decoder, "rlpf_summary": model.decoder},
          max_summary_tokens=self.max_summary_tokens, batch_size=self.eval_batch_size, known=known,
          train_labels=labels)
      self._known[name] = {key: row for key, row in rows.items()
                           if key not in ("rlpf_summary", "truncated_history@rlpf_summary")}
      self._known[name]["_priors"] = {key: rows[key] for key in eval_lib.PRIOR_ROWS if key in rows}
      key = "eval_table" if index == 0 else f"eval_table_{name.split()[0]}"
      tables[key] = eval_lib.format_table(
          rows, f"RLPF held-out users, {name} ({self.description()}, {len(examples)} users, "
          f"step {step})")
      results[key] = rows
      prefix = "" if index == 0 else f"{name.split()[0]}/"
      metrics.update({f"{prefix}{row}_accuracy": value["accuracy"] for row, value in rows.items()})
      metrics[f"{prefix}rlpf_summary_tokens"] = rows["rlpf_summary"]["context_tokens"]
      metrics[f"{prefix}rlpf_context_reduction"] = rows["rlpf_summary"]["context_reduction"]
      metrics[f"{prefix}rlpf_empty_summaries"] = rows["rlpf_summary"]["empty_summaries"]
    return Evaluation(metrics=metrics, tables=tables, results=results)

  def periodic_metrics(self, model: rl.PolicyWithValue, step: int) -> dict[str, float]:
    """The RLPF summary's held-out accuracy, length and share of empty summaries."""
    del step
    history_tokens = float(np.mean([len(self.codec.encode(e["history_text"]))
                                    for e in self.eval_examples]))
    row = eval_lib.summary_context(model.decoder, self.predictor, self.codec, self.eval_examples,
                                   max_summary_tokens=self.max_summary_tokens,
                                   history_tokens=history_tokens,
                                   batch_size=self.eval_batch_size)
    return {"rlpf_summary_accuracy": row["accuracy"], "rlpf_summary_tokens": row["context_tokens"],
            "rlpf_empty_summaries": row["empty_summaries"]}

  def tokenizer_source(self) -> str | None:
    source = self.source.vocabulary_source()
    return None if source == "bytes" else source
