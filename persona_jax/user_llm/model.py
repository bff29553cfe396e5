"""User-LLM (Ning, Liu et al., arXiv 2402.13598): user encoder, Perceiver resampler, and two ways into
a frozen decoder (gated cross-attention after chosen blocks, or a soft prompt).

Shapes: B batch, T history length (items), M resampled user tokens, P prompt tokens,
D_u user-encoder width, D decoder width, G categories (genres).

History features (what `tasks.history_features` builds; 0 is padding everywhere):
  item_ids    int32 [B, T]  `ItemVocabulary` ids (1 = unknown item)
  ratings     int32 [B, T]  rating bucket round(2 * rating) in 1..10
  genre_bits  int32 [B, T]  bit g set <=> the item has category id g (categories < 31)
  history_mask bool [B, T]  True for real items

Bad input, by design:
  * empty history (all of history_mask False): the encoder output is all zeros and masked; the
    Perceiver's latents also attend to themselves, so the M user tokens are the learned "no history"
    prior; nothing is NaN and the decoder still gets M tokens.
  * unknown item: encoded as id 1 (`ItemVocabulary.UNKNOWN_ID`), which has its own learned embedding.
  * history longer than `UserEncoderConfig.max_length`: `tasks.history_features` keeps the most recent
    `max_length` items (drops the oldest) and reports how many it dropped; the encoder itself raises
    on T > max_length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.errors import UserError
from persona_jax.train import losses
from persona_jax.nn.layers import GatedMLP, Linear, RMSNorm, logical_param

NUM_RATING_BUCKETS = 11  # 0 = padding, 1..10 = rating 0.5..5 in halves
MAX_CATEGORIES = 31      # categories travel as bits of an int32
FUSIONS = ("early", "late")
INTEGRATIONS = ("cross_attention", "soft_prompt")
STRATEGIES = ("full", "lora", "enc", "proj")
_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class UserEncoderConfig:
  """Sizes of the user encoder.

  Attributes:
    num_items: item vocabulary size (incl. padding 0 and unknown 1).
    num_categories: category vocabulary size (incl. padding and unknown), at most 31.
    embed_dim: D_u. num_layers / num_heads / mlp_dim: the causal transformer (per feature with late
      fusion).
    max_length: the longest history the encoder takes (positions 0..max_length-1).
    fusion: "early" (per-feature embeddings summed, one transformer) or "late" (one transformer per
      feature, outputs concatenated and projected).
  """
  num_items: int
  num_categories: int
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  max_length: int = 200
  fusion: str = "early"

  def __post_init__(self):
    if self.fusion not in FUSIONS:
      raise UserError(f"UserEncoderConfig.fusion={self.fusion!r}; use one of {FUSIONS}.")
    if not 3 <= self.num_categories <= MAX_CATEGORIES:
      raise UserError(f"UserEncoderConfig.num_categories={self.num_categories}: must be 3..{MAX_CATEGORIES} "
                       f"(categories travel as int32 bits); merge rare categories into the unknown id.")
    if self.embed_dim % self.num_heads:
      raise UserError(f"UserEncoderConfig: embed_dim={self.embed_dim} must be a multiple of "
                       f"num_heads={self.num_heads}.")

  def block_config(self) -> pnn.DecoderConfig:
    """The core decoder block's config for the encoder's transformer layers (llama family)."""
    return pnn.DecoderConfig(family="llama", vocab_size=1, num_layers=self.num_layers,
                             embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                             num_kv_heads=self.num_heads, head_dim=self.embed_dim // self.num_heads,
                             norm_eps=1e-5, max_positions=self.max_length)


def genre_multi_hot(genre_bits: jax.Array, num_categories: int) -> jax.Array:
  """int32 bits `[..., T]` -> float32 multi-hot `[..., T, num_categories]`."""
  shifts = jnp.arange(num_categories, dtype=jnp.int32)
  return ((genre_bits[..., None] >> shifts) & 1).astype(jnp.float32)


class _CausalStack(nnx.Module):
  """Core decoder blocks under a padded causal mask, then a final RMSNorm. `[B,T,D] -> [B,T,D]`."""

  def __init__(self, config: UserEncoderConfig, *, rngs: nnx.Rngs):
    block_config = config.block_config()
    self.blocks = nnx.List([pnn.Block(block_config, layer, rngs=rngs) for layer in range(config.num_layers)])
    self.norm = RMSNorm(config.embed_dim, eps=1e-5)

  def __call__(self, x: jax.Array, history_mask: jax.Array) -> jax.Array:
    mask = pnn.padded_causal_mask(history_mask)
    positions = pnn.positions_from_mask(history_mask)
    for block in self.blocks:
      x, _ = block(x, positions, mask)
    return self.norm(x)


class UserEncoder(nnx.Module):
  """Causal transformer over multi-feature item sequences, with next-item heads per feature.

  `__call__(features) -> [B, T, D_u]` user embeddings; position t depends only on items 0..t, and
  padding positions are zeros.
  """

  def __init__(self, config: UserEncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = jax.nn.initializers.normal(stddev=0.02)
    dim = config.embed_dim
    self.item_embedding = logical_param(init(rngs.params(), (config.num_items, dim)), ("vocab", "embed"))
    self.rating_embedding = logical_param(init(rngs.params(), (NUM_RATING_BUCKETS, dim)), (None, "embed"))
    self.genre_embedding = logical_param(init(rngs.params(), (config.num_categories, dim)), (None, "embed"))
    if config.fusion == "early":
      self.stacks = nnx.List([_CausalStack(config, rngs=rngs)])
      self.fuse = nnx.data(None)
    else:
      self.stacks = nnx.List([_CausalStack(config, rngs=rngs) for _ in range(3)])
      self.fuse = Linear(3 * dim, dim, in_axis="mlp", out_axis="embed", rngs=rngs)
    # Next-item heads: one per feature.
    self.item_head = Linear(dim, config.num_items, in_axis="embed", out_axis="vocab", rngs=rngs)
    self.rating_head = Linear(dim, NUM_RATING_BUCKETS, in_axis="embed", out_axis=None, rngs=rngs)
    self.genre_head = Linear(dim, config.num_categories, in_axis="embed", out_axis=None, rngs=rngs)

  def feature_embeddings(self, features: dict) -> list[jax.Array]:
    """Per-feature input embeddings, each `[B, T, D_u]`: item, rating, mean of the item's genres."""
    item = jnp.take(self.item_embedding[...], features["item_ids"], axis=0)
    rating = jnp.take(self.rating_embedding[...], features["ratings"], axis=0)
    genres = genre_multi_hot(features["genre_bits"], self.config.num_categories)
    genre = genres @ self.genre_embedding[...] / jnp.maximum(genres.sum(-1, keepdims=True), 1.0)
    return [item, rating, genre]

  def __call__(self, features: dict) -> jax.Array:
    history_mask = features["history_mask"].astype(bool)
    length = history_mask.shape[1]
    if length > self.config.max_length:
      raise UserError(f"UserEncoder: history length {length} > max_length={self.config.max_length}; "
                       f"build features with tasks.history_features(max_length=...), which keeps the "
                       f"most recent items.")
    parts = self.feature_embeddings(features)
    if self.fuse is None:
      out = self.stacks[0](sum(parts), history_mask)
    else:
      out = self.fuse(jnp.concatenate([stack(part, history_mask) for stack, part in
                                       zip(self.stacks, parts)], axis=-1))
    return jnp.where(history_mask[..., None], out, 0.0)

  def next_item_logits(self, embeddings: jax.Array) -> dict[str, jax.Array]:
    """Per-feature logits of the NEXT item at every position: item [B,T,num_items] (padding id
    excluded), rating [B,T,11], genre [B,T,G]."""
    item = self.item_head(embeddings).astype(jnp.float32)
    item = item.at[..., 0].set(_MASKED)
    return {"item": item, "rating": self.rating_head(embeddings).astype(jnp.float32),
            "genre": self.genre_head(embeddings).astype(jnp.float32)}


