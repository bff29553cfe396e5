"""Trains the tiny model with checkpoints in WORKDIR; resumes automatically if WORKDIR has one.

Usage: resume_script.py WORKDIR NUM_STEPS SLEEP_PER_BATCH RECORD_JSONL PARAMS_NPZ
Appends one JSON line per step ({"step", "batch", "loss"}) to RECORD_JSONL as it goes (flushed, so a
killed run leaves what it saw), and writes the final trainable parameters to PARAMS_NPZ when done.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from persona_jax.train import TrainConfig, Trainer, lm_loss  # noqa: E402
from persona_jax.train.checkpointing import flatten  # noqa: E402
from tiny import CountingIterator, batch_hash, tiny_model  # noqa: E402

workdir, num_steps, sleep, record_path, params_path = sys.argv[1:6]
config = TrainConfig(num_steps=int(num_steps), learning_rate=1e-2, warmup_steps=2, checkpoint_every=2,
                     keep_checkpoints=2, log_every=1, seed=3)
trainer = Trainer(tiny_model(), lm_loss, config, workdir=workdir,
                  checkpoint_metadata={"base": {"preset": "tiny_llama", "seed": 0}})
record = open(record_path, "a")


def on_step(step, metrics, batch):
  record.write(json.dumps({"step": step, "batch": batch_hash(batch), "loss": metrics["loss"]}) + "\n")
  record.flush()


result = trainer.train(CountingIterator(batch_size=4, sleep=float(sleep)), step_callback=on_step)
print(json.dumps({"final_step": result.step, "preempted": result.preempted}), flush=True)
if not result.preempted:
  np.savez(params_path, **{k: np.asarray(v) for k, v in flatten(jax.device_get(trainer.state.params)).items()})
