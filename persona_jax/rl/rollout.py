"""Rollouts: sample responses with the jit sampler and score them under any policy.

Layout shared by the whole `rl` package (and the batches `rl.policy.make_loss_fn` trains on):
  * `tokens`: `[batch, prompt_len + response_len]` int32, the left-padded prompt followed by the
    response (padding after a row's stop token);
  * `input_mask`: same shape, True for real tokens;
  * per-token arrays (`response_mask`, log-probs, advantages, values) cover the response part only,
    `[batch, response_len]`, aligned to the response tokens: entry t is about `tokens[:, P + t]`
    predicted from everything before it (P = prompt_len). Only those positions' logits are computed,
    which keeps `[batch, response_len, vocab]` (not the whole sequence) in memory.

A multi-turn method may put other tokens (a user's turn) inside the response part and leave them
out of `response_mask`: they are context, not actions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax import sampling
from persona_jax.nn import padded_causal_mask, positions_from_mask
from persona_jax.nn.logprobs import token_log_probs


@dataclasses.dataclass
class Rollout:
  """A batch of sampled responses (host numpy arrays).

  tokens / input_mask: `[batch, prompt_len + response_len]` (see the module docstring).
  response_mask: `[batch, response_len]` float32, 1 on sampled tokens (the stop token included).
  sampling_logprobs: `[batch, response_len]` float32, log-prob of each sampled token under the
    sampling policy's unmodified distribution (0 where masked).
  response_lengths: `[batch]` int32 sampled tokens per row, the stop token included.
  done: `[batch]` bool, the row emitted a stop token (False: cut at `max_new_tokens`).
  prompt_length: P, the padded prompt width.
  group_size: samples per prompt; rows `i*k .. i*k+k-1` answer prompt `i`.
  """
  tokens: np.ndarray
  input_mask: np.ndarray
  response_mask: np.ndarray
  sampling_logprobs: np.ndarray
  response_lengths: np.ndarray
  done: np.ndarray
  prompt_length: int
  group_size: int

  @property
  def batch_size(self) -> int:
    return self.tokens.shape[0]

  @property
  def response_length(self) -> int:
    return self.tokens.shape[1] - self.prompt_length

  @property
  def response_tokens(self) -> np.ndarray:
    """`[batch, response_len]` sampled ids (padding after the stop token)."""
    return self.tokens[:, self.prompt_length:]

  def response_token_lists(self, stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Each row's sampled ids without padding and without a final stop token from `stop_tokens`."""
    stops = set(int(t) for t in stop_tokens)
    rows = []
    for row, length in zip(self.response_tokens, self.response_lengths):
      ids = [int(t) for t in row[:length]]
      if ids and ids[-1] in stops:
        ids = ids[:-1]
      rows.append(ids)
    return rows


def response_hidden(decoder, tokens: jax.Array, input_mask: jax.Array, response_length: int,
                    side_inputs: dict | None = None) -> jax.Array:
  """Hidden states `[batch, response_len, embed]` (pre final norm) at the positions that predict
  the response tokens (P-1 .. P+R-2). Traceable (use inside a loss)."""
  out = decoder(tokens, positions=positions_from_mask(input_mask),
                attention_mask=padded_causal_mask(input_mask), side_inputs=side_inputs,
                return_logits=False)
  prompt_length = tokens.shape[1] - response_length
  return out.hidden[:, prompt_length - 1:-1]


def response_logprobs(decoder, tokens: jax.Array, input_mask: jax.Array, response_length: int,
                      side_inputs: dict | None = None) -> jax.Array:
  """`[batch, response_len]` fp32 log pi(response token t | everything before). Traceable."""
  hidden = response_hidden(decoder, tokens, input_mask, response_length, side_inputs)
  logits = decoder.logits(hidden)
  return token_log_probs(logits, tokens[:, tokens.shape[1] - response_length:])


@functools.partial(jax.jit, static_argnames=("graphdef", "response_length"))
def _score_program(graphdef, state, tokens, input_mask, *, response_length: int):
  model = nnx.merge(graphdef, state)
  if hasattr(model, "value_head"):  # a PolicyWithValue
    return model(tokens, input_mask, response_length)
  return response_logprobs(model, tokens, input_mask, response_length), None


def score(model, tokens, input_mask, response_length: int) -> tuple[np.ndarray, np.ndarray | None]:
  """Log-probs `[batch, response_len]` of the response under `model` (a `Decoder` or a
  `rl.policy.PolicyWithValue`) and, for the latter, its values `[batch, response_len]`.

  Jitted with the weights as arguments: one compilation serves the policy at every step and the
  reference (same structure).
  """
  graphdef, state = nnx.split(model)
  logprobs, values = _score_program(graphdef, state, jnp.asarray(tokens, jnp.int32),
                                    jnp.asarray(input_mask, bool), response_length=response_length)
  return np.asarray(logprobs), (None if values is None else np.asarray(values))


def sample_rollouts(decoder, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    rng: jax.Array, samples_per_prompt: int = 1, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
                    prompt_bucket: int = 16, cache_bucket: int = 64) -> Rollout:
  """Samples `samples_per_prompt` responses to each prompt in one batched `sampling.generate` call.

  Args:
    decoder: the policy's decoder.
    prompts: token-id lists (any lengths, each non-empty).
    max_new_tokens: response budget R (the response part is always R wide).
    rng: PRNG key.
    samples_per_prompt: k; rows are grouped per prompt (for RLOO/GRPO).
    temperature / top_k / top_p: sampling settings (log-probs are of the unmodified distribution, so
      PPO ratios are exact only at temperature 1 without truncation).
    stop_tokens: ids that end a response (default the config's eos).
    pad_id: padding id (default the config's pad id, else 0).
    prompt_bucket: prompts are left-padded to a multiple of this (the longest prompt or more: one
      fixed width for every batch, so nothing recompiles).
  """
  if samples_per_prompt < 1:
    raise ValueError(f"sample_rollouts: samples_per_prompt must be >= 1, got {samples_per_prompt}.")
  if temperature <= 0:
    raise ValueError(f"sample_rollouts: RL samples need temperature > 0, got {temperature}.")
  config = decoder.config
  if pad_id is None:
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
  repeated = [list(p) for p in prompts for _ in range(samples_per_prompt)]
  prompt_tokens, prompt_mask = sampling.pad_prompts(repeated, pad_id=pad_id,
                                                    length_multiple=prompt_bucket)
  result = sampling.generate(decoder, (prompt_tokens, prompt_mask), max_new_tokens=max_new_tokens,
                             rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_tokens=stop_tokens, pad_id=pad_id, cache_bucket=cache_bucket)
  response = np.asarray(result.tokens)
  lengths = np.asarray(result.lengths)
  # `generate` always returns R = max_new_tokens columns (padding after each row's stop).
  response_mask = (np.arange(response.shape[1])[None, :] < lengths[:, None])
  logprobs = np.asarray(result.logprobs, np.float32)
  return Rollout(
      tokens=np.concatenate([prompt_tokens, response], axis=1).astype(np.int32),
      input_mask=np.concatenate([prompt_mask, response_mask], axis=1),
      response_mask=response_mask.astype(np.float32),
      sampling_logprobs=logprobs * response_mask, response_lengths=lengths.astype(np.int32),
      done=np.asarray(result.done), prompt_length=prompt_tokens.shape[1],
      group_size=samples_per_prompt)
