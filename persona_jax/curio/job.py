"""CURIO's method (`run.method = 'curio'`, see gin/curio.gin): three stages inside one `fit`.

1. User model (workdir/user_model): `UserModel` on simulated dialogues with random questions to
   training users; cross-entropy of the true type at every prefix.
2. Imitation warm start (workdir/imitation): the policy learns the dialogue format from a mixed
   scripted/random agent (`tasks.scripted_dialogues`): next-token cross-entropy on the agent's tokens.
3. Multi-turn RL (the workdir itself), on the core's `rl.Learner`: each rollout plays `batch_size`
   dialogues with training users (`DialogueRollouts`, the method's `rl.RolloutSource`), gives every
   agent turn the reward r_t = extrinsic_t + intrinsic_coefficient * intrinsic_t (extrinsic: 1 at the
   final turn of a successful dialogue; intrinsic: `rewards.intrinsic_rewards(reward)` from the
   frozen user model's beliefs, none for the baseline `reward='none'`), and the core's
   `rl.turns.turn_batch` turns the turn rewards into advantages (REINFORCE with the value-head
   baseline, or GAE, over turns) spread over the tokens of each turn; the loss is `rl.make_loss_fn`
   (policy gradient + k3 KL to the warm-started policy + value loss).

Every stage resumes from its own checkpoints. The policy is the run's decoder (`DecoderSource.*`):
a random preset over CURIO's word vocabulary (`DecoderSource.vocabulary = 'words'`, the default
with a preset) or a pretrained ChatML model (its own tokenizer) with LoRA on q/v.

Evaluation (`evaluate`, and `periodic_metrics` every `TrainConfig.eval_every` RL updates): dialogues
with `eval_users` fixed held-out users (decisive combinations never seen in training) -> success
rate, turns to identify, ... (`eval.py`); the final table (`eval_table.md`) also shows the warm start.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import gin
import jax
import numpy as np
from flax import nnx

from persona_jax import rl
from persona_jax.curio import envs, rewards, tasks
from persona_jax.curio import eval as eval_lib
from persona_jax.curio.model import UserModel, build_policy, imitation_loss, user_model_loss
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.rl import turns as rl_turns
from persona_jax.train import checkpointing
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.method import Evaluation, FitResult, Method, Run, register_method
from persona_jax.train.trainer import Trainer, TrainResult

REWARD_NAMES = ("none",) + tuple(rewards.INTRINSIC_REWARDS)
STAGES = ("user_model", "imitation")  # subdirectories of the workdir


@dataclasses.dataclass(frozen=True)
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


def dialogue_batch(settings: RLSettings, fmt: tasks.DialogueFormat, domain: envs.Domain,
                   user_model: UserModel, vocab: tasks.WordVocabulary,
                   dialogues: Sequence[tasks.Dialogue], policy, reference) -> dict[str, np.ndarray]:
  """The `rl.make_loss_fn` batch of played dialogues (`rl.turns.turn_batch`: the prompt part is
  `fmt.start`, the response part the rest of the dialogue, the user's turns in it with
  `response_mask` 0) plus CURIO's `metric/*` (success, extrinsic / intrinsic return, turns, turns to
  identify)."""
  cap, length = settings.turn_cap, settings.sequence_length
  encoded = [tasks.encode_dialogue(fmt, d, length) for d in dialogues]
  tokens = np.stack([e[0] for e in encoded])
  lengths = np.array([e[2] for e in encoded])
  num_turns = np.array([len(d.turns) for d in dialogues])
  types = np.array([domain.type_index(d.profile.user_type) for d in dialogues])
  beliefs = eval_lib.dialogue_beliefs(user_model, vocab, dialogues, cap)
  total, extrinsic, intrinsic = rewards.turn_rewards(
      settings.reward, beliefs, types, num_turns, np.array([d.success for d in dialogues]),
      turn_cap=cap, gamma=settings.gamma, intrinsic_coefficient=settings.intrinsic_coefficient)
  batch = rl_turns.turn_batch(
      policy, tokens=tokens, input_mask=np.arange(length)[None, :] < lengths[:, None],
      token_turn=np.stack([e[1] for e in encoded]), prompt_length=len(fmt.start),
      turn_rewards=total, turn_logprobs=[d.agent_logprobs for d in dialogues], reference=reference,
      estimator=settings.estimator, gamma=settings.gamma, gae_lambda=settings.gae_lambda)
  batch.update({
      "metric/success": np.array([d.success for d in dialogues], np.float32),
      "metric/extrinsic_return": extrinsic.sum(axis=1).astype(np.float32),
      "metric/intrinsic_return": intrinsic.sum(axis=1).astype(np.float32),
      "metric/turns": num_turns.astype(np.float32),
      "metric/turns_to_identify": tasks.turns_to_identify(beliefs, types, num_turns).astype(np.float32),
  })
  return batch


class DialogueRollouts:
  """CURIO's `rl.RolloutSource`: each call plays `batch_size` dialogues with fresh training users
  under the learner's current policy and returns `dialogue_batch`. Resumable (`count`: the users of
  call n are drawn from (seed, 1, n); the sampling key is the learner's)."""

  def __init__(self, settings: RLSettings, fmt: tasks.DialogueFormat, domain: envs.Domain,
               population: envs.UserPopulation, user: envs.SimulatedUser, user_model: UserModel,
               vocab: tasks.WordVocabulary, *, reference, batch_size: int, seed: int):
    self.settings, self.fmt, self.domain = settings, fmt, domain
    self.population, self.user, self.user_model, self.vocab = population, user, user_model, vocab
    self.reference, self.batch_size, self.seed = reference, batch_size, seed
    self.count = 0

  def __call__(self, policy, rng: jax.Array) -> dict[str, np.ndarray]:
    profiles = self.population.sample_many(seed=[self.seed, 1, self.count], split="train",
                                           count=self.batch_size)
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


