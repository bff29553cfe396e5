"""User-LLM jobs (gin): user-encoder pretraining, then the LLM stage.

  python -m persona_jax.main --gin_file=gin/user_encoder_pretrain.gin --workdir=runs/user_encoder
  python -m persona_jax.main --gin_file=gin/user_llm.gin --workdir=runs/user_llm \
      --gin_bindings="user_llm.job.encoder_workdir='runs/user_encoder'"

Stage 1 (`user_llm.pretrain_encoder`, builder `user_llm.encoder_job`): the user encoder alone, trained
by next-item prediction (cross-entropy per feature), reporting Recall@K on held-out users.
Stage 2 (`user_llm.train`, builder `user_llm.job`): the User-LLM (or, with `method='text_prompt'`,
the text-prompt baseline) on a multiple-choice task, or (task='amazon_review') on review generation
trained with the LM loss on the target tokens and evaluated by ROUGE-Lsum of greedy generations
(gin/user_llm_review_smoke.gin); the trained part is what `strategy` names. With `encoder_workdir`
the stage-1 encoder is restored into the User-LLM first.

Both builders return an object whose `.trainer` is a core `Trainer`, so the stage-1 trainer of a
run is `build_encoder_job(workdir).trainer` and the stage-2 trainer `build_job(workdir).trainer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gin
import jax
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.data import user_histories as uh
from persona_jax.hf.pretrained import load_job_decoder
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.trainer import TrainConfig, Trainer
from persona_jax.user_llm import eval as eval_lib
from persona_jax.user_llm import model as model_lib
from persona_jax.user_llm import tasks


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UserData:
  """Users split by user and time, and the vocabularies built on the training users."""
  users: dict[str, list[uh.UserHistory]]
  items: uh.ItemVocabulary
  categories: uh.ItemVocabulary
  catalog: dict[str, tuple[str, tuple[str, ...]]]
  name: str


@gin.configurable("data", module="user_llm")
def load_user_data(dataset: str = "movielens", *, movielens_config: str = "latest-small",
                   amazon_dir: str | None = None, tfds_data_dir: str | None = None, seed: int = 0) -> UserData:
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
    catalog = {item.item_id: (item.title, item.categories) for split in users.values() for user in split
               for item in user.interactions + user.heldout}
    name = "amazon2023"
  else:
    raise ValueError(f"user_llm.data.dataset={dataset!r}; use 'movielens' or 'amazon'.")
  items = uh.ItemVocabulary.from_histories(users["train"], include_heldout=True)
  all_categories = uh.ItemVocabulary.from_histories(users["train"], field="categories", include_heldout=True)
  categories = uh.ItemVocabulary(all_categories.ids[2:model_lib.MAX_CATEGORIES])
  return UserData(users, items, categories, catalog, name)


def choice_examples(data: UserData, task_kind: str, *, num_options: int, examples_per_user: int,
                    seed: int, shuffle_options: bool = True) -> dict[str, list[tasks.ChoiceExample]]:
  """Examples of `task_kind` for each split (training users: `examples_per_user` cut points)."""
  if task_kind == "next_movie":
    return {split: tasks.next_movie_examples(users, data.catalog, num_options=num_options,
                                             examples_per_user=examples_per_user if split == "train" else 1,
                                             seed=seed)
            for split, users in data.users.items()}
  if task_kind == "favorite_genre":
    genres = [genre for genre in data.categories.ids[2:]]
    return {split: tasks.favorite_genre_examples(users, genres, num_options=num_options, seed=seed,
                                                 shuffle_options=shuffle_options)
            for split, users in data.users.items()}
  if task_kind == "amazon_rating":
    return {split: tasks.amazon_rating_examples(users) for split, users in data.users.items()}
  raise ValueError(f"user_llm.job.task={task_kind!r}; use one of {tasks.TASK_KINDS}.")


@gin.configurable("encoder", module="user_llm")
def encoder_config(num_items: int, num_categories: int, *, embed_dim: int = 64, num_layers: int = 2,
                   num_heads: int = 4, mlp_dim: int = 128, max_length: int = 200,
                   fusion: str = "early") -> model_lib.UserEncoderConfig:
  """The user encoder's sizes (gin: `user_llm.encoder.*`, shared by both stages)."""
  return model_lib.UserEncoderConfig(num_items=num_items, num_categories=num_categories, embed_dim=embed_dim,
                                     num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
                                     max_length=max_length, fusion=fusion)


