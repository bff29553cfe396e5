"""CURIO's data: the word vocabulary, dialogue encodings, scripted dialogues and the metrics.

Token layout of a dialogue as the tiny policy reads it (`word_format`, ids of `WordVocabulary`):

    <bos> <agent> ask age <eos> <user> my age is senior <agent> recommend walking <eos> <user>

The policy's prompt at turn t is everything so far plus `<agent>`; it generates the utterance and
`<eos>`. A pretrained policy uses the same layout in ChatML (`chat_format`).

`dialogue_format` picks the format from the run's vocabulary (`DecoderSource.vocabulary`): 'words'
(`WORDS`, the word vocabulary; the default with a random preset) or a pretrained tokenizer (ChatML).

Simulated dialogues train the user model (random questions, `random_dialogues`) and warm-start the
policy by imitation (`scripted_dialogues`: a mixture of a scripted agent that asks the decisive
attributes and a random one that asks anything, then recommends by the rule from what it heard);
`user_model_batch` / `imitation_batch` turn them into arrays and `ArrayBatches` serves those arrays
to a Trainer (seeded, resumable).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from persona_jax.curio import envs
from persona_jax.errors import UserError

WORDS = "words"  # DecoderSource.vocabulary naming `WordVocabulary`

SPECIALS = ("<pad>", "<bos>", "<eos>", "<agent>", "<user>", "<unk>")
PAD, BOS, EOS, AGENT, USER, UNK = range(len(SPECIALS))
TEMPLATE_WORDS = tuple(dict.fromkeys(
    ["ask", "my", "is"] + " ".join([envs.NOT_UNDERSTOOD, envs.REPHRASE_EMPTY,
                                    envs.REPHRASE_TOO_LONG]).split()))


class WordVocabulary:
  """Whitespace words of every domain plus the template user's words; unknown words -> `<unk>`."""

  def __init__(self, domains: Sequence[envs.Domain] = tuple(envs.DOMAINS.values())):
    words = list(SPECIALS) + list(TEMPLATE_WORDS)
    for domain in domains:
      words += domain.words()
    self.words = list(dict.fromkeys(words))
    self.index = {w: i for i, w in enumerate(self.words)}

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  def encode(self, text: str) -> list[int]:
    return [self.index.get(w, UNK) for w in text.lower().split()]

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[int(i)] for i in ids)


@dataclasses.dataclass(frozen=True)
class DialogueFormat:
  """How a dialogue becomes the policy decoder's token ids.

  start: ids before the first turn (`<bos>`, or a system prompt).
  agent_prefix: ids that open each agent turn (the policy generates after them).
  stop_id: the id that ends an agent utterance.
  pad_id: padding id of the batches.
  encode / decode: utterance text <-> ids (no markers).
  user_segment: a user reply -> the ids that follow the agent's utterance.
  vocab_size: rows the policy decoder needs.
  """
  start: tuple[int, ...]
  agent_prefix: tuple[int, ...]
  stop_id: int
  pad_id: int
  encode: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  user_segment: Callable[[str], list[int]]
  vocab_size: int


def word_format(vocab: WordVocabulary) -> DialogueFormat:
  """The tiny policy's format: `<bos> <agent> ask age <eos> <user> my age is senior <agent> ...`."""
  return DialogueFormat(start=(BOS,), agent_prefix=(AGENT,), stop_id=EOS, pad_id=PAD,
                        encode=vocab.encode, decode=vocab.decode,
                        user_segment=lambda reply: [USER] + vocab.encode(reply),
                        vocab_size=vocab.vocab_size)


def system_prompt(domain: envs.Domain) -> str:
  """The instructions a pretrained policy reads: how to ask and how to answer."""
  return (f"You talk with a user about {domain.name}. Ask one short question per turn, naming one "
          f"of these attributes: {', '.join(domain.attribute_names)}. When you know enough, answer "
          f"'{domain.final_verb} <name>' with one of: {', '.join(domain.type_names)}.")


def chat_format(tokenizer, domain: envs.Domain) -> DialogueFormat:
  """A ChatML format (SmolLM2-Instruct) over a `tokenizers.Tokenizer`; the agent is the assistant."""
  start_id, end_id = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
  if start_id is None or end_id is None:
    raise UserError("curio: the pretrained tokenizer has no <|im_start|>/<|im_end|> tokens; the "
                    "chat dialogue format is ChatML (SmolLM2-Instruct). Use a ChatML model or a "
                    f"random preset with DecoderSource.vocabulary = '{WORDS}'.")
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
  start = encode(f"<|im_start|>system\n{system_prompt(domain)}<|im_end|>\n")
  return DialogueFormat(
      start=tuple(start), agent_prefix=tuple(encode("<|im_start|>assistant\n")), stop_id=end_id,
      pad_id=end_id, encode=encode, decode=lambda ids: tokenizer.decode(list(ids)),
      user_segment=lambda reply: encode(f"\n<|im_start|>user\n{reply}<|im_end|>\n"),
      vocab_size=tokenizer.get_vocab_size())


