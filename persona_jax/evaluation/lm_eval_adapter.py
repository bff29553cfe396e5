"""The JAX decoder as an lm-evaluation-harness model (`pip install 'persona_jax[lm_eval]'`).

  from persona_jax.evaluation.lm_eval_adapter import DecoderLM, lm_eval_model
  lm = lm_eval_model(decoder, "smollm2-135m-instruct", batch_size=8)
  results = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"], ...)

`DecoderLM` implements the harness's three request types on the core alone (no lm_eval import):
  * `loglikelihood([(context, continuation), ...]) -> [(sum log p(continuation | context), is_greedy)]`;
  * `loglikelihood_rolling([(text,), ...]) -> [sum log p(text)]` over windows of `max_length` tokens,
    the first token conditioned on the prefix token (the harness's own windowing);
  * `generate_until([(context, {'until': [...], 'max_gen_toks': n, ...}), ...]) -> [text]`, greedy
    or sampled, cut at the first stop string.
`lm_eval_model(...)` wraps it in a subclass of `lm_eval.api.model.LM` (lm_eval is imported there,
never when this module is imported), ready for `lm_eval.simple_evaluate(model=...)`.

Methods plug in without the core knowing them (a method room passes callables):
  * `logits_fn(tokens [batch, seq] int32) -> logits [batch, seq, vocab]`: the scoring forward pass,
    e.g. a coprocessor's cache-augmented forward or a decoder with injected memory. Rows are
    right-padded with `pad_id`; only positions before the padding are read, so a causal model needs
    no mask. Default: `decoder(tokens).logits`, jit-compiled once per padded shape.
  * `generate_fn(prompts: list[list[int]], max_new_tokens: int, stop_tokens: tuple[int, ...],
    temperature: float) -> list[list[int]]`: the new tokens of each prompt. Default:
    `persona_jax.sampling.generate_in_batches` over `decoder`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persona_jax.errors import UserError

LogitsFn = Callable[[jax.Array], jax.Array]
GenerateFn = Callable[[list[list[int]], int, tuple[int, ...], float], list[list[int]]]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


@jax.jit
def _continuation_scores(logits, targets, weights):
  """Per-row sum of target log-probs over `weights` and whether every weighted target is the argmax.

  logits: `[batch, seq, vocab]`; targets / weights: `[batch, seq]`."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  total = jnp.sum(jnp.where(weights, target_log_probs, 0.0), axis=-1)
  all_greedy = jnp.all(jnp.where(weights, greedy, True), axis=-1)
  return total, all_greedy


def _args(request) -> tuple:
  """A harness `Instance` (its `.args`) or a plain tuple."""
  return tuple(getattr(request, "args", request))


