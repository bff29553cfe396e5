"""User-LLM's two methods: user-encoder pretraining (stage 1), then the LLM stage (stage 2).

  python -m persona_jax.main --gin_file=gin/user_encoder_pretrain.gin --workdir=runs/user_encoder
  python -m persona_jax.main --gin_file=gin/user_llm.gin --workdir=runs/user_llm \
      --gin_bindings="user_llm.job.encoder_workdir='runs/user_encoder'"

Stage 1 (`run.method = 'user_encoder'`, settings `user_llm.encoder_job.*`): the user encoder alone,
trained by next-item prediction (cross-entropy per feature), evaluated on held-out users
(Recall@K of the next item, the per-feature cross-entropies).
Stage 2 (`run.method = 'user_llm'`, settings `user_llm.job.*`): the User-LLM (or, with
`method='text_prompt'`, the text-prompt baseline) on a multiple-choice task, or (task='amazon_review')
on review generation trained with the LM loss on the target tokens and evaluated by ROUGE-Lsum of
greedy generations (gin/user_llm_review_smoke.gin); what trains is what `strategy` names. With
`encoder_workdir` the stage-1 encoder is restored into the User-LLM first.

Both stages share the data (`user_llm.data.*`) and the encoder's sizes (`user_llm.encoder.*`: keep
them identical in both gin files, stage 2 restores the stage-1 encoder). The decoder is
`DecoderSource.*`. Both write `<workdir>/eval_table.{md,json}`: the held-out metrics of the trained
model beside the untrained one (and, for choice tasks, chance).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.errors import UserError
from persona_jax.evaluation.loss import mean_loss_metrics
from persona_jax.hf.source import DecoderSource
from persona_jax.train import checkpointing
from persona_jax.train.method import Evaluation, FitResult, Method, Run, is_chief, register_method
from persona_jax.user_llm import eval as eval_lib
from persona_jax.user_llm import model as model_lib
from persona_jax.user_llm import tasks


# ------------------------------------------------------------------------------------------------
# Settings shared by both stages
# ------------------------------------------------------------------------------------------------
@gin.configurable("data", module="user_llm")
def load_user_data(dataset: str = "movielens", *, movielens_config: str = "latest-small",
                   amazon_dir: str | None = None, tfds_data_dir: str | None = None,
                   seed: int = 0) -> tasks.UserData:
  """The users of both stages (gin `user_llm.data.*`; see `tasks.load_user_data`)."""
  return tasks.load_user_data(dataset, movielens_config=movielens_config, amazon_dir=amazon_dir,
                              tfds_data_dir=tfds_data_dir, seed=seed)


@gin.configurable("encoder", module="user_llm")
def encoder_config(num_items: int, num_categories: int, *, embed_dim: int = 64, num_layers: int = 2,
                   num_heads: int = 4, mlp_dim: int = 128, max_length: int = 200,
                   fusion: str = "early") -> model_lib.UserEncoderConfig:
  """The user encoder's sizes (gin: `user_llm.encoder.*`, shared by both stages)."""
  return model_lib.UserEncoderConfig(num_items=num_items, num_categories=num_categories,
                                     embed_dim=embed_dim, num_layers=num_layers, num_heads=num_heads,
                                     mlp_dim=mlp_dim, max_length=max_length, fusion=fusion)


def _check_batch_sizes(job: str, **sizes: int) -> None:
  for name, size in sizes.items():
    if size < 1:
      raise UserError(f"{job}.{name}={size} must be >= 1.")


def _print(text: str) -> None:
  if is_chief():
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------
# Stage 1: the user encoder
# ------------------------------------------------------------------------------------------------
def encoder_loss(model: model_lib.UserEncoder, batch: dict, rng: jax.Array):
  del rng
  return model_lib.next_item_loss(model, batch)


class _UntrainedColumn(Method):
  """Scores the model before training too (the table's "untrained" column): before `fit`, or on a
  clone taken before `restore` loads the trained weights. Subclasses define `_metrics(model)`."""

  evaluate_untrained: bool = True
  _untrained: dict[str, float] | None = None
  _untrained_model: nnx.Module | None = None

  def fit(self, run: Run) -> FitResult:
    if self.evaluate_untrained:
      self._untrained = self._metrics(self.model())
    return super().fit(run)

  def restore(self, run: Run):
    if self.evaluate_untrained:
      self._untrained_model = nnx.clone(self.model())
    return super().restore(run)


