"""Trains the tiny model a few steps, as one of N processes (jax.distributed on localhost) or alone.

Usage: distributed_script.py NUM_PROCESSES PROCESS_ID PORT OUT_JSON
With NUM_PROCESSES > 1 the processes meet through `maybe_initialize_distributed()` (the
PERSONA_JAX_* variables) and use JAX's CPU collectives. Writes the per-step losses of two data modes:
every process reading the full global batch, and each process reading only its own rows.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
num_processes, process_id, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if num_processes > 1:
  os.environ.update(PERSONA_JAX_COORDINATOR=f"127.0.0.1:{port}",
                    PERSONA_JAX_NUM_PROCESSES=str(num_processes), PERSONA_JAX_PROCESS_ID=str(process_id))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from persona_jax.train import TrainConfig, Trainer, lm_loss, maybe_initialize_distributed  # noqa: E402
from tiny import CountingIterator, tiny_model  # noqa: E402

initialized = maybe_initialize_distributed()
assert initialized == (num_processes > 1)
assert jax.process_count() == num_processes and jax.device_count() == num_processes, jax.devices()

NUM_STEPS, GLOBAL_BATCH = 3, 4
config = TrainConfig(num_steps=NUM_STEPS, learning_rate=1e-2, warmup_steps=1, log_every=100)


class ProcessRows:
  """This process's contiguous block of rows of each global batch."""

  def __init__(self):
    self.source = CountingIterator(batch_size=GLOBAL_BATCH)

  def __next__(self):
    rows = GLOBAL_BATCH // jax.process_count()
    start = jax.process_index() * rows
    return {k: v[start:start + rows] for k, v in next(self.source).items()}


results = {}
for mode, data, local in (("global", CountingIterator(batch_size=GLOBAL_BATCH), False),
                          ("process_local", ProcessRows(), True)):
  trainer = Trainer(tiny_model(), lm_loss, config, process_local_batches=local)
  result = trainer.train(data)
  results[mode] = [h["loss"] for h in result.history]
with open(out_path, "w") as f:
  json.dump({"process_index": jax.process_index(), "losses": results}, f)