class DecoderLM:
  """Scores and generates with a decoder (or a method's forward through `logits_fn` / `generate_fn`).

  Args:
    decoder: a `persona_jax.nn.Decoder` (may be None when both hooks are given).
    vocabulary: a `seqio.Vocabulary` or a source for `persona_jax.data.get_vocabulary` ('bytes',
      'smollm2-135m-instruct', a tokenizer.json path, ...).
    batch_size: rows per forward pass (the last batch is padded, so one shape compiles).
    max_length: the longest token sequence one forward pass sees; longer requests keep their last
      `max_length` tokens (the harness's convention), rolling loglikelihoods use windows of it.
      Default: the decoder config's `max_position_embeddings` if it has one, else 2048.
    max_gen_toks: default new-token budget of `generate_until` (a request's `max_gen_toks` wins).
    prefix_token_id: what an empty context is conditioned on (default: BOS if the vocabulary or the
      decoder config has one, else EOS).
    length_bucket: padded lengths are rounded up to a multiple of this (fewer compilations).
    logits_fn / generate_fn: the hooks described in the module docstring.
  """

  def __init__(self, decoder=None, vocabulary: Any = "bytes", *, batch_size: int = 8,
               max_length: int | None = None, max_gen_toks: int = 256,
               prefix_token_id: int | None = None, length_bucket: int = 64,
               logits_fn: LogitsFn | None = None, generate_fn: GenerateFn | None = None,
               pad_id: int = 0):
    if decoder is None and (logits_fn is None or generate_fn is None):
      raise UserError("DecoderLM needs a decoder, or both logits_fn and generate_fn.")
    if batch_size < 1:
      raise UserError(f"DecoderLM: batch_size={batch_size} must be >= 1.")
    if isinstance(vocabulary, str) or not hasattr(vocabulary, "encode"):
      from persona_jax.data import get_vocabulary  # pylint: disable=g-import-not-at-top
      vocabulary = get_vocabulary(vocabulary)
    self.decoder = decoder
    self.vocabulary = vocabulary
    self.batch_size = batch_size
    config = getattr(decoder, "config", None)
    self.max_length = max_length or getattr(config, "max_position_embeddings", None) or 2048
    self.max_gen_toks = max_gen_toks
    self.length_bucket = length_bucket
    self.pad_id = pad_id
    if prefix_token_id is None:
      prefix_token_id = getattr(config, "bos_token_id", None)
    if prefix_token_id is None:
      prefix_token_id = getattr(vocabulary, "eos_id", None)
    if prefix_token_id is None:
      raise UserError("DecoderLM: pass prefix_token_id (the vocabulary and the decoder config "
                       "have no BOS/EOS token to condition an empty context on).")
    self.prefix_token_id = int(prefix_token_id)
    self._logits_fn = logits_fn or self._decoder_logits_fn(decoder)
    self._generate_fn = generate_fn or self._decoder_generate_fn(decoder)

  # The default hooks: the decoder itself ------------------------------------------------------------
  @staticmethod
  def _decoder_logits_fn(decoder) -> LogitsFn:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    graphdef, state = nnx.split(decoder)

    @jax.jit
    def forward(state, tokens):
      return nnx.merge(graphdef, state)(tokens).logits

    return lambda tokens: forward(state, tokens)

  def _decoder_generate_fn(self, decoder) -> GenerateFn:
    def generate(prompts, max_new_tokens, stop_tokens, temperature):
      from persona_jax import sampling  # pylint: disable=g-import-not-at-top
      rng = jax.random.PRNGKey(0) if temperature > 0 else None
      return sampling.generate_in_batches(
          decoder, prompts, max_new_tokens=max_new_tokens, batch_size=self.batch_size,
          temperature=temperature, rng=rng, stop_tokens=stop_tokens, pad_id=self.pad_id,
          prompt_length=_round_up(max(len(p) for p in prompts), self.length_bucket)).token_ids
    return generate

  # Tokens ------------------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    return [int(t) for t in self.vocabulary.encode(text)]

  def decode(self, tokens: Sequence[int]) -> str:
    return self.vocabulary.decode([int(t) for t in tokens])

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As the harness's HF model: trailing spaces of the context move to the continuation, and the
    continuation's tokens are the whole's minus the context's (tokenizers merge across the seam)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.encode(context + continuation)
    context_tokens = self.encode(context)
    if whole[:len(context_tokens)] != context_tokens:  # the seam merged: split by length instead
      return whole[:len(context_tokens)], whole[len(context_tokens):]
    return context_tokens, whole[len(context_tokens):]

  # Scoring -----------------------------------------------------------------------------------------
  def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """`[(context_tokens, continuation_tokens)] -> [(sum log p(continuation | context), is_greedy)]`.

    An empty context is conditioned on `prefix_token_id`; a pair longer than `max_length + 1` tokens
    keeps its last ones (the continuation must fit)."""
    rows = []
    for context, continuation in pairs:
      context, continuation = list(context), list(continuation)
      if not continuation:
        raise UserError("DecoderLM: an empty continuation has no likelihood to score.")
      if not context:
        context = [self.prefix_token_id]
      if len(continuation) > self.max_length:
        raise UserError(f"DecoderLM: a continuation of {len(continuation)} tokens does not fit "
                         f"max_length={self.max_length}.")
      whole = (context + continuation)[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    results: list[tuple[float, bool]] = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      width = min(_round_up(max(len(r[0]) for r in chunk), self.length_bucket), self.max_length)
      tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
      targets = np.zeros((self.batch_size, width), np.int32)
      weights = np.zeros((self.batch_size, width), bool)
      for i, (inputs, target, num_scored) in enumerate(chunk):
        tokens[i, :len(inputs)] = inputs
        targets[i, :len(target)] = target
        weights[i, len(target) - num_scored:len(target)] = True
      logits = self._logits_fn(jnp.asarray(tokens))
      total, greedy = jax.device_get(_continuation_scores(logits, targets, weights))
      results.extend((float(total[i]), bool(greedy[i])) for i in range(len(chunk)))
    return results

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    return self.score([self.encode_pair(*_args(r)[:2]) for r in requests])

  def rolling_windows(self, tokens: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Disjoint `(context, continuation)` windows that score every token of `tokens` exactly once:
    the first predicts `tokens[:max_length]` from the prefix token, each later one predicts the next
    `max_length - 1`... tokens from as much preceding text as fits (the harness's rolling windows
    with context length 1)."""
    tokens = list(tokens)
    windows, position = [], 0
    while position < len(tokens):
      if position == 0:
        count = min(self.max_length, len(tokens))
        windows.append(([self.prefix_token_id], tokens[:count]))
      else:
        count = min(self.max_length, len(tokens) - position)
        context_start = max(0, position + count - 1 - self.max_length)
        windows.append((tokens[context_start:position], tokens[position:position + count]))
      position += count
    return windows

  def loglikelihood_rolling(self, requests) -> list[float]:
    windows, owners = [], []
    for index, request in enumerate(requests):
      for window in self.rolling_windows(self.encode(_args(request)[0])):
        windows.append(window)
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (log_likelihood, _) in zip(owners, self.score(windows)):
      totals[owner] += log_likelihood
    return totals

  # Generation --------------------------------------------------------------------------------------
  def generate_until(self, requests) -> list[str]:
    outputs: list[str | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = {}
    for index, request in enumerate(requests):
      context, gen_kwargs = _args(request)[:2]
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) \
          else 0.0
      prompt = self.encode(context) or [self.prefix_token_id]
      prompt = prompt[-max(self.max_length - max_new_tokens, 1):]
      groups.setdefault((max_new_tokens, temperature), []).append((index, prompt, until))
    eos = getattr(self.vocabulary, "eos_id", None)
    stop_tokens = () if eos is None else (int(eos),)
    for (max_new_tokens, temperature), members in groups.items():
      new_tokens = self._generate_fn([m[1] for m in members], max_new_tokens, stop_tokens,
                                     temperature)
      for (index, _, until), tokens in zip(members, new_tokens):
        text = self.decode(tokens)
        for stop in until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        outputs[index] = text
    return outputs


@functools.cache
def _lm_eval_class():
  from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top

  class LMEvalDecoder(LM):
    """`DecoderLM` as an `lm_eval.api.model.LM` (single process)."""

    def __init__(self, adapter: DecoderLM):
      super().__init__()
      self.adapter = adapter

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.adapter.loglikelihood(requests)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.adapter.loglikelihood_rolling(requests)

    def generate_until(self, requests, disable_tqdm: bool = False):
      del disable_tqdm
      return self.adapter.generate_until(requests)

    @property
    def tokenizer_name(self) -> str:
      return type(self.adapter.vocabulary).__name__

  return LMEvalDecoder


def lm_eval_model(decoder=None, vocabulary: Any = "bytes", **kwargs):
  """A `DecoderLM` wrapped as an `lm_eval.api.model.LM` (imports lm_eval; `pip install
  'persona_jax[lm_eval]'`). Keyword arguments are `DecoderLM`'s."""
  try:
    cls = _lm_eval_class()
  except ImportError as error:
    raise ImportError("lm_eval_model needs the lm-evaluation-harness: pip install "
                      "'persona_jax[lm_eval]'.") from error
  adapter = decoder if isinstance(decoder, DecoderLM) else DecoderLM(decoder, vocabulary, **kwargs)
  return cls(adapter)
