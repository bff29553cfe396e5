"""Model cards (README.md) and PEFT `base_model_name_or_path` in exports.

The end-to-end test trains the coprocessor smoke config two steps, writes PEFT adapters into the
workdir as MiLP does, exports, and then follows the card: every Python snippet for the decoder and
the adapters is executed from the export directory, and what it loads must give the JAX logits. The
card's table is the run's own `eval_table.md`; its config is the run's `config.gin`.
"""

import json
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from persona_jax import export as export_lib
from persona_jax import nn as pnn
from persona_jax.hf.source import DecoderSource
from persona_jax.train.method import Method

PROMPTS = np.array([[3, 17, 42, 99, 7, 150, 23, 64], [200, 4, 9, 31, 77, 8, 120, 60]])


def test_hub_id_only_for_hub_models(tmp_path):
  assert export_lib.hub_id("google/gemma-2-2b-it") == "google/gemma-2-2b-it"
  assert export_lib.hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
  for not_hub in ("smollm2-135m-instruct", None, "/models/llama", "./org/name", "org/model.gguf",
                  "a/b/c"):
    assert export_lib.hub_id(not_hub) is None, not_hub
  local = tmp_path / "org" / "name"
  local.mkdir(parents=True)
  assert export_lib.hub_id(str(local)) is None


class _Toy(Method):
  """A toy method for the card's unit test.

  More text that the card leaves out.
  """
  name = "toy"

  def __init__(self, source):
    self.source = source

  def description(self):
    return "rank 4 on toy data"


def test_card_of_a_hub_based_run_names_the_hub_model(tmp_path):
  workdir, staging = tmp_path / "run", tmp_path / "export"
  workdir.mkdir()
  (workdir / "eval_table.md").write_text("| metric | value |\n|---|---|\n| accuracy | 0.5 |\n")
  (workdir / "notes_restored.md").write_text("restored table")
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=256), seed=0)
  export_lib.export_decoder(decoder, staging / "decoder")
  method = _Toy(DecoderSource(pretrained="google/gemma-2-2b-it"))
  base = export_lib.base_model(method, {"base": {"pretrained": "/cache/snapshots/abc"}})
  assert base["hub_id"] == "google/gemma-2-2b-it"
  card = export_lib.model_card(
      method=method, method_name="toy", base=base, step=7, config_text="run.method = 'toy'\n",
      workdir=workdir, staging=staging, artifacts={"decoder": "transformers llama model"},
      not_exported={"coprocessor": "why not"}, tokenizer=None, peft_base="decoder")
  front = card.split("---")[1]
  assert "base_model: google/gemma-2-2b-it" in front and "license: other" in front
  assert "tags: [persona_jax, toy]" in front and "library_name: transformers" in front
  assert "**toy**: A toy method for the card's unit test." in card and "More text" not in card
  assert "This run: rank 4 on toy data." in card and "at step 7" in card
  assert '"/cache/snapshots/abc"' in card  # the recorded base from the checkpoint metadata
  assert "https://huggingface.co/google/gemma-2-2b-it" in card.split("## License")[1]
  # eval_table.md first, then the others, verbatim.
  assert card.index("### eval_table.md") < card.index("### notes_restored.md")
  assert "| accuracy | 0.5 |" in card and "- `coprocessor`: why not" in card


