"""The simplest job: train or fine-tune a decoder as a language model on a SeqIO task.

Gin: `run.job = @pretrain.train`, settings as `pretrain.train.<arg> = ...` and the loop's as
`TrainConfig.<field> = ...` (see gin/pretrain.gin).
"""

from __future__ import annotations

from typing import Any

import gin
import jax
from absl import logging
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.losses import lm_loss
from persona_jax.train.trainer import TrainConfig, Trainer, TrainResult


def build_model(*, model: str | None, pretrained: str | None, vocab_size: int, dtype: str,
                param_dtype: str, model_overrides: dict | None, seed: int
                ) -> tuple[nnx.Module, dict[str, Any]]:
  """A decoder and the pointer that rebuilds its (frozen) base weights.

  Exactly one of `model` (a preset name from `persona_jax.nn.PRESETS`, randomly initialized) and
  `pretrained` (anything `persona_jax.hf.load_pretrained` takes) must be given.
  """
  if (model is None) == (pretrained is None):
    raise ValueError("pretrain.train: set exactly one of `model` (a preset such as 'tiny_llama') or "
                     "`pretrained` (a Hugging Face dir, hub id, .gguf file or short name).")
  overrides = dict(model_overrides or {})
  if pretrained is not None:
    from persona_jax.hf import load_pretrained  # only jobs that load weights pay for this import

    if dtype != param_dtype or overrides:
      raise ValueError("pretrain.train: with `pretrained`, `dtype` must equal `param_dtype` (the loaded "
                       "decoder computes in its parameter dtype) and `model_overrides` must be empty; "
                       "use TrainConfig.compute_dtype='bfloat16' for bf16 compute on fp32 weights.")
    loaded = load_pretrained(pretrained, dtype=param_dtype, with_tokenizer=False)
    decoder = loaded.decoder
    if decoder.config.vocab_size < vocab_size:
      raise ValueError(f"pretrain.train: the vocabulary has {vocab_size} ids but {pretrained!r} has only "
                       f"{decoder.config.vocab_size} embedding rows: use the model's own tokenizer as "
                       "`vocabulary`.")
    return decoder, {"base": {"pretrained": str(loaded.source)}}
  config = pnn.get_config(model, vocab_size=vocab_size, dtype=dtype, param_dtype=param_dtype, **overrides)
  return pnn.build_decoder(config, seed), {
      "base": {"preset": model, "overrides": {k: repr(v) for k, v in overrides.items()}, "seed": seed,
               "vocab_size": vocab_size}}


@gin.configurable("train", module="pretrain")
def train(workdir: str, *, model: str | None = "tiny_llama", pretrained: str | None = None,
          model_overrides: dict | None = None, dtype: str = "float32", param_dtype: str = "float32",
          dataset: Any = "tiny_shakespeare", vocabulary: Any = "bytes", tfds_data_dir: str | None = None,
          sequence_length: int = 128, batch_size: int = 8, pack: bool = True,
          eval_split: str | None = "validation", eval_batch_size: int | None = None,
          lora_rank: int = 0, lora_alpha: float | None = None, seed: int = 0,
          train_config: TrainConfig | None = None) -> TrainResult:
  """Trains a decoder with next-token cross-entropy.

  Args:
    workdir: checkpoints, TensorBoard events and the config go here; a rerun resumes from it.
    model / pretrained: a random preset, or pretrained weights (see `build_model`).
    model_overrides: DecoderConfig field overrides (e.g. {'num_layers': 4}).
    dtype: compute dtype ('bfloat16' with param_dtype 'float32' = bf16 compute on fp32 master weights).
    param_dtype: storage dtype of the parameters (and of the optimizer's master copy).
    dataset / vocabulary / tfds_data_dir: what `persona_jax.data.lm_task` takes.
    sequence_length / batch_size: global batch `[batch_size, sequence_length]`.
    pack: pack several documents into one row.
    eval_split: split to evaluate on (None: no evaluation); `TrainConfig.eval_every` and
      `TrainConfig.num_eval_batches` say when and how much.
    lora_rank: > 0 trains LoRA adapters of this rank on all projections and freezes the base.
    seed: initialization and data-order seed.
    train_config: the loop settings (default: `TrainConfig()` with its gin bindings).
  """
  train_config = train_config or TrainConfig()
  vocab = pdata.get_vocabulary(vocabulary)
  task = pdata.lm_task(dataset, vocab, tfds_data_dir=tfds_data_dir)
  num_processes, process_index = jax.process_count(), jax.process_index()
  if batch_size % num_processes:
    raise ValueError(f"pretrain.train.batch_size={batch_size} must be a multiple of the number of "
                     f"processes ({num_processes}).")
  local_batch = batch_size // num_processes
  train_data = pdata.make_iterator(task, split="train", sequence_length=sequence_length,
                                   batch_size=local_batch, seed=seed, pack=pack,
                                   shard_index=process_index, num_shards=num_processes)

  eval_batches = None
  if eval_split is not None:
    local_eval_batch = (eval_batch_size or batch_size) // num_processes

    def eval_batches():
      return pdata.make_iterator(task, split=eval_split, sequence_length=sequence_length,
                                 batch_size=local_eval_batch, seed=seed, shuffle=False, pack=pack,
                                 num_epochs=1, drop_remainder=False, shard_index=process_index,
                                 num_shards=num_processes)

  decoder, base = build_model(model=model, pretrained=pretrained, vocab_size=vocab.vocab_size,
                              dtype=dtype, param_dtype=param_dtype, model_overrides=model_overrides,
                              seed=seed)
  trainable = nnx.Param
  if lora_rank > 0:
    pnn.inject_lora(decoder, rank=lora_rank, alpha=lora_alpha, seed=seed)
    trainable = nnx.LoRAParam
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(decoder, trainable)))
  logging.info("pretrain: task %s, %d trainable parameters.", task, num_params)
  if process_index == 0:
    print(f"pretrain: task {task}, model {decoder.config.family} {decoder.config.num_layers} layers, "
          f"{num_params:,} trainable parameters", flush=True)

  trainer = Trainer(decoder, lm_loss, train_config, trainable=trainable, workdir=workdir,
                    checkpoint_metadata=dict(base, task=task, vocabulary=pdata.vocabulary_name(vocab)),
                    process_local_batches=True)
  result = trainer.train(train_data, eval_batches=eval_batches)
  if process_index == 0:
    summary = {"step": result.step, "preempted": result.preempted,
               "train": result.metrics, "eval": result.eval_metrics}
    workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"), summary)
  return result
