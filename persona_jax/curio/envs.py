"""Environments with hidden user types, the simulated users, and the dialogue environment.

A *domain* (`Domain`) lists user attributes (each with a few values, every value word unique within
the domain), which attributes are *decisive*, and a fixed rule from the decisive values to the user
*type* (the right strategy / learning style). Two domains:

  * `EXERCISE` (as in CURIO, arXiv 2504.03206): 20 attributes, 5 decisive (binary), 8 strategies:
    intensity = low if the user is a senior or injured, else high; focus = the user's goal;
    format = group if the user trains at a gym AND has a flexible schedule, else solo.
  * `EDUCATION`: 8 attributes, 3 decisive, 4 learning styles: kinesthetic if the student learns by
    doing, else visual if they recall images, else reading if they take notes, else auditory.

Held-out users: the combinations of decisive values are split once (seeded) into training and
held-out combinations; every type keeps at least one training combination, and no held-out
combination is ever sampled for training (`Domain.split_combinations`).

Dialogue protocol (`DialogueEnvironment`): each turn the agent says one utterance.
  * `"<final_verb> <type name>"` (e.g. "recommend walking", "teach visual") is the final answer: the
    dialogue ends; success = the named type equals the user's type. An unknown name ends the
    dialogue as a failure with `error="unknown_strategy"` (never guessed, never retried).
  * anything else goes to the simulated user, who answers it.
  * an empty (whitespace-only) utterance or one longer than `max_utterance_chars` is not shown to the
    user: the turn is spent, the user's reply is a fixed request to rephrase and `error` is
    "empty_utterance" / "utterance_too_long" (nothing is truncated).
  * after `turn_cap` agent turns without a final answer the dialogue ends as a failure with
    `hit_turn_cap=True`; stepping a finished dialogue raises ValueError.

Simulated users share one interface, `respond(profile, utterance) -> str`:
  * `TemplateUser`: deterministic; answers the first attribute the utterance names with its true
    value ("my age is senior"), otherwise says it did not understand.
  * `LLMUser`: a decoder with a persona prompt listing the user's attributes, sampled with the core's
    jit sampler.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Domain:
  """A family of users: attributes, the decisive ones and the rule that gives each user's type.

  attributes: ordered {attribute name: value words}; value words are unique within the domain.
  decisive: names of the attributes the rule reads, in the order `rule` takes them.
  type_names: the types (strategies / styles), index = type id.
  rule: decisive values (tuple of value words, `decisive` order) -> type name.
  final_verb: the first word of a final answer ("recommend", "teach").
  num_held_out: decisive-value combinations reserved for held-out users.
  """
  name: str
  attributes: Mapping[str, tuple[str, ...]]
  decisive: tuple[str, ...]
  type_names: tuple[str, ...]
  rule: Callable[[tuple[str, ...]], str]
  final_verb: str
  num_held_out: int

  @property
  def num_types(self) -> int:
    return len(self.type_names)

  @property
  def attribute_names(self) -> tuple[str, ...]:
    return tuple(self.attributes)

  def type_index(self, name: str) -> int:
    """Index of a type name; ValueError naming the valid ones otherwise."""
    if name not in self.type_names:
      raise ValueError(f"curio {self.name}: unknown strategy {name!r}; valid names: "
                       f"{', '.join(self.type_names)}.")
    return self.type_names.index(name)

  def user_type(self, values: Mapping[str, str]) -> str:
    return self.rule(tuple(values[a] for a in self.decisive))

  def split_combinations(self, seed: int) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(training, held-out) decisive-value combinations. Held-out ones are drawn round-robin over the
    types (so they spread over the types), never a type's last training combination."""
    combos = list(itertools.product(*(self.attributes[a] for a in self.decisive)))
    rng = np.random.default_rng(seed)
    pools = {t: [combos[i] for i in rng.permutation(len(combos)) if self.rule(combos[i]) == t]
             for t in self.type_names}
    held_out = []
    while len(held_out) < self.num_held_out:
      picked = False
      for t in rng.permutation(self.type_names):
        if len(held_out) < self.num_held_out and len(pools[t]) > 1:
          held_out.append(pools[t].pop())
          picked = True
      if not picked:
        raise ValueError(f"curio {self.name}: num_held_out={self.num_held_out} leaves some type "
                         "without a training combination; lower it.")
    training = [c for c in combos if c not in held_out]
    return training, held_out

  def words(self) -> list[str]:
    """Every domain word (attribute names, values, verb, type names), for vocabularies."""
    out = [self.final_verb, *self.attributes, *self.type_names]
    for values in self.attributes.values():
      out.extend(values)
    return out


