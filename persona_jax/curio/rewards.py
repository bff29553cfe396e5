"""CURIO's turn-level rewards from a sequence of user-model beliefs, and the extrinsic end reward.

A dialogue of n agent turns has beliefs b_0 .. b_n over the K user types (b_0 before any turn, b_t
after the user's reply to turn t), `beliefs [T+1, K]` (or `[batch, T+1, K]`, T >= n: rows after a
dialogue's end repeat its last belief). Turn t (0-based) gets the intrinsic reward r_t computed from
(b_t, b_{t+1}); `[T]` (or `[batch, T]`).

Potential-based shaping (Ng et al. 1999; CURIO sec. 4), with a potential phi of the belief:
  * "diff_acc":     phi(b) = b(u*)
  * "diff_log_acc": phi(b) = log b(u*)
  * "diff_ent":     phi(b) = -H(b)
Default (these names): true potential-based shaping, r_t = gamma * phi_{t+1} - phi_t with the
potential of the TERMINAL state set to 0 (phi_n = 0 after the dialogue's last turn n, whether it
ended by a final answer or at the turn cap). The discounted sum telescopes to the constant
sum_t gamma^t r_t = -phi(b_0), the same for every dialogue with the same user, so the shaped return
of any two complete dialogues differs exactly by their extrinsic return: the rewards cannot change
which policy is optimal (tests/curio/test_rewards.py checks this identity on random dialogues). They
help only through turn-level credit: with per-turn returns (reward-to-go), return_t = G^ext_t -
phi(b_t), i.e. the potential acts like a state-dependent baseline (Wiewiora 2003: shaping with
terminal zeroing = initialising the value function with phi). Train on per-turn returns /
advantages (`rl.turns`), never one return per episode (that return only gains a constant).

  * "diff_acc_paper", "diff_log_acc_paper", "diff_ent_paper": the same differences WITHOUT terminal
    zeroing, r_t = gamma * phi(b_{t+1}) - phi(b_t) for every turn, as the CURIO paper writes them.
    With gamma = 1 their sum is phi(b_n) - phi(b_0): a bonus for leaving the user model confident
    (DiffLogAcc: up to log K ~ 2.1 for K = 8, twice the task reward of 1), which does change the
    optimal policy (it pays for informative questions even when they do not change the answer).

Not potential-based (the paper's "reward hacking" cases; they can be farmed by dialogue length or
by ending early, depending on their sign):
  * "acc":       r_t = b_{t+1}(u*)            (>= 0 every turn: longer dialogues earn more)
  * "ent":       r_t = -H(b_{t+1})            (<= 0 every turn until the belief is certain)
  * "info_gain": r_t = KL(b_{t+1} || b_t), how far the reply moved the belief. Our reading; it needs
    no label. NOT confirmed against the paper's text (see docs/RESULTS.md, CURIO rewards).

The extrinsic reward is 1 at the final turn of a successful dialogue, else 0 (`extrinsic_rewards`);
`turn_rewards` combines both for a batch of dialogues (what the RL stage trains on).
All in float64 numpy: these are host-side quantities computed once per rollout.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

_EPS = 1e-12
PAPER_SUFFIX = "_paper"


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


def _num_turns(potentials: np.ndarray, num_turns) -> np.ndarray:
  """`[...]` ints (default: every row has T = potentials.shape[-1] - 1 turns), checked."""
  turns = potentials.shape[-1] - 1
  if num_turns is None:
    return np.full(potentials.shape[:-1], turns, np.int64)
  n = np.broadcast_to(np.asarray(num_turns, np.int64), potentials.shape[:-1])
  if (n < 0).any() or (n > turns).any():
    raise ValueError(f"curio rewards: num_turns must be in 0..{turns} (the beliefs have {turns + 1} "
                     f"rows), got {np.unique(n).tolist()}.")
  return n


def shaping(potentials: np.ndarray, gamma: float, num_turns=None, *,
            terminal_zero: bool = True) -> np.ndarray:
  """Potential-based shaping rewards `[..., T]` from `potentials [..., T+1]`.

  terminal_zero=True: r_t = gamma * phi_{t+1} - phi_t with phi_n := 0 at the terminal state n =
  `num_turns` (default T), and r_t = 0 for t >= n. terminal_zero=False (the paper's form):
  r_t = gamma * phi_{t+1} - phi_t for every t, nothing zeroed.
  """
  phi = np.array(potentials, np.float64)
  if not terminal_zero:
    return gamma * phi[..., 1:] - phi[..., :-1]
  n = _num_turns(phi, num_turns)
  index = np.arange(phi.shape[-1])
  phi = np.where(index >= n[..., None], 0.0, phi)  # phi(terminal) = 0 (and nothing after it)
  rewards = gamma * phi[..., 1:] - phi[..., :-1]
  return np.where(index[:-1] < n[..., None], rewards, 0.0)


def _acc(beliefs, user_type, gamma, num_turns):
  del gamma, num_turns
  return true_type_probability(beliefs, user_type)[..., 1:]


def _ent(beliefs, user_type, gamma, num_turns):
  del user_type, gamma, num_turns
  return -entropy(beliefs)[..., 1:]


def _info_gain(beliefs, user_type, gamma, num_turns):
  del user_type, gamma, num_turns
  b = np.maximum(np.asarray(beliefs, np.float64), _EPS)
  return np.sum(b[..., 1:, :] * (np.log(b[..., 1:, :]) - np.log(b[..., :-1, :])), axis=-1)


def _shaped(name, terminal_zero):
  def reward(beliefs, user_type, gamma, num_turns):
    return shaping(POTENTIALS[name](beliefs, user_type), gamma, num_turns,
                   terminal_zero=terminal_zero)
  return reward


INTRINSIC_REWARDS: dict[str, Callable] = {
    **{name: _shaped(name, True) for name in POTENTIALS},
    **{name + PAPER_SUFFIX: _shaped(name, False) for name in POTENTIALS},
    "acc": _acc, "ent": _ent, "info_gain": _info_gain,
}
POTENTIAL_BASED = tuple(POTENTIALS)  # the only variants that leave the optimal policy unchanged


def intrinsic_rewards(name: str, beliefs: np.ndarray, user_type, gamma: float = 1.0,
                      num_turns=None) -> np.ndarray:
  """Per-turn intrinsic reward `[..., T]` of variant `name` (see the module docstring).

  Args:
    name: one of `INTRINSIC_REWARDS`.
    beliefs: `[..., T+1, K]` probabilities (rows sum to 1).
    user_type: the true type index u*, int or `[...]`.
    gamma: the shaping discount (only the diff_* variants use it).
    num_turns: turns each dialogue played, int or `[...]` (default T): where the terminal-zero
      variants put phi = 0. The other variants ignore it (`turn_rewards` masks after the end).
  """
  if name not in INTRINSIC_REWARDS:
    raise ValueError(f"curio: unknown intrinsic reward {name!r}; choose one of "
                     f"{', '.join(INTRINSIC_REWARDS)} (or 'none' for the extrinsic-only baseline).")
  return INTRINSIC_REWARDS[name](beliefs, user_type, gamma, num_turns)


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
  num_turns = np.asarray(num_turns)
  turn_mask = np.arange(turn_cap)[None, :] < num_turns[:, None]
  extrinsic = np.stack([extrinsic_rewards(int(n), bool(s), turn_cap)
                        for n, s in zip(num_turns, successes)])
  if reward == "none":
    intrinsic = np.zeros_like(extrinsic)
  else:
    intrinsic = intrinsic_rewards(reward, beliefs, np.asarray(user_types), gamma,
                                  num_turns) * turn_mask
  return extrinsic + intrinsic_coefficient * intrinsic, extrinsic, intrinsic