# ------------------------------------------------------------------------------------------------
# Stage 1: the user encoder
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class EncoderJob:
  trainer: Trainer
  train_data: Any
  eval_batches: Callable[[], Any]
  data: UserData
  config: model_lib.UserEncoderConfig


def _encoder_loss(model, batch, rng):
  del rng
  return model_lib.next_item_loss(model, batch)


@gin.configurable("encoder_job", module="user_llm")
def build_encoder_job(workdir: str | None, *, batch_size: int = 16, seed: int = 0,
                      train_config: TrainConfig | None = None, data: UserData | None = None) -> EncoderJob:
  """The user encoder, its next-item task and trainer (`.trainer`)."""
  data = data or load_user_data()
  config = encoder_config(len(data.items), len(data.categories))
  task = tasks.register_next_item_task(f"user_llm.next_item.{data.name}.{config.max_length}", data.users,
                                       data.items, data.categories, config.max_length)
  encoder = model_lib.UserEncoder(config, rngs=nnx.Rngs(seed))
  train_data = tasks.ChoiceBatches(task, "train", batch_size=batch_size, max_length=config.max_length,
                                   max_prompt_length=None, seed=seed)

  def eval_batches():
    return tasks.ChoiceBatches(task, "validation", batch_size=batch_size, max_length=config.max_length,
                               max_prompt_length=None, shuffle=False, repeat=False, drop_remainder=False)

  trainer = Trainer(encoder, _encoder_loss, train_config or TrainConfig(), trainable=nnx.Param,
                    workdir=workdir, checkpoint_metadata={"stage": "user_encoder", "task": task})
  return EncoderJob(trainer, train_data, eval_batches, data, config)


@gin.configurable("pretrain_encoder", module="user_llm")
def pretrain_encoder(workdir: str, **overrides) -> dict[str, float]:
  """Stage 1: trains the user encoder; writes `<workdir>/final_metrics.json` (held-out Recall@K)."""
  job = build_encoder_job(workdir, **overrides)
  result = job.trainer.train(job.train_data, eval_batches=job.eval_batches)
  metrics = job.trainer.evaluate(job.eval_batches())
  print("user encoder, held-out users: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())),
        flush=True)
  workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"),
                         {"step": result.step, "train": result.metrics, "eval": metrics})
  return metrics


# ------------------------------------------------------------------------------------------------
# Stage 2: the LLM
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UserLLMJob:
  trainer: Trainer
  train_data: Any
  eval_batches: Callable[[], Any]
  method: str
  description: str
  task_name: str
  spec: tasks.ChoiceTaskSpec
  examples: dict[str, list]  # tasks.ChoiceExample, or tasks.ReviewExample for amazon_review
  vocabulary: Any
  task_kind: str
  max_target_length: int

  def evaluate(self, model: nnx.Module, samples: list | None = None) -> dict[str, float]:
    """Test-user metrics of `model`: choice metrics, or ROUGE-Lsum / target_ce for amazon_review."""
    if self.task_kind == "amazon_review":
      return eval_lib.evaluate_reviews(model, self.eval_batches(), self.method, self.vocabulary,
                                       self.max_target_length, samples)
    return eval_lib.evaluate_choices(model, self.eval_batches(), self.method)


def _user_llm_loss(model, batch, rng):
  del rng
  return model_lib.choice_loss(model.option_logits(batch), batch["label"])


def _text_prompt_loss(model, batch, rng):
  del rng
  return model_lib.choice_loss(model_lib.text_prompt_option_logits(model, batch), batch["label"])


def _user_llm_review_loss(model, batch, rng):
  del rng
  return model_lib.review_loss(model_lib.review_logits(model, batch, "user_llm"), batch)


def _text_prompt_review_loss(model, batch, rng):
  del rng
  return model_lib.review_loss(model_lib.review_logits(model, batch, "text_prompt"), batch)


