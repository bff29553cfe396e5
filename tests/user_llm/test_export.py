"""User-LLM export: the torch loader (`user_llm/hf_loader.py`, written as `user_llm_loader.py`) gives
the JAX model's logits.

Unit tests build User-LLMs directly (random weights, every trained part perturbed so the gates are
open and the user changes the output) for both integrations and fusions, a LoRA strategy and a Gemma
decoder (embedding scale); the end-to-end test trains the smoke config a few steps through
`persona_jax.main`, exports the workdir with `persona_jax.export` and compares on a real eval batch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from persona_jax import export as export_lib
from persona_jax import nn as pnn
from persona_jax.user_llm import job as job_lib
from persona_jax.user_llm import model as model_lib

GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"
ATOL = 1e-4


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _load_loader(output_dir):
  path = output_dir / job_lib.LOADER_FILE
  spec = importlib.util.spec_from_file_location(f"user_llm_loader_{abs(hash(str(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module.load(output_dir)


def _perturb(model, scale=0.3, seed=1):
  """Moves every trainable parameter (the gates start at 0: open them), as training would."""
  state = nnx.state(model, model.trainable_filter())
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))


def _features(num_items, num_categories, batch=3, length=6, seed=0):
  """Histories with padding (one user has none, one is full), as tasks.history_features builds them."""
  rng = np.random.default_rng(seed)
  lengths = [0, length, 3][:batch]
  mask = np.zeros((batch, length), bool)
  for row, n in enumerate(lengths):
    mask[row, :n] = True
  return {"item_ids": np.where(mask, rng.integers(1, num_items, (batch, length)), 0).astype(np.int32),
          "ratings": np.where(mask, rng.integers(1, 11, (batch, length)), 0).astype(np.int32),
          "genre_bits": np.where(mask, rng.integers(0, 2 ** num_categories, (batch, length)),
                                 0).astype(np.int32),
          "history_mask": mask}


def _prompts(batch=3, length=7, seed=1):
  """LEFT-padded prompts (rows of 7, 5 and 2 real tokens)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, length), bool)
  for row, n in enumerate([7, 5, 2][:batch]):
    mask[row, length - n:] = True
  return np.where(mask, rng.integers(1, 250, (batch, length)), 0).astype(np.int32), mask


def _torch(tree):
  return {k: torch.as_tensor(np.asarray(v)) for k, v in tree.items()}