@register_method("user_encoder")
@gin.configurable("encoder_job", module="user_llm")
class UserEncoderPretraining(_UntrainedColumn):
  """Stage 1: the user encoder, trained by next-item prediction on every training user's sequence.

  Args:
    batch_size: windows of `user_llm.encoder.max_length` items per step.
    eval_batch_size: windows per eval batch (default batch_size).
    num_eval_batches: eval batches per evaluation (None: the whole validation split).
    evaluate_untrained: also score the encoder before training (a column of the table).
    seed: initialization and data order.
    data: already-loaded users (tests and benchmarks; default `user_llm.data`).
  """

  def __init__(self, *, batch_size: int = 16, eval_batch_size: int | None = None,
               num_eval_batches: int | None = None, evaluate_untrained: bool = True, seed: int = 0,
               data: tasks.UserData | None = None):
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
    _check_batch_sizes("user_llm.encoder_job", batch_size=self.batch_size,
                       eval_batch_size=self.eval_batch_size)
    self.num_eval_batches, self.evaluate_untrained, self.seed = num_eval_batches, evaluate_untrained, seed
    self._data = data
    self._untrained: dict[str, float] | None = None
    self._untrained_model: nnx.Module | None = None

  def setup(self, workdir):
    self.data = self._data or load_user_data()
    self.config = encoder_config(len(self.data.items), len(self.data.categories))
    self.task = tasks.register_next_item_task(
        f"user_llm.next_item.{self.data.name}.{self.config.max_length}", self.data.users,
        self.data.items, self.data.categories, self.config.max_length)
    self.encoder = model_lib.UserEncoder(self.config, rngs=nnx.Rngs(self.seed))

  def description(self) -> str:
    config = self.config
    return (f"user encoder ({config.fusion} fusion, {config.num_layers} layers, "
            f"D_u={config.embed_dim}, {config.max_length} items), next item on {self.data.name}")

  def model(self):
    return self.encoder

  def trainable_filter(self):
    return nnx.Param

  def loss_fn(self):
    return encoder_loss

  def checkpoint_metadata(self) -> dict:
    return {"stage": "user_encoder", "task": self.task,
            "encoder": dataclasses.asdict(self.config)}

  def train_data(self):
    return tasks.ChoiceBatches(self.task, "train", batch_size=self.batch_size,
                               max_length=self.config.max_length, max_prompt_length=None,
                               seed=self.seed)

  def eval_batches(self):
    return tasks.ChoiceBatches(self.task, "validation", batch_size=self.eval_batch_size,
                               max_length=self.config.max_length, max_prompt_length=None,
                               shuffle=False, repeat=False, drop_remainder=False)

  def _metrics(self, model) -> dict[str, float]:
    return mean_loss_metrics(model, encoder_loss, self.eval_batches(), self.num_eval_batches)


  def periodic_metrics(self, model, step):
    return self._metrics(model)

  def evaluate(self, model, step) -> Evaluation:
    metrics = self._metrics(model)
    if self._untrained is None and self._untrained_model is not None:
      self._untrained = self._metrics(self._untrained_model)
    columns = {"untrained": self._untrained} if self._untrained else {}
    columns[f"step {step}"] = metrics
    table = eval_lib.format_table(
        columns, f"User encoder, held-out (validation) users: {self.description()}")
    return Evaluation(metrics=metrics, tables={"eval_table": table},
                      results={"eval_table": {"step": step, "columns": columns}})


# ------------------------------------------------------------------------------------------------
# Stage 2: the LLM
# ------------------------------------------------------------------------------------------------
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
  raise UserError(f"user_llm.job: the text-prompt baseline takes strategy 'full' or 'lora', not "
                  f"{strategy!r}.")


METHODS = ("user_llm", "text_prompt")
LOADER_FILE = "user_llm_loader.py"


