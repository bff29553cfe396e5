"""Metrics out: TensorBoard event files and a console progress line."""

from __future__ import annotations

import datetime
import time


class MetricsWriter:
  """Scalars to TensorBoard event files under `logdir` (no-op when `logdir` is None, e.g. on
  non-chief processes)."""

  def __init__(self, logdir: str | None):
    self._writer = None
    if logdir is not None:
      from tensorboardX import SummaryWriter  # heavy import, only where it is used
      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(name if "/" in name else f"train/{name}", float(value), global_step=step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


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

  def line(self, step: int, loss: float) -> str:
    text = f"step {step}/{self.num_steps} | loss {loss:.4f}"
    elapsed = time.time() - self._start_time if self._start_time else 0.0
    done = step - self._start_step
    if elapsed > 0 and done > 0:
      steps_per_second = done / elapsed
      eta = datetime.timedelta(seconds=round((self.num_steps - step) / steps_per_second))
      text += (f" | {steps_per_second:.2f} steps/s | {self._tokens / elapsed:,.0f} tokens/s"
               f" | ETA {eta}")
    return text