def _compare(model, output_dir, features, tokens, mask):
  runner = _load_loader(output_dir)
  jax_logits = np.asarray(model({k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(tokens),
                                jnp.asarray(mask)))
  torch_logits = runner.logits(_torch(features), torch.as_tensor(tokens), torch.as_tensor(mask)).numpy()
  assert torch_logits.shape == jax_logits.shape
  np.testing.assert_allclose(torch_logits[mask], jax_logits[mask], atol=ATOL, rtol=ATOL)
  # The user matters (else the comparison above would say little about the user-side weights).
  other = {k: np.roll(v, 1, axis=0) for k, v in features.items()}
  shifted = np.asarray(model({k: jnp.asarray(v) for k, v in other.items()}, jnp.asarray(tokens),
                             jnp.asarray(mask)))
  assert np.abs(shifted - jax_logits)[mask].max() > 1e-3
  return runner


@pytest.mark.parametrize("integration,fusion,strategy,family", [
    ("cross_attention", "early", "enc", "tiny_llama"),
    ("cross_attention", "late", "lora", "tiny_gemma"),
    ("soft_prompt", "early", "full", "tiny_gemma"),
    ("soft_prompt", "late", "proj", "tiny_llama"),
])
def test_torch_loader_logits_equal_the_jax_user_llm(tmp_path, integration, fusion, strategy, family):
  decoder = pnn.build_decoder(pnn.get_config(family, vocab_size=256), seed=0)
  config = model_lib.UserEncoderConfig(num_items=40, num_categories=6, embed_dim=16, num_layers=2,
                                       num_heads=2, mlp_dim=32, max_length=8, fusion=fusion)
  model = model_lib.UserLLM(decoder, config, integration=integration, strategy=strategy,
                            num_latents=3, resampler_layers=2, lora_rank=4, seed=0)
  _perturb(model)
  artifacts = job_lib.export_user_llm(model, tmp_path)
  assert {"decoder", "user_encoder", "user_llm.safetensors", job_lib.LOADER_FILE} <= set(artifacts)
  assert ("LoRA adapters merged" in artifacts["decoder"]) == (strategy == "lora")
  tokens, mask = _prompts()
  runner = _compare(model, tmp_path, _features(40, 6), tokens, mask)

  # Greedy generation from the loader equals greedy decoding with full recomputation by the JAX
  # model (the prompt grows by the argmax token each step; the left padding stays).
  features = _features(40, 6)
  generated = runner.generate(_torch(features), torch.as_tensor(tokens), torch.as_tensor(mask),
                              max_new_tokens=4).numpy()
  reference, grow_tokens, grow_mask = [], tokens, mask
  jax_features = {k: jnp.asarray(v) for k, v in features.items()}
  for _ in range(4):
    logits = np.asarray(model(jax_features, jnp.asarray(grow_tokens), jnp.asarray(grow_mask)))[:, -1]
    next_token = logits.argmax(-1)
    reference.append(next_token)
    grow_tokens = np.concatenate([grow_tokens, next_token[:, None].astype(np.int32)], axis=1)
    grow_mask = np.concatenate([grow_mask, np.ones((len(next_token), 1), bool)], axis=1)
  np.testing.assert_array_equal(generated, np.stack(reference, axis=1))


def test_text_prompt_baseline_exports_as_a_plain_decoder():
  method = job_lib.UserLLMMethod.__new__(job_lib.UserLLMMethod)
  method.method = "text_prompt"
  assert method.export_artifacts(None, "/nonexistent") == {}


@pytest.mark.slow
def test_smoke_workdir_exports_and_the_torch_loader_matches(tmp_path, shared_dir):
  from persona_jax import main as main_lib
  from persona_jax.train import jobs
  from persona_jax.train.method import Run, get_method
  from persona_jax.train.trainer import TrainConfig

  del shared_dir  # the Amazon slice lives there
  workdir, output_dir = tmp_path / "run", tmp_path / "export"
  bindings = ["TrainConfig.num_steps = 3", "TrainConfig.eval_every = 0",
              "user_llm.job.evaluate_untrained = False", "TrainConfig.learning_rate = 0.05"]
  main_lib.run_main([str(GIN / "user_llm_smoke.gin")], bindings, str(workdir))
  gin.clear_config()
  manifest = export_lib.export(str(workdir), str(output_dir))
  assert manifest["method"] == "user_llm" and manifest["step"] == 3
  assert manifest["not_exported"] == {}  # the decoder went out without its cross-attention layers
  assert {"decoder", "user_llm.safetensors", job_lib.LOADER_FILE, "README.md"} <= set(
      manifest["artifacts"])
  assert "user_llm_loader.load" in (output_dir / "README.md").read_text()

  gin.clear_config()
  jobs.discover_methods()
  gin.parse_config((workdir / "config.gin").read_text())
  with gin.unlock_config():
    method = get_method("user_llm")()
  method.setup(str(workdir))
  untrained = nnx.clone(method.model())
  model, step = method.restore(Run(workdir=str(workdir), config=TrainConfig()))
  assert step == 3
  batch = next(iter(method.eval_batches()))
  features = {k: batch[k] for k in ("item_ids", "ratings", "genre_bits", "history_mask")}
  tokens, mask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"]).astype(bool)
  _compare(model, output_dir, features, tokens, mask)
  # The trained state went out: three steps at lr 0.05 opened the gates / moved the user side.
  trained = np.asarray(model({k: jnp.asarray(v) for k, v in features.items()}, jnp.asarray(tokens),
                             jnp.asarray(mask)))
  before = np.asarray(untrained({k: jnp.asarray(v) for k, v in features.items()},
                                jnp.asarray(tokens), jnp.asarray(mask)))
  assert np.abs(trained - before)[mask].max() > 1e-3
