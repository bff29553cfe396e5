"""The cache coprocessor's method (`run.method = 'coprocessor'`, see gin/coprocessor.gin).

Loss: for each row, `num_traces` augmentation points are drawn at random (a fresh draw every step);
the coprocessor augments the frozen decoder's cache at each point and the decoder predicts the
`ahead_tokens` tokens after it; the loss is their mean NLL. The frozen decoder never changes; only
what the variant names (see `CacheCoprocessor`) is in the optimizer and the checkpoints.

Evaluation: the held-out table (baseline vs augmented perplexity at each position after the
augmentation point), written as `<workdir>/eval_table.{md,json}`; with `eval_sets`, one block per
held-out set (in-domain and out-of-domain), optional paired CIs and the "another row's cache" control.
`coprocessor_gsm8k` (below) evaluates a trained coprocessor on GSM8K. Export adds the soft tokens, the
settings and a `transformers` loader (`hf_loader.py`, copied as `coprocessor_loader.py`).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Callable, Sequence

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
from persona_jax.train.method import Evaluation, Method, Run, register_method

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
    data_dir: the shared data folder (../shared/data) for the room's named data sets
      (`tasks.NAMED_DATASETS`: 'general_mixture', 'persona_chat', 'amazon_reviews', 'wikitext2',
      'gsm8k_train_solutions'; `dataset` may name one).
    eval_sets: held-out sets, one table block each: names in `tasks.EVAL_SPLITS` or
      'name:split' (None: the one set `eval_dataset`:`eval_split`, today's table).
    confidence_intervals: add paired-bootstrap 95% CIs of the relative change per position and
      over all positions (the numbers of the table do not change; a CI column is added).
    other_row_control: add a block per eval set where every row's augmentation uses the latents
      computed from another row's cache (`eval.other_row_sources`): the gain must vanish if it
      depends on the input.
  """

  def __init__(self, *, decoder: DecoderSource | None = None, variant: str = "full",
               num_latents: int = 8, ahead_tokens: int = 8, num_traces: int = 8,
               lora_rank: int = 16, dataset: Any = "tiny_shakespeare", eval_dataset: Any = None,
               eval_split: str = "validation", tfds_data_dir: str | None = None,
               sequence_length: int = 128, batch_size: int = 4, eval_batch_size: int | None = None,
               num_eval_batches: int | None = 8, eval_traces: int | None = None, seed: int = 0,
               data_dir: str = tasks.DEFAULT_DATA_DIR, eval_sets: Sequence[str] | None = None,
               confidence_intervals: bool = False, other_row_control: bool = False):
    self.source = decoder or DecoderSource()
    self.variant, self.num_latents, self.ahead_tokens = variant, num_latents, ahead_tokens
    self.num_traces, self.lora_rank = num_traces, lora_rank
    self.dataset, self.eval_dataset, self.eval_split = dataset, eval_dataset, eval_split
    self.tfds_data_dir = tfds_data_dir
    self.sequence_length, self.batch_size = sequence_length, batch_size
    self.eval_batch_size = eval_batch_size or batch_size
    self.num_eval_batches, self.eval_traces, self.seed = num_eval_batches, eval_traces or num_traces, seed
    self.data_dir, self.eval_sets = data_dir, None if eval_sets is None else list(eval_sets)
    self.confidence_intervals, self.other_row_control = confidence_intervals, other_row_control
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
    resolve = lambda name: tasks.resolve_dataset(name, self.vocabulary, data_dir=self.data_dir,
                                                 tfds_data_dir=self.tfds_data_dir)
    self.task = resolve(self.dataset)
    self.eval_task = resolve(self.eval_dataset) if self.eval_dataset else self.task
    self.eval_blocks = None  # [(label, task, split)] when eval_sets is given
    if self.eval_sets is not None:
      self.eval_blocks = []
      for entry in self.eval_sets:
        name, _, split = str(entry).partition(":")
        split = split or tasks.EVAL_SPLITS.get(name)
        if split is None:
          raise UserError(f"coprocessor.job.eval_sets: {entry!r} names no split; write "
                          f"'name:split' or one of {sorted(tasks.EVAL_SPLITS)}.")
        self.eval_blocks.append((f"{name}:{split}", resolve(name), split))

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
    if self.eval_blocks is not None or self.confidence_intervals or self.other_row_control:
      return self._evaluate_blocks(model, step)
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

  def _evaluate_blocks(self, model: CacheCoprocessor, step: int) -> Evaluation:
    """One table block per eval set (and per control), each with CIs when asked."""
    blocks = self.eval_blocks or [(f"{self.eval_task}:{self.eval_split}", self.eval_task,
                                   self.eval_split)]
    runs = [(label, task, split, False) for label, task, split in blocks]
    if self.other_row_control:
      runs += [(f"{label}, control: another row's cache", task, split, True)
               for label, task, split in blocks]
    tables, results, metrics = [], {}, {}
    for label, task, split, control in runs:
      batches = tasks.eval_iterator(task, split, sequence_length=self.sequence_length,
                                    batch_size=self.eval_batch_size, seed=self.seed)
      result = eval_lib.evaluate_perplexity(
          model, batches, num_traces=self.eval_traces, ahead_tokens=self.ahead_tokens,
          max_batches=self.num_eval_batches, per_trace=self.confidence_intervals,
          other_row_latents=control)
      if self.confidence_intervals:
        result = eval_lib.add_paired_cis(result)
        result.pop("per_trace")
      tables.append(eval_lib.format_table(
          result, f"### {label}\n\nHeld-out perplexity after the augmentation point "
          f"({self.variant}, N_L={self.num_latents}, N_A={self.ahead_tokens}, step {step})"))
      results[label] = result
      prefix = "" if not metrics else f"{label}/"
      metrics.update({f"{prefix}position1_ppl": result["augmented_ppl"][0],
                      f"{prefix}baseline_position1_ppl": result["baseline_ppl"][0],
                      f"{prefix}mean_augmented_nll": float(np.mean(result["augmented_nll"])),
                      f"{prefix}mean_baseline_nll": float(np.mean(result["baseline_nll"]))})
    return Evaluation(metrics=metrics, tables={"eval_table": "\n\n".join(tables)},
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


@register_method("coprocessor_gsm8k")
@gin.configurable("job", module="coprocessor_gsm8k")
class CoprocessorGsm8k(Method):
  """GSM8K with a trained coprocessor, as the paper evaluates downstream tasks: the cache is augmented
  once, at the end of the prompt (`gin/coprocessor_gsm8k.gin`, `run.job = @evaluate`).

  For each shots setting (k exemplars drawn once from the train split; 0 = the question alone):
    (a) the per-token NLL of every gold worked solution (`score_problems` test problems, default all
        1,319) after the prompt, frozen decoder vs augmented cache (both read the same prompt cache);
    (b) greedy answers with and without augmentation on the fixed subset of test problems 0, g, 2g,
        ... (`generation_every` = g = 6: 220 problems), exact match of the final number (strict:
        after `####`; lenient: the last number of the answer).
  Per-problem rows go to `<workdir>/gsm8k_rows.jsonl` as they are scored; a rerun skips what is
  there, so a long evaluation resumes. The table is `<workdir>/gsm8k_table_restored.md`.

  Args:
    coprocessor: the trained coprocessor's settings (default `coprocessor.job` from gin: include the
      gin file it was trained with).
    coprocessor_workdir: where its checkpoint is (None: this run's workdir).
    data_dir: the shared data folder (`reasoning/gsm8k/` inside).
    shots: the shots settings, e.g. (0, 8).
    exemplar_seed: the draw of the exemplars.
    score_problems: the first N test problems to score (None: all).
    generation_every: the generation subset's stride (0: no generation).
    max_new_tokens / batch_size / generation_batch_size: decoding length and rows per call.
  """

  def __init__(self, *, coprocessor: Coprocessor | None = None, coprocessor_workdir: str | None = None,
               data_dir: str = tasks.DEFAULT_DATA_DIR, shots: Sequence[int] = (0, 8),
               exemplar_seed: int = 1234, score_problems: int | None = None,
               generation_every: int = 6, max_new_tokens: int = 256, batch_size: int = 8,
               generation_batch_size: int | None = None):
    self.coprocessor = coprocessor or Coprocessor()
    self.coprocessor_workdir, self.data_dir = coprocessor_workdir, data_dir
    self.shots, self.exemplar_seed = [int(k) for k in shots], exemplar_seed
    self.score_problems, self.generation_every = score_problems, generation_every
    self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
    self.generation_batch_size = generation_batch_size or batch_size

  def setup(self, workdir):
    self.workdir = workdir
    self.coprocessor.setup(workdir)
    self.vocabulary = self.coprocessor.vocabulary
    self.train_problems = tasks.read_gsm8k(self.data_dir, "train")
    self.test_problems = tasks.read_gsm8k(self.data_dir, "test")
    if self.score_problems is not None:
      self.test_problems = self.test_problems[:self.score_problems]

  def task_specific(self) -> bool:
    return self.coprocessor.dataset == tasks.GSM8K_TRAIN_SOLUTIONS

  def description(self) -> str:
    label = ("TASK-SPECIFIC: coprocessor trained on GSM8K train solutions"
             if self.task_specific() else f"coprocessor trained on {self.coprocessor.dataset}")
    return (f"GSM8K, {label}; {self.coprocessor.variant}, N_L={self.coprocessor.num_latents}, "
            f"shots {self.shots}")

  def model(self):
    return self.coprocessor.model()

  def trainable_filter(self):
    return self.coprocessor.trainable_filter()

  def fit(self, run: Run):
    raise UserError("coprocessor_gsm8k evaluates a trained coprocessor: use run.job = @evaluate "
                    "(gin/coprocessor_gsm8k.gin), and train it first with gin/coprocessor.gin.")

  def restore(self, run: Run):
    from persona_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

    source = self.coprocessor_workdir or run.workdir
    model = self.model()
    step = checkpointing.restore_trainable(source, model, self.trainable_filter(), run.step)
    if step is None:
      raise UserError(f"coprocessor_gsm8k: no checkpoint in {source}/checkpoints; train the "
                      "coprocessor first or bind coprocessor_gsm8k.job.coprocessor_workdir.")
    self.restored_from = (source, step)
    return model, step

  # Rows -----------------------------------------------------------------------------------------
  def _settings(self, step) -> dict:
    return {"kind": "settings", "coprocessor_workdir": str(getattr(self, "restored_from", [None])[0]),
            "step": step, "variant": self.coprocessor.variant,
            "num_latents": self.coprocessor.num_latents, "dataset": str(self.coprocessor.dataset),
            "exemplar_seed": self.exemplar_seed, "generation_every": self.generation_every,
            "max_new_tokens": self.max_new_tokens}

  def _load_rows(self, path: pathlib.Path | None, settings: dict) -> list[dict]:
    if path is None or not path.exists():
      return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and rows[0].get("kind") == "settings" and rows[0] != settings:
      raise UserError(f"{path} was written with other settings ({rows[0]}) than now ({settings}): "
                      "use another workdir (or delete the file to start over).")
    return rows

  def evaluate(self, model: CacheCoprocessor, step: int) -> Evaluation:
    settings = self._settings(step)
    path = pathlib.Path(self.workdir) / "gsm8k_rows.jsonl" if self.workdir else None
    rows = self._load_rows(path, settings)
    chief = jax.process_index() == 0
    if path is not None and chief:
      path.parent.mkdir(parents=True, exist_ok=True)
      if not rows:
        path.write_text(json.dumps(settings) + "\n")
    done = {(r.get("kind"), r.get("shots"), r.get("index")) for r in rows}

    def append(new_rows):
      rows.extend(new_rows)
      if path is not None and chief:
        with open(path, "a") as file:
          file.write("".join(json.dumps(r) + "\n" for r in new_rows))

    encode = lambda text: [int(t) for t in self.vocabulary.encode(text)]
    for shots in self.shots:
      exemplars = tasks.gsm8k_exemplars(self.train_problems, shots, self.exemplar_seed)
      prompts = [encode(tasks.gsm8k_prompt(p.question, exemplars)) for p in self.test_problems]
      continuations = [encode(tasks.gsm8k_continuation(p)) for p in self.test_problems]
      # One width per setting (from all problems), so every batch and every resume compiles once.
      width = eval_lib._bucket(max(len(p) for p in prompts), 64)  # pylint: disable=protected-access
      length = eval_lib._bucket(max(len(c) for c in continuations), 64)  # pylint: disable=protected-access
      todo = [i for i in range(len(prompts)) if ("nll", shots, i) not in done]
      pending = []
      for position, base, aug in eval_lib.score_continuations(
          model, [prompts[i] for i in todo], [continuations[i] for i in todo],
          batch_size=self.batch_size, prompt_width=width, continuation_width=length):
        index = todo[position]
        pending.append({"kind": "nll", "shots": shots, "index": index,
                        "baseline_nll": [round(float(x), 6) for x in base],
                        "augmented_nll": [round(float(x), 6) for x in aug]})
        if len(pending) == self.batch_size:
          append(pending)
          pending = []
      append(pending)
      if self.generation_every:
        subset = tasks.gsm8k_generation_subset(len(self.test_problems), self.generation_every)
        todo = [i for i in subset if ("generation", shots, i) not in done]
        for start in range(0, len(todo), self.generation_batch_size):
          chunk = todo[start:start + self.generation_batch_size]
          texts = {}
          for augment in (False, True):
            texts[augment] = dict(eval_lib.generate_texts(
                model, [prompts[i] for i in chunk], self.vocabulary.decode, augment=augment,
                max_new_tokens=self.max_new_tokens, batch_size=self.generation_batch_size,
                prompt_width=width))
          new_rows = []
          for position, index in enumerate(chunk):
            gold = self.test_problems[index].final_answer
            row = {"kind": "generation", "shots": shots, "index": index, "gold": gold}
            for augment, name in ((False, "baseline"), (True, "augmented")):
              text = eval_lib.cut_generation(texts[augment][position])
              strict, lenient = eval_lib.extract_final_answer(text), eval_lib.extract_last_number(text)
              row.update({f"{name}_text": text, f"{name}_strict": strict,
                          f"{name}_lenient": lenient, f"{name}_strict_correct": strict == gold,
                          f"{name}_lenient_correct": lenient == gold})
            new_rows.append(row)
          append(new_rows)
    rows = [r for r in rows if r.get("kind") in ("nll", "generation") and r["shots"] in self.shots]
    summary = eval_lib.gsm8k_summary(rows)
    table = eval_lib.format_gsm8k_table(summary, f"GSM8K test ({self.description()}, step {step})")
    metrics = {}
    for setting, block in summary.items():
      if "nll" in block:
        metrics[f"{setting}/solution_relative_ppl_change"] = (
            block["nll"]["relative_change_per_token"]["value"])
      if "generation" in block:
        metrics[f"{setting}/augmented_accuracy"] = block["generation"]["strict"]["augmented"]["value"]
        metrics[f"{setting}/baseline_accuracy"] = block["generation"]["strict"]["baseline"]["value"]
    return Evaluation(metrics=metrics, tables={"gsm8k_table": table}, results={"gsm8k": summary})