def export_user_llm(model: model_lib.UserLLM, output_dir) -> dict[str, str]:
  """Writes a User-LLM for PyTorch (`hf_loader.py`, copied as `user_llm_loader.py`, runs it):

    decoder/                  the base decoder (LoRA merged, cross-attention layers removed), transformers
    user_encoder/stack_<k>/   the user encoder's causal transformer(s) as transformers llama models
    user_llm.safetensors      everything else, named by its nnx path (kernels `[in, out]` as in JAX)
    user_llm.json             integration, M, cross-attention layers and heads, encoder sizes
  """
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from persona_jax.hf import save_pretrained  # pylint: disable=g-import-not-at-top

  output_dir = pathlib.Path(output_dir)
  config = model.decoder.config
  artifacts = {}
  if not (output_dir / "decoder").exists():  # the soft-prompt decoder was exported as it is
    decoder = nnx.clone(model.decoder)
    for layer in model.cross_attention_layers:
      decoder.layers[layer].after = None
    merged = pnn.merge_lora(decoder)
    save_pretrained(decoder, output_dir / "decoder")
    artifacts["decoder"] = (f"transformers {config.family} model: the base decoder without the "
                            f"cross-attention layers {list(model.cross_attention_layers)}"
                            + (f", {merged} LoRA adapters merged" if merged else ""))
  encoder = model.user_encoder
  for k, stack in enumerate(encoder.stacks):
    as_decoder = pnn.build_decoder(encoder.config.block_config(), seed=0)
    for block, trained in zip(as_decoder.layers, stack.blocks):
      nnx.update(block, nnx.state(trained))
    nnx.update(as_decoder.final_norm, nnx.state(stack.norm))
    save_pretrained(as_decoder, output_dir / "user_encoder" / f"stack_{k}")
  artifacts["user_encoder"] = (f"{len(encoder.stacks)} causal transformer(s) of the user encoder as "
                               "transformers llama models (read through inputs_embeds)")
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(str(part) for part in path)
    in_hook = path[0] == "decoder" and "after" in path
    if (path[0] == "decoder" and not in_hook) or tuple(path[:2]) == ("user_encoder", "stacks"):
      continue
    if "adapters" in path:
      raise UserError(f"export: {name} is a LoRA adapter outside the decoder's projections, which the "
                      "User-LLM loader does not read; merge it first.")
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    tensors[name] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
  save_file(tensors, str(output_dir / "user_llm.safetensors"), metadata={"format": "pt"})
  heads = {model.decoder.layers[layer].after.attention.num_heads
           for layer in model.cross_attention_layers}
  settings = {"integration": model.integration, "num_latents": model.num_latents,
              "cross_attention_layers": list(model.cross_attention_layers),
              "cross_attention_heads": heads.pop() if heads else None,
              "resampler_layers": len(model.resampler.attentions),
              "embed_dim": config.embed_dim, "scale_embeddings": bool(config.scale_embeddings),
              "encoder": dict(dataclasses.asdict(encoder.config), num_stacks=len(encoder.stacks))}
  (output_dir / "user_llm.json").write_text(json.dumps(settings, indent=2))
  shutil.copyfile(pathlib.Path(__file__).with_name("hf_loader.py"), output_dir / LOADER_FILE)
  artifacts["user_llm.safetensors"] = (f"{len(tensors)} tensors: user-encoder embeddings, resampler, "
                                       "projection, gated cross-attention (fp32)")
  artifacts["user_llm.json"] = "integration, num_latents, cross-attention layers, encoder sizes"
  artifacts[LOADER_FILE] = "runs the User-LLM with transformers: user_llm_loader.load(dir)"
  return artifacts


