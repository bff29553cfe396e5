"""CURIO's training job (`run.job = @curio.train`, see gin/curio.gin): three stages, three Trainers.

1. User model (`job.user_model_trainer`, workdir/user_model): `UserModel` on simulated dialogues with
   random questions to training users; cross-entropy of the true type at every prefix.
2. Imitation warm start (`job.imitation_trainer`, workdir/imitation): the policy learns the dialogue
   format from a mixed scripted/random agent (`tasks.scripted_dialogues`): next-token cross-entropy
   on the agent's tokens only.
3. Multi-turn RL (`job.trainer`, the workdir itself; built from the warm-started policy on first
   access): each step plays `batch_size` dialogues with training users (`DialogueRollouts`), gives
   every agent turn the reward r_t = extrinsic_t + intrinsic_coefficient * intrinsic_t (extrinsic: 1
   at the final turn of a successful dialogue; intrinsic: `rewards.intrinsic_rewards(reward)` from
   the frozen user model's beliefs, none for the baseline `reward='none'`), turns the turn rewards
   into advantages with GAE or REINFORCE with the value-head baseline (`persona_jax.rl`), spreads
   each turn's advantage over the tokens the agent generated in that turn, and takes one
   `rl.make_loss_fn` step (policy gradient + k3 KL to the warm-started policy + value loss).

Every stage resumes from its own checkpoints. `python -m persona_jax.export` rebuilds the policy with
`build_job(...).trainer` and `restore()`s it (the RL trainer's trainable state is the whole tiny
policy, or LoRA + value head on a pretrained one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import gin
import jax
import numpy as np
from flax import nnx

from persona_jax import rl
from persona_jax.curio import envs, rewards, tasks
from persona_jax.curio import eval as eval_lib
from persona_jax.curio.model import UserModel, build_policy, user_model_loss
from persona_jax.nn import padded_causal_mask, positions_from_mask
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.losses import weighted_cross_entropy
from persona_jax.train.trainer import TrainConfig, Trainer

REWARD_NAMES = ("none",) + tuple(rewards.INTRINSIC_REWARDS)


class ArrayBatches:
  """Endless seeded batches of rows of precomputed arrays (a fresh permutation each epoch);
  resumable through `get_state`/`set_state` (rows drawn so far)."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
    self.arrays = arrays
    self.cycler = rl.ExampleCycler(range(len(next(iter(arrays.values())))), batch_size, seed=seed)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = np.array(next(self.cycler))
    return {name: value[rows] for name, value in self.arrays.items()}

  def get_state(self) -> dict:
    return self.cycler.get_state()

  def set_state(self, state: dict) -> None:
    self.cycler.set_state(state)


def imitation_loss(model: rl.PolicyWithValue, batch: dict, rng: jax.Array):
  """Next-token cross-entropy on the agent's tokens (`tokens`, `input_mask`, `agent_mask` `[B, S]`)."""
  del rng
  tokens, input_mask = batch["tokens"], batch["input_mask"]
  out = model.decoder(tokens, positions=positions_from_mask(input_mask),
                      attention_mask=padded_causal_mask(input_mask))
  return weighted_cross_entropy(out.logits[:, :-1], tokens[:, 1:], batch["agent_mask"][:, 1:])


def imitation_batch(fmt: tasks.DialogueFormat, dialogues: list[tasks.Dialogue],
                    sequence_length: int) -> dict[str, np.ndarray]:
  encoded = [tasks.encode_dialogue(fmt, d, sequence_length) for d in dialogues]
  tokens = np.stack([e[0] for e in encoded])
  lengths = np.array([e[2] for e in encoded])
  return {"tokens": tokens,
          "input_mask": np.arange(sequence_length)[None, :] < lengths[:, None],
          "agent_mask": np.stack([e[1] >= 0 for e in encoded]).astype(np.float32)}


@dataclasses.dataclass
class RLSettings:
  """The multi-turn RL knobs (see `curio.job`)."""
  reward: str
  intrinsic_coefficient: float
  gamma: float
  gae_lambda: float
  estimator: str
  turn_cap: int
  max_utterance_tokens: int
  sequence_length: int
  temperature: float


