"""Parity of a trained job's Hugging Face export with the JAX model it came from.

  TFDS_DATA_DIR=../shared/tfds python -m benchmarks.export_parity --workdir=<trained workdir> \
      --output_dir=<dir> [--prompt=...]

Exports the workdir with `persona_jax.export.export` into `<output_dir>/export/`, rebuilds the same
method from the workdir's config.gin through the method registry (`run.method`), restores it in JAX
(`Method.restore`), and compares logits on one prompt (float32 on both sides):
  * every exported decoder dir, loaded with `transformers.AutoModelForCausalLM`, against the restored
    JAX decoder (LoRA adapters unmerged in JAX, merged in the export; for a job with PEFT adapters
    and no checkpoint, both without the adapters);
  * coprocessor: the exported `coprocessor_loader.py`'s augmented logits (base reads the prompt but its
    last token, latents appended, then the last token) against `CacheCoprocessor.augment_cache`;
  * milp: for every user in `<export>/peft/`, `persona_jax.hf.peft.peft_model(base, dir)` against
    `method.restore_user('users', user)`, with the memory's own effect `max |peft - base|` beside it,
    so a parity figure far below the effect shows the adapters were applied, not just loaded.
The prompt's token ids come from the exported tokenizer (`transformers.AutoTokenizer`) when the job
has a Hugging Face one, checked equal to persona_jax's; for the bytes vocabulary from
`persona_jax.data.get_vocabulary("bytes")`. Prints a markdown table and writes
`<output_dir>/export_parity.json`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import time

import gin
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.common import markdown_table
from persona_jax import export as export_lib
from persona_jax import sampling
from persona_jax.nn import lora
from persona_jax.train import TrainConfig, jobs
from persona_jax.train.method import Run, get_method

DEFAULT_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def restore_method(workdir: pathlib.Path, step: int | None):
  """The method rebuilt from the workdir's config.gin through the registry (as `persona_jax.export`
  does) and its trained model restored at checkpoint `step` (None: no checkpoint, as `export` does for
  PEFT-only workdirs: the method's base). Returns (method name, method, model)."""
  config_text = export_lib.read_config(workdir / export_lib.CONFIG_FILE)
  jobs.discover_methods()
  gin.clear_config()
  gin.parse_config(config_text)
  name = gin.query_parameter("run.method")
  with gin.unlock_config():
    method = get_method(name)()
    method.setup(str(workdir))
    model, _ = method.restore(Run(workdir=str(workdir), config=TrainConfig(), step=step))
  return name, method, model


def prompt_ids(prompt: str, tokenizer_source: str | None, hf_dir: pathlib.Path | None) -> tuple[list[int], dict]:
  """Token ids of `prompt` (no special tokens) and how they were obtained."""
  if tokenizer_source is None:
    from persona_jax.data import get_vocabulary  # pylint: disable=g-import-not-at-top
    ids = [int(i) for i in get_vocabulary("bytes").encode(prompt)]
    return ids, {"tokenizer": "bytes (persona_jax.data.get_vocabulary)"}
  from persona_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
  jax_ids = list(load_tokenizer(tokenizer_source)[0].encode(prompt, add_special_tokens=False).ids)
  if hf_dir is None:  # no decoder dir was exported, so no exported tokenizer to check
    return jax_ids, {"tokenizer": f"persona_jax {tokenizer_source!r}"}
  ids = AutoTokenizer.from_pretrained(str(hf_dir))(prompt, add_special_tokens=False)["input_ids"]
  if jax_ids != list(ids):
    raise ValueError(f"The exported tokenizer in {hf_dir} and persona_jax's {tokenizer_source!r} give "
                     f"different ids for --prompt ({ids} vs {jax_ids}); the export is broken.")
  return ids, {"tokenizer": f"exported AutoTokenizer ({hf_dir.name}/) == persona_jax {tokenizer_source!r}"}


def torch_logits(model, ids: list[int]) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor([ids])).logits.float().numpy()


def row(artifact: str, diff: float, reference: np.ndarray, **extra) -> dict:
  return {"artifact": artifact, "max_abs_logit_diff": diff, "max_abs_logit": float(np.abs(reference).max()),
          **extra}


def decoder_rows(model, manifest: dict, export_dir: pathlib.Path, ids: list[int]) -> list[dict]:
  """Each exported decoder dir in `transformers` vs the restored JAX decoder, logits at every position."""
  rows = []
  peft_only = manifest["step"] is None
  for name, decoder in export_lib.find_decoders(model):
    if name not in manifest["artifacts"]:
      continue  # listed under not_exported with its reason
    if peft_only:  # the export wrote the base the PEFT adapters apply to
      decoder = nnx.clone(decoder)
      for layer, projection, key, _ in lora.lora_sites(decoder):
        del lora.get_projection(decoder, layer, projection).adapters[key]
    jax_logits = np.asarray(decoder(jnp.asarray([ids])).logits)
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir / name), dtype=torch.float32)
    rows.append(row(f"{name}/ (transformers)", float(np.abs(torch_logits(hf, ids) - jax_logits).max()),
                    jax_logits))
  return rows