def _exercise_rule(values: tuple[str, ...]) -> str:
  age, injury, goal, schedule, location = values
  low = age == "senior" or injury == "injured"
  group = location == "gym" and schedule == "flexible"
  table = {(False, "strength", True): "powerlifting", (False, "strength", False): "calisthenics",
           (False, "weightloss", True): "spinning", (False, "weightloss", False): "running",
           (True, "strength", True): "pilates", (True, "strength", False): "bands",
           (True, "weightloss", True): "aquafit", (True, "weightloss", False): "walking"}
  return table[(low, goal, group)]


EXERCISE = Domain(
    name="exercise",
    attributes={
        "age": ("young", "senior"), "injury": ("injured", "uninjured"),
        "goal": ("strength", "weightloss"), "schedule": ("busy", "flexible"),
        "location": ("gym", "home"),
        "hobby": ("reading", "gaming", "cooking"), "diet": ("vegan", "omnivore", "keto"),
        "pet": ("dog", "cat", "nopet"), "music": ("rock", "jazz", "pop"),
        "city": ("urban", "rural"), "job": ("teacher", "engineer", "nurse"),
        "sleep": ("earlybird", "nightowl"), "height": ("tall", "short"),
        "smoking": ("smoker", "nonsmoker"), "language": ("english", "spanish"),
        "season": ("summer", "winter"), "siblings": ("onlychild", "siblings"),
        "transport": ("car", "bike", "bus"), "device": ("phone", "laptop"),
        "color": ("red", "blue", "green"),
    },
    decisive=("age", "injury", "goal", "schedule", "location"),
    type_names=("powerlifting", "calisthenics", "spinning", "running", "pilates", "bands", "aquafit",
                "walking"),
    rule=_exercise_rule, final_verb="recommend", num_held_out=8)


def _education_rule(values: tuple[str, ...]) -> str:
  practice, recall, notes = values
  if practice == "doing":
    return "kinesthetic"
  if recall == "images":
    return "visual"
  return "reading" if notes == "notetaker" else "auditory"


EDUCATION = Domain(
    name="education",
    attributes={
        "practice": ("doing", "watching"), "recall": ("images", "sounds"),
        "notes": ("notetaker", "listener"),
        "subject": ("math", "history", "biology"), "grade": ("sophomore", "junior"),
        "sport": ("soccer", "chess", "swimming"), "club": ("drama", "robotics"),
        "commute": ("walks", "drives"),
    },
    decisive=("practice", "recall", "notes"),
    type_names=("kinesthetic", "visual", "reading", "auditory"),
    rule=_education_rule, final_verb="teach", num_held_out=2)

DOMAINS = {"exercise": EXERCISE, "education": EDUCATION}


def get_domain(name: str) -> Domain:
  if name not in DOMAINS:
    raise ValueError(f"curio: unknown domain {name!r}; choose one of {', '.join(DOMAINS)}.")
  return DOMAINS[name]


@dataclasses.dataclass(frozen=True)
class UserProfile:
  """One simulated user: every attribute's value and the type the rule gives."""
  values: Mapping[str, str]
  user_type: str


class UserPopulation:
  """Samples training or held-out users of a domain, reproducibly.

  The decisive combination is drawn uniformly from the split's combinations, the other attributes
  uniformly from their values.
  """

  def __init__(self, domain: Domain, split_seed: int = 0):
    self.domain = domain
    self.training, self.held_out = domain.split_combinations(split_seed)

  def combinations(self, split: str) -> list[tuple[str, ...]]:
    if split == "train":
      return self.training
    if split == "held_out":
      return self.held_out
    raise ValueError(f"curio: unknown user split {split!r}; use 'train' or 'held_out'.")

  def sample(self, rng: np.random.Generator, split: str) -> UserProfile:
    combos = self.combinations(split)
    combo = combos[rng.integers(len(combos))]
    values = {}
    for attribute, options in self.domain.attributes.items():
      if attribute in self.domain.decisive:
        values[attribute] = combo[self.domain.decisive.index(attribute)]
      else:
        values[attribute] = options[rng.integers(len(options))]
    return UserProfile(values=values, user_type=self.domain.rule(combo))

  def sample_many(self, seed: int | list[int], split: str, count: int) -> list[UserProfile]:
    rng = np.random.default_rng(seed)
    return [self.sample(rng, split) for _ in range(count)]


