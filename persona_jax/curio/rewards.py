"""CURIO's turn-level rewards from a sequence of user-model beliefs, and the extrinsic end reward.

A dialogue of T agent turns has beliefs b_0 .. b_T over the K user types (b_0 before any turn, b_t
after the user's reply to turn t), `beliefs [T+1, K]` (or `[batch, T+1, K]`). Turn t (0-based)
gets the intrinsic reward r_t computed from (b_t, b_{t+1}); `[T]` (or `[batch, T]`):

Potential-based shaping, r_t = gamma * phi(b_{t+1}) - phi(b_t) (Ng et al. 1999; CURIO sec. 4):
  * "diff_acc":     phi(b) = b(u*)
  * "diff_log_acc": phi(b) = log b(u*)
  * "diff_ent":     phi(b) = -H(b)
Their discounted sum telescopes: sum_t gamma^t r_t = gamma^T phi(b_T) - phi(b_0), so they cannot
change which policy is optimal, only how fast it is found.

Not potential-based (they can be farmed by long dialogues, as the paper warns):
  * "acc":       r_t = b_{t+1}(u*)
  * "ent":       r_t = -H(b_{t+1})
  * "info_gain": r_t = KL(b_{t+1} || b_t), how far the reply moved the belief (our reading of the
    paper's InfoGain; it needs no label).

The extrinsic reward is 1 at the final turn of a successful dialogue, else 0 (`extrinsic_rewards`);
`turn_rewards` combines both for a batch of dialogues (what the RL stage trains on).
All in float64 numpy: these are host-side quantities computed once per rollout.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_EPS = 1e-12


def entropy(beliefs: np.ndarray) -> np.ndarray:
  """H(b) in nats over the last axis."""
  b = np.asarray(beliefs, np.float64)
  return -np.sum(b * np.log(np.maximum(b, _EPS)), axis=-1)


def true_type_probability(beliefs: np.ndarray, user_type) -> np.ndarray:
  """b(u*): `beliefs [..., T+1, K]`, `user_type` int or `[...]` ints -> `[..., T+1]`."""
  b = np.asarray(beliefs, np.float64)
  index = np.asarray(user_type)[..., None, None]
  index = np.broadcast_to(index, b.shape[:-1] + (1,))
  return np.take_along_axis(b, index, axis=-1)[..., 0]


POTENTIALS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "diff_acc": lambda b, u: true_type_probability(b, u),
    "diff_log_acc": lambda b, u: np.log(np.maximum(true_type_probability(b, u), _EPS)),
    "diff_ent": lambda b, u: -entropy(b),
}


def shaping(potentials: np.ndarray, gamma: float) -> np.ndarray:
  """gamma * phi_{t+1} - phi_t: `potentials [..., T+1]` -> `[..., T]`."""
  phi = np.asarray(potentials, np.float64)
  return gamma * phi[..., 1:] - phi[..., :-1]


def _acc(beliefs, user_type, gamma):
  del gamma
  return true_type_probability(beliefs, user_type)[..., 1:]


def _ent(beliefs, user_type, gamma):
  del user_type, gamma
  return -entropy(beliefs)[..., 1:]


def _info_gain(beliefs, user_type, gamma):
  del user_type, gamma
  b = np.maximum(np.asarray(beliefs, np.float64), _EPS)
  return np.sum(b[..., 1:, :] * (np.log(b[..., 1:, :]) - np.log(b[..., :-1, :])), axis=-1)


def _shaped(name):
  def reward(beliefs, user_type, gamma):
    return shaping(POTENTIALS[name](beliefs, user_type), gamma)
  return reward


INTRINSIC_REWARDS: dict[str, Callable] = {
    "diff_acc": _shaped("diff_acc"), "diff_log_acc": _shaped("diff_log_acc"),
    "diff_ent": _shaped("diff_ent"), "acc": _acc, "ent": _ent, "info_gain": _info_gain,
}


def intrinsic_rewards(name: str, beliefs: np.ndarray, user_type, gamma: float = 1.0) -> np.ndarray:
  """Per-turn intrinsic reward `[..., T]` of variant `name` (see the module docstring).

  Args:
    name: one of `INTRINSIC_REWARDS`.
    beliefs: `[..., T+1, K]` probabilities (rows sum to 1).
    user_type: the true type index u*, int or `[...]`.
    gamma: the shaping discount (only the diff_* variants use it).
  """
  if name not in INTRINSIC_REWARDS:
    raise ValueError(f"curio: unknown intrinsic reward {name!r}; choose one of "
                     f"{', '.join(INTRINSIC_REWARDS)} (or 'none' for the extrinsic-only baseline).")
  return INTRINSIC_REWARDS[name](beliefs, user_type, gamma)


def extrinsic_rewards(num_turns: int, success: bool, length: int | None = None) -> np.ndarray:
  """`[length]` zeros with 1.0 at turn `num_turns - 1` when the dialogue succeeded."""
  out = np.zeros(length if length is not None else num_turns, np.float64)
  if success:
    out[num_turns - 1] = 1.0
  return out


def turn_rewards(reward: str, beliefs: np.ndarray, user_types: np.ndarray, num_turns: np.ndarray,
                 successes: np.ndarray, *, turn_cap: int, gamma: float = 1.0,
                 intrinsic_coefficient: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(total, extrinsic, intrinsic) rewards `[batch, turn_cap]` of a batch of dialogues, 0 after a
  dialogue's last turn; total = extrinsic + intrinsic_coefficient * intrinsic.

  reward: "none" (extrinsic only) or a key of `INTRINSIC_REWARDS`; beliefs `[batch, turn_cap + 1,
  K]`; user_types, num_turns, successes `[batch]`.
  """
  turn_mask = np.arange(turn_cap)[None, :] < np.asarray(num_turns)[:, None]
  extrinsic = np.stack([extrinsic_rewards(int(n), bool(s), turn_cap)
                        for n, s in zip(num_turns, successes)])
  if reward == "none":
    intrinsic = np.zeros_like(extrinsic)
  else:
    intrinsic = intrinsic_rewards(reward, beliefs, np.asarray(user_types), gamma) * turn_mask
  return extrinsic + intrinsic_coefficient * intrinsic, extrinsic, intrinsic
