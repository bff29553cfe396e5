"""Hugging Face export: every artifact loads in transformers and gives the JAX model's logits.

The unit tests build tiny coprocessors directly (random weights, perturbed so the coprocessor differs
from the decoder); the end-to-end test trains the smoke config two steps through `persona_jax.main`
and exports the workdir through `persona_jax.export.export`, checking that the trained state (not the
initial one) came out.
"""

import importlib.util
import json
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from persona_jax import export as export_lib
from persona_jax import nn as pnn
from persona_jax import sampling
from persona_jax.coprocessor import CacheCoprocessor
from persona_jax.coprocessor.job import LOADER_FILE, Coprocessor
from persona_jax.errors import UserError

PROMPTS = np.array([[3, 17, 42, 99, 7, 150, 23, 64, 5, 11], [200, 4, 9, 31, 77, 8, 120, 60, 2, 19]])


def _perturb(model: CacheCoprocessor, scale: float = 0.05, seed: int = 1):
  """Adds noise to everything the variant trains (as training would move it)."""
  state = nnx.state(model, model.trainable_filter())
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))


def _jax_augmented_logits(model: CacheCoprocessor, prompts: np.ndarray) -> np.ndarray:
  heads = jnp.asarray(prompts[:, :-1])
  state = sampling.prefill(model.decoder, heads, jnp.ones(heads.shape, bool), max_len=64)
  logits = model.augment_cache(state.cache, state.key_valid, state.next_positions,
                               jnp.asarray(prompts[:, -1]))[-1]
  return np.asarray(logits)


def _jax_logits(decoder, prompts: np.ndarray) -> np.ndarray:
  return np.asarray(decoder(jnp.asarray(prompts)).logits)


def _torch_logits(directory, prompts: np.ndarray) -> np.ndarray:
  model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.as_tensor(prompts)).logits.numpy()


def _load_loader(output_dir):
  """Imports the coprocessor_loader.py the export wrote (as a user would, from that directory)."""
  path = output_dir / LOADER_FILE
  spec = importlib.util.spec_from_file_location(f"exported_loader_{abs(hash(str(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _export_coprocessor(model: CacheCoprocessor, output_dir):
  export_lib.export_decoder(model.decoder, output_dir / "decoder")
  if model.coprocessor is not None:
    export_lib.export_decoder(model.coprocessor, output_dir / "coprocessor")
  Coprocessor().export_artifacts(model, output_dir)


def _check_loader(model: CacheCoprocessor, output_dir):
  augmenter = _load_loader(output_dir).load(output_dir)
  torch_logits = augmenter.augmented_logits(torch.as_tensor(PROMPTS)).numpy()
  jax_logits = _jax_augmented_logits(model, PROMPTS)
  np.testing.assert_allclose(torch_logits, jax_logits, atol=2e-4, rtol=2e-4)
  # The augmentation changes the prediction (else the comparison above proves little).
  plain = _jax_logits(model.decoder, PROMPTS)[:, -1]
  assert np.abs(plain - jax_logits).max() > 1e-2
  return augmenter


@pytest.mark.parametrize("variant,family", [("full", "tiny_gemma"), ("lora", "tiny_llama")])
def test_coprocessor_loader_matches_augment_cache(tmp_path, variant, family):
  decoder = pnn.build_decoder(pnn.get_config(family, vocab_size=256), seed=0)
  model = CacheCoprocessor(decoder, num_latents=3, variant=variant, lora_rank=4, seed=0)
  _perturb(model)
  _export_coprocessor(model, tmp_path)
  _check_loader(model, tmp_path)
  # The exported coprocessor is the JAX coprocessor (LoRA merged for "lora") as a plain transformers model.
  np.testing.assert_allclose(_torch_logits(tmp_path / "coprocessor", PROMPTS),
                             _jax_logits(model.coprocessor, PROMPTS), atol=2e-4, rtol=2e-4)
  settings = json.loads((tmp_path / "coprocessor.json").read_text())
  assert settings["variant"] == variant and settings["num_latents"] == 3


def test_pause_variant_exports_soft_tokens_only(tmp_path):
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=256), seed=0)
  model = CacheCoprocessor(decoder, num_latents=2, variant="pause", seed=0)
  _perturb(model)
  _export_coprocessor(model, tmp_path)
  assert not (tmp_path / "coprocessor").exists()
  augmenter = _check_loader(model, tmp_path)
  tokens = augmenter.generate(torch.as_tensor(PROMPTS), max_new_tokens=3)
  assert tokens.shape == (2, 3)


