"""Runs an exported User-LLM with PyTorch and `transformers` alone (no JAX, no persona_jax needed).

`python -m persona_jax.export` copies this file into the export directory as `user_llm_loader.py`,
next to `decoder/` (the base decoder as a `transformers` model, LoRA merged, without the
cross-attention layers), `user_encoder/stack_<k>/` (the user encoder's causal transformer(s) as
`transformers` llama models read through `inputs_embeds`), `user_llm.safetensors` (item / rating /
category embeddings, the late-fusion projection, the Perceiver resampler, the projection into the
decoder's width and the gated cross-attention layers) and `user_llm.json` (the settings). Use it from
that directory:

    import torch, user_llm_loader
    model = user_llm_loader.load(".")
    features = {"item_ids": ..., "ratings": ..., "genre_bits": ..., "history_mask": ...}  # [B, T]
    logits = model.logits(features, prompt_tokens, prompt_mask)     # [B, P, vocab]
    tokens = model.generate(features, prompt_tokens, prompt_mask, max_new_tokens=20)

History features are what persona_jax's `user_llm.tasks.history_features` builds (int32 `[B, T]`,
0 = padding; `genre_bits`: bit g set when the item has category g). Prompts are int32 `[B, P]` with a
bool mask (left padding for generation). The computation is `UserLLM.__call__` of
persona_jax/user_llm/model.py:
  1. user encoder: per-feature embeddings (item, rating bucket, mean of the item's categories),
     summed ('early' fusion) or each through its own stack and projected ('late'), causal
     transformer(s), zeros at padding -> `[B, T, D_u]`;
  2. Perceiver resampler: M latents cross-attend to the user embeddings and themselves -> `[B, M, D_u]`;
  3. projection to the decoder's width -> M user tokens `[B, M, D]`;
  4. 'cross_attention': the decoder reads the prompt, and after each listed layer a gated
     cross-attention block (`x + tanh(g_a) * xattn(norm(x), user) ; + tanh(g_m) * mlp(norm(.))`)
     reads the user tokens; 'soft_prompt': the user tokens are prepended to the prompt's embeddings.
"""

from __future__ import annotations

import json
import math
import pathlib

try:
  import torch
  from safetensors.torch import load_file
  from transformers import AutoModel, AutoModelForCausalLM
except ImportError as error:  # the export's torch side; persona_jax itself never imports this module
  raise ImportError(f"user_llm_loader needs PyTorch and transformers ({error}): "
                    "pip install torch transformers safetensors") from error

_MASKED = -1e30


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
  x32 = x.float()
  normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
  return (normed * scale.float()).to(x.dtype)


def _positions(mask: torch.Tensor) -> torch.Tensor:
  """0, 1, 2, ... over real entries (left padding gets 0), as persona_jax's positions_from_mask."""
  return (mask.long().cumsum(-1) - 1).clamp(min=0)


