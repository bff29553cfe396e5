"""Runs an exported cache coprocessor with `transformers` alone (no JAX, no persona_jax needed).

`python -m persona_jax.export` copies this file into the export directory as `coprocessor_loader.py`,
next to `decoder/` (the frozen base), `coprocessor/` (the coprocessor, LoRA merged; absent for the
"pause" variant), `soft_tokens.safetensors` and `coprocessor.json`. Use it from that directory:

    import torch, coprocessor_loader
    augmenter = coprocessor_loader.load(".")
    ids = torch.tensor([tokenizer.encode("To be, or not")])
    logits = augmenter.augmented_logits(ids)      # [batch, vocab]: next token after each prompt
    tokens = augmenter.generate(ids, max_new_tokens=20)

The augmentation is the one `CacheCoprocessor.augment_cache` computes (persona_jax/coprocessor/model.py):
  1. the frozen base reads the prompt but its last token -> `past_key_values`;
  2. the coprocessor reads a copy of that cache and the soft tokens (all at the rotary position of the
     prompt's last token) -> its final-normed hidden states, rescaled to input-embedding size: latents;
  3. the base appends the latents to its cache (as input embeddings, same rotary position);
  4. the base reads the prompt's last token at its own position; its logits start decoding.
Prompts in one batch must have the same length (no padding).
"""

from __future__ import annotations

import copy
import json
import math
import pathlib

try:
  import torch
  from safetensors.torch import load_file
  from transformers import AutoModelForCausalLM
except ImportError as error:  # the export's torch side; persona_jax itself never imports this module
  raise ImportError(f"coprocessor_loader needs PyTorch and transformers ({error}): "
                    "pip install torch transformers safetensors") from error


class CoprocessorAugmenter:
  """The frozen base, the coprocessor and the soft tokens of one export."""

  def __init__(self, base, coprocessor, soft_tokens: torch.Tensor, settings: dict):
    self.base = base.eval()
    self.coprocessor = None if coprocessor is None else coprocessor.eval()
    self.soft_tokens = soft_tokens  # [num_latents, embed]
    self.latent_scale = float(settings["latent_scale"])
    # Gemma multiplies input embeddings by sqrt(embed_dim). persona_jax does so for every input, as
    # transformers 4 did; transformers 5 does it in the token-embedding module only, so embeddings
    # passed as `inputs_embeds` are scaled here.
    self.embedding_scale = math.sqrt(settings["embed_dim"]) if settings["scale_embeddings"] else 1.0
    body = getattr(base, base.base_model_prefix)
    self.inputs_embeds_scale = self.embedding_scale if hasattr(body.embed_tokens, "embed_scale") else 1.0
    if settings["variant"] == "activations":
      raise ValueError("coprocessor.json: the 'activations' variant reads the prompt's last-layer "
                       "activations, which past_key_values does not keep; this loader runs the "
                       "full, lora, scratch and pause variants.")

  def latents(self, cache, positions: torch.Tensor) -> torch.Tensor:
    """`[batch, num_latents, embed]` `inputs_embeds` for the base (step 2); `cache` is not changed."""
    batch = positions.shape[0]
    soft = self.soft_tokens[None].expand(batch, -1, -1).to(self.base.dtype) * self.inputs_embeds_scale
    if self.coprocessor is None:  # "pause": the soft tokens themselves
      return soft
    body = getattr(self.coprocessor, self.coprocessor.base_model_prefix)
    hidden = body(inputs_embeds=soft, position_ids=positions, past_key_values=copy.deepcopy(cache),
                  use_cache=True).last_hidden_state  # after the final norm
    # Latents enter the base at a token embedding's size (CacheCoprocessor._as_input_embeddings).
    return hidden * (self.latent_scale * self.inputs_embeds_scale / self.embedding_scale)

  @torch.no_grad()
  def augment(self, input_ids: torch.Tensor):
    """Steps 1-4 for `input_ids` `[batch, length >= 2]`. Returns (logits `[batch, vocab]`, cache, next position)."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
      raise ValueError(f"augment: input_ids must be [batch, length >= 2], got {tuple(input_ids.shape)}.")
    batch, length = input_ids.shape
    cache = self.base(input_ids=input_ids[:, :-1], use_cache=True).past_key_values
    num_latents = self.soft_tokens.shape[0]
    positions = torch.full((batch, num_latents), length - 1, dtype=torch.long)
    latents = self.latents(cache, positions)
    cache = self.base(inputs_embeds=latents, position_ids=positions, past_key_values=cache,
                      use_cache=True).past_key_values
    last = self.base(input_ids=input_ids[:, -1:], position_ids=positions[:, :1],
                     past_key_values=cache, use_cache=True)
    return last.logits[:, -1].float(), last.past_key_values, length

  def augmented_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
    """`[batch, vocab]` logits of the token after each prompt, with the cache augmented."""
    return self.augment(input_ids)[0]

  @torch.no_grad()
  def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy `[batch, max_new_tokens]` continuation after one augmentation at the prompt's end."""
    logits, cache, position = self.augment(input_ids)
    tokens = []
    for _ in range(max_new_tokens):
      next_token = logits.argmax(-1, keepdim=True)
      tokens.append(next_token)
      out = self.base(input_ids=next_token, position_ids=torch.full_like(next_token, position),
                      past_key_values=cache, use_cache=True)
      logits, cache, position = out.logits[:, -1].float(), out.past_key_values, position + 1
    return torch.cat(tokens, dim=1)


def load(export_dir, dtype=torch.float32) -> CoprocessorAugmenter:
  """Loads `decoder/`, `coprocessor/`, `soft_tokens.safetensors` and `coprocessor.json` of an export."""
  export_dir = pathlib.Path(export_dir)
  settings = json.loads((export_dir / "coprocessor.json").read_text())
  base = AutoModelForCausalLM.from_pretrained(export_dir / "decoder", dtype=dtype)
  coprocessor = None
  if settings["variant"] != "pause":
    coprocessor = AutoModelForCausalLM.from_pretrained(export_dir / "coprocessor", dtype=dtype)
  soft_tokens = load_file(str(export_dir / "soft_tokens.safetensors"))["soft_tokens"].to(dtype)
  return CoprocessorAugmenter(base, coprocessor, soft_tokens, settings)