# Simulated users --------------------------------------------------------------------------------------
NOT_UNDERSTOOD = "sorry i do not understand"


class SimulatedUser(Protocol):
  """Answers one agent utterance given the user's hidden profile."""

  def respond(self, profile: UserProfile, utterance: str,
              history: Sequence[tuple[str, str]] = ()) -> str: ...


class TemplateUser:
  """Deterministic, truthful: answers the first attribute named in the utterance."""

  def __init__(self, domain: Domain):
    self.domain = domain

  def asked_attribute(self, utterance: str) -> str | None:
    for word in utterance.lower().split():
      if word in self.domain.attributes:
        return word
    return None

  def respond(self, profile: UserProfile, utterance: str,
              history: Sequence[tuple[str, str]] = ()) -> str:
    del history
    attribute = self.asked_attribute(utterance)
    if attribute is None:
      return NOT_UNDERSTOOD
    return f"my {attribute} is {profile.values[attribute]}"


def persona_prompt(domain: Domain, profile: UserProfile) -> str:
  """The system text that makes a decoder play `profile`."""
  facts = ", ".join(f"{a}: {v}" for a, v in profile.values.items())
  return (f"You are a person talking to an assistant about {domain.name}. Your profile: {facts}. "
          "Answer the assistant's question truthfully in one short sentence.")


class LLMUser:
  """A decoder playing the user from a persona prompt (same interface as `TemplateUser`).

  tokenizer: a `tokenizers.Tokenizer` (pretrained) or a `persona_jax.data` vocabulary (anything with
  `encode(str)` and `decode(ids)`; `tokenizers.Tokenizer.encode` returns an object with `.ids`).
  chat_template: a pretrained model's chat template; None formats the dialogue as plain text.
  """

  def __init__(self, domain: Domain, decoder, tokenizer, *, chat_template: str | None = None,
               max_new_tokens: int = 24, temperature: float = 0.0, seed: int = 0,
               stop_tokens: Sequence[int] | None = None):
    self.domain = domain
    self.decoder = decoder
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.max_new_tokens = max_new_tokens
    self.temperature = temperature
    self.stop_tokens = stop_tokens
    self._seed = seed
    self._calls = 0

  def _encode(self, text: str) -> list[int]:
    encoded = self.tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))

  def prompt_text(self, profile: UserProfile, utterance: str,
                  history: Sequence[tuple[str, str]] = ()) -> str:
    system = persona_prompt(self.domain, profile)
    if self.chat_template is not None:
      from persona_jax.hf import apply_chat_template  # only the pretrained path needs jinja

      # The agent speaks as "user" and the simulated person answers as "assistant" in chat terms.
      messages = [{"role": "system", "content": system}]
      for agent, user in history:
        messages += [{"role": "user", "content": agent}, {"role": "assistant", "content": user}]
      messages.append({"role": "user", "content": utterance})
      return apply_chat_template(self.chat_template, messages, add_generation_prompt=True)
    lines = [system] + [f"Assistant: {a}\nYou: {u}" for a, u in history]
    lines.append(f"Assistant: {utterance}\nYou:")
    return "\n".join(lines)

  def respond(self, profile: UserProfile, utterance: str,
              history: Sequence[tuple[str, str]] = ()) -> str:
    import jax

    from persona_jax import sampling

    prompt = self._encode(self.prompt_text(profile, utterance, history))
    rng = jax.random.key(self._seed + self._calls)
    self._calls += 1
    result = sampling.generate(self.decoder, [prompt], max_new_tokens=self.max_new_tokens, rng=rng,
                               temperature=self.temperature, stop_tokens=self.stop_tokens)
    length = int(result.lengths[0])
    ids = [int(t) for t in np.asarray(result.tokens[0, :length])]
    if bool(result.done[0]):
      ids = ids[:-1]  # the stop token is not part of the answer
    return self.tokenizer.decode(ids).strip()


# The dialogue ---------------------------------------------------------------------------------------
REPHRASE_EMPTY = "please say something"
REPHRASE_TOO_LONG = "please ask one short question"