def _code_blocks(card: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", card, flags=re.S)


@pytest.mark.slow
def test_export_card_and_peft_base_of_a_trained_smoke_run(tmp_path, monkeypatch, shared_dir):
  from peft import AutoPeftModelForCausalLM
  from persona_jax import main as main_lib
  from persona_jax.hf.peft import save_peft_adapters
  from persona_jax.train.method import Run, get_method
  from persona_jax.train.trainer import TrainConfig
  from persona_jax.train import jobs

  workdir, output_dir = tmp_path / "run", tmp_path / "export"
  bindings = ["coprocessor.job.variant = 'lora'", "coprocessor.job.lora_rank = 4",
              "coprocessor.job.sequence_length = 32", "coprocessor.job.batch_size = 2",
              "coprocessor.job.num_eval_batches = 1", "TrainConfig.num_steps = 2",
              "TrainConfig.checkpoint_every = 2", "TrainConfig.async_checkpointing = False"]
  try:
    main_lib.run_main(["gin/coprocessor_smoke.gin"], bindings, str(workdir))
    gin.clear_config()
    jobs.discover_methods()
    gin.parse_config((workdir / "config.gin").read_text())
    with gin.unlock_config():
      method = get_method("coprocessor")()
    method.setup(str(workdir))
    model, _ = method.restore(Run(workdir=str(workdir), config=TrainConfig()))
  finally:
    gin.clear_config()
  # Per-user adapters on the frozen base, written into the workdir as MiLP writes its memories.
  decoder = nnx.clone(model.decoder)
  pnn.inject_lora(decoder, layers=[0, 1], projections=("q_proj", "down_proj"), rank=2, name="memory_0")
  state = nnx.state(decoder, nnx.LoRAParam)
  nnx.update(decoder, jax.tree.map(lambda x: x + 0.1 * jnp.ones_like(x), state))
  save_peft_adapters(decoder, workdir / "peft" / "user_a")
  jax_with_adapter = np.asarray(decoder(jnp.asarray(PROMPTS)).logits)
  jax_base = np.asarray(model.decoder(jnp.asarray(PROMPTS)).logits)
  jax_coprocessor = np.asarray(model.coprocessor(jnp.asarray(PROMPTS)).logits)
  assert np.abs(jax_with_adapter - jax_base).max() > 1e-2

  try:
    manifest = export_lib.export(str(workdir), str(output_dir))
  finally:
    gin.clear_config()
  card = (output_dir / "README.md").read_text()
  assert {"README.md", "training_config.gin", "decoder", "peft/user_a"} <= set(manifest["artifacts"])
  assert manifest["base_model"] == "random tiny_llama"
  front = card.split("---")[1]
  assert "license: apache-2.0" in front and "base_model:" not in front
  assert "# coprocessor (persona_jax export)" in card and "at step 2" in card
  assert "A trainable coprocessor that augments" in card and "lora, N_L=4" in card
  assert '"preset": "tiny_llama"' in card  # recorded in the step-2 checkpoint
  config_text = (workdir / "config.gin").read_text()
  assert (output_dir / "training_config.gin").read_text() == config_text
  assert "coprocessor.job.lora_rank = 4" in card
  table = (workdir / "eval_table.md").read_text().strip()
  assert table and table in card and "after training to step 2" in card
  assert "coprocessor_loader.load" in card  # the loader's own usage

  # PEFT: the adapter config names the exported base, relative to the export directory.
  adapter_config = json.loads((output_dir / "peft/user_a/memory_0/adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == "decoder"
  monkeypatch.chdir(output_dir)
  with torch.no_grad():
    auto = AutoPeftModelForCausalLM.from_pretrained("peft/user_a/memory_0", dtype=torch.float32).eval()
    np.testing.assert_allclose(auto(torch.as_tensor(PROMPTS)).logits.numpy(), jax_with_adapter,
                               atol=2e-4, rtol=2e-4)
    # Every snippet of the card's "How to load" runs from the export dir and loads the JAX model.
    blocks = _code_blocks(card.split("## How to load")[1])
    expected = {'from_pretrained("decoder")': jax_base, 'from_pretrained("coprocessor")': jax_coprocessor,
                "PeftModel": jax_with_adapter}
    assert len(blocks) == len(expected)
    for marker, logits in expected.items():
      (block,) = [b for b in blocks if marker in b and (marker == "PeftModel" or "PeftModel" not in b)]
      namespace = {}
      exec(block, namespace)  # pylint: disable=exec-used
      np.testing.assert_allclose(namespace["model"](torch.as_tensor(PROMPTS)).logits.numpy(), logits,
                                 atol=2e-4, rtol=2e-4)

  # An export with its card is still recognized as a previous export (and never as a workdir).
  try:
    again = export_lib.export(str(workdir), str(output_dir), overwrite=True)
  finally:
    gin.clear_config()
  assert again["step"] == 2