def next_item_loss(encoder: UserEncoder, features: dict, recall_at: Sequence[int] = (1, 5, 10)
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-item pretraining: cross-entropy per feature (item, rating, genres) at every position whose
  next item is real; the loss is their sum. Metrics: each CE and Recall@K of the next item id.

  The genre target is the next item's genre multi-hot normalized to sum 1 (soft-label CE).
  """
  embeddings = encoder(features)
  logits = encoder.next_item_logits(embeddings[:, :-1])
  mask = features["history_mask"].astype(bool)
  valid = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
  count = jnp.maximum(valid.sum(), 1.0)
  next_items = features["item_ids"][:, 1:]
  item_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits["item"]), next_items[..., None], -1)[..., 0]
  rating_ce = -jnp.take_along_axis(jax.nn.log_softmax(logits["rating"]),
                                   features["ratings"][:, 1:, None], -1)[..., 0]
  genres = genre_multi_hot(features["genre_bits"][:, 1:], encoder.config.num_categories)
  genre_target = genres / jnp.maximum(genres.sum(-1, keepdims=True), 1.0)
  genre_ce = -(genre_target * jax.nn.log_softmax(logits["genre"])).sum(-1)
  metrics = {name: (value * valid).sum() / count for name, value in
             (("item_ce", item_ce), ("rating_ce", rating_ce), ("genre_ce", genre_ce))}
  true_logit = jnp.take_along_axis(logits["item"], next_items[..., None], -1)
  rank = (logits["item"] > true_logit).sum(-1)  # 0 = ranked first
  for k in recall_at:
    metrics[f"recall@{k}"] = ((rank < k).astype(jnp.float32) * valid).sum() / count
  loss = metrics["item_ce"] + metrics["rating_ce"] + metrics["genre_ce"]
  return loss, metrics


class CrossAttention(nnx.Module):
  """Multi-head attention of queries `[B, Q, query_dim]` over keys/values `[B, K, key_dim]`."""

  def __init__(self, query_dim: int, key_dim: int, num_heads: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    if query_dim % num_heads:
      raise UserError(f"CrossAttention: query_dim={query_dim} must be a multiple of num_heads={num_heads}.")
    self.num_heads = num_heads
    self.head_dim = query_dim // num_heads
    kw = dict(rngs=rngs, dtype=dtype)
    self.q_proj = Linear(query_dim, query_dim, in_axis="embed", out_axis="heads", **kw)
    self.k_proj = Linear(key_dim, query_dim, in_axis="embed", out_axis="heads", **kw)
    self.v_proj = Linear(key_dim, query_dim, in_axis="embed", out_axis="heads", **kw)
    self.o_proj = Linear(query_dim, query_dim, in_axis="heads", out_axis="embed", **kw)

  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
    """key_mask: `[B, K]` bool. Returns `[B, Q, query_dim]`."""
    batch, num_queries, _ = queries.shape
    split = lambda x: x.reshape(batch, x.shape[1], self.num_heads, self.head_dim)
    q, k, v = split(self.q_proj(queries)), split(self.k_proj(keys)), split(self.v_proj(keys))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    logits = jnp.where(key_mask[:, None, None, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, num_queries, -1)
    return self.o_proj(out)


class PerceiverResampler(nnx.Module):
  """M learned latent queries cross-attend to the user embeddings over L layers (Flamingo style:
  keys are the inputs and the latents themselves). `[B, T, D_u] -> [B, M, D_u]` for any T (also 0
  real items)."""

  def __init__(self, embed_dim: int, *, num_latents: int, num_layers: int, num_heads: int,
               rngs: nnx.Rngs):
    self.latents = logical_param(jax.random.normal(rngs.params(), (num_latents, embed_dim)) * 0.02,
                                 (None, "embed"))
    self.attention_norms = nnx.List([RMSNorm(embed_dim, eps=1e-5) for _ in range(num_layers)])
    self.attentions = nnx.List([CrossAttention(embed_dim, embed_dim, num_heads, rngs=rngs)
                                for _ in range(num_layers)])
    self.mlp_norms = nnx.List([RMSNorm(embed_dim, eps=1e-5) for _ in range(num_layers)])
    self.mlps = nnx.List([GatedMLP(embed_dim, 2 * embed_dim, activation="silu", rngs=rngs)
                          for _ in range(num_layers)])
    self.norm = RMSNorm(embed_dim, eps=1e-5)

  def __call__(self, user_embeddings: jax.Array, history_mask: jax.Array) -> jax.Array:
    batch = user_embeddings.shape[0]
    latents = jnp.broadcast_to(self.latents[...], (batch,) + self.latents.shape)
    latent_mask = jnp.ones(latents.shape[:2], bool)
    for norm, attention, mlp_norm, mlp in zip(self.attention_norms, self.attentions, self.mlp_norms,
                                              self.mlps):
      normed = norm(latents)
      keys = jnp.concatenate([user_embeddings, normed], axis=1)
      key_mask = jnp.concatenate([history_mask.astype(bool), latent_mask], axis=1)
      latents = latents + attention(normed, keys, key_mask)
      latents = latents + mlp(mlp_norm(latents))
    return self.norm(latents)


class GatedCrossAttention(nnx.Module):
  """Flamingo's gated cross-attention block, installed as a decoder `Block.after` hook.

  `x + tanh(attn_gate) * xattn(norm(x), user_tokens)`, then `+ tanh(mlp_gate) * mlp(norm(.))`. Both
  gates start at exactly 0, so at init the decoder's output is bit-for-bit unchanged.
  Called as `after(x, user_tokens=[B, M, D], user_mask=[B, M] bool, ...)`; without `user_tokens`
  it returns `x` unchanged.
  """

  def __init__(self, embed_dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.attention_norm = RMSNorm(embed_dim, eps=1e-5)
    self.attention = CrossAttention(embed_dim, embed_dim, num_heads, rngs=rngs, dtype=dtype)
    self.attn_gate = logical_param(jnp.zeros((), jnp.float32), ())
    self.mlp_norm = RMSNorm(embed_dim, eps=1e-5)
    self.mlp = GatedMLP(embed_dim, 2 * embed_dim, activation="silu", rngs=rngs, dtype=dtype)
    self.mlp_gate = logical_param(jnp.zeros((), jnp.float32), ())

  def __call__(self, x: jax.Array, user_tokens: jax.Array | None = None,
               user_mask: jax.Array | None = None, **other_side_inputs) -> jax.Array:
    del other_side_inputs  # meant for other hooks
    if user_tokens is None:
      return x
    if user_mask is None:
      user_mask = jnp.ones(user_tokens.shape[:2], bool)
    h = self.attention(self.attention_norm(x), user_tokens.astype(x.dtype), user_mask)
    x = x + jnp.tanh(self.attn_gate[...]).astype(x.dtype) * h
    h = self.mlp(self.mlp_norm(x))
    return x + jnp.tanh(self.mlp_gate[...]).astype(x.dtype) * h


class UserLLM(nnx.Module):
  """User encoder -> Perceiver resampler -> projection -> decoder (cross-attention or soft prompt).

  Strategies (what `trainable_filter` selects, as in the paper):
    full  everything: decoder, user encoder, resampler, projection, cross-attention layers;
    lora  LoRA adapters on the decoder + user encoder + resampler + projection + cross-attention;
    enc   user encoder + resampler + projection + cross-attention (decoder frozen);
    proj  resampler + projection + cross-attention (user encoder and decoder frozen).

  The given decoder is never modified: the User-LLM holds its own copy (`nnx.clone`, which shares
  the weight arrays, so no memory is copied) and installs the cross-attention hooks and LoRA
  adapters there (`self.decoder`).
  """

  def __init__(self, decoder: pnn.Decoder, encoder_config: UserEncoderConfig, *,
               integration: str = "cross_attention", strategy: str = "enc", num_latents: int = 8,
               resampler_layers: int = 2, cross_attention_layers: Sequence[int] | None = None,
               cross_attention_heads: int | None = None, lora_rank: int = 8, seed: int = 0):
    if integration not in INTEGRATIONS:
      raise UserError(f"UserLLM: integration={integration!r}; use one of {INTEGRATIONS}.")
    if strategy not in STRATEGIES:
      raise UserError(f"UserLLM: strategy={strategy!r}; use one of {STRATEGIES}.")
    rngs = nnx.Rngs(seed)
    config = decoder.config
    # The caller's decoder stays untouched (a frozen base may serve other models or be reused).
    decoder = nnx.clone(decoder)
    self.integration = integration
    self.strategy = strategy
    self.num_latents = num_latents
    self.decoder = decoder
    self.user_encoder = UserEncoder(encoder_config, rngs=rngs)
    self.resampler = PerceiverResampler(encoder_config.embed_dim, num_latents=num_latents,
                                        num_layers=resampler_layers, num_heads=encoder_config.num_heads,
                                        rngs=rngs)
    self.projection = Linear(encoder_config.embed_dim, config.embed_dim, in_axis=None, out_axis="embed",
                             rngs=rngs)
    self.cross_attention_layers: tuple[int, ...] = ()
    if integration == "cross_attention":
      layers = tuple(cross_attention_layers if cross_attention_layers is not None else
                     range(config.num_layers - 1, -1, -max(1, config.num_layers // 4)))
      bad = [layer for layer in layers if not 0 <= layer < config.num_layers]
      if bad:
        raise UserError(f"UserLLM: cross_attention_layers {bad} do not exist (decoder layers "
                         f"0..{config.num_layers - 1}).")
      heads = cross_attention_heads or config.num_heads
      for layer in layers:
        if decoder.layers[layer].after is not None:
          raise UserError(f"UserLLM: decoder layer {layer} already has an `after` hook.")
        decoder.layers[layer].after = GatedCrossAttention(config.embed_dim, heads, rngs=rngs,
                                                          dtype=config.compute_dtype)
      self.cross_attention_layers = tuple(sorted(layers))
    if strategy == "lora":
      pnn.inject_lora(decoder, rank=lora_rank, name="user_llm", seed=seed)

  def trainable_filter(self):
    """The nnx filter of the parameters this strategy trains."""
    adapters = (nnx.PathContains("resampler"), nnx.PathContains("projection"), nnx.PathContains("after"))
    if self.strategy == "full":
      return nnx.Param
    if self.strategy == "lora":
      return nnx.Any(nnx.LoRAParam, nnx.PathContains("user_encoder"), *adapters)
    if self.strategy == "enc":
      return nnx.Any(nnx.PathContains("user_encoder"), *adapters)
    return nnx.Any(*adapters)

  def user_tokens(self, features: dict) -> jax.Array:
    """History features -> `[B, M, D]` user tokens in the decoder's width."""
    embeddings = self.user_encoder(features)
    latents = self.resampler(embeddings, features["history_mask"])
    return self.projection(latents).astype(self.decoder.config.compute_dtype)

  def hidden(self, features: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """Decoder hidden states `[B, P, D]` (before the final norm) of the prompt, conditioned on the user.

    Args:
      features: history features (see the module docstring).
      prompt_tokens: int32 `[B, P]`; prompt_mask: bool `[B, P]`, True for real tokens (left or right
        padding both work).
    """
    user = self.user_tokens(features)
    prompt_mask = prompt_mask.astype(bool)
    if self.integration == "cross_attention":
      return self.decoder(prompt_tokens, positions=pnn.positions_from_mask(prompt_mask),
                          attention_mask=pnn.padded_causal_mask(prompt_mask),
                          side_inputs={"user_tokens": user}, return_logits=False).hidden
    embeddings, mask = self._soft_prompt(user, prompt_tokens, prompt_mask)
    out = self.decoder(embeddings=embeddings, positions=pnn.positions_from_mask(mask),
                       attention_mask=pnn.padded_causal_mask(mask), return_logits=False)
    return out.hidden[:, self.num_latents:]

  def _soft_prompt(self, user: jax.Array, prompt_tokens: jax.Array, prompt_mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    config = self.decoder.config
    if config.scale_embeddings:  # the decoder multiplies every input embedding by sqrt(D)
      user = user / jnp.asarray(config.embed_dim ** 0.5, user.dtype)
    embeddings = jnp.concatenate([user, self.decoder.embed(prompt_tokens)], axis=1)
    mask = jnp.concatenate([jnp.ones(user.shape[:2], bool), prompt_mask.astype(bool)], axis=1)
    return embeddings, mask

  def soft_prompt_inputs(self, features: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
    """The soft-prompt integration's decoder input: `[B, M + P, D]` embeddings (the M user tokens,
    then the embedded prompt) and their `[B, M + P]` mask. With a LEFT-padded prompt the padding sits
    between the user tokens and the prompt, every row ends on a real token, and
    `sampling.prefill(decoder, None, mask, ..., embeddings=embeddings)` generates from it."""
    if self.integration != "soft_prompt":
      raise UserError("UserLLM.soft_prompt_inputs: only the soft-prompt integration has them.")
    return self._soft_prompt(self.user_tokens(features), prompt_tokens, prompt_mask)

  def __call__(self, features: dict, prompt_tokens: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """Logits `[B, P, vocab]` (fp32) of the prompt conditioned on the user (see `hidden`)."""
    return self.decoder.logits(self.hidden(features, prompt_tokens, prompt_mask))

  def option_logits(self, batch: dict) -> jax.Array:
    """`[B, C]` logits of each option's answer token after a LEFT-padded prompt (last position)."""
    last = self.hidden(batch, batch["prompt_tokens"], batch["prompt_mask"])[:, -1]
    return jnp.take_along_axis(self.decoder.logits(last), batch["options"], axis=-1)


def text_prompt_option_logits(decoder: pnn.Decoder, batch: dict) -> jax.Array:
  """The text-prompt baseline: `[B, C]` option logits of the plain decoder on LEFT-padded prompts
  (the history is written into the prompt)."""
  mask = batch["prompt_mask"].astype(bool)
  hidden = decoder(batch["prompt_tokens"], positions=pnn.positions_from_mask(mask),
                   attention_mask=pnn.padded_causal_mask(mask), return_logits=False).hidden
  return jnp.take_along_axis(decoder.logits(hidden[:, -1]), batch["options"], axis=-1)


def choice_loss(option_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy over the options and accuracy. option_logits `[B, C]`, labels `[B]`."""
  log_probs = jax.nn.log_softmax(option_logits.astype(jnp.float32))
  loss = -jnp.take_along_axis(log_probs, labels[:, None], -1).mean()
  accuracy = (jnp.argmax(option_logits, -1) == labels).astype(jnp.float32).mean()
  return loss, {"choice_ce": loss, "accuracy": accuracy}


def review_sequence(batch: dict) -> tuple[jax.Array, jax.Array]:
  """LEFT-padded prompt + RIGHT-padded target (tasks.ReviewBatches) -> `tokens, mask` `[B, P + S]`."""
  tokens = jnp.concatenate([batch["prompt_tokens"], batch["target_tokens"]], axis=1)
  mask = jnp.concatenate([batch["prompt_mask"], batch["target_mask"]], axis=1).astype(bool)
  return tokens, mask


def review_logits(model: nnx.Module, batch: dict, method: str) -> jax.Array:
  """Teacher-forced logits `[B, P + S, vocab]` of prompt + target: a `UserLLM` (`method='user_llm'`,
  conditioned on the batch's history) or a plain decoder ('text_prompt')."""
  tokens, mask = review_sequence(batch)
  if method == "user_llm":
    return model(batch, tokens, mask)
  return model(tokens, positions=pnn.positions_from_mask(mask), attention_mask=pnn.padded_causal_mask(mask)).logits


def review_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of the target tokens (EOS included) given `review_logits`; the prompt is
  not trained on. Metrics: `target_ce`, `token_accuracy`."""
  prompt_length = batch["prompt_tokens"].shape[1]
  loss, metrics = losses.weighted_cross_entropy(logits[:, prompt_length - 1:-1], batch["target_tokens"],
                                                batch["target_mask"])
  return loss, {"target_ce": loss, "token_accuracy": metrics["accuracy"]}