@register_method("user_llm")
@gin.configurable("job", module="user_llm")
class UserLLMMethod(_UntrainedColumn):
  """Stage 2: the User-LLM (method='user_llm') or the text-prompt baseline (method='text_prompt').

  Args:
    decoder: the decoder's source (default `DecoderSource()` with its gin bindings); its vocabulary
      tokenizes the prompts.
    method: 'user_llm' (history as user embeddings) or 'text_prompt' (history written into the
      prompt, `text_history_items` most recent items).
    task: one of tasks.TASK_KINDS. integration / strategy: see model.UserLLM (both integrations
      generate for amazon_review).
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
    batch_size / eval_batch_size: examples per training step / per eval batch.
    encoder_workdir: restore the stage-1 user encoder from there (same data and `user_llm.encoder`).
    evaluate_untrained: also score the model before training (a column of the table).
    show_samples: review generation: how many (reference, generated) pairs the table shows.
    seed: initialization, options and data order.
    data: already-loaded users (tests and benchmarks; default `user_llm.data`).
  """

  def __init__(self, *, decoder: DecoderSource | None = None, method: str = "user_llm",
               task: str = "next_movie", integration: str = "cross_attention", strategy: str = "enc",
               num_latents: int = 8, resampler_layers: int = 2, cross_attention_layers: Any = None,
               lora_rank: int = 8, num_options: int = 5, shuffle_options: bool = True,
               examples_per_user: int = 4, text_history_items: int = 50,
               text_history_fields: Any = ("title", "categories", "rating"),
               history_items: int | None = None, review_field: str = "title",
               max_target_length: int = 64, max_prompt_length: int | None = 256,
               batch_size: int = 8, eval_batch_size: int = 16, encoder_workdir: str | None = None,
               evaluate_untrained: bool = True, show_samples: int = 3, seed: int = 0,
               data: tasks.UserData | None = None):
    if method not in METHODS:
      raise UserError(f"user_llm.job.method={method!r}; use one of {METHODS}.")
    if task not in tasks.TASK_KINDS:
      raise UserError(f"user_llm.job.task={task!r}; use one of {tasks.TASK_KINDS}.")
    if method == "user_llm" and integration not in model_lib.INTEGRATIONS:
      raise UserError(f"user_llm.job.integration={integration!r}; use one of "
                      f"{model_lib.INTEGRATIONS}.")
    if method == "user_llm" and strategy not in model_lib.STRATEGIES:
      raise UserError(f"user_llm.job.strategy={strategy!r}; use one of {model_lib.STRATEGIES}.")
    if method == "text_prompt":
      text_prompt_filter(strategy)
    review = task == "amazon_review"
    _check_batch_sizes("user_llm.job", batch_size=batch_size, eval_batch_size=eval_batch_size)
    self.source = decoder or DecoderSource()
    self.method, self.task_kind, self.review = method, task, review
    self.integration, self.strategy = integration, strategy
    self.num_latents, self.resampler_layers = num_latents, resampler_layers
    self.cross_attention_layers, self.lora_rank = cross_attention_layers, lora_rank
    self.num_options, self.shuffle_options = num_options, shuffle_options
    self.examples_per_user = examples_per_user
    self.text_history_items, self.text_history_fields = text_history_items, tuple(text_history_fields)
    self.history_items, self.review_field = history_items, review_field
    self.max_target_length, self.max_prompt_length = max_target_length, max_prompt_length
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.encoder_workdir, self.evaluate_untrained = encoder_workdir, evaluate_untrained
    self.show_samples, self.seed = show_samples, seed
    self._data = data
    self._untrained: dict[str, float] | None = None
    self._untrained_model: nnx.Module | None = None

  # Set up -----------------------------------------------------------------------------------------
  def setup(self, workdir):
    self.data = data = self._data or load_user_data()
    self.vocabulary = pdata.get_vocabulary(self.source.vocabulary_source())
    loaded = self.source.load("user_llm.job", vocab_size=self.vocabulary.vocab_size, seed=self.seed)
    self.base = loaded.base
    decoder = loaded.decoder
    if decoder.config.vocab_size < self.vocabulary.vocab_size:
      raise UserError(f"user_llm.job: vocabulary {pdata.vocabulary_name(self.vocabulary)} has "
                      f"{self.vocabulary.vocab_size} ids but the decoder has "
                      f"{decoder.config.vocab_size} rows.")
    self.encoder_config = config = encoder_config(len(data.items), len(data.categories))
    if self.review:
      self.examples = {split: tasks.amazon_review_examples(users, self.review_field)
                       for split, users in data.users.items()}
    else:
      self.examples = tasks.choice_examples(data, self.task_kind, num_options=self.num_options,
                                            examples_per_user=self.examples_per_user, seed=self.seed,
                                            shuffle_options=self.shuffle_options)
    text = self.method == "text_prompt"
    self.spec = tasks.ChoiceTaskSpec(items=data.items, categories=data.categories,
                                     max_length=config.max_length,
                                     text_history_items=self.text_history_items if text else None,
                                     history_items=self.history_items,
                                     history_fields=self.text_history_fields)
    register = tasks.register_review_task if self.review else tasks.register_choice_task
    field = f"_{self.review_field}" if self.review else ""
    self.task_name = register(f"user_llm.{self.task_kind}{field}.{data.name}", self.examples,
                              self.spec, self.vocabulary)
    if self.max_prompt_length is None:
      self.max_prompt_length = -(-tasks.longest_prompt(self.task_name) // 64) * 64
    if self.method == "user_llm":
      self._model = model_lib.UserLLM(
          decoder, config, integration=self.integration, strategy=self.strategy,
          num_latents=self.num_latents, resampler_layers=self.resampler_layers,
          cross_attention_layers=self.cross_attention_layers, lora_rank=self.lora_rank,
          seed=self.seed)
      if self.encoder_workdir is not None:
        self._restore_encoder(self._model.user_encoder)
    else:
      if self.strategy == "lora":
        pnn.inject_lora(decoder, rank=self.lora_rank, name="text_prompt", seed=self.seed)
      self._model = decoder

  def _restore_encoder(self, encoder: model_lib.UserEncoder) -> None:
    """Loads the stage-1 encoder of `encoder_workdir` (its latest checkpoint) into `encoder`."""
    try:
      step = checkpointing.restore_trainable(self.encoder_workdir, encoder, nnx.Param)
    except ValueError as error:
      raise UserError(f"user_llm.job.encoder_workdir={self.encoder_workdir!r}: {error} Use the same "
                      "user_llm.data and user_llm.encoder settings as stage 1.") from error
    if step is None:
      raise UserError(f"user_llm.job.encoder_workdir={self.encoder_workdir!r} holds no checkpoint: "
                      "run gin/user_encoder_pretrain.gin there first (or set it to None).")
    _print(f"user_llm: restored the stage-1 user encoder (step {step}) from {self.encoder_workdir}.")

  def description(self) -> str:
    if self.method == "user_llm":
      what = (f"User-LLM {self.integration}, strategy {self.strategy}, M={self.num_latents}")
    else:
      what = f"text prompt ({self.text_history_items} items), strategy {self.strategy}"
    return f"{what}, {self.task_kind} on {self.data.name} ({self.source.describe()})"

  # Training ---------------------------------------------------------------------------------------
  def model(self):
    return self._model

  def trainable_filter(self):
    if self.method == "user_llm":
      return self._model.trainable_filter()
    return text_prompt_filter(self.strategy)

  def loss_fn(self):
    if self.method == "user_llm":
      return _user_llm_review_loss if self.review else _user_llm_loss
    return _text_prompt_review_loss if self.review else _text_prompt_loss

  def checkpoint_metadata(self) -> dict:
    return {"base": self.base, "stage": "user_llm", "method": self.method, "task": self.task_name,
            "strategy": self.strategy, "integration": self.integration,
            "encoder_workdir": self.encoder_workdir}

  def batches(self, split: str, *, train: bool):
    """Training batches (shuffled, repeated) or one ordered pass over `split` (the last batch kept;
    review batches then carry the reference strings for ROUGE)."""
    kwargs = dict(batch_size=self.batch_size if train else self.eval_batch_size,
                  max_length=self.encoder_config.max_length,
                  max_prompt_length=self.max_prompt_length, seed=self.seed, shuffle=train,
                  repeat=train, drop_remainder=train)
    if self.review:
      return tasks.ReviewBatches(self.task_name, split, max_target_length=self.max_target_length,
                                 references=not train, **kwargs)
    return tasks.ChoiceBatches(self.task_name, split, **kwargs)

  def train_data(self):
    return self.batches("train", train=True)

  def eval_batches(self):
    return self.batches("test", train=False)


  # Evaluation -------------------------------------------------------------------------------------
  def _metrics(self, model, samples: list | None = None) -> dict[str, float]:
    """Test-user metrics: choice metrics, or ROUGE-Lsum / target_ce for amazon_review."""
    if self.review:
      return eval_lib.evaluate_reviews(model, self.eval_batches(), self.method, self.vocabulary,
                                       self.max_target_length, samples)
    return eval_lib.evaluate_choices(model, self.eval_batches(), self.method)

  def periodic_metrics(self, model, step):
    return self._metrics(model)

  def evaluate(self, model, step) -> Evaluation:
    samples: list = []
    metrics = self._metrics(model, samples)
    if self._untrained is None and self._untrained_model is not None:
      self._untrained = self._metrics(self._untrained_model)
    columns: dict[str, dict[str, float]] = {}
    if not self.review:
      options = {len(example.options) for example in self.examples["test"]}
      if len(options) == 1:
        count = options.pop()
        columns["chance"] = {"accuracy": 1 / count,
                             **{name: min(1.0, int(name.split("@")[1]) / count)
                                for name in metrics if name.startswith("recall@")}}
      # Always answering the training users' most frequent label (a skewed task's real floor).
      train_labels = [example.label for example in self.examples.get("train", ())]
      if train_labels:
        majority = max(set(train_labels), key=train_labels.count)
        test_labels = [example.label for example in self.examples["test"]]
        columns["majority label"] = {"accuracy": test_labels.count(majority) / len(test_labels)}
    if self._untrained:
      columns["untrained"] = self._untrained
    columns[f"step {step}"] = metrics
    table = eval_lib.format_table(columns, f"Test users: {self.description()}")
    shown = [list(pair) for pair in samples[:self.show_samples]]
    if shown:
      table += "\n\n" + "\n".join(f"- reference: {reference!r}\n  generated: {generated!r}"
                                  for reference, generated in shown)
    return Evaluation(metrics=metrics, tables={"eval_table": table},
                      results={"eval_table": {"step": step, "columns": columns, "samples": shown}})

  def export_artifacts(self, model, output_dir) -> dict[str, str]:
    """The User-LLM for PyTorch (`export_user_llm`); the text-prompt baseline is a plain decoder,
    exported as `decoder/` by the generic export."""
    if self.method != "user_llm":
      return {}
    return export_user_llm(model, output_dir)

  def tokenizer_source(self):
    source = self.source.vocabulary_source()
    return None if source == "bytes" else source