def test_peft_adapters_load_on_the_exported_base(tmp_path):
  from persona_jax.hf.peft import peft_model, save_peft_adapters

  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=256), seed=0)
  base_logits = _jax_logits(decoder, PROMPTS)
  pnn.inject_lora(decoder, layers=[1], projections=("q_proj", "v_proj"), rank=4, name="memory_0")
  pnn.inject_lora(decoder, layers=[0, 1], projections=("down_proj",), rank=2, name="memory_1", seed=1)
  state = nnx.state(decoder, nnx.LoRAParam)
  nnx.update(decoder, jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), state))
  workdir, output_dir = tmp_path / "run", tmp_path / "export"
  save_peft_adapters(decoder, workdir / "peft" / "user_a")  # as MiLP writes them
  assert export_lib.export_decoder(decoder, output_dir / "decoder", remove_adapters=True) == 4
  assert set(export_lib.copy_peft_adapters(workdir, output_dir)) == {"peft/user_a"}

  torch_base = AutoModelForCausalLM.from_pretrained(output_dir / "decoder", dtype=torch.float32).eval()
  with torch.no_grad():  # the exported base is the decoder without its adapters ...
    np.testing.assert_allclose(torch_base(torch.as_tensor(PROMPTS)).logits.numpy(), base_logits,
                               atol=2e-4, rtol=2e-4)
    # ... and PEFT adds the two adapters back: the JAX decoder's logits with its memories.
    with_memory = peft_model(torch_base, output_dir / "peft" / "user_a")(torch.as_tensor(PROMPTS))
  jax_with_memory = _jax_logits(decoder, PROMPTS)
  assert np.abs(jax_with_memory - base_logits).max() > 1e-2
  np.testing.assert_allclose(with_memory.logits.numpy(), jax_with_memory, atol=2e-4, rtol=2e-4)


def test_find_decoders_names_each_decoder_by_its_attribute():
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=256), seed=0)
  names = [name for name, _ in export_lib.find_decoders(CacheCoprocessor(decoder, num_latents=2))]
  assert sorted(names) == ["coprocessor", "decoder"]
  assert [name for name, _ in export_lib.find_decoders(decoder)] == ["decoder"]


def test_config_imports_of_other_packages_are_refused(tmp_path):
  (tmp_path / "config.gin").write_text("import this\nrun.method = 'coprocessor'\n")
  with pytest.raises(UserError, match=r"imports \['this'\].*only when"):
    export_lib.read_config(tmp_path / "config.gin")
  (tmp_path / "config.gin").write_text("import persona_jax.train.jobs\nrun.method = 'coprocessor'\n")
  assert "run.method" in export_lib.read_config(tmp_path / "config.gin")


def _fake_run(path):
  path.mkdir(parents=True)
  (path / "config.gin").write_text("run.method = 'coprocessor'\n")
  (path / "checkpoints").mkdir()
  return path


def test_export_never_touches_a_run_or_anything_but_a_previous_export(tmp_path):
  run = _fake_run(tmp_path / "runs" / "a")
  sibling = _fake_run(tmp_path / "runs" / "b")
  for target in (run, run / "export", tmp_path / "runs", tmp_path):
    with pytest.raises(UserError, match="workdir"):
      export_lib.export(str(run), str(target), overwrite=True)
  with pytest.raises(UserError, match="another run's workdir"):
    export_lib.export(str(run), str(sibling / "export"), overwrite=True)
  unrelated = tmp_path / "papers"
  unrelated.mkdir()
  (unrelated / "draft.tex").write_text("mine")
  with pytest.raises(UserError, match="not a previous export.*never deletes"):
    export_lib.export(str(run), str(unrelated), overwrite=True)
  assert (unrelated / "draft.tex").read_text() == "mine"
  assert (run / "config.gin").is_file() and (sibling / "checkpoints").is_dir()