def _fresh_copy(module: nnx.Module) -> nnx.Module:
  """The same module with new Variable objects over the same (immutable) arrays: restoring into it
  leaves `module` as it was (`nnx.merge` of a split state would share the Variables), no copy."""
  graphdef, state = nnx.split(module)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def _subdir(workdir: str | None, name: str) -> str | None:
  return None if workdir is None else workdir_lib.join(workdir, name)


@register_method("curio")
@gin.configurable("job", module="curio")
class Curio(Method):
  """Curiosity-rewarded multi-turn RL on simulated users (Wan et al., arXiv 2504.03206).

  Args:
    decoder: the policy's decoder (default `DecoderSource()` with its gin bindings): a random preset
      over the word vocabulary (`DecoderSource.vocabulary = 'words'`), or a pretrained ChatML model
      with LoRA of rank `lora_rank` (0: full fine-tuning).
    domain: "exercise" or "education".
    simulated_user: "template" (deterministic) or "llm" (the policy's pretrained decoder plays the
      user from a persona prompt; needs a tokenizer, i.e. a pretrained decoder).
    reward: "none" (baseline: extrinsic only) or a key of `rewards.INTRINSIC_REWARDS`.
    intrinsic_coefficient: weight of the intrinsic reward.
    gamma / gae_lambda: turn-level discount (also the shaping gamma) and GAE lambda.
    estimator: "reinforce" (reward-to-go minus the value head) or "gae".
    kl_coefficient: weight of the k3 KL to the warm-started policy.
    value_coefficient: weight of the value loss.
    turn_cap: agent turns per dialogue; max_utterance_tokens: ids per utterance (+ stop).
    sequence_length: tokens of a whole dialogue (longer ones raise).
    temperature: sampling temperature of the RL rollouts and of the evaluation.
    batch_size: dialogues per rollout (and rows per user-model / imitation step).
    user_model_* / imitation_*: data size, steps, width and learning rate of stages 1 and 2 (their
      loops copy `TrainConfig` with these steps and learning rates, without periodic eval).
    random_ask_prob: share of random questions in the imitation data.
    eval_users: held-out users in the evaluation.
    split_seed: the held-out split of decisive combinations; seed: everything else.
  The RL loop is `TrainConfig.*` (num_steps = optimizer updates) and `rl.learner.*` (epochs and
  minibatches per rollout).
  """

  def __init__(self, *, decoder: DecoderSource | None = None, domain: str = "exercise",
               lora_rank: int = 8, simulated_user: str = "template", reward: str = "diff_log_acc",
               intrinsic_coefficient: float = 1.0, gamma: float = 1.0, gae_lambda: float = 0.95,
               estimator: str = "reinforce", kl_coefficient: float = 0.05,
               value_coefficient: float = 0.5, turn_cap: int = 8, max_utterance_tokens: int = 3,
               sequence_length: int = 96, temperature: float = 1.0, batch_size: int = 32,
               user_model_dialogues: int = 2000, user_model_steps: int = 300,
               user_model_hidden: int = 64, user_model_learning_rate: float = 3e-3,
               imitation_dialogues: int = 2000, imitation_steps: int = 200,
               imitation_learning_rate: float = 3e-3, random_ask_prob: float = 0.5,
               eval_users: int = 256, split_seed: int = 0, seed: int = 0):
    if reward not in REWARD_NAMES:
      raise UserError(f"curio.job.reward={reward!r} is unknown; choose one of "
                      f"{', '.join(REWARD_NAMES)}.")
    if estimator not in rl_turns.TURN_ESTIMATORS:
      raise UserError(f"curio.job.estimator={estimator!r} is unknown; choose one of "
                      f"{', '.join(repr(e) for e in rl_turns.TURN_ESTIMATORS)}.")
    if simulated_user not in ("template", "llm"):
      raise UserError(f"curio.job.simulated_user={simulated_user!r} is unknown; use 'template' or "
                      "'llm'.")
    try:
      self.domain = envs.get_domain(domain)
    except ValueError as error:
      raise UserError(f"curio.job.domain: {error}") from error
    for name, value in (("turn_cap", turn_cap), ("batch_size", batch_size),
                        ("eval_users", eval_users), ("max_utterance_tokens", max_utterance_tokens)):
      if value < 1:
        raise UserError(f"curio.job.{name}={value} must be >= 1.")
    self.source = decoder or DecoderSource()
    self.lora_rank = lora_rank if self.source.pretrained is not None else 0
    self.simulated_user = simulated_user
    self.settings = RLSettings(reward=reward, intrinsic_coefficient=intrinsic_coefficient,
                               gamma=gamma, gae_lambda=gae_lambda, estimator=estimator,
                               turn_cap=turn_cap, max_utterance_tokens=max_utterance_tokens,
                               sequence_length=sequence_length, temperature=temperature)
    self.kl_coefficient, self.value_coefficient = kl_coefficient, value_coefficient
    self.batch_size = batch_size
    self.user_model_dialogues, self.user_model_steps = user_model_dialogues, user_model_steps
    self.user_model_hidden, self.user_model_learning_rate = user_model_hidden, user_model_learning_rate
    self.imitation_dialogues, self.imitation_steps = imitation_dialogues, imitation_steps
    self.imitation_learning_rate, self.random_ask_prob = imitation_learning_rate, random_ask_prob
    self.eval_users, self.split_seed, self.seed = eval_users, split_seed, seed
    # Set by fit / restore: the trained user model and the warm-started policy.
    self.trained_user_model: UserModel | None = None
    self.warm_policy: rl.PolicyWithValue | None = None
    self._warm_evaluation: tuple[dict, list] | None = None
    self.stage_metrics: dict[str, dict[str, float]] = {}

  # Set up -----------------------------------------------------------------------------------------
  def vocabulary_source(self) -> str:
    """'words' (CURIO's word vocabulary; the default with a random preset) or a tokenizer source."""
    if self.source.vocabulary is None and self.source.preset is not None:
      return tasks.WORDS
    return self.source.vocabulary_source()

  def setup(self, workdir):
    del workdir
    self.population = envs.UserPopulation(self.domain, self.split_seed)
    self.vocab = tasks.WordVocabulary()
    self.fmt, tokenizer, chat_template = tasks.dialogue_format(self.vocabulary_source(), self.domain,
                                                               self.vocab)
    loaded = self.source.load("curio.job", vocab_size=self.fmt.vocab_size, seed=self.seed)
    if loaded.decoder.config.vocab_size < self.fmt.vocab_size:
      raise UserError(f"curio.job: the dialogue vocabulary has {self.fmt.vocab_size} ids but the "
                      f"decoder has {loaded.decoder.config.vocab_size} embedding rows; use the "
                      "model's own tokenizer (DecoderSource.vocabulary = None).")
    self.base = loaded.base
    self.policy = build_policy(loaded.decoder, lora_rank=self.lora_rank)
    if self.simulated_user == "llm":
      if tokenizer is None:
        raise UserError("curio.job.simulated_user='llm' needs a pretrained decoder with a tokenizer "
                        "to play the user (DecoderSource.pretrained).")
      # The untrained policy decoder (LoRA starts at zero: the base model) plays the user; the
      # trainers copy the parameters they train, so this module keeps its weights.
      self.user = envs.LLMUser(self.domain, self.policy.decoder, tokenizer,
                               chat_template=chat_template, seed=self.seed,
                               stop_tokens=(self.fmt.stop_id,))
    else:
      self.user = envs.TemplateUser(self.domain)
    self.user_model = UserModel(self.vocab.vocab_size, self.domain.num_types,
                                self.user_model_hidden, seed=self.seed)

  def description(self) -> str:
    return (f"{self.domain.name}, reward {self.settings.reward}, {self.settings.estimator}, policy "
            f"{self.source.describe()}")

  # The RL stage's model (what the generic jobs restore and export) --------------------------------
  def model(self) -> rl.PolicyWithValue:
    return self.policy

  def trainable_filter(self):
    return rl.PolicyWithValue.trainable_filter(lora=self.lora_rank > 0)

  def loss_fn(self):
    return rl.make_loss_fn(policy_loss="policy_gradient", kl_coefficient=self.kl_coefficient,
                           kl_estimator="k3", value_coefficient=self.value_coefficient)

  def checkpoint_metadata(self) -> dict:
    return {"stage": "rl", "base": self.base, "domain": self.domain.name,
            "reward": self.settings.reward}

  # The stages -------------------------------------------------------------------------------------
  def _stage_config(self, run: Run, steps: int, learning_rate: float):
    return dataclasses.replace(run.config, num_steps=steps, learning_rate=learning_rate,
                               eval_every=0)

  def user_model_data(self) -> tasks.ArrayBatches:
    dialogues = tasks.random_dialogues(self.domain, self.population,
                                       count=self.user_model_dialogues,
                                       num_turns=self.settings.turn_cap, decisive_prob=0.5,
                                       seed=self.seed)
    arrays = tasks.user_model_batch(self.vocab, self.domain, dialogues,
                                    num_turns=self.settings.turn_cap)
    return tasks.ArrayBatches(arrays, self.batch_size, self.seed)

  def imitation_data(self) -> tasks.ArrayBatches:
    scripted = tasks.scripted_dialogues(self.domain, self.population,
                                        count=self.imitation_dialogues,
                                        turn_cap=self.settings.turn_cap,
                                        random_ask_prob=self.random_ask_prob, seed=self.seed)
    arrays = tasks.imitation_batch(self.fmt, scripted, self.settings.sequence_length)
    return tasks.ArrayBatches(arrays, self.batch_size, self.seed)

  def imitation_trainer(self, run: Run) -> Trainer:
    return run.trainer(self.policy, imitation_loss, self.trainable_filter(),
                       workdir=_subdir(run.workdir, "imitation"),
                       config=self._stage_config(run, self.imitation_steps,
                                                 self.imitation_learning_rate),
                       checkpoint_metadata={"stage": "imitation", "base": self.base,
                                            "domain": self.domain.name})

  def user_model_trainer(self, run: Run) -> Trainer:
    return run.trainer(self.user_model, user_model_loss, nnx.Param,
                       workdir=_subdir(run.workdir, "user_model"),
                       config=self._stage_config(run, self.user_model_steps,
                                                 self.user_model_learning_rate),
                       checkpoint_metadata={"stage": "user_model", "domain": self.domain.name})

  def train_user_model(self, run: Run, trainer: Trainer | None = None) -> TrainResult:
    """Stage 1 (resumes from workdir/user_model); sets `trained_user_model`."""
    trainer = trainer or self.user_model_trainer(run)
    result = trainer.train(self.user_model_data(), final_eval=False)
    self.trained_user_model = trainer.model()
    self.stage_metrics["user_model"] = result.metrics
    return result

  def train_imitation(self, run: Run, trainer: Trainer | None = None) -> TrainResult:
    """Stage 2 (resumes from workdir/imitation); sets `warm_policy`."""
    trainer = trainer or self.imitation_trainer(run)
    result = trainer.train(self.imitation_data(), final_eval=False)
    self.warm_policy = trainer.model()
    self._warm_evaluation = None
    self.stage_metrics["imitation"] = result.metrics
    return result

  def rl_trainer(self, run: Run, warm_policy: nnx.Module) -> Trainer:
    """The RL stage's trainer in the run's workdir, starting from `warm_policy`."""
    return run.trainer(warm_policy, self.loss_fn(), self.trainable_filter(),
                       checkpoint_metadata=self.checkpoint_metadata())

  def rollouts(self, reference, settings: RLSettings | None = None,
               seed: int | None = None) -> DialogueRollouts:
    """The RL stage's rollout source: KL to `reference` (the warm-started decoder), under `settings`
    (default the job's), training users drawn from `seed` (default the job's)."""
    if self.trained_user_model is None:
      raise ValueError("curio: train the user model (train_user_model) before the RL stage.")
    return DialogueRollouts(settings or self.settings, self.fmt, self.domain, self.population,
                            self.user, self.trained_user_model, self.vocab, reference=reference,
                            batch_size=self.batch_size, seed=self.seed if seed is None else seed)

  def fit(self, run: Run) -> FitResult:
    # The imitation trainer is built first so the parameter-count line describes the policy.
    imitation = self.imitation_trainer(run)
    user_result = self.train_user_model(run)
    if user_result.preempted:
      return FitResult(result=user_result, model=self.policy)
    imitation_result = self.train_imitation(run, imitation)
    if imitation_result.preempted:
      return FitResult(result=imitation_result, model=self.warm_policy)
    trainer = self.rl_trainer(run, self.warm_policy)
    # The RL trainer copies the parameters it trains, so the warm policy's decoder stays the
    # reference of the KL term.
    learner = rl.Learner(trainer, self.rollouts(self.warm_policy.decoder))
    result = learner.train(eval_fn=run.eval_fn)
    return FitResult(result=result, model=trainer.model())

  def restore(self, run: Run):
    """The RL policy from the workdir's checkpoint (parameters only), and the user model and the
    warm start from their stages' checkpoints (for the evaluation)."""
    model, warm = _fresh_copy(self.policy), _fresh_copy(self.policy)  # the LLM user keeps its weights
    step = checkpointing.restore_trainable(run.workdir, model, self.trainable_filter(), run.step)
    if step is None:
      raise UserError(f"curio: no checkpoint in {run.workdir}/checkpoints; train first "
                      "(run.job = @train).")
    user_model = _fresh_copy(self.user_model)
    if checkpointing.restore_trainable(_subdir(run.workdir, "user_model"), user_model,
                                       nnx.Param) is None:
      raise UserError(f"curio: no user-model checkpoint in {run.workdir}/user_model/checkpoints; "
                      "the evaluation needs it (rerun the training).")
    self.trained_user_model = user_model
    if checkpointing.restore_trainable(_subdir(run.workdir, "imitation"), warm,
                                       self.trainable_filter()) is not None:
      self.warm_policy, self._warm_evaluation = warm, None
    return model, step

  # Evaluation -------------------------------------------------------------------------------------
  def eval_users_of(self, split: str = "held_out") -> list[envs.UserProfile]:
    """`eval_users` fixed users of `split` ("held_out", or fresh "train" users)."""
    return self.population.sample_many(seed=[10_000, self.seed], split=split, count=self.eval_users)

  def evaluate_policy(self, policy, split: str = "held_out") -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-dialogue rows) of dialogues with the eval users of `split` at the rollout
    temperature (fixed key)."""
    if self.trained_user_model is None:
      raise ValueError("curio: the evaluation needs the trained user model (fit or restore first).")
    return eval_lib.evaluate(policy.decoder, self.fmt, self.domain, self.user,
                             self.trained_user_model, self.vocab, self.eval_users_of(split),
                             turn_cap=self.settings.turn_cap,
                             max_utterance_tokens=self.settings.max_utterance_tokens,
                             temperature=self.settings.temperature, seed=10_000 + self.seed)

  def periodic_metrics(self, model, step):
    del step
    return self.evaluate_policy(model)[0]

  def evaluate(self, model, step) -> Evaluation:
    metrics, rows = self.evaluate_policy(model)
    table_rows, results = {}, {"after_rl": metrics, "step": step}
    if self.warm_policy is not None:
      if self._warm_evaluation is None:
        self._warm_evaluation = self.evaluate_policy(self.warm_policy)
      table_rows["warm start (before RL)"] = results["before_rl"] = self._warm_evaluation[0]
    table_rows[f"after RL (step {step})"] = metrics
    title = (f"CURIO held-out users ({self.eval_users}, temperature {self.settings.temperature}, "
             f"fixed key): {self.description()}")
    if self.stage_metrics:
      results["stages"] = self.stage_metrics
    return Evaluation(metrics=metrics, tables={"eval_table": eval_lib.format_table(table_rows, title)},
                      results={"eval_table": results}, examples=rows)

  def tokenizer_source(self):
    source = self.vocabulary_source()
    return None if source in (tasks.WORDS, "bytes") else source