def dialogue_format(vocabulary: str, domain: envs.Domain, word_vocabulary: WordVocabulary
                    ) -> tuple[DialogueFormat, object | None, str | None]:
  """(format, tokenizer, chat template) for the vocabulary source `vocabulary`: `WORDS` gives the
  word format (no tokenizer), anything else is a `persona_jax.hf.load_tokenizer` source (ChatML)."""
  if vocabulary == WORDS:
    return word_format(word_vocabulary), None, None
  if vocabulary == "bytes":
    raise UserError("curio: the byte vocabulary cannot spell the dialogue protocol's words; with a "
                    f"random preset set DecoderSource.vocabulary = '{WORDS}' (the curio word "
                    "vocabulary), or use a pretrained ChatML model (DecoderSource.pretrained).")
  from persona_jax.hf import load_tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer, chat_template, _ = load_tokenizer(vocabulary)
  if tokenizer is None:
    raise UserError(f"curio: DecoderSource vocabulary {vocabulary!r} has no tokenizer.json; use a "
                    f"model with a tokenizer or DecoderSource.vocabulary = '{WORDS}'.")
  return chat_format(tokenizer, domain), tokenizer, chat_template


@dataclasses.dataclass
class Dialogue:
  """A finished dialogue: the profile, the turns (utterance, reply) and how it ended."""
  profile: envs.UserProfile
  turns: list[tuple[str, str]]
  success: bool
  hit_turn_cap: bool
  agent_ids: list[list[int]] | None = None  # the policy's generated ids per turn (stop id included)
  agent_logprobs: list[list[float]] | None = None  # their sampling log-probs
  errors: list[str] = dataclasses.field(default_factory=list)  # StepResult.error of each bad turn


def encode_dialogue(fmt: DialogueFormat, dialogue: Dialogue, sequence_length: int
                    ) -> tuple[np.ndarray, np.ndarray, int]:
  """(tokens `[sequence_length]` padded with `fmt.pad_id`, agent turn per token `[sequence_length]`
  (t on the ids the agent produced in turn t, -1 elsewhere), real length). The prompt of turn t
  (`prompt_ids`) is a prefix of it. Raises when the dialogue does not fit (never truncates)."""
  tokens, agent_turn = list(fmt.start), [-1] * len(fmt.start)
  for t, (utterance, reply) in enumerate(dialogue.turns):
    ids = (list(dialogue.agent_ids[t]) if dialogue.agent_ids is not None
           else fmt.encode(utterance) + [fmt.stop_id])
    user = fmt.user_segment(reply)
    tokens += list(fmt.agent_prefix) + ids + user
    agent_turn += [-1] * len(fmt.agent_prefix) + [t] * len(ids) + [-1] * len(user)
  if len(tokens) > sequence_length:
    raise UserError(f"curio: a dialogue of {len(dialogue.turns)} turns takes {len(tokens)} tokens, "
                    f"more than curio.job.sequence_length={sequence_length}; raise it.")
  pad = sequence_length - len(tokens)
  return (np.array(tokens + [fmt.pad_id] * pad, np.int32),
          np.array(agent_turn + [-1] * pad, np.int32), len(tokens))


def prompt_ids(fmt: DialogueFormat, turns: Sequence[tuple[str, str]],
               agent_ids: Sequence[Sequence[int]] | None = None) -> list[int]:
  """The policy's prompt for the next turn: the dialogue so far plus the agent prefix."""
  tokens = list(fmt.start)
  for t, (utterance, reply) in enumerate(turns):
    ids = list(agent_ids[t]) if agent_ids is not None else fmt.encode(utterance) + [fmt.stop_id]
    tokens += list(fmt.agent_prefix) + ids + fmt.user_segment(reply)
  return tokens + list(fmt.agent_prefix)


def reply_features(vocab: WordVocabulary, dialogue: Dialogue, num_turns: int) -> np.ndarray:
  """What the user model reads: `[num_turns + 1, vocab]` multi-hot of the words the USER said in
  turns < t (row t), so row 0 is the empty dialogue. Rows after the dialogue's end repeat its last.

  Only the user's words count, so an agent cannot move the belief by saying attribute values itself.
  """
  features = np.zeros((num_turns + 1, vocab.vocab_size), np.float32)
  for t, (_, reply) in enumerate(dialogue.turns[:num_turns]):
    features[t + 1:] = features[t]
    features[t + 1, vocab.encode(reply)] = 1.0
  last = min(len(dialogue.turns), num_turns)
  features[last + 1:] = features[last]
  return features


def run_scripted(domain: envs.Domain, user: envs.SimulatedUser, profile: envs.UserProfile,
                 utterances_fn, turn_cap: int) -> Dialogue:
  env = envs.DialogueEnvironment(domain, user, profile, turn_cap=turn_cap)
  result = None
  while not env.done:
    result = env.step(utterances_fn(env))
  return Dialogue(profile, list(env.history), env.success, result.hit_turn_cap)