def test_export_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.gin"):
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "out"))
  run = _fake_run(tmp_path / "run")
  previous = tmp_path / "out" / "export_manifest.json"
  previous.parent.mkdir()
  previous.write_text("{}")
  with pytest.raises(UserError, match="--overwrite"):
    export_lib.export(str(run), str(tmp_path / "out"))
  with pytest.raises(UserError, match="no checkpoint"):
    export_lib.export(str(run), str(tmp_path / "out"), overwrite=True)
  assert previous.read_text() == "{}"  # a failed export leaves the previous one in place


@pytest.mark.slow
def test_export_trained_smoke_job_round_trips(tmp_path, shared_dir):
  from persona_jax import main as main_lib

  workdir, output_dir = tmp_path / "run", tmp_path / "export"
  bindings = ["coprocessor.job.variant = 'lora'", "coprocessor.job.lora_rank = 4",
              "coprocessor.job.sequence_length = 32", "coprocessor.job.batch_size = 2",
              "coprocessor.job.num_eval_batches = 1", "TrainConfig.num_steps = 2",
              "TrainConfig.checkpoint_every = 2", "TrainConfig.learning_rate = 0.05",
              "TrainConfig.async_checkpointing = False"]
  try:
    main_lib.run_main(["gin/coprocessor_smoke.gin"], bindings, str(workdir))
    manifest = export_lib.export(str(workdir), str(output_dir))
    initial = _rebuild_untrained(workdir)  # the same job before training (no restore)
  finally:
    gin.clear_config()
  assert manifest["method"] == "coprocessor" and manifest["step"] == 2
  assert {"decoder", "coprocessor", "soft_tokens.safetensors", "coprocessor_loader.py"} <= set(
      manifest["artifacts"])
  assert "LoRA adapters merged" in manifest["artifacts"]["coprocessor"]

  augmenter = _load_loader(output_dir).load(output_dir)
  exported_soft = augmenter.soft_tokens.numpy()
  # The trained state was exported: two steps at lr 0.05 moved the soft tokens and the LoRA.
  assert np.abs(exported_soft - np.asarray(initial.soft_tokens[...])).max() > 1e-3
  coprocessor_logits = _torch_logits(output_dir / "coprocessor", PROMPTS)
  assert np.abs(coprocessor_logits - _jax_logits(initial.coprocessor, PROMPTS)).max() > 1e-3

  # Rebuild the trained JAX model from the checkpoint and compare everything with transformers.
  trained = _restored(workdir)
  np.testing.assert_allclose(exported_soft, np.asarray(trained.soft_tokens[...]), atol=0)
  np.testing.assert_allclose(_torch_logits(output_dir / "decoder", PROMPTS),
                             _jax_logits(trained.decoder, PROMPTS), atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(coprocessor_logits, _jax_logits(trained.coprocessor, PROMPTS),
                             atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(augmenter.augmented_logits(torch.as_tensor(PROMPTS)).numpy(),
                             _jax_augmented_logits(trained, PROMPTS), atol=2e-4, rtol=2e-4)


def _method(workdir):
  from persona_jax.train import jobs
  from persona_jax.train.method import get_method

  gin.clear_config()
  jobs.discover_methods()
  gin.parse_config((workdir / export_lib.CONFIG_FILE).read_text())
  with gin.unlock_config():
    method = get_method(gin.query_parameter("run.method"))()
  method.setup(str(workdir))
  return method


def _rebuild_untrained(workdir):
  return _method(workdir).model()


def _restored(workdir):
  from persona_jax.train.method import Run
  from persona_jax.train.trainer import TrainConfig

  try:
    model, _ = _method(workdir).restore(Run(workdir=str(workdir), config=TrainConfig()))
    return model
  finally:
    gin.clear_config()
