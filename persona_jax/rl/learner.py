"""The RL learner: rollout -> reward -> advantages -> `num_epochs` passes of minibatch updates.

A method supplies a `RolloutSource` (sample with the current policy, score, compute advantages;
return one train batch in the layout `rl.make_loss_fn` consumes) and a loss (`rl.make_loss_fn`); the
`Learner` runs the loop on the core `Trainer`:

  rollout r (sampled with the policy after update u) -> for epoch in num_epochs: shuffle the rows
  (seeded by (seed, r, epoch)), split them into num_minibatches -> one optimizer update each

so each rollout gives `num_epochs * num_minibatches` updates and `TrainConfig.num_steps` counts
updates. From the second update on, the policy differs from the sampling policy and PPO's ratio and
clip act (their diagnostics `ratio_mean`, `clip_fraction`, `approx_kl` are in the loss metrics).

How it reuses the core loop: the Learner IS the Trainer's data iterator. `next()` hands out the
current rollout's next minibatch and samples a new rollout when the schedule of the current one is
done. Its `get_state()` holds the source's state, the rollout count, the position in the schedule
and the current rollout itself (its arrays, losslessly encoded), so a checkpoint taken in the middle
of a rollout resumes bitwise equal to an uninterrupted run (the rollout cannot be re-sampled: the
policy that sampled it is gone). Checkpointing, resume, SIGTERM, the NaN / stuck-gradient stops, the
progress line, TensorBoard and periodic evaluation are `Trainer.train`'s.

Two sources ship with the core: `PromptRollouts` (one scalar reward per sampled response to a
prompt; RLPF's summaries) and whatever a multi-turn method builds (CURIO's dialogues).

Rollouts are sampled with the trainer's model in its compute dtype (`TrainConfig.compute_dtype`:
the frozen base is stored in it, the trainable parameters are cast as in the train step), so the
sampling log-probs are those of the policy the step differentiates.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from typing import Any, Callable, Protocol, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persona_jax.rl import advantages as adv
from persona_jax.rl import losses
from persona_jax.rl.policy import PolicyWithValue, sequence_batch
from persona_jax.rl.rollout import Rollout, sample_rollouts, score
from persona_jax.train.trainer import Trainer, TrainResult


class RolloutSource(Protocol):
  """Where a learner's rollouts come from (a method's sampler, reward and advantages).

  `source(policy, rng)` samples with `policy` (the trainer's current model in its compute dtype: a
  `PolicyWithValue` or a `Decoder`), scores, computes advantages and returns one train batch in the
  layout `rl.make_loss_fn` consumes: tokens, input_mask `[B, P+R]`; response_mask,
  sampling_logprobs, advantages, returns, value_mask `[B, R]`; optional rewards `[B]`,
  reference_logprobs `[B, R]`, metric/<name> `[B]`. Every call must return the same shapes (one
  compilation of the step).
  """

  def __call__(self, policy, rng: jax.Array) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict: ...

  def set_state(self, state: dict) -> None: ...


@gin.configurable("learner", module="rl")
@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """num_epochs: passes over each rollout. num_minibatches: minibatches per pass (the rows split
  evenly; shuffled per epoch with `seed`). seed: the rollouts' sampling keys and the shuffles."""
  num_epochs: int = 1
  num_minibatches: int = 1
  seed: int = 0

  def __post_init__(self):
    for name in ("num_epochs", "num_minibatches"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"rl.learner.{name}={value!r}: must be an integer >= 1. Fix: e.g. "
                         f"--gin_bindings='rl.learner.{name} = 1'.")

  @property
  def updates_per_rollout(self) -> int:
    return self.num_epochs * self.num_minibatches