@dataclasses.dataclass
class StepResult:
  """What one agent turn produced.

  reply: the user's answer ("" after a final answer or when the turn cap ended the dialogue).
  done: the dialogue is over.
  success: the final answer named the user's type (False until then).
  error: None, "empty_utterance", "utterance_too_long" or "unknown_strategy".
  hit_turn_cap: the dialogue ended because `turn_cap` turns passed without a final answer.
  """
  reply: str
  done: bool
  success: bool = False
  error: str | None = None
  hit_turn_cap: bool = False


class DialogueEnvironment:
  """One dialogue with one hidden user (see the module docstring for the protocol)."""

  def __init__(self, domain: Domain, user: SimulatedUser, profile: UserProfile, *, turn_cap: int = 8,
               max_utterance_chars: int = 200):
    if turn_cap < 1:
      raise ValueError(f"curio: turn_cap must be >= 1, got {turn_cap}.")
    self.domain = domain
    self.user = user
    self.profile = profile
    self.turn_cap = turn_cap
    self.max_utterance_chars = max_utterance_chars
    self.history: list[tuple[str, str]] = []
    self.done = False
    self.success = False
    self.final_answer: str | None = None

  @property
  def turns(self) -> int:
    return len(self.history)

  def step(self, utterance: str) -> StepResult:
    if self.done:
      raise ValueError("curio: the dialogue is over (final answer given or turn cap reached); "
                       "start a new DialogueEnvironment.")
    result = self._answer(utterance)
    self.history.append((utterance, result.reply))
    if not result.done and self.turns >= self.turn_cap:
      result = dataclasses.replace(result, done=True, hit_turn_cap=True)
    self.done = result.done
    return result

  def _answer(self, utterance: str) -> StepResult:
    if not utterance.strip():
      return StepResult(REPHRASE_EMPTY, done=False, error="empty_utterance")
    if len(utterance) > self.max_utterance_chars:
      return StepResult(REPHRASE_TOO_LONG, done=False, error="utterance_too_long")
    words = utterance.lower().split()
    if words[0] == self.domain.final_verb:
      name = " ".join(words[1:])
      self.final_answer = name
      if name not in self.domain.type_names:
        return StepResult("", done=True, success=False, error="unknown_strategy")
      self.success = name == self.profile.user_type
      return StepResult("", done=True, success=self.success)
    return StepResult(self.user.respond(self.profile, utterance, tuple(self.history)), done=False)


# Discrete actions, batched (the controllable experiment, benchmarks/curio_discrete.py) ---------------
def discrete_actions(domain: Domain, argmax_recommend: bool = False) -> tuple[str, ...]:
  """The utterance of each discrete action: "ask <attribute>" for every attribute (in order), then
  "<final_verb> <type>" for every type, or (argmax_recommend) one "<final_verb>" action whose type is
  the exact user model's argmax (`DiscreteDialogues.argmax_type`)."""
  asks = tuple(f"ask {a}" for a in domain.attribute_names)
  if argmax_recommend:
    return asks + (domain.final_verb,)
  return asks + tuple(f"{domain.final_verb} {t}" for t in domain.type_names)


class RulePosterior:
  """The exact Bayesian user model of a domain: a uniform prior over every combination of decisive
  values (the rule is known, the training/held-out split is not), conditioned on the decisive
  values heard so far; the belief over types is the share of consistent combinations per type.
  Non-decisive answers do not move it, and it never gives the true type probability 0."""

  def __init__(self, domain: Domain):
    self.domain = domain
    combos = list(itertools.product(*(domain.attributes[a] for a in domain.decisive)))
    self.combos = np.array([[domain.attributes[a].index(v) for a, v in zip(domain.decisive, c)]
                            for c in combos], np.int64)  # [C, D] value indices
    types = np.array([domain.type_index(domain.rule(c)) for c in combos])
    self.combo_types = np.eye(domain.num_types)[types]  # [C, K]

  def beliefs(self, heard: np.ndarray) -> np.ndarray:
    """`heard [..., D]` value index of each decisive attribute (-1: not heard) -> `[..., K]`."""
    heard = np.asarray(heard)[..., None, :]
    consistent = np.all((heard < 0) | (heard == self.combos), axis=-1).astype(np.float64)
    mass = consistent @ self.combo_types
    return mass / mass.sum(-1, keepdims=True)


