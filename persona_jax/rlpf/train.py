"""RLPF training job (`run.job = @rlpf.train`, see gin/rlpf.gin).

Policy: the summarizer (`rl.PolicyWithValue` over the decoder, LoRA by default) writes a summary of
a user's last `num_history` activities; the frozen predictor scores the 4 options of the task's
question from the summary alone; reward `r_pred + w * min(C, beta * (L - len))` (see
`rlpf.model`), minus `kl_reward_coefficient * KL(policy || initial policy)` (k1 summed over the
summary, the paper's KL-to-anchor term). Advantages: REINFORCE with the learned value baseline by
default, RLOO / GRPO with `estimator=` and `samples_per_prompt >= 2`. The policy step is the core
`Trainer`'s sharded train step with `rl.make_loss_fn` (gin `rl.loss.*`).

Weight sharing: the module handed to the Trainer keeps its initial weights (the Trainer trains a
copy of the trainable part). Its decoder is the reference policy for the KL and the frozen
predictor: one load of the model. With LoRA the base arrays are the very same in policy,
reference and predictor; LoRA's `b` starts at 0, so the reference/predictor compute the base model.
With `lora_rank=0` (full fine-tuning) the reference/predictor are the initial weights the Trainer
copied from.

After training, held-out users are evaluated side by side (full history / zero-shot summary / RLPF
summary) into `<workdir>/eval_table.{md,json}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import jax
import numpy as np

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax import rl
from persona_jax.hf.pretrained import load_job_decoder
from persona_jax.rlpf import eval as eval_lib
from persona_jax.rlpf import tasks
from persona_jax.rlpf.model import Predictor, RewardConfig, TextCodec, summary_rewards
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.trainer import TrainConfig, Trainer, TrainResult


@dataclasses.dataclass
class RLPFJob:
  """What `train` and the benchmark share.

  trainer: the core Trainer of the summarizer policy (`trainer.model()` is a `rl.PolicyWithValue`).
  batches: the `rl.RolloutBatches` feeding it.
  reference: the initial decoder = reference policy = the predictor's weights.
  """
  trainer: Trainer
  batches: rl.RolloutBatches
  reference: Any
  predictor: Predictor
  codec: TextCodec
  reward_config: RewardConfig
  train_examples: list
  eval_examples: list
  max_summary_tokens: int
  description: str


def _load(pretrained: str | None, model: str | None, vocabulary: Any, seed: int):
  if model is not None and pretrained is None:
    vocab = pdata.get_vocabulary(vocabulary or "bytes")
    loaded = load_job_decoder("rlpf.job", model=model, vocab_size=vocab.vocab_size, seed=seed)
    return loaded.decoder, TextCodec(vocab), loaded.base
  loaded = load_job_decoder("rlpf.job", pretrained, model, with_tokenizer=True, seed=seed)
  codec = TextCodec(pdata.get_vocabulary(vocabulary or pretrained), loaded.pretrained.chat_template)
  return loaded.decoder, codec, loaded.base


def make_reward_fn(predictor: Predictor, codec: TextCodec, reward_config: RewardConfig,
                   max_summary_tokens: int):
  """`reward_fn(rows, rollout)` for `rl.RolloutBatches`: decode summaries, score them."""

  def reward_fn(rows: Sequence[dict], rollout: rl.Rollout) -> dict[str, np.ndarray]:
    ids = rollout.response_token_lists(stop_tokens=codec.stop_ids)
    summaries = [codec.decode(row) for row in ids]
    return summary_rewards(summaries, [len(row) for row in ids], rows, predictor, reward_config,
                           max_summary_tokens)

  return reward_fn


@gin.configurable("job", module="rlpf")
def build_job(workdir: str | None, *, pretrained: str | None = "smollm2-135m-instruct",
              model: str | None = None, vocabulary: Any = None,
              task: str = "movielens_future_movie", num_history: int = 10, future_items: int = 10,
              num_train_users: int | None = None, num_eval_users: int | None = 32,
              eval_split: str = "test", train_examples: Sequence[dict] | None = None,
              eval_examples: Sequence[dict] | None = None, max_summary_tokens: int = 48,
              batch_size: int = 4, samples_per_prompt: int = 1, estimator: str = "reinforce",
              lora_rank: int = 16, temperature: float = 1.0, kl_reward_coefficient: float = 0.01,
              reward_kind: str = "accuracy", length_weight: float = 1.0,
              target_length: float = 48.0, length_beta: float = 0.01, length_cap: float = 0.2,
              seed: int = 0, train_config: TrainConfig | None = None) -> RLPFJob:
  """Builds the summarizer policy, the frozen predictor, the reward and the trainer.

  Args:
    workdir: checkpoints, TensorBoard events, tables (None: no checkpoints).
    pretrained / model: the decoder (summarizer and predictor): pretrained weights or a random preset.
    vocabulary: tokenizer (default the pretrained model's; "bytes" with presets).
    task: one of `rlpf.tasks.TASKS` (SeqIO task over the core's user histories).
    num_history: N, past activities shown to the summarizer. future_items: the genre task's future.
    num_train_users / num_eval_users: first users of the train / `eval_split` split (None: all).
    train_examples / eval_examples: examples given directly (tests), instead of `task`.
    max_summary_tokens: summary budget (the length reward's minimum is taken at this length).
    batch_size: users per step; samples_per_prompt: summaries per user (>= 2 for rloo/grpo).
    estimator: 'reinforce' (value baseline), 'rloo' or 'grpo'.
    lora_rank: LoRA rank on every projection (0: full fine-tuning).
    temperature: sampling temperature of the rollouts.
    kl_reward_coefficient: KL-to-initial-policy penalty in the reward.
    reward_kind / length_weight / target_length / length_beta / length_cap: `RewardConfig` (w, L,
      beta, C).
    seed: data order, sampling, LoRA init.
    train_config: the loop's settings (default `TrainConfig()` with its gin bindings).
  """
  train_config = train_config or TrainConfig()
  if lora_rank < 0:
    raise ValueError(f"rlpf.job.lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}.")
  if batch_size < 1 or max_summary_tokens < 1:
    raise ValueError(f"rlpf.job: batch_size ({batch_size}) and max_summary_tokens "
                     f"({max_summary_tokens}) must be >= 1.")
  decoder, codec, base = _load(pretrained, model, vocabulary, seed)
  if lora_rank:
    pnn.inject_lora(decoder, rank=lora_rank, seed=seed)
  if train_examples is None or eval_examples is None:
    task_name = tasks.rlpf_task(task, num_history=num_history, future_items=future_items, seed=seed)
    if train_examples is None:
      train_examples = tasks.load_examples(task_name, "train", limit=num_train_users)
    if eval_examples is None:
      eval_examples = tasks.load_examples(task_name, eval_split, limit=num_eval_users)
  train_examples = [dict(e, prompt_tokens=p) for e, p in
                    zip(train_examples, eval_lib.summarizer_prompts(codec, train_examples))]
  reward_config = RewardConfig(reward_kind=reward_kind, length_weight=length_weight,
                               target_length=target_length, beta=length_beta, cap=length_cap)
  policy = rl.PolicyWithValue(decoder)
  trainer = Trainer(policy, rl.make_loss_fn(), train_config, workdir=workdir,
                    trainable=rl.PolicyWithValue.trainable_filter(lora=lora_rank > 0),
                    checkpoint_metadata={"base": base, "task": task, "lora_rank": lora_rank})
  # `decoder` keeps its initial weights (the Trainer trains a copy): reference policy and predictor.
  predictor = Predictor(decoder, codec)
  batches = rl.RolloutBatches(
      trainer, rl.ExampleCycler(train_examples, batch_size, seed=seed),
      make_reward_fn(predictor, codec, reward_config, max_summary_tokens), reference=decoder,
      estimator=estimator, samples_per_prompt=samples_per_prompt,
      max_new_tokens=max_summary_tokens, temperature=temperature, stop_tokens=codec.stop_ids,
      pad_id=codec.pad_id, kl_reward_coefficient=kl_reward_coefficient, seed=seed)
  description = (f"{task}, N={num_history}, {len(train_examples)} train users, estimator={estimator}, "
                 f"lora_rank={lora_rank}, reward={reward_kind}, w={length_weight}")
  return RLPFJob(trainer=trainer, batches=batches, reference=decoder, predictor=predictor,
                 codec=codec, reward_config=reward_config, train_examples=train_examples,
                 eval_examples=list(eval_examples), max_summary_tokens=max_summary_tokens,
                 description=description)


def evaluate(job: RLPFJob, examples: Sequence[dict] | None = None, batch_size: int = 8) -> dict:
  """Held-out table: full history vs zero-shot summary (initial policy) vs RLPF summary."""
  return eval_lib.evaluate_contexts(
      job.predictor, job.codec, job.eval_examples if examples is None else examples,
      {"zero_shot_summary": job.reference, "rlpf_summary": job.trainer.model().decoder},
      max_summary_tokens=job.max_summary_tokens, batch_size=batch_size)


def write_table(workdir: str, results: dict, title: str) -> str:
  lines = [f"### {title}", "", "| context | accuracy | context tokens | reduction vs history |",
           "|---|---|---|---|"]
  for name, row in results.items():
    reduction = f"{row['context_reduction']:.1f}x" if "context_reduction" in row else "1.0x"
    lines.append(f"| {name} | {row['accuracy']:.3f} | {row['context_tokens']:.1f} | {reduction} |")
  table = "\n".join(lines) + "\n"
  if workdir:
    workdir_lib.makedirs(workdir)
    workdir_lib.write_text(workdir_lib.join(workdir, "eval_table.md"), table)
    workdir_lib.write_json(workdir_lib.join(workdir, "eval_table.json"), results)
  return table


@gin.configurable("train", module="rlpf")
def train(workdir: str, evaluate_after: bool = True, **overrides) -> dict[str, Any]:
  """Trains the summarizer (settings: `rlpf.job.*`, `rl.loss.*`, `TrainConfig.*`), then evaluates."""
  job = build_job(workdir, **overrides)
  if jax.process_index() == 0:
    print(f"rlpf: {job.description}", flush=True)
  result: TrainResult = job.trainer.train(job.batches)
  summary = {"step": result.step, "preempted": result.preempted, "train": result.metrics,
             "history": result.history}
  if evaluate_after and not result.preempted:
    results = evaluate(job)
    table = write_table(workdir, results, f"RLPF held-out users ({job.description}, step {result.step})")
    summary["eval"] = results
    if jax.process_index() == 0:
      print(table, flush=True)
  if jax.process_index() == 0 and workdir:
    workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"), summary)
  return summary
