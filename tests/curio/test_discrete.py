"""The discrete-action dialogues (benchmarks/curio_discrete.py) against the text environment, and the
exact user model against hand-computed posteriors."""

import numpy as np
import pytest

from persona_jax.curio import envs, rewards


def test_rule_posterior_matches_hand_computed_beliefs():
  domain = envs.EXERCISE
  posterior = envs.RulePosterior(domain)
  prior = posterior.beliefs(np.full(5, -1))
  # low intensity (senior or injured): 3/4; goal: 1/2; group (gym and flexible): 1/4.
  expected = {"powerlifting": 1 / 32, "calisthenics": 3 / 32, "spinning": 1 / 32, "running": 3 / 32,
              "pilates": 3 / 32, "bands": 9 / 32, "aquafit": 3 / 32, "walking": 9 / 32}
  for name, p in expected.items():
    assert prior[domain.type_index(name)] == pytest.approx(p)
  # Heard "senior": intensity is low for sure; goal and format still open.
  heard = np.array([domain.attributes["age"].index("senior"), -1, -1, -1, -1])
  after = posterior.beliefs(heard)
  for name in ("pilates", "aquafit"):
    assert after[domain.type_index(name)] == pytest.approx(1 / 8)
  for name in ("bands", "walking"):
    assert after[domain.type_index(name)] == pytest.approx(3 / 8)
  # All five decisive values: the rule's type with probability 1.
  values = ("young", "uninjured", "strength", "flexible", "gym")
  full = np.array([domain.attributes[a].index(v) for a, v in zip(domain.decisive, values)])
  np.testing.assert_allclose(posterior.beliefs(full), np.eye(8)[domain.type_index("powerlifting")])


@pytest.mark.parametrize("argmax_recommend", [False, True])
def test_discrete_dialogues_follow_the_text_environment(argmax_recommend):
  """Random action sequences played both ways: the same ends, successes, turns and caps; the
  observation holds exactly the values the template user said."""
  domain = envs.EXERCISE
  population = envs.UserPopulation(domain)
  profiles = population.sample_many(3, "train", 40) + population.sample_many(4, "held_out", 40)
  cap = 6
  batch = envs.DiscreteDialogues(domain, profiles, turn_cap=cap, argmax_recommend=argmax_recommend)
  utterances = envs.discrete_actions(domain, argmax_recommend)
  assert batch.num_actions == len(utterances) == (21 if argmax_recommend else 28)
  texts = [envs.DialogueEnvironment(domain, envs.TemplateUser(domain), p, turn_cap=cap)
           for p in profiles]
  rng = np.random.default_rng(0)
  # Mostly questions, so that some dialogues reach the cap.
  for _ in range(cap + 2):
    actions = np.where(rng.random(len(profiles)) < 0.85,
                       rng.integers(0, batch.num_attributes, len(profiles)),
                       rng.integers(batch.num_attributes, batch.num_actions, len(profiles)))
    recommended = batch.argmax_type()
    for i, env in enumerate(texts):
      if env.done:
        continue
      utterance = utterances[actions[i]]
      if argmax_recommend and actions[i] == batch.num_attributes:
        utterance = f"{domain.final_verb} {domain.type_names[recommended[i]]}"
      env.step(utterance)
    batch.step(actions)
  assert batch.done.all() and all(env.done for env in texts)
  assert batch.hit_cap.any() and batch.success.any() and not batch.success.all()
  for i, env in enumerate(texts):
    assert batch.success[i] == env.success and batch.turns[i] == env.turns
    assert batch.hit_cap[i] == (env.final_answer is None)
    said = {r.split()[1]: r.split()[3] for _, r in env.history if r}
    observation = batch.observation()[i]
    on = {(a, v) for a in domain.attribute_names for k, v in enumerate(domain.attributes[a])
          if observation[batch.offsets[domain.attribute_names.index(a)] + k]}
    assert on == set(said.items())


def test_belief_history_feeds_the_shaped_rewards():
  """Asking the five decisive attributes and recommending: the exact beliefs end at certainty, and
  the terminal-zero DiffLogAcc return is -log b_0(u*) whatever was asked."""
  domain = envs.EXERCISE
  profiles = envs.UserPopulation(domain).sample_many(0, "train", 8)
  names = domain.attribute_names
  batch = envs.DiscreteDialogues(domain, profiles, turn_cap=8)
  for attribute in domain.decisive:
    batch.step(np.full(8, names.index(attribute)))
  batch.step(len(names) + batch.argmax_type())
  assert batch.success.all() and (batch.turns == 6).all()
  certain = batch.belief_history[np.arange(8), 5, batch.types]
  np.testing.assert_allclose(certain, 1.0)
  np.testing.assert_allclose(batch.belief_history[:, 6:], batch.belief_history[:, 5:6].repeat(3, 1))
  total, extrinsic, intrinsic = rewards.turn_rewards("diff_log_acc", batch.belief_history,
                                                     batch.types, batch.turns, batch.success,
                                                     turn_cap=8)
  prior = batch.belief_history[np.arange(8), 0, batch.types]
  np.testing.assert_allclose(intrinsic.sum(1), -np.log(prior))
  np.testing.assert_allclose(extrinsic.sum(1), 1.0)
