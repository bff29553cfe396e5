"""The coprocessor's part of `python -m persona_jax.export`: soft tokens, settings, loader snippet.

The generic export has already written the frozen base to `<output_dir>/decoder/` and the
coprocessor (LoRA merged) to `<output_dir>/coprocessor/` as `transformers` models; this adds what a
`transformers` user needs to run the augmentation (see `hf_loader.py`, copied as
`coprocessor_loader.py`).
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from persona_jax.coprocessor.model import CacheCoprocessor

LOADER_FILE = "coprocessor_loader.py"


def export_artifacts(model: CacheCoprocessor, output_dir: str | pathlib.Path) -> dict[str, str]:
  """Writes `soft_tokens.safetensors` (`[num_latents, embed]`), `coprocessor.json` and the loader.

  Returns {artifact: what it is} for the export manifest.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  if not isinstance(model, CacheCoprocessor):
    raise TypeError(f"coprocessor export expects a CacheCoprocessor, got {type(model).__name__}.")
  output_dir = pathlib.Path(output_dir)
  soft_tokens = np.asarray(model.soft_tokens[...], dtype=np.float32)
  save_file({"soft_tokens": soft_tokens}, str(output_dir / "soft_tokens.safetensors"),
            metadata={"format": "pt"})
  config = model.decoder.config
  settings = {"variant": model.variant, "num_latents": model.num_latents,
              "latent_scale": float(model.latent_scale), "embed_dim": config.embed_dim,
              "scale_embeddings": bool(config.scale_embeddings)}
  (output_dir / "coprocessor.json").write_text(json.dumps(settings, indent=2))
  shutil.copyfile(pathlib.Path(__file__).with_name("hf_loader.py"), output_dir / LOADER_FILE)
  return {"soft_tokens.safetensors": f"soft tokens [{model.num_latents}, {config.embed_dim}] fp32",
          "coprocessor.json": "variant, num_latents, latent scale",
          LOADER_FILE: "runs the augmentation with transformers: coprocessor_loader.load(dir)"}