class UserLLMRunner:
  """The base decoder, the user encoder, the resampler and the integration of one export."""

  def __init__(self, base, stacks: list, weights: dict[str, torch.Tensor], settings: dict):
    self.base = base.eval()
    self.stacks = [stack.eval() for stack in stacks]
    self.w = weights
    self.settings = settings
    self.integration = settings["integration"]
    self.num_latents = settings["num_latents"]
    self.cross_attention_layers = list(settings["cross_attention_layers"])
    # persona_jax scales every decoder input embedding by sqrt(D) when the family does (Gemma) and
    # divides the user tokens by it first; transformers 5 scales in the token-embedding module only.
    body = getattr(base, base.base_model_prefix)
    self.embed_tokens = body.embed_tokens
    scaled_module = hasattr(body.embed_tokens, "embed_scale")
    self.soft_prompt_scale = (1.0 if settings["scale_embeddings"] and scaled_module else
                              1.0 / math.sqrt(settings["embed_dim"]) if settings["scale_embeddings"]
                              else 1.0)
    self._user_tokens = None
    for layer in self.cross_attention_layers:
      body.layers[layer].register_forward_hook(self._hook(layer))

  # Building blocks ------------------------------------------------------------------------------
  def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ self.w[name + ".kernel"].to(x.dtype)

  def _attention(self, prefix: str, heads: int, queries, keys, key_mask):
    batch, num_queries, _ = queries.shape
    q, k, v = (self._linear(f"{prefix}.{p}", x) for p, x in
               (("q_proj", queries), ("k_proj", keys), ("v_proj", keys)))
    split = lambda x: x.reshape(batch, x.shape[1], heads, -1)
    q, k, v = split(q), split(k), split(v)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~key_mask[:, None, None, :], _MASKED)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, num_queries, -1)
    return self._linear(f"{prefix}.o_proj", out)

  def _mlp(self, prefix: str, x):
    gate = torch.nn.functional.silu(self._linear(f"{prefix}.gate_proj", x))
    return self._linear(f"{prefix}.down_proj", gate * self._linear(f"{prefix}.up_proj", x))

  # 1-3: history -> user tokens --------------------------------------------------------------------
  @torch.no_grad()
  def user_embeddings(self, features: dict) -> torch.Tensor:
    """`[B, T, D_u]` (zeros at padding)."""
    mask = features["history_mask"].bool()
    num_categories = self.settings["encoder"]["num_categories"]
    item = self.w["user_encoder.item_embedding"][features["item_ids"].long()]
    rating = self.w["user_encoder.rating_embedding"][features["ratings"].long()]
    shifts = torch.arange(num_categories)
    genres = ((features["genre_bits"].long()[..., None] >> shifts) & 1).float()
    genre = genres @ self.w["user_encoder.genre_embedding"] / genres.sum(-1, keepdim=True).clamp(min=1.0)
    positions = _positions(mask)

    def stack(k, x):
      return self.stacks[k](inputs_embeds=x, attention_mask=mask.long(),
                            position_ids=positions).last_hidden_state

    if self.settings["encoder"]["fusion"] == "early":
      out = stack(0, item + rating + genre)
    else:
      out = self._linear("user_encoder.fuse", torch.cat(
          [stack(k, part) for k, part in enumerate((item, rating, genre))], dim=-1))
    return torch.where(mask[..., None], out, torch.zeros_like(out))

  @torch.no_grad()
  def user_tokens(self, features: dict) -> torch.Tensor:
    """`[B, M, D]` user tokens in the decoder's width."""
    embeddings = self.user_embeddings(features)
    history_mask = features["history_mask"].bool()
    batch = embeddings.shape[0]
    latents = self.w["resampler.latents"][None].expand(batch, -1, -1)
    latent_mask = torch.ones(latents.shape[:2], dtype=torch.bool)
    heads = self.settings["encoder"]["num_heads"]
    for layer in range(self.settings["resampler_layers"]):
      prefix = "resampler"
      normed = _rms_norm(latents, self.w[f"{prefix}.attention_norms.{layer}.scale"])
      keys = torch.cat([embeddings, normed], dim=1)
      key_mask = torch.cat([history_mask, latent_mask], dim=1)
      latents = latents + self._attention(f"{prefix}.attentions.{layer}", heads, normed, keys, key_mask)
      latents = latents + self._mlp(f"{prefix}.mlps.{layer}",
                                    _rms_norm(latents, self.w[f"{prefix}.mlp_norms.{layer}.scale"]))
    latents = _rms_norm(latents, self.w["resampler.norm.scale"])
    return self._linear("projection", latents).to(self.base.dtype)

  # 4: the decoder ---------------------------------------------------------------------------------
  def _hook(self, layer: int):
    prefix = f"decoder.layers.{layer}.after"
    heads = self.settings["cross_attention_heads"]

    def hook(module, inputs, output):
      del module, inputs
      if self._user_tokens is None:
        return output
      x = output[0] if isinstance(output, tuple) else output
      user = self._user_tokens.to(x.dtype)
      user_mask = torch.ones(user.shape[:2], dtype=torch.bool)
      h = self._attention(f"{prefix}.attention", heads,
                          _rms_norm(x, self.w[f"{prefix}.attention_norm.scale"]), user, user_mask)
      x = x + torch.tanh(self.w[f"{prefix}.attn_gate"]).to(x.dtype) * h
      h = self._mlp(f"{prefix}.mlp", _rms_norm(x, self.w[f"{prefix}.mlp_norm.scale"]))
      x = x + torch.tanh(self.w[f"{prefix}.mlp_gate"]).to(x.dtype) * h
      return (x,) + tuple(output[1:]) if isinstance(output, tuple) else x

    return hook

  def _inputs(self, features, prompt_tokens, prompt_mask):
    """(keyword arguments of the base's first call, the mask over its inputs, the user tokens)."""
    user = self.user_tokens(features)
    prompt_mask = prompt_mask.bool()
    if self.integration == "cross_attention":
      return dict(input_ids=prompt_tokens.long()), prompt_mask, user
    embeddings = torch.cat([user * self.soft_prompt_scale, self.embed_tokens(prompt_tokens.long())],
                           dim=1)
    mask = torch.cat([torch.ones(user.shape[:2], dtype=torch.bool), prompt_mask], dim=1)
    return dict(inputs_embeds=embeddings), mask, user

  @torch.no_grad()
  def logits(self, features: dict, prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor
             ) -> torch.Tensor:
    """`[B, P, vocab]` fp32 logits of the prompt conditioned on the user (`UserLLM.__call__`)."""
    inputs, mask, user = self._inputs(features, prompt_tokens, prompt_mask)
    self._user_tokens = user if self.integration == "cross_attention" else None
    try:
      out = self.base(**inputs, attention_mask=mask.long(), position_ids=_positions(mask))
    finally:
      self._user_tokens = None
    logits = out.logits.float()
    return logits if self.integration == "cross_attention" else logits[:, self.num_latents:]

  @torch.no_grad()
  def generate(self, features: dict, prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor,
               max_new_tokens: int) -> torch.Tensor:
    """Greedy `[B, max_new_tokens]` continuation of LEFT-padded prompts conditioned on the user."""
    inputs, mask, user = self._inputs(features, prompt_tokens, prompt_mask)
    self._user_tokens = user if self.integration == "cross_attention" else None
    try:
      mask = mask.long()
      out = self.base(**inputs, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
      position = mask.sum(-1, keepdim=True)  # the next real position of every row
      tokens = []
      for _ in range(max_new_tokens):
        next_token = out.logits[:, -1].float().argmax(-1, keepdim=True)
        tokens.append(next_token)
        mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
        out = self.base(input_ids=next_token, attention_mask=mask, position_ids=position,
                        past_key_values=out.past_key_values, use_cache=True)
        position = position + 1
    finally:
      self._user_tokens = None
    return torch.cat(tokens, dim=1)


def load(export_dir, dtype=torch.float32) -> UserLLMRunner:
  """Loads `decoder/`, `user_encoder/stack_<k>/`, `user_llm.safetensors` and `user_llm.json`."""
  export_dir = pathlib.Path(export_dir)
  settings = json.loads((export_dir / "user_llm.json").read_text())
  base = AutoModelForCausalLM.from_pretrained(export_dir / "decoder", dtype=dtype,
                                              attn_implementation="eager")
  stacks = [AutoModel.from_pretrained(export_dir / "user_encoder" / f"stack_{k}", dtype=torch.float32,
                                      attn_implementation="eager")
            for k in range(settings["encoder"]["num_stacks"])]
  weights = {name: tensor.float() for name, tensor in
             load_file(str(export_dir / "user_llm.safetensors")).items()}
  return UserLLMRunner(base, stacks, weights, settings)