def scripted_dialogues(domain: envs.Domain, population: envs.UserPopulation, *, count: int,
                       turn_cap: int, random_ask_prob: float, seed: int) -> list[Dialogue]:
  """Imitation data: each question is, with probability `random_ask_prob`, a random non-decisive
  attribute, else the next decisive one not yet asked (shuffled order); the agent recommends once it
  asked every decisive attribute or at its last turn, by the rule applied to what it heard (values it
  never heard are guessed at random)."""
  rng = np.random.default_rng(seed)
  user = envs.TemplateUser(domain)
  others = [a for a in domain.attributes if a not in domain.decisive]
  out = []
  for _ in range(count):
    profile = population.sample(rng, "train")
    order = list(rng.permutation(domain.decisive))
    heard: dict[str, str] = {}

    def next_utterance(env, order=order, heard=heard, profile=profile):
      if env.history:
        asked = user.asked_attribute(env.history[-1][0])
        if asked is not None:
          heard[asked] = profile.values[asked]
      missing = [a for a in order if a not in heard]
      if not missing or env.turns == env.turn_cap - 1:
        guess = tuple(heard.get(a, domain.attributes[a][rng.integers(len(domain.attributes[a]))])
                      for a in domain.decisive)
        return f"{domain.final_verb} {domain.rule(guess)}"
      if rng.random() < random_ask_prob:
        return f"ask {others[rng.integers(len(others))]}"
      return f"ask {missing[0]}"

    out.append(run_scripted(domain, user, profile, next_utterance, turn_cap))
  return out


def random_dialogues(domain: envs.Domain, population: envs.UserPopulation, *, count: int,
                     num_turns: int, decisive_prob: float, seed: int, split: str = "train"
                     ) -> list[Dialogue]:
  """User-model data: `num_turns` questions, each a decisive attribute with probability
  `decisive_prob` (else any attribute), asked of the template user; no final answer."""
  rng = np.random.default_rng(seed)
  user = envs.TemplateUser(domain)
  names = domain.attribute_names
  out = []
  for _ in range(count):
    profile = population.sample(rng, split)
    turns = []
    for _ in range(num_turns):
      pool = domain.decisive if rng.random() < decisive_prob else names
      utterance = f"ask {pool[rng.integers(len(pool))]}"
      turns.append((utterance, user.respond(profile, utterance)))
    out.append(Dialogue(profile, turns, success=False, hit_turn_cap=False))
  return out


def user_model_batch(vocab: WordVocabulary, domain: envs.Domain, dialogues: Sequence[Dialogue],
                     num_turns: int) -> dict[str, np.ndarray]:
  """{"features": `[batch, num_turns + 1, vocab]`, "user_type": `[batch]`} for the user model."""
  return {
      "features": np.stack([reply_features(vocab, d, num_turns) for d in dialogues]),
      "user_type": np.array([domain.type_index(d.profile.user_type) for d in dialogues], np.int32),
  }


def imitation_batch(fmt: DialogueFormat, dialogues: Sequence[Dialogue],
                    sequence_length: int) -> dict[str, np.ndarray]:
  """{"tokens", "input_mask", "agent_mask"} `[batch, sequence_length]` for `model.imitation_loss`."""
  encoded = [encode_dialogue(fmt, d, sequence_length) for d in dialogues]
  tokens = np.stack([e[0] for e in encoded])
  lengths = np.array([e[2] for e in encoded])
  return {"tokens": tokens,
          "input_mask": np.arange(sequence_length)[None, :] < lengths[:, None],
          "agent_mask": np.stack([e[1] >= 0 for e in encoded]).astype(np.float32)}


class ArrayBatches:
  """Endless seeded batches of rows of precomputed arrays (a fresh permutation each epoch);
  resumable through `get_state`/`set_state` (rows drawn so far)."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int = 0):
    self.arrays = arrays
    self.num_rows = len(next(iter(arrays.values())))
    if self.num_rows == 0 or batch_size < 1:
      raise UserError(f"curio: {self.num_rows} rows in batches of {batch_size}; need at least one "
                      "row and curio.job.batch_size >= 1.")
    self.batch_size = batch_size
    self.seed = seed
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for _ in range(self.batch_size):
      epoch, index = divmod(self.position, self.num_rows)
      rows.append(np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)[index])
      self.position += 1
    rows = np.array(rows)
    return {name: value[rows] for name, value in self.arrays.items()}

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


def turns_to_identify(beliefs: np.ndarray, user_type: np.ndarray, num_turns: np.ndarray,
                      threshold: float = 0.5) -> np.ndarray:
  """First turn t >= 1 after which the user model names the true type (argmax b_t = u* and
  b_t(u*) >= threshold), per dialogue; dialogues that never get there count as turn_cap + 1.

  beliefs: `[batch, turn_cap + 1, K]`; user_type: `[batch]`; num_turns: `[batch]` turns played.
  """
  turn_cap = beliefs.shape[1] - 1
  rows = np.arange(beliefs.shape[0])
  probability = beliefs[rows, :, user_type]  # [batch, turn_cap + 1]
  identified = (beliefs.argmax(-1) == user_type[:, None]) & (probability >= threshold)
  identified[:, 0] = False
  identified &= np.arange(turn_cap + 1)[None, :] <= num_turns[:, None]
  first = np.where(identified.any(1), identified.argmax(1), turn_cap + 1)
  return first