def text_prompt_filter(strategy: str):
  """What the text-prompt baseline trains: the whole decoder ('full') or LoRA adapters ('lora')."""
  if strategy == "full":
    return nnx.Param
  if strategy == "lora":
    return nnx.LoRAParam
  raise ValueError(f"text-prompt baseline: strategy={strategy!r}; use 'full' or 'lora'.")


@gin.configurable("job", module="user_llm")
def build_job(workdir: str | None, *, method: str = "user_llm", pretrained: str | None = "smollm2-135m-instruct",
              model: str | None = None, vocabulary: Any = None, task: str = "next_movie",
              integration: str = "cross_attention", strategy: str = "enc", num_latents: int = 8,
              resampler_layers: int = 2, cross_attention_layers: Any = None, lora_rank: int = 8,
              num_options: int = 5, shuffle_options: bool = True, examples_per_user: int = 4,
              text_history_items: int = 50, text_history_fields: Any = ("title", "categories", "rating"),
              history_items: int | None = None, review_field: str = "title", max_target_length: int = 64,
              max_prompt_length: int | None = 256, batch_size: int = 8, eval_batch_size: int = 16,
              encoder_workdir: str | None = None, seed: int = 0, train_config: TrainConfig | None = None,
              data: UserData | None = None, decoder: pnn.Decoder | None = None) -> UserLLMJob:
  """The User-LLM (method='user_llm') or text-prompt baseline (method='text_prompt') job.

  Args:
    workdir: checkpoints and metrics.
    method: 'user_llm' (history as user embeddings) or 'text_prompt' (history written into the prompt,
      `text_history_items` most recent items).
    pretrained / model / vocabulary: the decoder (pretrained weights, or a random preset with
      `vocabulary`, default 'bytes') and the prompt tokenizer (default: the pretrained model's).
    task: one of tasks.TASK_KINDS. integration / strategy: see model.UserLLM. amazon_review needs the
      cross-attention integration (generation passes the user tokens as side inputs).
    review_field / max_target_length: amazon_review only: generate the held-out review's 'title' or
      'text'; targets are cut to `max_target_length` tokens (EOS included) for the loss, counted in
      `targets_truncated`, and generation stops after that many tokens.
    num_latents: M user tokens. cross_attention_layers: decoder layers followed by gated
      cross-attention (default: every ~num_layers/4-th layer counted from the last).
    num_options: options per question; shuffle_options=False keeps them fixed (favorite_genre).
    examples_per_user: training examples per training user (next_movie).
    text_history_fields: what the text prompt writes per item (see render_history_text).
    history_items: keep only the most recent `history_items` of every example's history (both methods).
    max_prompt_length: prompts are left-padded to this width, and longer ones raise (never cut); None:
      the task's longest prompt rounded up to a multiple of 64.
    encoder_workdir: restore the stage-1 user encoder from there (same data and `user_llm.encoder`).
    data / decoder: already-loaded data / decoder (benchmarks reuse them across jobs).
  """
  if method not in ("user_llm", "text_prompt"):
    raise ValueError(f"user_llm.job.method={method!r}; use 'user_llm' or 'text_prompt'.")
  train_config = train_config or TrainConfig()
  data = data or load_user_data()
  vocab = pdata.get_vocabulary(vocabulary if vocabulary is not None else (pretrained or "bytes"))
  decoder = decoder if decoder is not None else load_job_decoder(
      "user_llm.job", pretrained, model, vocab_size=vocab.vocab_size, seed=seed).decoder
  config = encoder_config(len(data.items), len(data.categories))
  review = task == "amazon_review"
  if review and method == "user_llm" and integration != "cross_attention":
    raise ValueError(f"user_llm.job: task='amazon_review' needs integration='cross_attention' (got "
                     f"{integration!r}): generation passes the user tokens as side inputs; sampling.prefill "
                     f"takes token ids, so the soft prompt cannot generate.")
  if review:
    examples = {split: tasks.amazon_review_examples(users, review_field) for split, users in data.users.items()}
  else:
    examples = choice_examples(data, task, num_options=num_options, examples_per_user=examples_per_user,
                               seed=seed, shuffle_options=shuffle_options)
  spec = tasks.ChoiceTaskSpec(items=data.items, categories=data.categories, max_length=config.max_length,
                              text_history_items=text_history_items if method == "text_prompt" else None,
                              history_items=history_items, history_fields=tuple(text_history_fields))
  history_tag = (f"text{text_history_items}_{'_'.join(text_history_fields)}" if method == "text_prompt"
                 else "embed") + f".h{history_items}"
  history_tag += "" if shuffle_options else ".fixed"
  register = tasks.register_review_task if review else tasks.register_choice_task
  task_name = register(f"user_llm.{task}{'_' + review_field if review else ''}.{data.name}."
                       f"{pdata.vocabulary_name(vocab)}.{history_tag}.{config.max_length}", examples, spec, vocab)
  if max_prompt_length is None:
    max_prompt_length = -(-tasks.longest_prompt(task_name) // 64) * 64
  if method == "user_llm":
    module = model_lib.UserLLM(decoder, config, integration=integration, strategy=strategy,
                               num_latents=num_latents, resampler_layers=resampler_layers,
                               cross_attention_layers=cross_attention_layers, lora_rank=lora_rank, seed=seed)
    if encoder_workdir is not None:
      encoder_job = build_encoder_job(encoder_workdir, data=data, seed=seed)
      if encoder_job.trainer.restore() is None:
        raise ValueError(f"user_llm.job.encoder_workdir={encoder_workdir!r} holds no checkpoint: run "
                         f"gin/user_encoder_pretrain.gin there first.")
      nnx.update(module.user_encoder, nnx.state(encoder_job.trainer.model()))
    loss_fn, trainable = _user_llm_review_loss if review else _user_llm_loss, module.trainable_filter()
    description = f"User-LLM {integration}, strategy {strategy}, M={num_latents}"
  else:
    if strategy == "lora":
      pnn.inject_lora(decoder, rank=lora_rank, name="text_prompt", seed=seed)
    module, trainable = decoder, text_prompt_filter(strategy)
    loss_fn = _text_prompt_review_loss if review else _text_prompt_loss
    description = f"text prompt ({text_history_items} items), strategy {strategy}"

  def batches(split, shuffle, repeat, size):
    kwargs = dict(batch_size=size, max_length=config.max_length, max_prompt_length=max_prompt_length, seed=seed,
                  shuffle=shuffle, repeat=repeat, drop_remainder=repeat)
    if review:  # evaluation batches carry the reference strings for ROUGE
      return tasks.ReviewBatches(task_name, split, max_target_length=max_target_length, references=not repeat,
                                 **kwargs)
    return tasks.ChoiceBatches(task_name, split, **kwargs)

  trainer = Trainer(module, loss_fn, train_config, trainable=trainable, workdir=workdir,
                    checkpoint_metadata={"stage": "user_llm", "method": method, "task": task_name,
                                         "strategy": strategy, "integration": integration})
  return UserLLMJob(trainer=trainer, train_data=batches("train", True, True, batch_size),
                    eval_batches=lambda: batches("test", False, False, eval_batch_size), method=method,
                    description=f"{description}, {task} on {data.name}", task_name=task_name, spec=spec,
                    examples=examples, vocabulary=vocab, task_kind=task, max_target_length=max_target_length)


@gin.configurable("train", module="user_llm")
def train(workdir: str, **overrides) -> dict[str, float]:
  """Stage 2: trains the User-LLM (or text-prompt baseline); evaluates before and after on the test
  users; writes `<workdir>/final_metrics.json`."""
  job = build_job(workdir, **overrides)
  count = sum(x.size for x in jax.tree.leaves(nnx.state(job.trainer.model(), job.trainer.trainable_filter)))
  print(f"user_llm: {job.description}; {count:,} trainable parameters", flush=True)
  before = job.evaluate(job.trainer.model())
  result = job.trainer.train(job.train_data)
  samples: list = []
  after = job.evaluate(job.trainer.model(), samples)
  for reference, generated in samples[:3]:  # review generation: show a few
    print(f"  reference: {reference!r}\n  generated: {generated!r}", flush=True)
  print(f"test users, before training: {eval_lib.format_metrics(before)}", flush=True)
  print(f"test users, after {result.step} steps: {eval_lib.format_metrics(after)}", flush=True)
  workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"),
                         {"step": result.step, "train": result.metrics, "untrained": before, "eval": after})
  return after
