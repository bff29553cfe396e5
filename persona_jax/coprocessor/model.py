"""The cache coprocessor (Liu et al., "Deliberation in Latent Space via Differentiable Cache
Augmentation", arXiv 2412.17747).

A frozen decoder reads the input and fills its kv cache. A coprocessor of the same architecture reads
that cache as its prefix, takes `num_latents` trainable soft-token embeddings as input and emits
`num_latents` latent embeddings (its final, normed hidden states) in one parallel pass. The latents are
fed to the frozen decoder as input embeddings after the augmentation point, so the decoder computes
keys and values for them; decoding then goes on as usual.

Layout of one augmentation at point p (training and inference alike):
  cache: x_0 .. x_p (the frozen decoder's keys/values), then the latents z_1 .. z_{N_L};
  then the N_A ahead tokens x_{p+1} .. x_{p+N_A}, teacher-forced, whose outputs predict
  x_{p+2} .. x_{p+N_A+1}: "position i" is the prediction made by ahead token i.
This is the layout of a T5X/Gemma-style decode loop, whose cache holds the prompt but its last token
and whose first step feeds that token: augmenting "at the end of a prompt" x_0 .. x_{n} puts the
latents after x_{n-1}, and x_n is the first ahead token. Every prediction is made by a real token that
attends to the augmented cache (a prediction made by a latent itself starts far from the frozen
decoder's: 7,260 vs 43.5 perplexity on SmolLM2 before training, docs/RESULTS.md).

Rotary positions: the latents take no positions of their own. All of them sit at the position of
the first ahead token, and the ahead tokens keep their original positions, so the text's relative
distances are those the decoder was trained on: x_{p+1} still finds x_p at distance 1, where its
previous-token heads look, and the latents at distance 0. (Giving the latents positions p+1..p+N_L
and shifting the ahead tokens by N_L trained worse: docs/RESULTS.md.)

Variants (the paper's ablations), chosen by `variant`:
  * "full":        coprocessor initialized from the decoder's weights, all of it trained (default);
  * "lora":        coprocessor = decoder weights (frozen) + trainable LoRA adapters;
  * "scratch":     coprocessor randomly initialized, all of it trained;
  * "pause":       no coprocessor: the soft tokens themselves are inserted ("pause tokens");
  * "activations": as "full", but the coprocessor reads the decoder's last-layer activations (run
                   through its own layers) instead of the decoder's kv cache.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax import sampling
from persona_jax.coprocessor import masks
from persona_jax.nn import Decoder, init_cache, inject_lora
from persona_jax.nn.layers import logical_param
from persona_jax.nn.logprobs import token_log_probs

VARIANTS = ("full", "lora", "scratch", "pause", "activations")


class SoftTokens(nnx.Param):
  """The trainable soft-token embeddings (a Param subtype so filters can name them)."""


class CacheCoprocessor(nnx.Module):
  """Frozen decoder + trainable coprocessor and soft tokens.

  Attributes:
    decoder: the frozen decoder (never in the optimizer).
    coprocessor: a `Decoder` of the same config (None for "pause").
    soft_tokens: `[num_latents, embed]` trainable embeddings.
  """

  def __init__(self, decoder: Decoder, *, num_latents: int, variant: str = "full",
               lora_rank: int = 16, seed: int = 0):
    if variant not in VARIANTS:
      raise ValueError(f"Unknown coprocessor variant {variant!r}; choose from {VARIANTS}.")
    if num_latents <= 0:
      raise ValueError(f"num_latents must be positive, got {num_latents}.")
    self.variant = variant
    self.num_latents = num_latents
    self.decoder = decoder
    config = decoder.config
    if variant == "pause":
      self.coprocessor = nnx.data(None)
    elif variant == "scratch":
      self.coprocessor = Decoder(config, rngs=nnx.Rngs(seed + 1))
    else:
      self.coprocessor = nnx.clone(decoder)
      # Own buffers: the trainer donates trainable state, which must not alias the frozen decoder's.
      nnx.update(self.coprocessor, jax.tree.map(jnp.copy, nnx.state(self.coprocessor)))
      if variant == "lora":
        inject_lora(self.coprocessor, rank=lora_rank, alpha=lora_rank, seed=seed + 2)
    # Latents leave the coprocessor through its final norm (RMS ~ the norm's scale) but enter the
    # decoder as input embeddings, whose rows are much smaller (17x for SmolLM2). A fixed factor maps
    # one scale onto the other, so at step 0 a latent looks like a token embedding: with tied
    # embeddings, the embedding of what the coprocessor predicts next.
    embedding_rms = float(jnp.sqrt(jnp.mean(jnp.square(decoder.embedding[...].astype(jnp.float32)))))
    norm_scale = decoder.final_norm.offset + decoder.final_norm.scale[...].astype(jnp.float32)
    self.latent_scale = embedding_rms / float(jnp.sqrt(jnp.mean(jnp.square(norm_scale))))
    # Soft tokens start as embeddings of random vocabulary entries: the right scale for the decoder.
    rows = jax.random.randint(jax.random.key(seed), (num_latents,), 0, config.vocab_size)
    self.soft_tokens = logical_param(decoder.embedding[...][rows], (None, "embed"), kind=SoftTokens)

  def trainable_filter(self):
    """The nnx filter of what this variant trains."""
    if self.variant == "lora":
      return nnx.Any(nnx.LoRAParam, SoftTokens)
    if self.variant == "pause":
      return SoftTokens
    # The coprocessor reads soft-token embeddings and emits hidden states: its token embedding table
    # (and tied output projection) is never used, so it stays out of the optimizer.
    return nnx.Any(nnx.All(nnx.PathContains("coprocessor"), nnx.Not(nnx.PathContains("embedding"))),
                   SoftTokens)

  # Pieces ---------------------------------------------------------------------------------------
  def _as_input_embeddings(self, normed: jax.Array) -> jax.Array:
    """Final-normed hidden states -> decoder input embeddings (embedding-table scale).

    Also undoes the sqrt(d) factor gemma applies to every input embedding.
    """
    config = self.decoder.config
    x = normed * jnp.asarray(self.latent_scale, normed.dtype)
    return x / jnp.asarray(config.embed_dim ** 0.5, x.dtype) if config.scale_embeddings else x

  def latents_from_cache(self, cache, visible_originals: jax.Array, latent_positions: jax.Array,
                         cache_size: int, originals_hidden: jax.Array | None = None,
                         originals_mask: jax.Array | None = None,
                         originals_positions: jax.Array | None = None) -> jax.Array:
    """Runs the coprocessor for K traces at once.

    Args:
      cache: the frozen decoder's kv cache holding the T originals (length T).
      visible_originals: `[batch, K, T]` which originals each trace may see.
      latent_positions: `[batch, K * num_latents]` rotary positions of the latents.
      cache_size: key slots of `cache`.
      originals_hidden: `[batch, T, embed]` decoder last-layer activations ("activations" variant).
      originals_mask: `[batch, T, T]` the originals' own (packed-causal) mask ("activations").
      originals_positions: `[batch, T]` the originals' rotary positions ("activations").
    Returns:
      latents `[batch, K * num_latents, embed]` (input embeddings for the decoder).
    """
    batch, num_traces, seq = visible_originals.shape
    count = num_traces * self.num_latents
    soft = jnp.broadcast_to(self.soft_tokens[...], (batch, num_traces) + self.soft_tokens.shape)
    soft = soft.reshape(batch, count, -1)
    if self.coprocessor is None:  # pause tokens
      return soft
    mask = masks.trace_group_mask(visible_originals, self.num_latents, cache_size)
    if self.variant == "activations":
      # The coprocessor re-reads the decoder's last-layer activations through its own layers instead
      # of receiving the decoder's kv cache.
      prefix = self._as_input_embeddings(self.decoder.final_norm(originals_hidden))
      inputs = jnp.concatenate([prefix, soft.astype(prefix.dtype)], axis=1)
      prefix_mask = jnp.pad(originals_mask, ((0, 0), (0, 0), (0, count)))
      full_mask = jnp.concatenate([prefix_mask, mask[:, :, : seq + count]], axis=1)
      positions = jnp.concatenate([originals_positions, latent_positions], axis=1)
      hidden = self.coprocessor(embeddings=inputs, positions=positions, attention_mask=full_mask,
                                return_logits=False).hidden[:, seq:]
    else:
      hidden = self.coprocessor(embeddings=soft, positions=latent_positions, attention_mask=mask,
                                cache=cache, return_logits=False).hidden
    return self._as_input_embeddings(self.coprocessor.final_norm(hidden))

  # Training-time forward ------------------------------------------------------------------------
  def forward_traces(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                     trace_positions: jax.Array, ahead_tokens: int,
                     with_baseline: bool = False,
                     latent_source_rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """All K traces of every row in one pass.

    Args:
      tokens, segment_ids, positions: `[batch, T]` (packed or not; segment 0 is padding).
      trace_positions: `[batch, K]` augmentation points p (see `masks.sample_trace_positions`).
      ahead_tokens: N_A, the tokens after p whose loss is measured.
      with_baseline: also return the frozen decoder's own NLL of the same tokens (no augmentation).
      latent_source_rows: `[batch]` int, the control "coprocessor fed another row's cache": row b's
        trace k gets the latents the coprocessor computed from row `latent_source_rows[b]`'s cache
        at that row's trace k (None: every row its own latents).
    Returns:
      dict with `nll` `[batch, K, N_A]` fp32 (position i: NLL of x_{p+1+i}, predicted by ahead token
      x_{p+i} reading the augmented cache) and, with_baseline, `baseline_nll` of the same shape.
    """
    originals = self.encode_originals(tokens, segment_ids, positions,
                                      num_traces=trace_positions.shape[1], ahead_tokens=ahead_tokens)
    return self.augmented_nll(originals, tokens, segment_ids, positions, trace_positions,
                              ahead_tokens, with_baseline=with_baseline,
                              latent_source_rows=latent_source_rows)

  def encode_originals(self, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array, *,
                       num_traces: int, ahead_tokens: int) -> dict:
    """The frozen decoder over the originals, with room in its cache for K trace groups.

    Returns a dict with `cache` (length T, size T + K * group) and `hidden` `[batch, T, embed]`
    (last-layer activations before the final norm), both without gradient.
    """
    batch, seq = tokens.shape
    cache_size = seq + num_traces * (self.num_latents + ahead_tokens)
    cache = init_cache(self.decoder.config, batch, cache_size)
    out = self.decoder(tokens, positions=positions,
                       attention_mask=masks.original_tokens_mask(segment_ids, cache_size),
                       cache=cache, return_logits=False)
    return {"cache": jax.lax.stop_gradient(out.cache), "hidden": jax.lax.stop_gradient(out.hidden)}

  def augmented_nll(self, originals: dict, tokens: jax.Array, segment_ids: jax.Array,
                    positions: jax.Array, trace_positions: jax.Array, ahead_tokens: int,
                    with_baseline: bool = False,
                    latent_source_rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """Coprocessor + decoder over all trace groups, reading the originals' cache (see forward_traces)."""
    batch, seq = tokens.shape
    num_traces = trace_positions.shape[1]
    num_latents = self.num_latents
    group = num_latents + ahead_tokens  # latents, then the N_A ahead tokens teacher-forced
    cache, originals_hidden = originals["cache"], originals["hidden"]
    cache_size = cache[0]["k"].shape[1]
    if cache_size != seq + num_traces * group:
      raise ValueError(f"The originals' cache has {cache_size} slots; expected "
                       f"{seq} + {num_traces} x {group} (encode_originals with the same K and N_A).")

    visible = masks.original_visibility(segment_ids, trace_positions)  # [B, K, T]
    trace_start = jnp.take_along_axis(positions, trace_positions, axis=1)  # rotary position of p
    # Every latent takes the rotary position of the first ahead token (see the module docstring).
    latent_positions = jnp.broadcast_to(trace_start[:, :, None] + 1,
                                        (batch, num_traces, num_latents)).reshape(batch, -1)

    # The coprocessor: K x num_latents latents.
    latents = self.latents_from_cache(
        cache, visible, latent_positions, cache_size, originals_hidden,
        originals_mask=masks.original_tokens_mask(segment_ids, seq), originals_positions=positions)
    if latent_source_rows is not None:  # the control: latents computed from another row's cache
      latents = jnp.take(latents, latent_source_rows, axis=0)

    # The decoder again, on [latents, ahead tokens] per trace, reading the same original cache.
    offsets = jnp.arange(1, ahead_tokens + 1)
    input_index = jnp.minimum(trace_positions[:, :, None] + offsets, seq - 1)  # x_{p+1..p+N_A}
    target_index = jnp.minimum(input_index + 1, seq - 1)  # x_{p+2..p+N_A+1}
    gather = lambda index: jnp.take_along_axis(tokens, index.reshape(batch, -1), axis=1).reshape(
        batch, num_traces, ahead_tokens)
    ahead_inputs = self.decoder.embed(gather(input_index))  # [B, K, N_A, E]
    targets = gather(target_index)
    inputs = jnp.concatenate(
        [latents.reshape(batch, num_traces, num_latents, -1).astype(ahead_inputs.dtype), ahead_inputs],
        axis=2).reshape(batch, num_traces * group, -1)
    group_positions = jnp.concatenate(
        [jnp.broadcast_to(trace_start[:, :, None] + 1, (batch, num_traces, num_latents)),
         trace_start[:, :, None] + 1 + jnp.arange(ahead_tokens)], axis=2).reshape(batch, -1)
    second = self.decoder(embeddings=inputs, positions=group_positions,
                          attention_mask=masks.trace_group_mask(visible, group, cache_size),
                          cache=cache, return_logits=False)
    hidden = second.hidden.reshape(batch, num_traces, group, -1)[:, :, num_latents:]
    logits = self.decoder.logits(hidden)  # [B, K, N_A, V]
    result = {"nll": -token_log_probs(logits, targets)}
    if with_baseline:
      # The decoder's own prediction of the same targets, made by the same tokens in place.
      source = input_index.reshape(batch, -1)
      source_hidden = jnp.take_along_axis(originals_hidden, source[:, :, None], axis=1)
      baseline_logits = self.decoder.logits(source_hidden).reshape(
          batch, num_traces, ahead_tokens, -1)
      result["baseline_nll"] = jax.lax.stop_gradient(-token_log_probs(baseline_logits, targets))
    return result

  # Inference ------------------------------------------------------------------------------------
  def augment_cache(self, cache, key_valid: jax.Array, next_positions: jax.Array,
                    last_tokens: jax.Array):
    """Augments a prompt's cache and feeds the prompt's last token (see the module docstring).

    Args:
      cache: the frozen decoder's cache holding each prompt but its last token (left-padded rows,
        all ending at the cache's `length`).
      key_valid: `[batch, cache_size]` real (non-padding) filled slots.
      next_positions: `[batch]` rotary position each row's next entry would take.
      last_tokens: `[batch]` each prompt's last token: the first ahead token.
    Returns:
      (cache, key_valid, next_positions, logits): the cache now holds the latents and the last
      token; `logits` `[batch, vocab]` predict the first token after the prompt.
    """
    cache, key_valid = self.append_latents(cache, key_valid, next_positions)
    cache_size = key_valid.shape[1]
    slots = jnp.arange(cache_size)[None, :]
    # The prompt's last token reads the augmented cache at its own position (the latents take no
    # positions of their own); its logits start the decoding.
    length = cache[0]["length"]
    key_valid = key_valid | (slots == length)
    out = self.decoder(last_tokens[:, None], positions=next_positions[:, None],
                       attention_mask=(key_valid & (slots <= length))[:, None, :], cache=cache)
    return out.cache, key_valid, next_positions + 1, out.logits[:, -1]

  def append_latents(self, cache, key_valid: jax.Array, next_positions: jax.Array):
    """Appends the latents to a cache holding each prompt but its last token (left-padded rows).

    Args: as `augment_cache`.
    Returns:
      (cache, key_valid): the cache with `num_latents` latent entries after the prompt, all at
      rotary position `next_positions` (the position of the prompt's last token, fed next).
    """
    batch, cache_size = key_valid.shape
    length = cache[0]["length"]
    num_latents = self.num_latents
    slots = jnp.arange(cache_size)[None, :]
    visible = key_valid & (slots < length)  # one trace: the whole cached prompt
    latent_positions = jnp.broadcast_to(next_positions[:, None], (batch, num_latents))
    group_mask = _appended_group_mask(visible, length, num_latents, cache_size)
    soft = jnp.broadcast_to(self.soft_tokens[...], (batch,) + self.soft_tokens.shape)
    if self.coprocessor is None:
      latents = soft
    elif self.variant == "activations":
      raise ValueError("augment_cache: the 'activations' variant reads the prompt's last-layer "
                       "activations, which a kv cache does not keep; evaluate it with forward_traces.")
    else:
      hidden = self.coprocessor(embeddings=soft, positions=latent_positions,
                                attention_mask=group_mask, cache=cache, return_logits=False).hidden
      latents = self._as_input_embeddings(self.coprocessor.final_norm(hidden))
    cache = self.decoder(embeddings=latents, positions=latent_positions, attention_mask=group_mask,
                         cache=cache, return_logits=False).cache
    key_valid = key_valid | ((slots >= length) & (slots < length + num_latents))
    return cache, key_valid