def _encode_array(array: np.ndarray) -> str:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_array(text: str) -> np.ndarray:
  return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def _cast_floating(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def current_policy(trainer: Trainer) -> nnx.Module:
  """The trainer's model with its current trainable state, in `TrainConfig.compute_dtype` when set
  (the frozen state is stored in it already; the trainable copy is cast as the train step does)."""
  params = trainer.state.params
  if trainer.config.compute_dtype is not None:
    params = _cast_floating(params, jnp.dtype(trainer.config.compute_dtype))
  return nnx.merge(trainer.graphdef, params, trainer.frozen)


class Learner:
  """Trains `trainer`'s policy on rollouts of `source` (see the module docstring).

  Usage:
    trainer = run.trainer(rl.PolicyWithValue(decoder), rl.make_loss_fn(), trainable)
    learner = rl.Learner(trainer, source, rl.LearnerConfig(num_epochs=2))
    result = learner.train(eval_fn=run.eval_fn)
  """

  def __init__(self, trainer: Trainer, source: RolloutSource, config: LearnerConfig | None = None):
    self.trainer = trainer
    self.source = source
    self.config = config or LearnerConfig()
    self.rollouts = 0  # rollouts sampled so far
    self.position = 0  # updates taken from the current rollout
    self.batch: dict[str, np.ndarray] | None = None  # the current rollout's train batch

  # The Trainer's data iterator ------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.batch is None or self.position >= self.config.updates_per_rollout:
      self._sample()
    epoch, index = divmod(self.position, self.config.num_minibatches)
    self.position += 1
    if self.config.num_minibatches == 1:
      return self.batch
    rows = self._rows(self.batch)
    size = rows // self.config.num_minibatches
    picked = self._order(epoch, rows)[index * size:(index + 1) * size]
    return {name: value[picked] for name, value in self.batch.items()}

  def _rows(self, batch: dict[str, np.ndarray]) -> int:
    return int(np.shape(batch["tokens"])[0])

  def _order(self, epoch: int, rows: int) -> np.ndarray:
    return np.random.default_rng([self.config.seed, self.rollouts - 1, epoch]).permutation(rows)

  def _sample(self) -> None:
    rng = jax.random.fold_in(jax.random.key(self.config.seed), self.rollouts)
    batch = {name: np.asarray(value) for name, value in
             self.source(current_policy(self.trainer), rng).items()}
    if "tokens" not in batch:
      raise ValueError(f"The rollout source returned no 'tokens' (got {sorted(batch)}); it must "
                       "return the layout of rl.make_loss_fn.")
    rows = self._rows(batch)
    for name, value in batch.items():
      if np.shape(value)[:1] != (rows,):
        raise ValueError(f"Rollout batch feature {name!r} has shape {np.shape(value)}; every feature "
                         f"needs the batch's {rows} rows first.")
    if rows % self.config.num_minibatches:
      raise ValueError(f"A rollout of {rows} rows cannot be split into rl.learner.num_minibatches="
                       f"{self.config.num_minibatches} equal minibatches: make the rollout's rows "
                       "(prompts x samples per prompt) a multiple of it.")
    self.batch = batch
    self.rollouts += 1
    self.position = 0

  def get_state(self) -> dict:
    state = {"source": self.source.get_state(), "rollouts": self.rollouts,
             "position": self.position}
    if self.batch is not None and self.position < self.config.updates_per_rollout:
      state["batch"] = {name: _encode_array(value) for name, value in self.batch.items()}
    return state

  def set_state(self, state: dict) -> None:
    self.source.set_state(state["source"])
    self.rollouts = int(state["rollouts"])
    self.position = int(state["position"])
    self.batch = ({name: _decode_array(text) for name, text in state["batch"].items()}
                  if "batch" in state else None)

  # The loop -------------------------------------------------------------------------------------
  def policy(self) -> nnx.Module:
    """The current policy in the compute dtype (what rollouts sample with)."""
    return current_policy(self.trainer)

  def train(self, eval_fn: Callable[[nnx.Module, int], dict[str, float]] | None = None, *,
            step_callback: Callable | None = None, final_eval: bool = False) -> TrainResult:
    """Trains up to `TrainConfig.num_steps` optimizer updates (resuming from the trainer's workdir).

    eval_fn: `eval_fn(model, step) -> {name: float}` every `TrainConfig.eval_every` updates (the
      generic jobs pass `Run.eval_fn`); step_callback / final_eval: as in `Trainer.train`.
    """
    return self.trainer.train(self, eval_fn=eval_fn, step_callback=step_callback,
                              final_eval=final_eval)


# A source for one scalar reward per sampled response ----------------------------------------------
class ExampleCycler:
  """Endless, seeded pass over a list of examples in batches of `batch_size` (a fresh permutation
  each epoch); `get_state`/`set_state` make it resumable."""

  def __init__(self, examples: Sequence[Any], batch_size: int, seed: int = 0):
    if not examples:
      raise ValueError("ExampleCycler: no examples to train on (the prompt source is empty).")
    if batch_size < 1:
      raise ValueError(f"ExampleCycler: batch_size must be >= 1, got {batch_size}.")
    self.examples = list(examples)
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0  # examples drawn so far

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def __next__(self) -> list[Any]:
    picked = []
    for _ in range(self.batch_size):
      epoch, index = divmod(self.position, len(self.examples))
      picked.append(self.examples[self._order(epoch)[index]])
      self.position += 1
    return picked

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


RewardFn = Callable[[list[Any], Rollout], dict[str, np.ndarray]]


class PromptRollouts:
  """A `RolloutSource`: prompts -> `samples_per_prompt` sampled responses -> one reward each.

  Args:
    examples: an `ExampleCycler` (or anything with `__next__` -> list of examples and
      `get_state`/`set_state`); each example is a dict with `prompt_tokens` (list of ids).
    reward_fn: `reward_fn(examples_per_row, rollout) -> {"rewards": [B], other name: [B] ...}`; rows
      are the examples repeated `samples_per_prompt` times; extra entries become `metric/<name>`.
    reference: the frozen reference policy (a `Decoder`), or None when no KL is used.
    estimator: a key of `advantages.SEQUENCE_ESTIMATORS` ('reinforce' uses the value head's V(prompt)
      as its baseline when the policy has one).
    samples_per_prompt / max_new_tokens / temperature / top_k / top_p / stop_tokens / pad_id: sampling.
    kl_reward_coefficient: subtract `coef * sum_t k1_t` (KL to the reference) from each reward.
    prompt_length: left-pad every prompt to this width (default: the longest prompt of
      `examples.examples` rounded up to 16, when the source exposes its examples), so every batch
      has one shape and the sampler, scorer and train step compile once.

  The last rollout is kept as `last_rollout` (tests, logging).
  """

  def __init__(self, examples, reward_fn: RewardFn, *, reference=None,
               estimator: str = "reinforce", samples_per_prompt: int = 1, max_new_tokens: int = 32,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
               kl_reward_coefficient: float = 0.0, prompt_length: int | None = None):
    if estimator not in adv.SEQUENCE_ESTIMATORS:
      raise ValueError(f"PromptRollouts: estimator={estimator!r} is unknown; choose one of "
                       f"{sorted(adv.SEQUENCE_ESTIMATORS)}.")
    if estimator != "reinforce" and samples_per_prompt < 2:
      raise ValueError(f"PromptRollouts: estimator={estimator!r} compares samples of the same "
                       f"prompt: set samples_per_prompt >= 2 (got {samples_per_prompt}).")
    if kl_reward_coefficient > 0 and reference is None:
      raise ValueError("PromptRollouts: kl_reward_coefficient > 0 needs a reference policy.")
    self.examples = examples
    self.reward_fn = reward_fn
    self.reference = reference
    self.estimator = estimator
    self.samples_per_prompt = samples_per_prompt
    self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id)
    self.kl_reward_coefficient = kl_reward_coefficient
    if prompt_length is None and hasattr(examples, "examples"):
      prompt_length = -(-max(len(e["prompt_tokens"]) for e in examples.examples) // 16) * 16
    self.prompt_length = prompt_length
    self.last_rollout: Rollout | None = None

  def __call__(self, policy, rng: jax.Array) -> dict[str, np.ndarray]:
    decoder = policy.decoder if isinstance(policy, PolicyWithValue) else policy
    examples = next(self.examples)
    rollout = sample_rollouts(decoder, [e["prompt_tokens"] for e in examples], rng=rng,
                              samples_per_prompt=self.samples_per_prompt,
                              prompt_bucket=self.prompt_length or 16, **self.sampling)
    rows = [e for e in examples for _ in range(self.samples_per_prompt)]
    reward_out = dict(self.reward_fn(rows, rollout))
    rewards = np.asarray(reward_out.pop("rewards"), np.float32)
    if rewards.shape != (rollout.batch_size,):
      raise ValueError(f"reward_fn returned rewards of shape {rewards.shape}; expected "
                       f"({rollout.batch_size},), one per sampled response.")
    needs_values = isinstance(policy, PolicyWithValue) and self.estimator == "reinforce"
    values = score(policy, rollout.tokens, rollout.input_mask, rollout.response_length)[1] \
        if needs_values else None
    reference_logprobs = None
    if self.reference is not None:
      reference_logprobs, _ = score(self.reference, rollout.tokens, rollout.input_mask,
                                    rollout.response_length)
      kl = (rollout.sampling_logprobs - reference_logprobs) * rollout.response_mask
      reward_out["kl_to_reference"] = kl.sum(axis=-1)
      if self.kl_reward_coefficient > 0:
        reward_out["task_reward"] = rewards
        rewards = np.asarray(losses.kl_penalized_rewards(
            rewards, rollout.sampling_logprobs, reference_logprobs, rollout.response_mask,
            self.kl_reward_coefficient))
    batch = sequence_batch(rollout, rewards, estimator=self.estimator, values=values,
                           reference_logprobs=reference_logprobs)
    for name, value in reward_out.items():
      batch[f"metric/{name}"] = np.asarray(value, np.float32)
    self.last_rollout = rollout
    return batch

  def get_state(self) -> dict:
    return {"examples": self.examples.get_state()}

  def set_state(self, state: dict) -> None:
    self.examples.set_state(state["examples"])
