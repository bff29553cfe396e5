"""Turn-level RL batches: multi-turn episodes (dialogues) as one `make_loss_fn` batch.

A multi-turn episode is one token sequence: a prompt, then the policy's turns (its actions: the ids
it sampled, the stop id included) interleaved with what the environment said back (context, never
trained on). Rewards come per policy turn, `turn_rewards [batch, max_turns]`.

The episode is laid out as `rl.rollout` describes (tokens / input_mask `[batch, P + R]`, per-token
arrays over the response part `[batch, R]`); the environment's tokens sit inside the response part
with `response_mask` 0. One extra array says which turn each token belongs to:

  token_turn `[batch, P + R]` int: t on the ids the policy generated in its turn t (0-based), -1
  elsewhere (prompt, environment tokens, padding). The prompt part must be all -1.

Credit assignment over turns (`turn_advantages`), with V(turn t) = the value head at the first token
of turn t (the state before the policy acts in that turn):
  * "reinforce": return_t = sum_{k>=t} gamma^(k-t) r_k (reward-to-go over turns), advantage_t =
    return_t - V(turn t) (REINFORCE with the value head as baseline; a policy without a value head
    has baseline 0);
  * "gae": generalized advantage estimation over turns (`rl.gae_advantages`, lambda = gae_lambda).
Every token the policy generated in turn t gets advantage_t; the value head regresses return_t at
the first token of turn t (`value_mask`). Nothing here knows what a dialogue, user or reward is.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from persona_jax.rl import advantages as adv
from persona_jax.rl.rollout import score

TURN_ESTIMATORS = ("reinforce", "gae")


def turn_advantages(rewards, values, mask, *, estimator: str = "reinforce", gamma: float = 1.0,
                    gae_lambda: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """(advantages, returns) `[batch, max_turns]` float32 over turns, 0 where `mask` is 0.

  rewards: `[batch, max_turns]` reward of each turn; values: `[batch, max_turns]` V(turn start);
  mask: `[batch, max_turns]` 1 for the turns the policy played.
  """
  if estimator not in TURN_ESTIMATORS:
    raise ValueError(f"turn_advantages: estimator={estimator!r} is unknown; choose one of "
                     f"{', '.join(TURN_ESTIMATORS)}.")
  mask = np.asarray(mask, np.float32)
  if estimator == "gae":
    advantages, returns = adv.gae_advantages(rewards, values, mask, gamma=gamma, lam=gae_lambda)
  else:  # REINFORCE with the value head as baseline
    returns = adv.discounted_returns(rewards, mask, gamma=gamma)
    advantages = (returns - np.asarray(values, np.float32)) * mask
  return np.asarray(advantages, np.float32), np.asarray(returns, np.float32)


def turn_starts(response_turn: np.ndarray, max_turns: int) -> tuple[np.ndarray, np.ndarray]:
  """(first response index of each turn `[batch, max_turns]` int (0 for turns not played), turn mask
  `[batch, max_turns]` float32) from `response_turn [batch, R]` (token_turn's response part).

  Raises when a row plays more than `max_turns` turns or skips a turn index.
  """
  batch = response_turn.shape[0]
  first = np.zeros((batch, max_turns), np.int64)
  mask = np.zeros((batch, max_turns), np.float32)
  for b in range(batch):
    played = np.unique(response_turn[b][response_turn[b] >= 0])
    if played.size and (played[-1] >= max_turns or played.size != played[-1] + 1):
      raise ValueError(f"turn batch: row {b} has policy turns {played.tolist()}; expected 0..T-1 "
                       f"with T <= max_turns={max_turns} (the width of turn_rewards).")
    for t in played:
      first[b, t] = int(np.argmax(response_turn[b] == t))
      mask[b, t] = 1.0
  return first, mask


def place_turn_logprobs(response_turn: np.ndarray,
                        turn_logprobs: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
  """`[batch, R]` float32: each turn's sampling log-probs (`turn_logprobs[b][t]`, one per generated
  id, in order) at that turn's tokens, 0 elsewhere. Raises on a count mismatch."""
  out = np.zeros(response_turn.shape, np.float32)
  for b, turns in enumerate(turn_logprobs):
    for t, logprobs in enumerate(turns):
      where = np.nonzero(response_turn[b] == t)[0]
      if len(where) != len(logprobs):
        raise ValueError(f"turn batch: row {b} turn {t} has {len(where)} policy tokens but "
                         f"{len(logprobs)} sampling log-probs.")
      out[b, where] = logprobs
  return out


