"""The coprocessor job: trains only what it should, beats the frozen baseline, restores exactly."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax.coprocessor import train as train_lib
from persona_jax.train.trainer import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_job(workdir, variant, num_steps=3):
  return train_lib.build_job(
      str(workdir), pretrained=None, model="tiny_llama", vocabulary="bytes", variant=variant,
      num_latents=2, ahead_tokens=3, num_traces=4, sequence_length=32, batch_size=4,
      num_eval_batches=1,
      train_config=TrainConfig(num_steps=num_steps, learning_rate=1e-2, warmup_steps=1,
                               checkpoint_every=0, log_every=1, async_checkpointing=False))


@pytest.mark.parametrize("variant", ["full", "lora", "pause"])
def test_training_changes_only_the_trainable_part(tmp_path, variant):
  job = _tiny_job(tmp_path / variant, variant)
  model = job.trainer.model()
  decoder_before = jax.tree.map(np.array, nnx.state(model.decoder))
  trainable_before = jax.tree.map(np.array, nnx.state(model, job.trainer.trainable_filter))
  job.trainer.train(job.train_data)
  trained = job.trainer.model()
  # The frozen decoder: bitwise unchanged.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(trained.decoder), decoder_before)
  # Every trainable leaf moved (LoRA's `b` starts at 0 and its `a` gets gradient once `b` != 0).
  trainable_after = nnx.state(trained, job.trainer.trainable_filter)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), trainable_after,
                       trainable_before)
  assert all(jax.tree.leaves(moved)), moved
  # The optimizer holds exactly the trainable parameters.
  sizes = lambda tree: sorted(x.size for x in jax.tree.leaves(tree))
  assert sizes(job.trainer.state.params) == sizes(trainable_before)


def _run_main(gin_file, workdir, *bindings):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "persona_jax.main", f"--gin_file={gin_file}",
             f"--workdir={workdir}"] + [f"--gin_bindings={b}" for b in bindings]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.mark.slow
def test_smoke_job_beats_frozen_baseline_and_restores_in_a_new_process(tmp_path):
  workdir = tmp_path / "run"
  stdout = _run_main("gin/coprocessor_smoke.gin", workdir)
  assert "| position | baseline ppl | augmented ppl | relative change |" in stdout
  with open(workdir / "eval_table.json") as f:
    table = json.load(f)
  # Held-out: the augmented cache predicts the token after the augmentation point better.
  assert table["augmented_ppl"][0] < table["baseline_ppl"][0]
  assert np.mean(table["augmented_nll"]) < np.mean(table["baseline_nll"])
  assert os.path.isfile(workdir / "config.gin")

  # A new process restores the checkpoint and reproduces the table (no training step).
  stdout = _run_main("gin/coprocessor_smoke.gin", workdir, "run.job=@coprocessor.evaluate")
  with open(workdir / "eval_table_restored.json") as f:
    restored = json.load(f)
  np.testing.assert_allclose(restored["augmented_nll"], table["augmented_nll"], rtol=1e-5)
  np.testing.assert_allclose(restored["baseline_nll"], table["baseline_nll"], rtol=1e-6)
  assert restored["num_traces_scored"] == table["num_traces_scored"]
