"""Environments, simulated users and the dialogue protocol's bad inputs."""

import itertools

import pytest

from persona_jax.curio import envs


@pytest.mark.parametrize("domain", list(envs.DOMAINS.values()), ids=list(envs.DOMAINS))
def test_population_is_seeded_and_held_out_combinations_are_never_trained_on(domain):
  first = envs.UserPopulation(domain, split_seed=3)
  again = envs.UserPopulation(domain, split_seed=3)
  assert first.held_out == again.held_out and first.training == again.training
  assert first.sample_many(7, "train", 50) == again.sample_many(7, "train", 50)
  assert first.sample_many(7, "train", 50) != first.sample_many(8, "train", 50)
  assert not set(first.held_out) & set(first.training)
  assert len(first.held_out) == domain.num_held_out
  # Every type can still be learned from training users.
  assert {domain.rule(c) for c in first.training} == set(domain.type_names)
  for split, combos in (("train", first.training), ("held_out", first.held_out)):
    for profile in first.sample_many(1, split, 200):
      combo = tuple(profile.values[a] for a in domain.decisive)
      assert combo in combos
      assert profile.user_type == domain.rule(combo)
  with pytest.raises(ValueError, match="'train' or 'held_out'"):
    first.combinations("test")


def test_exercise_domain_shape_and_rule():
  domain = envs.EXERCISE
  assert len(domain.attributes) == 20 and len(domain.decisive) == 5 and domain.num_types == 8
  combos = list(itertools.product(*(domain.attributes[a] for a in domain.decisive)))
  assert {domain.rule(c) for c in combos} == set(domain.type_names)
  # Each decisive attribute matters: flipping it changes the type for some combination.
  for position in range(5):
    flips = [c[:position] + (v,) + c[position + 1:] for c in combos
             for v in domain.attributes[domain.decisive[position]] if v != c[position]]
    assert any(domain.rule(c) != domain.rule(f) for c, f in zip(combos, flips))
  # Value words are unique within the domain, so a reply names its attribute's value unambiguously.
  values = [v for vs in domain.attributes.values() for v in vs]
  assert len(values) == len(set(values))
  assert domain.rule(("senior", "uninjured", "weightloss", "busy", "home")) == "walking"
  assert domain.rule(("young", "uninjured", "strength", "flexible", "gym")) == "powerlifting"


def test_template_user_answers_truthfully_and_deterministically():
  domain = envs.EXERCISE
  user = envs.TemplateUser(domain)
  for profile in envs.UserPopulation(domain).sample_many(0, "train", 20):
    for attribute in domain.attributes:
      reply = user.respond(profile, f"could you tell me your {attribute} please")
      assert reply == f"my {attribute} is {profile.values[attribute]}"
      assert reply == user.respond(profile, f"could you tell me your {attribute} please")
    assert user.respond(profile, "how is the weather") == envs.NOT_UNDERSTOOD
    # The first attribute named is the one answered.
    assert user.respond(profile, "ask age and goal") == f"my age is {profile.values['age']}"


def _env(turn_cap=3, profile=None):
  domain = envs.EXERCISE
  profile = profile or envs.UserPopulation(domain).sample_many(0, "train", 1)[0]
  return envs.DialogueEnvironment(domain, envs.TemplateUser(domain), profile, turn_cap=turn_cap,
                                  max_utterance_chars=40)


def test_final_answer_ends_the_dialogue():
  env = _env()
  assert not env.step("ask age").done
  result = env.step(f"recommend {env.profile.user_type}")
  assert result.done and result.success and result.error is None and env.turns == 2
  wrong = next(t for t in envs.EXERCISE.type_names if t != env.profile.user_type)
  env = _env()
  result = env.step(f"recommend {wrong}")
  assert result.done and not result.success


def test_bad_inputs_have_defined_behaviour():
  env = _env(turn_cap=5)
  empty = env.step("   ")
  assert (empty.error, empty.done, empty.reply) == ("empty_utterance", False, envs.REPHRASE_EMPTY)
  long = env.step("ask age " + "x" * 100)
  assert (long.error, long.done, long.reply) == ("utterance_too_long", False, envs.REPHRASE_TOO_LONG)
  assert env.turns == 2  # both turns were spent; nothing was truncated and answered
  unknown = env.step("recommend zumba")
  assert unknown.done and not unknown.success and unknown.error == "unknown_strategy"
  assert env.final_answer == "zumba"
  with pytest.raises(ValueError, match="dialogue is over"):
    env.step("ask age")
  with pytest.raises(ValueError, match="unknown strategy 'zumba'; valid names: powerlifting"):
    envs.EXERCISE.type_index("zumba")


def test_turn_cap_ends_the_dialogue_as_a_failure():
  env = _env(turn_cap=3)
  results = [env.step("ask age"), env.step("ask goal"), env.step("ask pet")]
  assert [r.done for r in results] == [False, False, True]
  assert results[-1].hit_turn_cap and not results[-1].success and env.done
  # A final answer on the last allowed turn is a final answer, not a turn-cap failure.
  env = _env(turn_cap=2)
  env.step("ask age")
  last = env.step(f"recommend {env.profile.user_type}")
  assert last.done and last.success and not last.hit_turn_cap
  with pytest.raises(ValueError, match="turn_cap"):
    _env(turn_cap=0)


def test_llm_user_has_the_template_users_interface():
  from persona_jax import nn as pnn
  from persona_jax.curio import tasks

  domain = envs.EDUCATION
  vocab = tasks.WordVocabulary()  # any encode/decode tokenizer; words keep the prompt short
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=vocab.vocab_size), 0)
  profile = envs.UserPopulation(domain).sample_many(0, "train", 1)[0]
  prompt = envs.LLMUser(domain, decoder, vocab).prompt_text(profile, "ask practice")
  for attribute, value in profile.values.items():
    assert f"{attribute}: {value}" in prompt
  assert prompt.endswith("Assistant: ask practice\nYou:")
  replies = [envs.LLMUser(domain, decoder, vocab, max_new_tokens=4, seed=1).respond(
      profile, "ask practice") for _ in range(2)]
  assert isinstance(replies[0], str) and replies[0] == replies[1]
