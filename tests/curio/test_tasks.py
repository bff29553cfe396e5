"""Dialogue encodings, user-model features, scripted dialogues and turns-to-identify."""

import numpy as np
import pytest

from persona_jax.curio import envs, tasks

DOMAIN = envs.EXERCISE
VOCAB = tasks.WordVocabulary()
FMT = tasks.word_format(VOCAB)


def _dialogue():
  population = envs.UserPopulation(DOMAIN)
  return tasks.scripted_dialogues(DOMAIN, population, count=1, turn_cap=8, random_ask_prob=0.5,
                                  seed=1)[0]


def test_each_turns_prompt_is_a_prefix_of_the_encoded_dialogue():
  dialogue = _dialogue()
  tokens, agent_turn, length = tasks.encode_dialogue(FMT, dialogue, 96)
  assert VOCAB.decode(tokens[:3]) == "<bos> <agent> ask" and (tokens[length:] == tasks.PAD).all()
  for t, (utterance, _) in enumerate(dialogue.turns):
    prompt = tasks.prompt_ids(FMT, dialogue.turns[:t])
    np.testing.assert_array_equal(tokens[:len(prompt)], prompt)
    ids = tokens[agent_turn == t]
    # Exactly the agent's own ids (utterance + <eos>) right after its prompt carry turn index t.
    np.testing.assert_array_equal(ids, VOCAB.encode(utterance) + [tasks.EOS])
    np.testing.assert_array_equal(tokens[len(prompt):len(prompt) + len(ids)], ids)
  assert (agent_turn >= 0).sum() == sum(len(u.split()) + 1 for u, _ in dialogue.turns)
  with pytest.raises(ValueError, match="raise it"):
    tasks.encode_dialogue(FMT, dialogue, length - 1)


def test_user_model_features_count_only_the_users_words():
  profile = envs.UserPopulation(DOMAIN).sample_many(0, "train", 1)[0]
  turns = [("ask senior age", f"my age is {profile.values['age']}"), ("young senior", "sorry")]
  dialogue = tasks.Dialogue(profile, turns, success=False, hit_turn_cap=False)
  features = tasks.reply_features(VOCAB, dialogue, num_turns=4)
  assert features.shape == (5, VOCAB.vocab_size)
  assert features[0].sum() == 0
  said = {VOCAB.words[i] for i in np.nonzero(features[1])[0]}
  assert said == {"my", "age", "is", profile.values["age"]}
  other = ({"young", "senior"} - {profile.values["age"]}).pop()
  assert features[:, VOCAB.index[other]].sum() == 0  # the agent said it, the user did not
  np.testing.assert_array_equal(features[3], features[2])  # rows after the end repeat the last
  np.testing.assert_array_equal(features[4], features[2])


def test_scripted_agent_with_full_information_always_succeeds():
  population = envs.UserPopulation(DOMAIN)
  dialogues = tasks.scripted_dialogues(DOMAIN, population, count=50, turn_cap=8, random_ask_prob=0.0,
                                       seed=0)
  assert all(d.success and len(d.turns) == 6 for d in dialogues)
  again = tasks.scripted_dialogues(DOMAIN, population, count=50, turn_cap=8, random_ask_prob=0.0,
                                   seed=0)
  assert [d.turns for d in dialogues] == [d.turns for d in again]


def test_turns_to_identify():
  uniform = np.full(4, 0.25)
  sure = np.array([0.1, 0.7, 0.1, 0.1])
  beliefs = np.stack([
      np.stack([uniform, uniform, sure, sure]),  # identified after turn 2
      np.stack([sure, uniform, uniform, uniform]),  # b_0 does not count; never identified
      np.stack([uniform, uniform, uniform, sure]),  # identified at turn 3, but only 2 turns played
  ])
  out = tasks.turns_to_identify(beliefs, np.array([1, 1, 1]), np.array([3, 3, 2]))
  np.testing.assert_array_equal(out, [2, 4, 4])