def turn_batch(policy, *, tokens: np.ndarray, input_mask: np.ndarray, token_turn: np.ndarray,
               prompt_length: int, turn_rewards: np.ndarray,
               turn_logprobs: Sequence[Sequence[Sequence[float]]], reference=None,
               estimator: str = "reinforce", gamma: float = 1.0,
               gae_lambda: float = 0.95) -> dict[str, np.ndarray]:
  """The `rl.make_loss_fn` batch of `batch` multi-turn episodes (see the module docstring).

  Args:
    policy: the sampling policy (a `PolicyWithValue`, or a `Decoder`: baseline 0); its values are
      computed here.
    tokens / input_mask / token_turn: `[batch, P + R]` (module docstring); P = `prompt_length`.
    turn_rewards: `[batch, max_turns]` reward of each turn (ignored after a row's last turn).
    turn_logprobs: per row, per turn, the sampling log-prob of each generated id.
    reference: the frozen reference policy for the KL term (None: no `reference_logprobs`).
    estimator / gamma / gae_lambda: see `turn_advantages`.
  Returns:
    tokens, input_mask, response_mask, sampling_logprobs, advantages, returns, value_mask
    (`[batch, R]` except the first two), rewards `[batch]` (sum of the played turns' rewards) and,
    with a reference, reference_logprobs. The caller adds its own `metric/<name>` entries.
  """
  tokens = np.asarray(tokens, np.int32)
  input_mask = np.asarray(input_mask, bool)
  token_turn = np.asarray(token_turn)
  turn_rewards = np.asarray(turn_rewards, np.float64)
  if not tokens.shape == input_mask.shape == token_turn.shape:
    raise ValueError(f"turn batch: tokens {tokens.shape}, input_mask {input_mask.shape} and "
                     f"token_turn {token_turn.shape} must have the same shape [batch, P + R].")
  if (token_turn[:, :prompt_length] >= 0).any():
    raise ValueError(f"turn batch: policy tokens inside the prompt part (the first {prompt_length} "
                     "positions); the prompt must be context only.")
  max_turns = turn_rewards.shape[1]
  response_turn = token_turn[:, prompt_length:]
  response_length = response_turn.shape[1]
  response_mask = (response_turn >= 0).astype(np.float32)
  first, turn_mask = turn_starts(response_turn, max_turns)
  sampling_logprobs = place_turn_logprobs(response_turn, turn_logprobs)

  _, values = score(policy, tokens, input_mask, response_length)
  if values is None:
    values = np.zeros(response_mask.shape, np.float32)
  turn_values = np.take_along_axis(values, first, axis=1) * turn_mask
  rewards = turn_rewards * turn_mask
  advantages, returns = turn_advantages(rewards, turn_values, turn_mask, estimator=estimator,
                                        gamma=gamma, gae_lambda=gae_lambda)
  rows = np.arange(tokens.shape[0])[:, None]
  token_advantages = advantages[rows, np.maximum(response_turn, 0)] * response_mask
  value_mask = np.zeros_like(response_mask)
  value_returns = np.zeros_like(response_mask)
  for t in range(max_turns):
    live = turn_mask[:, t] > 0
    value_mask[live, first[live, t]] = 1.0
    value_returns[live, first[live, t]] = returns[live, t]
  batch = {
      "tokens": tokens, "input_mask": input_mask, "response_mask": response_mask,
      "sampling_logprobs": sampling_logprobs, "advantages": token_advantages.astype(np.float32),
      "returns": value_returns, "value_mask": value_mask,
      "rewards": rewards.sum(axis=1).astype(np.float32),
  }
  if reference is not None:
    reference_logprobs, _ = score(reference, tokens, input_mask, response_length)
    batch["reference_logprobs"] = (reference_logprobs * response_mask).astype(np.float32)
  return batch