def turn_rewards(settings: RLSettings, domain: envs.Domain, beliefs: np.ndarray,
                 dialogues: list[tasks.Dialogue]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(total, extrinsic, intrinsic) rewards `[batch, turn_cap]`, 0 after a dialogue's last turn."""
  cap = settings.turn_cap
  num_turns = np.array([len(d.turns) for d in dialogues])
  turn_mask = np.arange(cap)[None, :] < num_turns[:, None]
  extrinsic = np.stack([rewards.extrinsic_rewards(len(d.turns), d.success, cap) for d in dialogues])
  if settings.reward == "none":
    intrinsic = np.zeros_like(extrinsic)
  else:
    types = np.array([domain.type_index(d.profile.user_type) for d in dialogues])
    intrinsic = rewards.intrinsic_rewards(settings.reward, beliefs, types, settings.gamma) * turn_mask
  return extrinsic + settings.intrinsic_coefficient * intrinsic, extrinsic, intrinsic


def dialogue_batch(settings: RLSettings, fmt: tasks.DialogueFormat, domain: envs.Domain,
                   user_model: UserModel, vocab: tasks.WordVocabulary,
                   dialogues: list[tasks.Dialogue], policy: rl.PolicyWithValue,
                   reference) -> dict[str, np.ndarray]:
  """The `rl.make_loss_fn` batch of a list of played dialogues (layout of `persona_jax.rl.rollout`:
  the prompt part is `fmt.start`, the response part is the rest of the dialogue, the user's turns
  are in it with `response_mask` 0)."""
  cap, length = settings.turn_cap, settings.sequence_length
  encoded = [tasks.encode_dialogue(fmt, d, length) for d in dialogues]
  tokens = np.stack([e[0] for e in encoded])
  lengths = np.array([e[2] for e in encoded])
  input_mask = np.arange(length)[None, :] < lengths[:, None]
  prompt_length = len(fmt.start)
  turn_of = np.stack([e[1] for e in encoded])[:, prompt_length:]  # [B, R]
  response_mask = (turn_of >= 0).astype(np.float32)
  batch_size, response_length = turn_of.shape

  sampling_logprobs = np.zeros((batch_size, response_length), np.float32)
  first_token = np.zeros((batch_size, cap), np.int64)  # response index of each turn's first token
  for b, d in enumerate(dialogues):
    for t, logprobs in enumerate(d.agent_logprobs):
      where = np.nonzero(turn_of[b] == t)[0]
      sampling_logprobs[b, where] = logprobs
      first_token[b, t] = where[0]
  num_turns = np.array([len(d.turns) for d in dialogues])
  turn_mask = (np.arange(cap)[None, :] < num_turns[:, None]).astype(np.float32)

  beliefs = eval_lib.dialogue_beliefs(user_model, vocab, dialogues, cap)
  total, extrinsic, intrinsic = turn_rewards(settings, domain, beliefs, dialogues)
  _, values = rl.score(policy, tokens, input_mask, response_length)
  turn_values = np.take_along_axis(values, first_token, axis=1) * turn_mask
  if settings.estimator == "gae":
    advantages, returns = rl.gae_advantages(total, turn_values, turn_mask, gamma=settings.gamma,
                                            lam=settings.gae_lambda)
  else:  # REINFORCE with the value head as baseline
    returns = rl.discounted_returns(total, turn_mask, gamma=settings.gamma)
    advantages = (returns - turn_values) * turn_mask
  advantages, returns = np.asarray(advantages), np.asarray(returns)
  rows = np.arange(batch_size)[:, None]
  token_advantages = advantages[rows, np.maximum(turn_of, 0)] * response_mask
  value_mask = np.zeros_like(response_mask)
  value_returns = np.zeros_like(response_mask)
  for t in range(cap):
    live = turn_mask[:, t] > 0
    value_mask[live, first_token[live, t]] = 1.0
    value_returns[live, first_token[live, t]] = returns[live, t]
  reference_logprobs, _ = rl.score(reference, tokens, input_mask, response_length)
  types = np.array([domain.type_index(d.profile.user_type) for d in dialogues])
  return {
      "tokens": tokens, "input_mask": input_mask, "response_mask": response_mask,
      "sampling_logprobs": sampling_logprobs, "advantages": token_advantages.astype(np.float32),
      "returns": value_returns, "value_mask": value_mask,
      "reference_logprobs": (reference_logprobs * response_mask).astype(np.float32),
      "rewards": total.sum(axis=1).astype(np.float32),
      "metric/success": np.array([d.success for d in dialogues], np.float32),
      "metric/extrinsic_return": extrinsic.sum(axis=1).astype(np.float32),
      "metric/intrinsic_return": intrinsic.sum(axis=1).astype(np.float32),
      "metric/turns": num_turns.astype(np.float32),
      "metric/turns_to_identify": tasks.turns_to_identify(beliefs, types, num_turns).astype(np.float32),
  }


class DialogueRollouts:
  """The RL trainer's data: each `next()` plays `batch_size` dialogues with fresh training users
  under the trainer's current policy and returns `dialogue_batch`. Resumable (`count`)."""

  def __init__(self, trainer: Trainer, reference, settings: RLSettings, fmt: tasks.DialogueFormat,
               domain: envs.Domain, population: envs.UserPopulation, user: envs.SimulatedUser,
               user_model: UserModel, vocab: tasks.WordVocabulary, *, batch_size: int, seed: int):
    self.trainer = trainer
    self.reference = reference
    self.settings = settings
    self.fmt = fmt
    self.domain = domain
    self.population = population
    self.user = user
    self.user_model = user_model
    self.vocab = vocab
    self.batch_size = batch_size
    self.seed = seed
    self.count = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    policy = self.trainer.model()
    profiles = self.population.sample_many(seed=[self.seed, 1, self.count], split="train",
                                           count=self.batch_size)
    rng = jax.random.fold_in(jax.random.key(self.seed), self.count)
    self.count += 1
    dialogues = eval_lib.play_dialogues(
        policy.decoder, self.fmt, self.domain, self.user, profiles, turn_cap=self.settings.turn_cap,
        max_utterance_tokens=self.settings.max_utterance_tokens,
        temperature=self.settings.temperature, rng=rng)
    return dialogue_batch(self.settings, self.fmt, self.domain, self.user_model, self.vocab,
                          dialogues, policy, self.reference)

  def get_state(self) -> dict:
    return {"count": self.count}

  def set_state(self, state: dict) -> None:
    self.count = int(state["count"])


@dataclasses.dataclass
class CurioJob:
  """The three stages' trainers and what the RL stage needs; `trainer` is the RL policy's."""
  workdir: str | None
  domain: envs.Domain
  population: envs.UserPopulation
  user: envs.SimulatedUser
  vocab: tasks.WordVocabulary
  fmt: tasks.DialogueFormat
  settings: RLSettings
  user_model_trainer: Trainer
  user_model_data: ArrayBatches
  imitation_trainer: Trainer
  imitation_data: ArrayBatches
  make_policy_trainer: Callable[[nnx.Module], Trainer]
  batch_size: int
  seed: int
  eval_users: int
  _trainer: Trainer | None = None

  @property
  def trainer(self) -> Trainer:
    """The RL trainer, built (once) from the imitation trainer's current policy."""
    if self._trainer is None:
      self._trainer = self.make_policy_trainer(self.imitation_trainer.model())
    return self._trainer

  def user_model(self) -> UserModel:
    return self.user_model_trainer.model()

  def rollouts(self, trainer: Trainer | None = None, settings: RLSettings | None = None,
               seed: int | None = None) -> DialogueRollouts:
    """RL data for `trainer` (default `self.trainer`) under `settings` (default the job's) with
    users and samples drawn from `seed` (default the job's); the reference policy is the
    warm-started decoder (the module the RL trainer got)."""
    reference = self.imitation_trainer.model().decoder
    return DialogueRollouts(trainer or self.trainer, reference, settings or self.settings, self.fmt,
                            self.domain, self.population, self.user, self.user_model(), self.vocab,
                            batch_size=self.batch_size, seed=self.seed if seed is None else seed)

  def eval_users_of(self, split: str = "held_out") -> list[envs.UserProfile]:
    """`eval_users` fixed users of `split` ("held_out", or fresh "train" users)."""
    return self.population.sample_many(seed=[10_000, self.seed], split=split,
                                       count=self.eval_users)

  def evaluate(self, policy: rl.PolicyWithValue, split: str = "held_out") -> dict[str, float]:
    """Dialogues with the eval users of `split` at the rollout temperature (fixed key)."""
    return eval_lib.evaluate(policy.decoder, self.fmt, self.domain, self.user, self.user_model(),
                             self.vocab, self.eval_users_of(split), turn_cap=self.settings.turn_cap,
                             max_utterance_tokens=self.settings.max_utterance_tokens,
                             temperature=self.settings.temperature, seed=10_000 + self.seed)


def _subdir(workdir: str | None, name: str) -> str | None:
  return None if workdir is None else os.path.join(workdir, name)


@gin.configurable("job", module="curio")
def build_job(workdir: str | None, *, domain: str = "exercise", model: str | None = None,
              pretrained: str | None = "smollm2-135m-instruct", lora_rank: int = 8,
              simulated_user: str = "template", reward: str = "diff_log_acc",
              intrinsic_coefficient: float = 1.0, gamma: float = 1.0, gae_lambda: float = 0.95,
              estimator: str = "reinforce", kl_coefficient: float = 0.05,
              value_coefficient: float = 0.5, turn_cap: int = 8, max_utterance_tokens: int = 3,
              sequence_length: int = 96, temperature: float = 1.0, batch_size: int = 32,
              user_model_dialogues: int = 2000, user_model_steps: int = 300,
              user_model_hidden: int = 64, user_model_learning_rate: float = 3e-3,
              imitation_dialogues: int = 2000, imitation_steps: int = 200,
              imitation_learning_rate: float = 3e-3, random_ask_prob: float = 0.5,
              eval_users: int = 256, split_seed: int = 0, seed: int = 0,
              train_config: TrainConfig | None = None) -> CurioJob:
  """Builds the three stages of a CURIO run.

  Args:
    workdir: checkpoints (RL in the workdir, user_model/ and imitation/ below it); None: none.
    domain: "exercise" or "education".
    model / pretrained: the policy: a random preset over the word vocabulary, or a pretrained decoder
      (ChatML tokenizer) with LoRA of rank `lora_rank` (0: full fine-tuning).
    simulated_user: "template" (deterministic) or "llm" (the policy's pretrained decoder plays the
      user from a persona prompt; needs `pretrained`).
    reward: "none" (baseline: extrinsic only) or a key of `rewards.INTRINSIC_REWARDS`.
    intrinsic_coefficient: weight of the intrinsic reward.
    gamma / gae_lambda: turn-level discount (also the shaping gamma) and GAE lambda.
    estimator: "reinforce" (reward-to-go minus the value head) or "gae".
    kl_coefficient: weight of the k3 KL to the warm-started policy.
    value_coefficient: weight of the value loss.
    turn_cap: agent turns per dialogue; max_utterance_tokens: ids per utterance (+ stop).
    sequence_length: tokens of a whole dialogue (longer ones raise).
    temperature: sampling temperature of the RL rollouts.
    batch_size: dialogues per RL step (and per user-model / imitation step).
    user_model_* / imitation_*: data size, steps, width and learning rate of stages 1 and 2.
    random_ask_prob: share of random questions in the imitation data.
    eval_users: held-out users in the evaluation.
    split_seed: the held-out split of decisive combinations; seed: everything else.
    train_config: the RL loop (default `TrainConfig()` with its gin bindings); stages 1 and 2 copy it
      with their own steps and learning rates.
  """
  if reward not in REWARD_NAMES:
    raise ValueError(f"curio.job.reward={reward!r} is unknown; choose one of {', '.join(REWARD_NAMES)}.")
  if estimator not in ("reinforce", "gae"):
    raise ValueError(f"curio.job.estimator={estimator!r} is unknown; choose 'reinforce' or 'gae'.")
  train_config = train_config or TrainConfig()
  domain_ = envs.get_domain(domain)
  population = envs.UserPopulation(domain_, split_seed)
  vocab = tasks.WordVocabulary()
  tokenizer = chat_template = None
  if pretrained is not None:
    from persona_jax.hf import load_tokenizer  # pretrained jobs only

    tokenizer, chat_template, _ = load_tokenizer(pretrained)
    fmt = tasks.chat_format(tokenizer, domain_)
  else:
    fmt = tasks.word_format(vocab)
  policy, base = build_policy(vocab_size=fmt.vocab_size, model=model, pretrained=pretrained,
                              lora_rank=lora_rank if pretrained is not None else 0, seed=seed)
  if simulated_user == "llm":
    if tokenizer is None:
      raise ValueError("curio.job.simulated_user='llm' needs curio.job.pretrained (a decoder with a "
                       "tokenizer to play the user).")
    # The untrained policy decoder (LoRA starts at zero: the base model) plays the user; the
    # trainers copy the parameters they train, so this module keeps its weights.
    user = envs.LLMUser(domain_, policy.decoder, tokenizer, chat_template=chat_template, seed=seed,
                        stop_tokens=(fmt.stop_id,))
  elif simulated_user == "template":
    user = envs.TemplateUser(domain_)
  else:
    raise ValueError(f"curio.job.simulated_user={simulated_user!r} is unknown; use 'template' or 'llm'.")
  settings = RLSettings(reward=reward, intrinsic_coefficient=intrinsic_coefficient, gamma=gamma,
                        gae_lambda=gae_lambda, estimator=estimator, turn_cap=turn_cap,
                        max_utterance_tokens=max_utterance_tokens, sequence_length=sequence_length,
                        temperature=temperature)
  trainable = rl.PolicyWithValue.trainable_filter(lora=pretrained is not None and lora_rank > 0)

  user_model = UserModel(vocab.vocab_size, domain_.num_types, user_model_hidden, seed=seed)
  user_model_trainer = Trainer(
      user_model, user_model_loss,
      dataclasses.replace(train_config, num_steps=user_model_steps,
                          learning_rate=user_model_learning_rate, eval_every=0),
      trainable=nnx.Param, workdir=_subdir(workdir, "user_model"),
      checkpoint_metadata={"stage": "user_model", "domain": domain})
  model_dialogues = tasks.random_dialogues(domain_, population, count=user_model_dialogues,
                                           num_turns=turn_cap, decisive_prob=0.5, seed=seed)
  user_model_data = ArrayBatches(
      tasks.user_model_batch(vocab, domain_, model_dialogues, num_turns=turn_cap), batch_size, seed)

  imitation_trainer = Trainer(
      policy, imitation_loss,
      dataclasses.replace(train_config, num_steps=imitation_steps,
                          learning_rate=imitation_learning_rate, eval_every=0),
      trainable=trainable, workdir=_subdir(workdir, "imitation"),
      checkpoint_metadata={"stage": "imitation", "base": base, "domain": domain})
  scripted = tasks.scripted_dialogues(domain_, population, count=imitation_dialogues,
                                      turn_cap=turn_cap, random_ask_prob=random_ask_prob, seed=seed)
  imitation_data = ArrayBatches(imitation_batch(fmt, scripted, sequence_length), batch_size, seed)

  loss_fn = rl.make_loss_fn(policy_loss="policy_gradient", kl_coefficient=kl_coefficient,
                            kl_estimator="k3", value_coefficient=value_coefficient)

  def make_policy_trainer(warm_policy: nnx.Module) -> Trainer:
    return Trainer(warm_policy, loss_fn, train_config, trainable=trainable, workdir=workdir,
                   checkpoint_metadata={"stage": "rl", "base": base, "domain": domain,
                                        "reward": reward})

  return CurioJob(workdir=workdir, domain=domain_, population=population, user=user, vocab=vocab,
                  fmt=fmt, settings=settings, user_model_trainer=user_model_trainer,
                  user_model_data=user_model_data, imitation_trainer=imitation_trainer,
                  imitation_data=imitation_data, make_policy_trainer=make_policy_trainer,
                  batch_size=batch_size, seed=seed, eval_users=eval_users)


def run_stages(job: CurioJob, *, eval_fn: Callable | None = None) -> dict[str, Any]:
  """Trains the user model, the imitation warm start, then RL; evaluates on held-out users before
  and after RL. Returns {"user_model", "imitation", "rl": last train metrics, "before_rl",
  "after_rl": held-out metrics, "history": RL train metrics per step}."""
  user_result = job.user_model_trainer.train(job.user_model_data)
  imitation_result = job.imitation_trainer.train(job.imitation_data)
  before = job.evaluate(job.imitation_trainer.model())
  rl_result = job.trainer.train(job.rollouts(), eval_fn=eval_fn)
  after = job.evaluate(job.trainer.model())
  return {"user_model": user_result.metrics, "imitation": imitation_result.metrics,
          "rl": rl_result.metrics, "before_rl": before, "after_rl": after, "step": rl_result.step,
          "history": rl_result.history}


@gin.configurable("train", module="curio")
def train(workdir: str, **overrides) -> dict[str, Any]:
  """Runs the three stages (settings: `curio.job.*`, `TrainConfig.*`) and writes
  `<workdir>/final_metrics.json` with the held-out metrics before and after RL."""
  job = build_job(workdir, **overrides)
  periodic = job.trainer.config.eval_every > 0  # held-out curve during RL (gin/curio.gin)
  results = run_stages(job, eval_fn=(lambda model, step: job.evaluate(model)) if periodic else None)
  if jax.process_index() == 0:
    summary = {k: v for k, v in results.items() if k != "history"}
    print(f"curio ({job.domain.name}, reward={job.settings.reward}): held-out success "
          f"{results['before_rl']['success_rate']:.3f} before RL -> "
          f"{results['after_rl']['success_rate']:.3f} after; turns to identify "
          f"{results['before_rl']['turns_to_identify']:.2f} -> "
          f"{results['after_rl']['turns_to_identify']:.2f}", flush=True)
    workdir_lib.write_json(workdir_lib.join(workdir, "final_metrics.json"), summary)
  return results
