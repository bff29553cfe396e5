"""Training job of the cache coprocessor (`run.job = @coprocessor.train`, see gin/coprocessor.gin).

Loss: for each row, `num_traces` augmentation points are drawn at random (a fresh draw every step);
the coprocessor augments the frozen decoder's cache at each point and the decoder predicts the
`ahead_tokens` tokens after it; the loss is their mean NLL. The frozen decoder never changes; only
what the variant names (see `CacheCoprocessor`) is in the optimizer and the checkpoints.

After training, the held-out table (baseline vs augmented perplexity at each position after the
augmentation point) is printed and written to `<workdir>/eval_table.{md,json}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax import data as pdata
from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor import masks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.hf.pretrained import load_job_decoder
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.trainer import TrainConfig, Trainer, TrainResult


def make_loss_fn(num_traces: int, ahead_tokens: int) -> Callable:
  """`loss_fn(model, batch, rng)` for the Trainer: mean NLL of the ahead tokens over random traces."""

  def loss_fn(model: CacheCoprocessor, batch: dict, rng: jax.Array):
    segment_ids = batch["decoder_segment_ids"]
    trace_positions, valid = masks.sample_trace_positions(rng, segment_ids, num_traces,
                                                           ahead_tokens + 1)
    out = model.forward_traces(batch["decoder_target_tokens"], segment_ids, batch["decoder_positions"],
                               trace_positions, ahead_tokens, with_baseline=True)
    weights = jnp.broadcast_to(valid[:, :, None], out["nll"].shape).astype(jnp.float32)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (out["nll"] * weights).sum() / total
    baseline = (out["baseline_nll"] * weights).sum() / total
    first = weights[:, :, 0]
    first_total = jnp.maximum(first.sum(), 1.0)
    return loss, {
        "ahead_nll": loss,
        "baseline_ahead_nll": baseline,
        "position1_nll": (out["nll"][:, :, 0] * first).sum() / first_total,
        "baseline_position1_nll": (out["baseline_nll"][:, :, 0] * first).sum() / first_total,
        "traces": weights[:, :, 0].sum(),
    }

  return loss_fn


@dataclasses.dataclass
class CoprocessorJob:
  """Everything `train` and `evaluate` share: model, trainer, data, settings."""
  trainer: Trainer
  train_data: Any
  eval_batches: Callable[[], Any]
  num_traces: int
  ahead_tokens: int
  num_eval_batches: int | None
  description: str


@gin.configurable("job", module="coprocessor")
def build_job(workdir: str, *, pretrained: str | None = "smollm2-135m-instruct",
              model: str | None = None, vocabulary: Any = None, variant: str = "full",
              num_latents: int = 8, ahead_tokens: int = 8, num_traces: int = 8, lora_rank: int = 16,
              dataset: Any = "tiny_shakespeare", eval_dataset: Any = None,
              eval_split: str = "validation", tfds_data_dir: str | None = None,
              sequence_length: int = 128, batch_size: int = 4, eval_batch_size: int | None = None,
              num_eval_batches: int | None = 8, eval_traces: int | None = None, seed: int = 0,
              train_config: TrainConfig | None = None) -> CoprocessorJob:
  """Builds the model, the trainer and the data of a coprocessor run.

  Args:
    workdir: checkpoints, TensorBoard events and tables.
    pretrained / model: the frozen decoder: pretrained weights (anything `load_pretrained` takes) or a
      random preset (tests).
    vocabulary: tokenizer for the data (default: the pretrained model's own; "bytes" with presets).
    variant: "full", "lora", "scratch", "pause" or "activations" (see `CacheCoprocessor`).
    num_latents: N_L latent embeddings per augmentation.
    ahead_tokens: N_A tokens after the augmentation point whose loss is trained and reported.
    num_traces: augmentation points per row per training step.
    lora_rank: rank of the "lora" variant.
    dataset / eval_dataset / eval_split: `persona_jax.data.lm_task` data sets (eval_dataset defaults
      to dataset) and the held-out split.
    sequence_length / batch_size: training rows `[batch_size, sequence_length]` (packed).
    num_eval_batches: eval batches per evaluation (None: the whole split).
    eval_traces: augmentation points per eval row (default num_traces).
    seed: data order, soft-token init and trace sampling.
    train_config: the loop's settings (default `TrainConfig()` with its gin bindings).
  """
  train_config = train_config or TrainConfig()
  if vocabulary is None:
    vocabulary = pretrained if pretrained is not None else "bytes"
  vocab = pdata.get_vocabulary(vocabulary)
  loaded = load_job_decoder("coprocessor.job", pretrained, model, vocab_size=vocab.vocab_size,
                            seed=seed)
  decoder, base = loaded.decoder, loaded.base
  if decoder.config.vocab_size < vocab.vocab_size:
    raise ValueError(f"coprocessor.train: vocabulary {pdata.vocabulary_name(vocab)} has "
                     f"{vocab.vocab_size} ids but the decoder has {decoder.config.vocab_size} rows.")
  model_ = CacheCoprocessor(decoder, num_latents=num_latents, variant=variant, lora_rank=lora_rank,
                            seed=seed)

  num_processes, process_index = jax.process_count(), jax.process_index()
  for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or batch_size)):
    if size % num_processes:
      raise ValueError(f"coprocessor.job.{name}={size} must be a multiple of the number of processes "
                       f"({num_processes}).")
  task = pdata.lm_task(dataset, vocab, tfds_data_dir=tfds_data_dir)
  eval_task = pdata.lm_task(eval_dataset, vocab, tfds_data_dir=tfds_data_dir) if eval_dataset else task
  train_data = pdata.make_iterator(task, split="train", sequence_length=sequence_length,
                                   batch_size=batch_size // num_processes, seed=seed, pack=True,
                                   shard_index=process_index, num_shards=num_processes)

  def eval_batches():
    return pdata.make_iterator(eval_task, split=eval_split, sequence_length=sequence_length,
                               batch_size=(eval_batch_size or batch_size) // num_processes, seed=seed,
                               shuffle=False, pack=True, num_epochs=1, drop_remainder=False,
                               shard_index=process_index, num_shards=num_processes)

  trainer = Trainer(model_, make_loss_fn(num_traces, ahead_tokens), train_config,
                    trainable=model_.trainable_filter(), workdir=workdir,
                    checkpoint_metadata={"base": base, "variant": variant, "num_latents": num_latents,
                                         "task": task},
                    process_local_batches=True)
  description = (f"{variant}, N_L={num_latents}, N_A={ahead_tokens}, {eval_task}:{eval_split}")
  return CoprocessorJob(trainer=trainer, train_data=train_data, eval_batches=eval_batches,
                        num_traces=eval_traces or num_traces, ahead_tokens=ahead_tokens,
                        num_eval_batches=num_eval_batches, description=description)


@gin.configurable("train", module="coprocessor")
def train(workdir: str, **overrides) -> dict[str, Any]:
  """Trains the coprocessor (settings: `coprocessor.job.*`, `TrainConfig.*`) and writes its table."""
  job = build_job(workdir, **overrides)
  trainable = nnx.state(job.trainer.model(), job.trainer.trainable_filter)
  count = sum(x.size for x in jax.tree.leaves(trainable))
  if jax.process_index() == 0:
    print(f"coprocessor: {job.description}; {count:,} trainable parameters", flush=True)
  result: TrainResult = job.trainer.train(job.train_data)
  results = eval_lib.evaluate_perplexity(job.trainer.model(), job.eval_batches(),
                                         num_traces=job.num_traces, ahead_tokens=job.ahead_tokens,
                                         max_batches=job.num_eval_batches)
  table = eval_lib.write_table(workdir, results, "eval_table",
                               f"Held-out perplexity after the augmentation point ({job.description}, "
                               f"step {result.step})")
  if jax.process_index() == 0:
    print(table, flush=True)
    workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"),
                           {"step": result.step, "preempted": result.preempted,
                            "train": result.metrics, "eval": results})
  return results

