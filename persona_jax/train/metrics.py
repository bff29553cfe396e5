"""Metrics out: TensorBoard (and optionally Weights & Biases) through clu's `metric_writers`, and a
console progress line.

`MetricsWriter(logdir, writers=('tensorboard', 'wandb'), hparams={...})` fans every `write(step,
scalars)` out to the chosen backends (a clu `MultiWriter`):
  * 'tensorboard': event files under `logdir` (local or gs://). clu's TF `SummaryWriter` when the
    `tensorboard` package is installed (`pip install 'persona_jax[tensorboard]'`, which also gives the
    viewer), else a tensorboardX writer with the same event layout;
  * 'wandb': a Weights & Biases run (`pip install 'persona_jax[wandb]'`). Project / entity / mode come
    from wandb's own environment variables (`WANDB_PROJECT`, default 'persona_jax'; `WANDB_ENTITY`;
    `WANDB_MODE=offline` writes the run under `logdir/wandb` without a network).
Names without a '/' get the `train/` prefix (`loss` -> `train/loss`); `eval/...` names are kept.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
from clu.metric_writers import interface as clu_interface
from clu.metric_writers import multi_writer

from persona_jax.errors import UserError

WRITERS = ("tensorboard", "wandb")


def _flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts flattened with '.', values that TensorBoard's hparams plugin can show (bool, int,
  float, str; anything else as its repr; None as 'None')."""
  flat = {}
  for key, value in hparams.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flat_hparams(value, prefix=f"{name}."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = repr(value) if value is not None else "None"
  return flat


class _TensorboardXWriter(clu_interface.MetricWriter):
  """clu's writer interface over tensorboardX: used when the `tensorboard` package is not installed
  (clu's TF SummaryWriter imports it for its hparams plugin). Scalars and hparams only."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def write_scalars(self, step, scalars):
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), global_step=step)

  def write_hparams(self, hparams):
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=g-import-not-at-top
    for summary in hparams_summary(dict(hparams), {}):
      self._writer.file_writer.add_summary(summary)

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    for name, text in texts.items():
      self._writer.add_text(name, text, global_step=step)

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _tensorboard_writer(logdir: str) -> clu_interface.MetricWriter:
  try:
    import tensorboard  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    logging.info("The tensorboard package is not installed: writing events with tensorboardX.")
    return _TensorboardXWriter(logdir)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:  # TF only writes event files here: keep it off the accelerators JAX uses
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # TF's devices were initialized already (by a data pipeline)
    pass
  from clu.metric_writers.tf.summary_writer import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(logdir)


class WandbWriter(clu_interface.MetricWriter):
  """clu's writer interface over a Weights & Biases run (clu has none of its own).

  Args:
    logdir: wandb writes its local files under `logdir/wandb` (offline runs stay there).
    config: the run's hyperparameters (`wandb.config`).
    name: the run's display name (default: the logdir's last component).
  """

  def __init__(self, logdir: str | None, config: Mapping[str, Any] | None = None,
               name: str | None = None):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ImportError("TrainConfig.metrics_writers includes 'wandb' but wandb is not installed: "
                        "pip install 'persona_jax[wandb]' (or drop 'wandb' from the writers).") from error
    directory = None
    if logdir is not None and "://" not in logdir:  # wandb's own files are local
      directory = os.path.join(logdir, "wandb")
      os.makedirs(directory, exist_ok=True)
    if name is None and logdir is not None:
      name = os.path.basename(os.path.dirname(logdir.rstrip("/"))) or None
    self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "persona_jax"), dir=directory,
                           name=name, config=dict(config or {}), reinit="finish_previous")

  @property
  def run(self):
    return self._run

  def write_scalars(self, step, scalars):
    self._run.log({name: float(value) for name, value in scalars.items()}, step=step)

  def write_hparams(self, hparams):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    import wandb  # pylint: disable=g-import-not-at-top
    self._run.log({name: wandb.Html(f"<pre>{text}</pre>") for name, text in texts.items()}, step=step)

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self):
    pass

  def close(self):
    self._run.finish()


class MetricsWriter:
  """Scalars to the chosen backends under `logdir`; a no-op when `logdir` is None (e.g. on non-chief
  processes).

  Args:
    logdir: where TensorBoard events (and wandb's local files) go; local or gs://.
    writers: any of `WRITERS` ('tensorboard', 'wandb'); empty: write nothing.
    hparams: the run's hyperparameters (TrainConfig, model, data), flattened and written once
      (TensorBoard's HPARAMS tab; wandb's run config).
  """

  def __init__(self, logdir: str | None, writers: Sequence[str] = ("tensorboard",),
               hparams: Mapping[str, Any] | None = None):
    if isinstance(writers, str):
      writers = (writers,)
    unknown = [w for w in writers if w not in WRITERS]
    if unknown:
      raise UserError(f"TrainConfig.metrics_writers has unknown writer(s) {unknown}: choose from "
                       f"{list(WRITERS)}, e.g. TrainConfig.metrics_writers = ('tensorboard', 'wandb').")
    self._writer = None
    if logdir is None or not writers:
      return
    flat = _flat_hparams(hparams or {})
    backends = []
    for name in dict.fromkeys(writers):
      if name == "tensorboard":
        backends.append(_tensorboard_writer(logdir))
      elif name == "wandb":
        backends.append(WandbWriter(logdir, config=flat))
    self._writer = multi_writer.MultiWriter(backends)
    if flat:
      self._writer.write_hparams(flat)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    values = {name if "/" in name else f"train/{name}": float(value)
              for name, value in scalars.items()}
    self._writer.write_scalars(step, values)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def learning_rate_at(config, step: int) -> float:
  """The learning rate of the update that produced `step` (1 = the first update) under `config`'s
  warmup + cosine schedule (a `TrainConfig`)."""
  from persona_jax.train.optim import learning_rate_schedule  # pylint: disable=g-import-not-at-top
  schedule = learning_rate_schedule(config.learning_rate, config.num_steps, config.warmup_steps,
                                    config.final_learning_rate_fraction)
  return float(schedule(max(step - 1, 0)))  # optax counts updates from 0


class ProgressLine:
  """`step 120/1000 | loss 2.3412 | 4.10 steps/s | 16,794 tokens/s | ETA 0:03:34`.

  Rates are measured from the first step that follows compilation, so they show steady state.
  """

  def __init__(self, num_steps: int, start_step: int = 0):
    self.num_steps = num_steps
    self._start_time = None
    self._start_step = start_step
    self._tokens = 0

  def update(self, step: int, tokens: int) -> None:
    if self._start_time is None:  # the first step includes compilation: start the clock after it
      self._start_time = time.time()
      self._start_step = step
      return
    self._tokens += tokens

  def rates(self, step: int) -> dict[str, float]:
    """`{'steps_per_second', 'tokens_per_second'}` since the clock started; empty before a rate
    can be measured (the first step after compilation)."""
    elapsed = time.time() - self._start_time if self._start_time else 0.0
    done = step - self._start_step
    if elapsed <= 0 or done <= 0:
      return {}
    return {"steps_per_second": done / elapsed, "tokens_per_second": self._tokens / elapsed}

  def line(self, step: int, loss: float) -> str:
    text = f"step {step}/{self.num_steps} | loss {loss:.4f}"
    rates = self.rates(step)
    if rates:
      remaining = (self.num_steps - step) / rates["steps_per_second"]
      eta = datetime.timedelta(seconds=round(remaining)) if math.isfinite(remaining) else "?"
      text += (f" | {rates['steps_per_second']:.2f} steps/s | {rates['tokens_per_second']:,.0f} "
               f"tokens/s | ETA {eta}")
    return text
