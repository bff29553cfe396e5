"""The coprocessor method: trains only what it should, beats the frozen baseline, restores exactly,
evaluates every shard of a multi-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from persona_jax.coprocessor.job import Coprocessor
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")


def _tiny_method(variant):
  method = Coprocessor(decoder=TINY, variant=variant, num_latents=2, ahead_tokens=3, num_traces=4,
                       sequence_length=32, batch_size=4, num_eval_batches=1)
  method.setup(None)
  return method


@pytest.mark.parametrize("variant", ["full", "lora", "pause"])
def test_training_changes_only_the_trainable_part(variant):
  method = _tiny_method(variant)
  config = TrainConfig(num_steps=3, learning_rate=1e-2, warmup_steps=1, checkpoint_every=0,
                       log_every=1, async_checkpointing=False)
  trainer = method.trainer(Run(workdir=None, config=config))
  model = trainer.model()
  decoder_before = jax.tree.map(np.array, nnx.state(model.decoder))
  trainable_before = jax.tree.map(np.array, nnx.state(model, trainer.trainable_filter))
  trainer.train(method.train_data())
  trained = trainer.model()
  # The frozen decoder: bitwise unchanged.
  jax.tree.map(np.testing.assert_array_equal, nnx.state(trained.decoder), decoder_before)
  # Every trainable leaf moved (LoRA's `b` starts at 0 and its `a` gets gradient once `b` != 0).
  trainable_after = nnx.state(trained, trainer.trainable_filter)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), trainable_after,
                       trainable_before)
  assert all(jax.tree.leaves(moved)), moved
  # The optimizer holds exactly the trainable parameters.
  sizes = lambda tree: sorted(x.size for x in jax.tree.leaves(tree))
  assert sizes(trainer.state.params) == sizes(trainable_before)


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
  stdout = _run_main("gin/coprocessor_smoke.gin", workdir, "TrainConfig.eval_every=30")
  assert "| position | baseline ppl | augmented ppl | relative change |" in stdout
  assert "eval at step 30: " in stdout  # TrainConfig.eval_every honoured
  with open(workdir / "eval_table.json") as f:
    table = json.load(f)
  # Held-out: the augmented cache predicts the token after the augmentation point better.
  assert table["augmented_ppl"][0] < table["baseline_ppl"][0]
  assert np.mean(table["augmented_nll"]) < np.mean(table["baseline_nll"])
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["method"] == "coprocessor" and final["step"] == 60
  assert final["periodic_eval"]["eval/position1_ppl"] > 0

  # A new process restores the checkpoint (parameters only) and reproduces the table.
  _run_main("gin/coprocessor_smoke.gin", workdir, "run.job=@evaluate")
  with open(workdir / "eval_table_restored.json") as f:
    restored = json.load(f)
  np.testing.assert_allclose(restored["augmented_nll"], table["augmented_nll"], rtol=1e-5)
  np.testing.assert_allclose(restored["baseline_nll"], table["baseline_nll"], rtol=1e-6)
  assert restored["num_traces_scored"] == table["num_traces_scored"]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_eval_table_equals_one_process(tmp_path):
  """Each process scores its own rows; the table every process gets covers all of them."""
  script = str(pathlib.Path(__file__).with_name("eval_script.py"))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, script, "2", str(i), str(port), str(tmp_path / f"p{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  single = subprocess.run([sys.executable, script, "1", "0", "0", str(tmp_path / "single.json")],
                          env=env, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
  reference = json.loads((tmp_path / "single.json").read_text())
  for i in range(2):
    table = json.loads((tmp_path / f"p{i}.json").read_text())
    assert table["num_traces_scored"] == reference["num_traces_scored"]
    for key in ("augmented_nll", "baseline_nll"):
      np.testing.assert_allclose(table[key], reference[key], rtol=1e-5)