def _appended_group_mask(visible_prefix: jax.Array, start, group_size: int,
                         cache_size: int) -> jax.Array:
  """`[batch, group, cache]`: a group written at slot `start` sees the visible prefix and itself causally."""
  slots = jnp.arange(cache_size)
  query_slots = start + jnp.arange(group_size)
  own = (slots[None, :] >= start) & (slots[None, :] <= query_slots[:, None])
  prefix = visible_prefix[:, None, :] & (slots[None, None, :] < start)
  return prefix | own[None]


@nnx.jit
def _augment(model: CacheCoprocessor, state: sampling.PrefillState,
             last_tokens: jax.Array) -> sampling.PrefillState:
  cache, key_valid, next_positions, logits = model.augment_cache(state.cache, state.key_valid,
                                                                 state.next_positions, last_tokens)
  return sampling.PrefillState(cache=cache, logits=logits, key_valid=key_valid,
                               next_positions=next_positions)


def _feed_teacher_forced(decoder: Decoder, cache, key_valid: jax.Array, next_positions: jax.Array,
                         inputs: jax.Array) -> jax.Array:
  """Logits `[batch, M, vocab]` of M tokens fed after what the cache holds (causally, at rotary
  positions next_positions + 0..M-1)."""
  cache_size = key_valid.shape[1]
  length = cache[0]["length"]
  slots = jnp.arange(cache_size)[None, :]
  num_inputs = inputs.shape[1]
  mask = _appended_group_mask(key_valid & (slots < length), length, num_inputs, cache_size)
  out = decoder(inputs, positions=next_positions[:, None] + jnp.arange(num_inputs)[None, :],
                attention_mask=mask, cache=cache)
  return out.logits