class DiscreteDialogues:
  """A batch of dialogues of `DialogueEnvironment`'s protocol with the template user, played with
  discrete actions (`discrete_actions`): action i < num_attributes asks attribute i (the reply
  reveals its value), the others are final answers (success = the named type, or with
  `argmax_recommend` the exact user model's argmax, is the user's). After `turn_cap` turns without
  a final answer a dialogue ends as a failure (`hit_cap`). Finished rows ignore further actions.

  Observation (`observation()`, float32 `[batch, observation_size]`): one bit per attribute value
  the user has said, one bit per attribute asked, the turn index one-hot.
  `belief_history [batch, turn_cap + 1, K]`: the exact user model's belief after each turn (b_0 the
  prior; rows after a dialogue's end repeat its last), the input of `rewards.turn_rewards`.
  """

  def __init__(self, domain: Domain, profiles: Sequence[UserProfile], *, turn_cap: int = 8,
               argmax_recommend: bool = False, posterior: RulePosterior | None = None):
    self.domain, self.turn_cap, self.argmax_recommend = domain, turn_cap, argmax_recommend
    self.posterior = posterior or RulePosterior(domain)
    names = domain.attribute_names
    self.num_attributes = len(names)
    self.num_actions = len(discrete_actions(domain, argmax_recommend))
    self.offsets = np.cumsum([0] + [len(domain.attributes[a]) for a in names])
    self.values = np.array([[domain.attributes[a].index(p.values[a]) for a in names]
                            for p in profiles], np.int64)  # [B, A]
    self.types = np.array([domain.type_index(p.user_type) for p in profiles], np.int64)
    self.decisive_index = np.array([names.index(a) for a in domain.decisive])
    batch = len(profiles)
    self.asked = np.zeros((batch, self.num_attributes), bool)
    self.turns = np.zeros(batch, np.int64)
    self.done = np.zeros(batch, bool)
    self.success = np.zeros(batch, bool)
    self.hit_cap = np.zeros(batch, bool)
    self.belief_history = np.zeros((batch, turn_cap + 1, domain.num_types))
    self.belief_history[:] = self.beliefs()[:, None, :]

  @property
  def observation_size(self) -> int:
    return int(self.offsets[-1]) + self.num_attributes + self.turn_cap

  def heard_decisive(self) -> np.ndarray:
    """`[batch, D]` value index of each decisive attribute the user has said, -1 otherwise."""
    index = self.decisive_index
    return np.where(self.asked[:, index], self.values[:, index], -1)

  def beliefs(self) -> np.ndarray:
    return self.posterior.beliefs(self.heard_decisive())

  def argmax_type(self) -> np.ndarray:
    return self.beliefs().argmax(-1)

  def observation(self) -> np.ndarray:
    batch = len(self.types)
    out = np.zeros((batch, self.observation_size), np.float32)
    rows, attributes = np.nonzero(self.asked)
    out[rows, self.offsets[attributes] + self.values[rows, attributes]] = 1.0
    out[:, self.offsets[-1]:self.offsets[-1] + self.num_attributes] = self.asked
    turn = np.minimum(self.turns, self.turn_cap - 1)
    out[np.arange(batch), self.offsets[-1] + self.num_attributes + turn] = 1.0
    return out

  def step(self, actions: np.ndarray) -> None:
    """One turn for every live row (`actions [batch]` ints)."""
    actions = np.asarray(actions, np.int64)
    if ((actions < 0) | (actions >= self.num_actions)).any():
      raise ValueError(f"curio discrete: actions must be in 0..{self.num_actions - 1}.")
    live = ~self.done
    rows = np.arange(len(actions))
    ask = live & (actions < self.num_attributes)
    final = live & ~ask
    if self.argmax_recommend:
      named = self.argmax_type()
    else:
      named = actions - self.num_attributes
    self.success |= final & (named == self.types)
    self.asked[rows[ask], actions[ask]] = True
    self.turns += live
    self.hit_cap |= ask & (self.turns >= self.turn_cap)
    self.done |= final | self.hit_cap
    later = live[:, None] & (np.arange(self.turn_cap + 1)[None, :] >= self.turns[:, None])
    self.belief_history = np.where(later[..., None], self.beliefs()[:, None, :],
                                   self.belief_history)