def coprocessor_rows(model, export_dir: pathlib.Path, ids: list[int]) -> list[dict]:
  """coprocessor_loader.py's augmented next-token logits vs `CacheCoprocessor.augment_cache`."""
  if len(ids) < 2:
    raise ValueError(f"--prompt has {len(ids)} token(s); the coprocessor check needs at least 2.")
  if model.variant == "activations":
    return [{"artifact": "coprocessor_loader.py", "unsupported":
             "the 'activations' variant has no transformers loader (it reads last-layer activations)"}]
  spec = importlib.util.spec_from_file_location("coprocessor_loader", export_dir / "coprocessor_loader.py")
  loader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(loader)
  torch_aug = loader.load(export_dir).augmented_logits(torch.tensor([ids])).numpy()
  prefix = ids[:-1]
  state = sampling.prefill(model.decoder, jnp.asarray([prefix]), jnp.ones((1, len(prefix)), bool),
                           sampling.round_up(len(ids) + model.num_latents, 8))
  jax_aug = np.asarray(model.augment_cache(state.cache, state.key_valid, state.next_positions,
                                           jnp.asarray([ids[-1]]))[-1])
  return [row("coprocessor_loader.py augmented logits", float(np.abs(torch_aug - jax_aug).max()), jax_aug)]


def milp_rows(method, export_dir: pathlib.Path, ids: list[int]) -> list[dict]:
  """Each user's exported PEFT memory on the exported base vs `method.restore_user('users', user)`."""
  from persona_jax.hf.peft import peft_model  # pylint: disable=g-import-not-at-top

  peft_dir = export_dir / export_lib.PEFT_DIR
  users = sorted(p.name for p in peft_dir.iterdir() if p.is_dir()) if peft_dir.is_dir() else []
  if not users:
    raise ValueError(f"{peft_dir}: no users' PEFT adapters were exported; run the milp job to its end "
                     "(it writes <workdir>/peft/<user>/) first.")
  load_base = lambda: AutoModelForCausalLM.from_pretrained(str(export_dir / "decoder"), dtype=torch.float32)
  base_logits = torch_logits(load_base(), ids)
  rows = []
  for user in users:
    jax_logits = np.asarray(method.restore_user("users", user)(jnp.asarray([ids])).logits)
    peft_logits = torch_logits(peft_model(load_base(), peft_dir / user), ids)
    rows.append(row(f"peft/{user} (peft_model)", float(np.abs(peft_logits - jax_logits).max()), jax_logits,
                    memory_effect=float(np.abs(peft_logits - base_logits).max())))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A trained job's workdir (config.gin, checkpoints/).")
  parser.add_argument("--output_dir", required=True,
                      help="Gets export/ (replaced if present) and export_parity.json.")
  parser.add_argument("--prompt", default=DEFAULT_PROMPT)
  args = parser.parse_args()

  workdir = pathlib.Path(args.workdir).expanduser().absolute()
  config_path = workdir / export_lib.CONFIG_FILE
  if not config_path.is_file():
    raise SystemExit(f"--workdir={args.workdir}: no {export_lib.CONFIG_FILE}; point it at the workdir of "
                     "a job run with `python -m persona_jax.main`.")
  jobs.discover_methods()
  gin.clear_config()
  gin.parse_config(export_lib.read_config(config_path))
  room = gin.query_parameter("run.method")
  output_dir = pathlib.Path(args.output_dir).expanduser().absolute()
  export_dir = output_dir / "export"

  output_dir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  try:
    manifest = export_lib.export(str(workdir), str(export_dir), overwrite=True)
  except ValueError as error:  # e.g. nothing in the model has a Hugging Face equivalent
    result = {"room": room, "workdir": str(workdir), "unsupported": f"export failed: {error}"}
    (output_dir / "export_parity.json").write_text(json.dumps(result, indent=2))
    raise SystemExit(f"unsupported: the {room} job cannot be exported ({error}); wrote "
                     f"{output_dir / 'export_parity.json'}.") from error
  export_seconds = time.time() - started
  room, method, model = restore_method(workdir, manifest["step"])

  exported_decoders = [name for name, _ in export_lib.find_decoders(model) if name in manifest["artifacts"]]
  hf_dir = export_dir / exported_decoders[0] if exported_decoders else None
  ids, tokenization = prompt_ids(args.prompt, manifest["tokenizer"], hf_dir)

  rows = decoder_rows(model, manifest, export_dir, ids)
  if room == "coprocessor":
    rows += coprocessor_rows(model, export_dir, ids)
  elif room == "milp":
    rows += milp_rows(method, export_dir, ids)
  rows += [{"artifact": f"{name}/", "unsupported": f"not exported: {reason}"}
           for name, reason in manifest["not_exported"].items()]

  fmt = lambda value: "" if value is None else f"{value:.3g}"
  headers = ["artifact", "max \\|logit diff\\|", "max \\|logit\\|"]
  headers += ["memory effect max \\|peft - base\\|"] if room == "milp" else []
  table = markdown_table(headers, [
      [r["artifact"], fmt(r.get("max_abs_logit_diff")) or r.get("unsupported", ""),
       fmt(r.get("max_abs_logit"))] + ([fmt(r.get("memory_effect"))] if room == "milp" else [])
      for r in rows])
  at = (f"at step {manifest['step']}" if manifest["step"] is not None
        else "(its PEFT adapters; no checkpoints/)")
  print(f"export parity of the {room} job {at} ({workdir}), {len(ids)} prompt tokens, "
        f"{tokenization['tokenizer']}; float32 logits at every prompt position"
        + (" (augmented: the next token's)" if room == "coprocessor" else ""))
  print(table)

  result = {"room": room, "workdir": str(workdir), "step": manifest["step"], "export_dir": str(export_dir),
            "export_seconds": export_seconds, "prompt": args.prompt, "token_ids": ids, **tokenization,
            "rows": rows, "manifest": manifest, "machine": f"{platform.node()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs", "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  (output_dir / "export_parity.json").write_text(json.dumps(result, indent=2))
  print(f"wrote {output_dir / 'export_parity.json'}")


if __name__ == "__main__":
  main()