@nnx.jit
def _continuation_nll(model: CacheCoprocessor, state: sampling.PrefillState, inputs: jax.Array,
                      targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  baseline = _feed_teacher_forced(model.decoder, state.cache, state.key_valid, state.next_positions,
                                  inputs)
  cache, key_valid = model.append_latents(state.cache, state.key_valid, state.next_positions)
  augmented = _feed_teacher_forced(model.decoder, cache, key_valid, state.next_positions, inputs)
  return -token_log_probs(baseline, targets), -token_log_probs(augmented, targets)


def continuation_nll(model: CacheCoprocessor, heads: np.ndarray, head_mask: np.ndarray,
                     inputs: np.ndarray, targets: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Per-token NLL of continuations after prompts, frozen decoder alone and with the cache
  augmented once at the end of each prompt (the layout of the module docstring).

  Args:
    heads: `[batch, W]` each prompt but its last token, left-padded (`sampling.pad_prompts`).
    head_mask: `[batch, W]` bool, True on real tokens.
    inputs: `[batch, M]` the prompt's last token, then the continuation but its last token
      (right-padded; what follows a row's end does not change its earlier NLLs).
    targets: `[batch, M]` the continuation (right-padded).
  Returns:
    (baseline_nll, augmented_nll), each `[batch, M]` fp32 (read each row up to its length). Both
    read the same prefilled cache; the augmented one has the latents appended after it.
  """
  max_len = heads.shape[1] + model.num_latents + inputs.shape[1]
  state = sampling.prefill(model.decoder, jnp.asarray(heads), jnp.asarray(head_mask), max_len)
  return _continuation_nll(model, state, jnp.asarray(inputs, jnp.int32),
                           jnp.asarray(targets, jnp.int32))


def generate(model: CacheCoprocessor, prompts, *, max_new_tokens: int, augment: bool = True,
             prompt_bucket: int = 16, **sampling_options) -> sampling.GenerateResult:
  """Generates after each prompt, with the cache augmented once at the prompt's end.

  The cache is prefilled with each prompt but its last token, the latents are appended, and the last
  prompt token is fed next (the layout training uses; see the module docstring).

  Args:
    model: the trained coprocessor (its frozen decoder generates).
    prompts: token-id lists (any lengths >= 2; left-padded here).
    max_new_tokens: tokens to generate per row.
    augment: False decodes with the unchanged decoder (the coprocessor is optional at inference).
    prompt_bucket: prompts (without their last token) are left-padded to a multiple of this (a
      fixed width for every batch compiles the loop once).
    sampling_options: `persona_jax.sampling.decode` options (temperature, top_k, top_p, rng,
      stop_tokens, pad_id).
  """
  config = model.decoder.config
  pad_id = sampling_options.pop("pad_id", None)
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  if sampling_options.get("stop_tokens") is None:
    eos = config.eos_token_id
    sampling_options["stop_tokens"] = () if eos is None else (
        (eos,) if isinstance(eos, int) else tuple(eos))
  if not augment:
    return sampling.generate(model.decoder, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                             prompt_bucket=prompt_bucket, **sampling_options)
  if any(len(prompt) < 2 for prompt in prompts):
    raise ValueError("coprocessor.generate: augmenting needs prompts of at least 2 tokens (the cache "
                     "holds all but the last, which is fed after the latents).")
  heads, mask = sampling.pad_prompts([prompt[:-1] for prompt in prompts], pad_id=pad_id,
                                     length_multiple=prompt_bucket)
  last_tokens = jnp.asarray([prompt[-1] for prompt in prompts], jnp.int32)
  max_len = sampling.round_up(heads.shape[1] + model.num_latents + 1 + max_new_tokens, 64)
  state = sampling.prefill(model.decoder, heads, mask, max_len)
  state = _augment(model, state, last_tokens)
  return sampling.decode(model.decoder, state, max_new_tokens=max_new_tokens, pad_id=pad_id,
                         **sampling_options)
