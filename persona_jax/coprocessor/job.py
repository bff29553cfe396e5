"""The cache coprocessor's method (`run.method = 'coprocessor'`, see gin/coprocessor.gin).

Loss: for each row, `num_traces` augmentation points are drawn at random (a fresh draw every step);
the coprocessor augments the frozen decoder's cache at each point and the decoder predicts the
`ahead_tokens` tokens after it; the loss is their mean NLL. The frozen decoder never changes; only
what the variant names (see `CacheCoprocessor`) is in the optimizer and the checkpoints.

Evaluation: the held-out table (baseline vs augmented perplexity at each position after the
augmentation point), written as `<workdir>/eval_table.{md,json}`. Export adds the soft tokens, the
settings and a `transformers` loader (`hf_loader.py`, copied as `coprocessor_loader.py`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from persona_jax import data as pdata
from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor import masks, tasks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Evaluation, Method, register_method

LOADER_FILE = "coprocessor_loader.py"


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


@register_method("coprocessor")
@gin.configurable("job", module="coprocessor")
class Coprocessor(Method):
  """A trainable coprocessor that augments a frozen decoder's kv cache with latent embeddings.

  Args:
    decoder: the frozen decoder's source (default `DecoderSource()` with its gin bindings).
    variant: "full", "lora", "scratch", "pause" or "activations" (see `CacheCoprocessor`).
    num_latents: N_L latent embeddings per augmentation.
    ahead_tokens: N_A tokens after the augmentation point whose loss is trained and reported.
    num_traces: augmentation points per row per training step.
    lora_rank: rank of the "lora" variant.
    dataset / eval_dataset / eval_split: `persona_jax.data.lm_task` data sets (eval_dataset defaults
      to dataset) and the held-out split.
    tfds_data_dir: TFDS data dir (default: $TFDS_DATA_DIR).
    sequence_length / batch_size: training rows `[batch_size, sequence_length]` (packed).
    eval_batch_size: rows per eval batch (default batch_size).
    num_eval_batches: eval batches per evaluation (None: the whole split).
    eval_traces: augmentation points per eval row (default num_traces).
    seed: data order, soft-token init and trace sampling.
  """

  def __init__(self, *, decoder: DecoderSource | None = None, variant: str = "full",
               num_latents: int = 8, ahead_tokens: int = 8, num_traces: int = 8,
               lora_rank: int = 16, dataset: Any = "tiny_shakespeare", eval_dataset: Any = None,
               eval_split: str = "validation", tfds_data_dir: str | None = None,
               sequence_length: int = 128, batch_size: int = 4, eval_batch_size: int | None = None,
               num_eval_batches: int | None = 8, eval_traces: int | None = None, seed: int = 0):
    self.source = decoder or DecoderSource()
    self.variant, self.num_latents, self.ahead_tokens = variant, num_latents, ahead_tokens
    self.num_traces, self.lora_rank = num_traces, lora_rank
    self.dataset, self.eval_dataset, self.eval_split = dataset, eval_dataset, eval_split
    self.tfds_data_dir = tfds_data_dir
    self.sequence_length, self.batch_size = sequence_length, batch_size
    self.eval_batch_size = eval_batch_size or batch_size
    self.num_eval_batches, self.eval_traces, self.seed = num_eval_batches, eval_traces or num_traces, seed
    for name, size in (("batch_size", batch_size), ("eval_batch_size", self.eval_batch_size)):
      if size % jax.process_count():
        raise UserError(f"coprocessor.job.{name}={size} must be a multiple of the number of "
                        f"processes ({jax.process_count()}).")

  def setup(self, workdir):
    self.vocabulary = pdata.get_vocabulary(self.source.vocabulary_source())
    loaded = self.source.load("coprocessor.job", vocab_size=self.vocabulary.vocab_size,
                              seed=self.seed)
    self.base = loaded.base
    if loaded.decoder.config.vocab_size < self.vocabulary.vocab_size:
      raise UserError(f"coprocessor.job: vocabulary {pdata.vocabulary_name(self.vocabulary)} has "
                      f"{self.vocabulary.vocab_size} ids but the decoder has "
                      f"{loaded.decoder.config.vocab_size} rows.")
    self._model = CacheCoprocessor(loaded.decoder, num_latents=self.num_latents,
                                   variant=self.variant, lora_rank=self.lora_rank, seed=self.seed)
    self.task = pdata.lm_task(self.dataset, self.vocabulary, tfds_data_dir=self.tfds_data_dir)
    self.eval_task = (pdata.lm_task(self.eval_dataset, self.vocabulary,
                                    tfds_data_dir=self.tfds_data_dir)
                      if self.eval_dataset else self.task)

  def description(self) -> str:
    return (f"{self.variant}, N_L={self.num_latents}, N_A={self.ahead_tokens}, "
            f"{self.eval_task}:{self.eval_split}")

  def model(self) -> CacheCoprocessor:
    return self._model

  def trainable_filter(self):
    return self._model.trainable_filter()

  def loss_fn(self):
    return make_loss_fn(self.num_traces, self.ahead_tokens)

  def train_data(self):
    return tasks.train_iterator(self.task, sequence_length=self.sequence_length,
                                batch_size=self.batch_size, seed=self.seed)

  def eval_batches(self):
    return tasks.eval_iterator(self.eval_task, self.eval_split, sequence_length=self.sequence_length,
                               batch_size=self.eval_batch_size, seed=self.seed)

  def checkpoint_metadata(self) -> dict:
    return {"base": self.base, "variant": self.variant, "num_latents": self.num_latents,
            "task": self.task}

  def evaluate(self, model: CacheCoprocessor, step: int) -> Evaluation:
    results = eval_lib.evaluate_perplexity(model, self.eval_batches(), num_traces=self.eval_traces,
                                           ahead_tokens=self.ahead_tokens,
                                           max_batches=self.num_eval_batches)
    table = eval_lib.format_table(
        results, f"Held-out perplexity after the augmentation point ({self.description()}, "
        f"step {step})")
    metrics = {"position1_ppl": results["augmented_ppl"][0],
               "baseline_position1_ppl": results["baseline_ppl"][0],
               "mean_augmented_nll": float(np.mean(results["augmented_nll"])),
               "mean_baseline_nll": float(np.mean(results["baseline_nll"]))}
    return Evaluation(metrics=metrics, tables={"eval_table": table},
                      results={"eval_table": results})

  def export_artifacts(self, model: CacheCoprocessor, output_dir) -> dict[str, str]:
    """Writes `soft_tokens.safetensors` (`[num_latents, embed]`), `coprocessor.json` and the loader."""
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    output_dir = pathlib.Path(output_dir)
    soft_tokens = np.asarray(model.soft_tokens[...], dtype=np.float32)
    save_file({"soft_tokens": soft_tokens}, str(output_dir / "soft_tokens.safetensors"),
              metadata={"format": "pt"})
    config = model.decoder.config
    settings = {"variant": model.variant, "num_latents": model.num_latents,
                "latent_scale": float(model.latent_scale), "embed_dim": config.embed_dim,
                "scale_embeddings": bool(config.scale_embeddings)}
    (output_dir / "coprocessor.json").write_text(json.dumps(settings, indent=2))
    shutil.copyfile(pathlib.Path(__file__).with_name("hf_loader.py"), output_dir / LOADER_FILE)
    return {"soft_tokens.safetensors": f"soft tokens [{model.num_latents}, {config.embed_dim}] fp32",
            "coprocessor.json": "variant, num_latents, latent scale",
            LOADER_FILE: "runs the augmentation with transformers: coprocessor_loader.load(dir)"}

  def tokenizer_source(self):
    source = self.source.vocabulary_source()
    return None if source == "bytes" else source
