"""Jit-compiled autoregressive sampling over the decoder's kv cache.

Three layers, so a method can step in between prefill and decode (the cache coprocessor appends
latent embeddings to the cache after the prompt):

  * `prefill(decoder, prompt_tokens, prompt_mask, max_len)` runs the left-padded prompt through the
    decoder once and returns a `PrefillState`: the kv cache, the next-token logits, which cache slots
    hold real entries (`key_valid`) and each row's next rotary position.
  * `decode(decoder, state, max_new_tokens=..., ...)` continues from ANY such state with a
    `lax.while_loop`, one token per iteration, until every row emitted a stop token or
    `max_new_tokens` were generated. The state (and so the cache) is donated: the loop updates the
    cache in place instead of copying it.
  * `generate(decoder, prompts, ...)` = prefill + decode, the convenience entry point.

Prompts are left-padded so every row's last prompt token sits in the same slot; positions are
counted over real tokens only (`positions_from_mask`), so a padded row computes exactly what it
would compute alone, and `key_valid` hides the padding slots from every query.

The decoder's parameters are arguments of the compiled programs (`nnx.split`), never constants
baked into them, so one compilation serves any weights of the same structure; programs are cached by
jax per (shapes, static sampling switches). Cache lengths are rounded up to `cache_bucket` slots to
limit recompiles across prompt lengths.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.errors import UserError
from persona_jax.nn.attention import cache_mask, init_cache, positions_from_mask
from persona_jax.nn.decoder import Decoder
from persona_jax.nn.quantization import convert_decoder_weights
from persona_jax.nn.logprobs import token_log_probs


# State and results ----------------------------------------------------------------------------------
@dataclasses.dataclass
class PrefillState:
  """Everything `decode` needs to continue a batch of sequences.

  cache: kv cache (`persona_jax.nn.attention.init_cache` layout); `cache[i]['length']` is the next
    slot to write (shared by all rows).
  logits: `[batch, vocab]` fp32 logits of the next token.
  key_valid: `[batch, max_len]` bool, True for cache slots that hold real entries (not padding).
    A method that appends entries to the cache marks their slots valid here.
  next_positions: `[batch]` int32 rotary position of each row's next token.
  """
  cache: tuple[dict, ...]
  logits: jax.Array
  key_valid: jax.Array
  next_positions: jax.Array

  @property
  def batch_size(self) -> int:
    return self.logits.shape[0]

  @property
  def max_len(self) -> int:
    return self.key_valid.shape[1]


@dataclasses.dataclass
class GenerateResult:
  """What `decode` / `generate` return.

  tokens: `[batch, max_new_tokens]` int32 generated ids; `pad_id` after a row's stop token.
  logprobs: `[batch, max_new_tokens]` fp32 log-probability of each sampled token under the model's
    unmodified distribution (temperature 1, no top-k/top-p truncation), 0 after the stop token.
    These are the behaviour-policy log-probs RL needs.
  lengths: `[batch]` int32 number of generated tokens, the stop token included.
  done: `[batch]` bool, True for rows that emitted a stop token.
  state: the `PrefillState` after the loop: the cache holds the prompt and every emitted token (the
    slots a row wrote after its stop token are marked invalid), `logits` predict each row's next
    token, so `decode` can continue from it (multi-turn, a method reading the cache).
  """
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  done: jax.Array
  state: PrefillState


jax.tree_util.register_dataclass(
    PrefillState, data_fields=["cache", "logits", "key_valid", "next_positions"], meta_fields=[])
jax.tree_util.register_dataclass(
    GenerateResult, data_fields=["tokens", "logprobs", "lengths", "done", "state"], meta_fields=[])


# Sampling of one step -------------------------------------------------------------------------------
def sample_tokens(logits: jax.Array, rng: jax.Array | None, *, greedy: bool,
                  temperature: jax.Array | float = 1.0, top_k: int | None = None,
                  top_p: jax.Array | float | None = None) -> jax.Array:
  """Picks one token per row from `logits: [batch, vocab]`; returns `[batch]` int32.

  Greedy takes the argmax (first index on ties). Otherwise, as Hugging Face orders its warpers:
  divide by `temperature`, keep the `top_k` largest logits, keep the smallest set of tokens whose
  probability mass reaches `top_p` (the most likely token is always kept), then sample.
  Ties at a cut-off are kept.
  """
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# Compiled programs ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill_program(graphdef, params, tokens, mask, side_inputs, embeddings=None, *,
                     max_len: int) -> PrefillState:
  decoder = nnx.merge(graphdef, params)
  batch, prompt_len = mask.shape
  cache = init_cache(decoder.config, batch, max_len)
  positions = positions_from_mask(mask)
  key_valid = jnp.zeros((batch, max_len), bool).at[:, :prompt_len].set(mask)
  out = decoder(tokens if embeddings is None else None, embeddings=embeddings, positions=positions,
                attention_mask=cache_mask(key_valid, prompt_len, 0), cache=cache,
                side_inputs=side_inputs, return_logits=False)
  # Left padding puts every row's last prompt token in the last slot: one logits row per sequence.
  logits = decoder.logits(out.hidden[:, -1])
  next_positions = jnp.sum(mask.astype(jnp.int32), axis=-1)
  return PrefillState(cache=out.cache, logits=logits, key_valid=key_valid,
                      next_positions=next_positions)


def _decode_program(graphdef, params, state: PrefillState, rng, temperature, top_p, stop_ids, pad_id,
                    side_inputs, *, max_new_tokens: int, greedy: bool, top_k: int | None,
                    use_top_p: bool) -> GenerateResult:
  """The compiled loop. `stop_ids: [num_stop]` int32 (-1 never matches), `pad_id` int32 scalar."""
  decoder = nnx.merge(graphdef, params)
  batch = state.batch_size

  def pick(logits, step):
    step_rng = None if greedy else jax.random.fold_in(rng, step)
    token = sample_tokens(logits, step_rng, greedy=greedy, temperature=temperature, top_k=top_k,
                          top_p=top_p if use_top_p else None)
    return token, token_log_probs(logits, token)

  def record(step, token, logprob, tokens, logprobs, lengths, done):
    emitted = ~done  # a row that already stopped emits padding
    tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(emitted, token, pad_id)[:, None], (0, step))
    logprobs = jax.lax.dynamic_update_slice(
        logprobs, jnp.where(emitted, logprob, 0.0)[:, None], (0, step))
    lengths = lengths + emitted.astype(jnp.int32)
    done = done | (emitted & jnp.isin(token, stop_ids))
    return tokens, logprobs, lengths, done

  def cond(carry):
    step, _, (_, _, _, done) = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, state, buffers = carry
    done_before = buffers[3]
    token, logprob = pick(state.logits, step)
    buffers = record(step, token, logprob, *buffers)
    # Feed the token back so the state stays a complete continuation point (cache holds every
    # emitted token, logits predict the next one). Slots a stopped row writes stay invalid and its
    # position stops advancing, so the final state continues every row correctly.
    slot = state.cache[0]["length"]
    key_valid = jax.lax.dynamic_update_slice(state.key_valid, ~done_before[:, None], (0, slot))
    out = decoder(token[:, None], positions=state.next_positions[:, None],
                  attention_mask=cache_mask(key_valid, 1, slot), cache=state.cache,
                  side_inputs=side_inputs)
    state = PrefillState(cache=out.cache, logits=out.logits[:, 0], key_valid=key_valid,
                         next_positions=state.next_positions + (~done_before).astype(jnp.int32))
    return step + 1, state, buffers

  buffers = (jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool))
  _, state, (tokens, logprobs, lengths, done) = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), state, buffers))
  return GenerateResult(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done, state=state)


# Stop ids and the pad id are array arguments, so changing them does not recompile.
_DECODE_STATIC = ("graphdef", "max_new_tokens", "greedy", "top_k", "use_top_p")
# The state (its kv cache above all) is donated: the loop reuses its buffers in place.
_decode_donating = jax.jit(_decode_program, static_argnames=_DECODE_STATIC, donate_argnames=("state",))
_decode_copying = jax.jit(_decode_program, static_argnames=_DECODE_STATIC)


# Public API -----------------------------------------------------------------------------------------
def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def prefill(decoder: Decoder, prompt_tokens, prompt_mask, max_len: int, *,
            side_inputs: dict | None = None, embeddings=None) -> PrefillState:
  """Runs left-padded prompts through the decoder into a fresh kv cache of `max_len` slots.

  Args:
    decoder: the model.
    prompt_tokens: `[batch, prompt_len]` int ids, left-padded.
    prompt_mask: `[batch, prompt_len]` bool, True for real tokens. Every row must end with a real
      token (left padding) and hold at least one.
    max_len: cache slots; at least `prompt_len + max_new_tokens` (plus whatever a method appends).
    side_inputs: keyword arguments for `Block.after` modules a method installed.
    embeddings: `[batch, prompt_len, embed]` input embeddings INSTEAD of `prompt_tokens` (pass
      `prompt_tokens=None`), e.g. a soft prompt followed by embedded tokens; left-padded like
      tokens (`prompt_mask` marks the real positions). The decoder treats them as it treats
      `Decoder(embeddings=...)` (gemma's sqrt(d) scale applies). Decoding then continues on tokens.
  Returns:
    `PrefillState` with the cache filled up to `prompt_len`.
  """
  prompt_mask = jnp.asarray(prompt_mask, bool)
  if embeddings is not None:
    if prompt_tokens is not None:
      raise UserError("prefill: pass prompt_tokens=None with embeddings (one input, not both).")
    embeddings = jnp.asarray(embeddings)
    if embeddings.ndim != 3 or embeddings.shape[:2] != prompt_mask.shape:
      raise UserError(f"prefill: embeddings {embeddings.shape} must be [batch, prompt_len, embed] "
                       f"with prompt_mask {prompt_mask.shape} = [batch, prompt_len].")
    prompt_tokens = jnp.zeros(prompt_mask.shape, jnp.int32)  # shape only; not read
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
    raise UserError(f"prefill: prompt_tokens {prompt_tokens.shape} and prompt_mask "
                     f"{prompt_mask.shape} must both be [batch, prompt_len].")
  if max_len < prompt_tokens.shape[1]:
    raise UserError(f"prefill: max_len={max_len} is shorter than the prompt ({prompt_tokens.shape[1]}).")
  if _is_concrete(prompt_mask) and not bool(jnp.all(prompt_mask[:, -1])):
    raise UserError("prefill: prompt_mask must be left-padded (every row's last entry True, i.e. a "
                     "non-empty prompt ending in the last column); build it with `pad_prompts`.")
  graphdef, params = nnx.split(decoder)
  return _prefill_program(graphdef, params, prompt_tokens, prompt_mask, side_inputs, embeddings,
                          max_len=max_len)


def decode(decoder: Decoder, state: PrefillState, *, max_new_tokens: int, rng: jax.Array | None = None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           stop_tokens: Sequence[int] = (), pad_id: int | None = None,
           side_inputs: dict | None = None, donate: bool = True) -> GenerateResult:
  """Generates up to `max_new_tokens` tokens per row, continuing from `state`.

  Args:
    decoder: the model (same structure as the one that built `state`).
    state: a `PrefillState` (from `prefill`, possibly modified by a method). Donated when `donate`:
      its arrays must not be used afterwards.
    max_new_tokens: tokens to generate per row (fewer when every row stops early).
    rng: PRNG key; required unless greedy (`temperature == 0`).
    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k: keep only the `top_k` most likely tokens (None: all).
    top_p: nucleus sampling mass in (0, 1] (None or 1: no truncation).
    stop_tokens: ids that end a row (the stop token is emitted and counted in `lengths`).
    pad_id: id written after a row stops (default the config's pad id, else 0).
    side_inputs: keyword arguments for `Block.after` modules a method installed.
    donate: donate `state` to the compiled loop (no copy of the cache).
  """
  if max_new_tokens < 1:
    raise UserError(f"decode: max_new_tokens must be >= 1, got {max_new_tokens}.")
  if temperature < 0:
    raise UserError(f"decode: temperature must be >= 0 (0 = greedy), got {temperature}.")
  if top_k is not None and top_k < 1:
    raise UserError(f"decode: top_k must be >= 1 or None, got {top_k}.")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise UserError(f"decode: top_p must be in (0, 1] or None, got {top_p}.")
  greedy = temperature == 0
  if not greedy and rng is None:
    raise UserError("decode: sampling with temperature > 0 needs an explicit `rng` key "
                     "(e.g. jax.random.key(0)).")
  length = state.cache[0]["length"]
  if _is_concrete(length) and int(length) + max_new_tokens > state.max_len:
    raise UserError(
        f"decode: the cache has {state.max_len} slots, {int(length)} filled; {max_new_tokens} new "
        f"tokens need {int(length) + max_new_tokens}. Prefill with a larger max_len.")
  config = decoder.config
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  use_top_p = top_p is not None and top_p < 1.0
  graphdef, params = nnx.split(decoder)
  program = _decode_donating if donate else _decode_copying
  return program(
      graphdef, params, state, rng if rng is not None else jax.random.key(0),
      jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p if use_top_p else 1.0),
      jnp.asarray(sorted({int(t) for t in stop_tokens}) or [-1], jnp.int32), jnp.int32(pad_id),
      side_inputs, max_new_tokens=max_new_tokens, greedy=greedy,
      top_k=None if greedy else top_k, use_top_p=use_top_p and not greedy)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                length_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists into `tokens [batch, prompt_len]` int32 and `mask` bool.

  `prompt_len` is the longest prompt rounded up to `length_multiple` (fewer distinct shapes, fewer
  compilations).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("pad_prompts: every prompt needs at least one token (got an empty prompt list "
                     "or an empty prompt).")
  prompt_len = round_up(max(len(p) for p in prompts), length_multiple)
  tokens = np.full((len(prompts), prompt_len), pad_id, np.int32)
  mask = np.zeros((len(prompts), prompt_len), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, prompt_len - len(prompt):] = prompt
    mask[row, prompt_len - len(prompt):] = True
  return tokens, mask


def generate(decoder: Decoder, prompts: Sequence[Sequence[int]] | tuple[Any, Any], *,
             max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
             cache_bucket: int = 64, prompt_bucket: int = 16,
             side_inputs: dict | None = None, decode_weights: str = "float32") -> GenerateResult:
  """Prefill + decode.

  Args:
    decoder: the model.
    prompts: a list of token-id lists (any lengths), or a `(tokens, mask)` pair of left-padded
      `[batch, prompt_len]` arrays.
    max_new_tokens, rng, temperature, top_k, top_p, pad_id, side_inputs: as in `decode`.
    stop_tokens: ids that end a row; default the config's `eos_token_id` (none if unset); pass
      `()` to never stop early.
    cache_bucket: the cache length is rounded up to a multiple of this (fewer recompiles).
    prompt_bucket: list prompts are left-padded to a multiple of this length.
    decode_weights: `'float32'` (the decoder as it is), `'bfloat16'` or `'int8'` (weight-only,
      per-channel scales): the weights are converted once, before prefill, by
      `persona_jax.nn.quantization.convert_decoder_weights`. When the same weights generate many
      times, convert once yourself and pass the converted decoder (conversion is a pass over the
      weights). Separate from the config's compute dtype.
  """
  decoder = convert_decoder_weights(decoder, decode_weights)
  config = decoder.config
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  if stop_tokens is None:
    eos = config.eos_token_id
    stop_tokens = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
  if isinstance(prompts, tuple) and len(prompts) == 2 and hasattr(prompts[0], "shape"):
    tokens, mask = prompts
  else:
    tokens, mask = pad_prompts(prompts, pad_id=pad_id, length_multiple=prompt_bucket)
  max_len = round_up(tokens.shape[1] + max_new_tokens, cache_bucket)
  state = prefill(decoder, tokens, mask, max_len, side_inputs=side_inputs)
  return decode(decoder, state, max_new_tokens=max_new_tokens, rng=rng, temperature=temperature,
                top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
                side_inputs=side_inputs, donate=True)


@dataclasses.dataclass
class TextGenerations:
  """What `generate_in_batches` returns, one entry per prompt in the given order.

  token_ids: the generated ids of each row, cut before its stop token (the stop token not included).
  stopped: whether each row ended on a stop token (False: it ran to `max_new_tokens`).
  texts: `decode(token_ids)` per row when a `decode` function was given, else None.
  """
  token_ids: list[list[int]]
  stopped: list[bool]
  texts: list[str] | None = None


def generate_in_batches(decoder: Decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                        batch_size: int = 8, decode=None, rng: jax.Array | None = None,
                        temperature: float = 0.0, stop_tokens: Sequence[int] | None = None,
                        pad_id: int | None = None, prompt_length: int | None = None,
                        side_inputs_fn=None) -> TextGenerations:
  """Generates for many prompts in fixed-shape batches, cuts each row at its stop token, decodes.

  The one "generate in batches, cut at EOS, decode" loop of the code base. Every batch has the same
  shape (the last one is filled with copies of its last prompt, whose outputs are dropped) and every
  prompt is left-padded to `prompt_length` (default: the longest prompt rounded up to 16), so the
  sampler compiles once.

  Args:
    decoder / max_new_tokens / temperature / stop_tokens / pad_id: as in `generate`.
    batch_size: rows per call.
    decode: `decode(ids) -> str` (a vocabulary's or tokenizer's), to fill `texts`.
    rng: sampling key (folded with the batch index; None for greedy).
    prompt_length: the common prompt width (a prompt longer than it is an error).
    side_inputs_fn: `side_inputs_fn(start, stop) -> side_inputs` for the rows `start:stop` (e.g.
      User-LLM's user tokens), padded to `batch_size` rows by the caller's function.
  """
  if not prompts:
    return TextGenerations([], [], [] if decode is not None else None)
  longest = max(len(p) for p in prompts)
  width = prompt_length if prompt_length is not None else round_up(longest, 16)
  if longest > width:
    raise UserError(f"generate_in_batches: a prompt has {longest} tokens, more than prompt_length="
                     f"{width}.")
  token_ids, stopped = [], []
  for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
    chunk = [list(p) for p in prompts[start:start + batch_size]]
    rows = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - rows)
    batch_rng = None if rng is None else jax.random.fold_in(rng, batch_index)
    side_inputs = None if side_inputs_fn is None else side_inputs_fn(start, start + rows)
    result = generate(decoder, chunk, max_new_tokens=max_new_tokens, rng=batch_rng,
                      temperature=temperature, stop_tokens=stop_tokens, pad_id=pad_id,
                      prompt_bucket=width, side_inputs=side_inputs)
    tokens, lengths, done = (np.asarray(result.tokens), np.asarray(result.lengths),
                             np.asarray(result.done))
    for row in range(rows):
      token_ids.append([int(t) for t in tokens[row, :lengths[row] - int(done[row])]])
      stopped.append(bool(done[row]))
  texts = [decode(ids) for ids in token_ids] if decode is not None else None
  return TextGenerations(token_ids, stopped, texts)
