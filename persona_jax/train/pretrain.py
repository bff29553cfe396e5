"""The simplest method: train or fine-tune a decoder as a language model on a SeqIO task.

Gin (gin/pretrain.gin): `run.method = 'pretrain'`, `run.job = @train`; settings as
`pretrain.job.<arg> = ...`, the decoder as `DecoderSource.*`, the loop as `TrainConfig.<field>`.
It lives in the core (not a room) because every method's decoder can come from it.
"""

from __future__ import annotations

from typing import Any

import gin
import jax
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.errors import UserError
from persona_jax.evaluation.loss import mean_loss_metrics
from persona_jax.hf.source import DecoderSource
from persona_jax.train.losses import lm_loss
from persona_jax.train.method import Evaluation, Method, register_method


@register_method("pretrain")
@gin.configurable("job", module="pretrain")
class Pretrain(Method):
  """Next-token cross-entropy on a SeqIO language-modelling task.

  Args:
    decoder: the decoder source (default `DecoderSource()` with its gin bindings).
    dataset / tfds_data_dir: what `persona_jax.data.lm_task` takes.
    sequence_length / batch_size: global batch `[batch_size, sequence_length]`.
    pack: pack several documents into one row.
    eval_split: split to evaluate on (None: no evaluation); `num_eval_batches` batches of it.
    eval_batch_size: rows per eval batch (default batch_size).
    lora_rank: > 0 trains LoRA adapters of this rank on all projections and freezes the base.
    seed: initialization and data-order seed.
  """

  def __init__(self, *, decoder: DecoderSource | None = None, dataset: Any = "tiny_shakespeare",
               tfds_data_dir: str | None = None, sequence_length: int = 128, batch_size: int = 8,
               pack: bool = True, eval_split: str | None = "validation",
               eval_batch_size: int | None = None, num_eval_batches: int | None = 4,
               lora_rank: int = 0, lora_alpha: float | None = None, seed: int = 0):
    self.source = decoder or DecoderSource()
    self.dataset, self.tfds_data_dir = dataset, tfds_data_dir
    self.sequence_length, self.batch_size, self.pack = sequence_length, batch_size, pack
    self.eval_split, self.eval_batch_size = eval_split, eval_batch_size or batch_size
    self.num_eval_batches = num_eval_batches
    self.lora_rank, self.lora_alpha, self.seed = lora_rank, lora_alpha, seed
    for name, size in (("batch_size", batch_size), ("eval_batch_size", self.eval_batch_size)):
      if size % jax.process_count():
        raise UserError(f"pretrain.job.{name}={size} must be a multiple of the number of processes "
                        f"({jax.process_count()}).")

  def setup(self, workdir):
    self.vocabulary = pdata.get_vocabulary(self.source.vocabulary_source())
    self.task = pdata.lm_task(self.dataset, self.vocabulary, tfds_data_dir=self.tfds_data_dir)
    loaded = self.source.load("pretrain.job", vocab_size=self.vocabulary.vocab_size, seed=self.seed)
    if loaded.decoder.config.vocab_size < self.vocabulary.vocab_size:
      raise UserError(f"pretrain.job: the vocabulary has {self.vocabulary.vocab_size} ids but the "
                      f"decoder has only {loaded.decoder.config.vocab_size} embedding rows: use the "
                      "model's own tokenizer as DecoderSource.vocabulary.")
    self.decoder, self.base = loaded.decoder, loaded.base
    if self.lora_rank > 0:
      pnn.inject_lora(self.decoder, rank=self.lora_rank, alpha=self.lora_alpha, seed=self.seed)

  def description(self) -> str:
    config = self.decoder.config
    return (f"task {self.task}, model {config.family} {config.num_layers} layers "
            f"({self.source.describe()})")

  def model(self):
    return self.decoder

  def trainable_filter(self):
    return nnx.LoRAParam if self.lora_rank > 0 else nnx.Param

  def loss_fn(self):
    return lm_loss

  def checkpoint_metadata(self):
    return {"base": self.base, "task": self.task,
            "vocabulary": pdata.vocabulary_name(self.vocabulary)}

  def _iterator(self, split, *, train: bool):
    num_processes, index = jax.process_count(), jax.process_index()
    size = self.batch_size if train else self.eval_batch_size
    extra = {} if train else dict(shuffle=False, num_epochs=1, drop_remainder=False)
    return pdata.make_iterator(self.task, split=split, sequence_length=self.sequence_length,
                               batch_size=size // num_processes, seed=self.seed, pack=self.pack,
                               shard_index=index, num_shards=num_processes, **extra)

  def train_data(self):
    return self._iterator("train", train=True)

  def evaluate(self, model, step):
    if self.eval_split is None:
      return Evaluation()
    metrics = mean_loss_metrics(model, lm_loss, self._iterator(self.eval_split, train=False),
                                self.num_eval_batches)
    return Evaluation(metrics=metrics)

  def tokenizer_source(self):
    source = self.source.vocabulary_source()
    return None if source == "bytes" else source
