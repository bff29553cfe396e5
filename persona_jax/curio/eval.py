"""Playing dialogues with the policy decoder, and the held-out evaluation.

`play_dialogues` runs a batch of dialogues turn by turn: every turn, one batched `sampling.generate`
call over all rows (finished rows are fed their own prompt and ignored, so the batch shape never
changes and nothing recompiles), then each live environment steps on its decoded utterance.

`evaluate` plays held-out users (sampling at the training temperature with a fixed key, so the
numbers describe the stochastic policy RL optimizes and repeat exactly; temperature 0 is greedy)
and reports:
  * success_rate: final answer = the user's type;
  * turns_to_identify: mean first turn after which the user model names the true type
    (`tasks.turns_to_identify`; never = turn_cap + 1);
  * mean_turns, turn_cap_rate (dialogues that hit the cap), invalid_turn_rate (empty / too long
    utterances and unknown strategy names per turn), decisive_asked (share of the decisive
    attributes the agent asked about);
and, per dialogue, the rows behind them (`dialogue_rows`, for paired statistics); `format_table`
writes the markdown table the job's evaluation returns.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
import numpy as np

from persona_jax import sampling
from persona_jax.curio import envs, tasks
from persona_jax.curio.model import UserModel


def play_dialogues(decoder, fmt: tasks.DialogueFormat, domain: envs.Domain, user: envs.SimulatedUser,
                   profiles: Sequence[envs.UserProfile], *, turn_cap: int, max_utterance_tokens: int,
                   temperature: float, rng: jax.Array | None = None) -> list[tasks.Dialogue]:
  """Plays one dialogue per profile with the policy `decoder` (temperature 0: greedy).

  Each agent utterance is at most `max_utterance_tokens` ids plus the stop id; one that never stops
  is used as generated (its ids are what the policy is trained on), never cut further.
  """
  environments = [envs.DialogueEnvironment(domain, user, p, turn_cap=turn_cap) for p in profiles]
  agent_ids = [[] for _ in profiles]
  agent_logprobs = [[] for _ in profiles]
  errors = [[] for _ in profiles]
  hit_cap = [False] * len(profiles)
  for turn in range(turn_cap):
    live = [i for i, env in enumerate(environments) if not env.done]
    if not live:
      break
    prompts = [tasks.prompt_ids(fmt, env.history, agent_ids[i]) for i, env in enumerate(environments)]
    result = sampling.generate(
        decoder, prompts, max_new_tokens=max_utterance_tokens + 1, temperature=temperature,
        rng=None if temperature == 0 else jax.random.fold_in(rng, turn),
        stop_tokens=(fmt.stop_id,), pad_id=fmt.pad_id)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    logprobs = np.asarray(result.logprobs)
    for i in live:
      ids = [int(t) for t in tokens[i, :lengths[i]]]
      text_ids = ids[:-1] if ids and ids[-1] == fmt.stop_id else ids
      step = environments[i].step(fmt.decode(text_ids))
      agent_ids[i].append(ids)
      agent_logprobs[i].append([float(x) for x in logprobs[i, :lengths[i]]])
      if step.error is not None:
        errors[i].append(step.error)
      hit_cap[i] = step.hit_turn_cap
  return [tasks.Dialogue(env.profile, list(env.history), env.success, hit_cap[i], agent_ids[i],
                         agent_logprobs[i], errors[i])
          for i, env in enumerate(environments)]


def dialogue_beliefs(user_model: UserModel, vocab: tasks.WordVocabulary,
                     dialogues: Sequence[tasks.Dialogue], turn_cap: int) -> np.ndarray:
  """The user model's beliefs b_0..b_turn_cap per dialogue, `[batch, turn_cap + 1, K]` float64."""
  features = np.stack([tasks.reply_features(vocab, d, turn_cap) for d in dialogues])
  return np.asarray(_beliefs(user_model, features), np.float64)


@nnx.jit
def _beliefs(user_model, features):
  return user_model.beliefs(features)


def dialogue_rows(domain: envs.Domain, user_model: UserModel, vocab: tasks.WordVocabulary,
                  dialogues: Sequence[tasks.Dialogue], turn_cap: int) -> list[dict]:
  """One JSON-able row per dialogue: user type, success, turns, turns_to_identify, hit_turn_cap,
  invalid turns, share of the decisive attributes asked."""
  beliefs = dialogue_beliefs(user_model, vocab, dialogues, turn_cap)
  types = np.array([domain.type_index(d.profile.user_type) for d in dialogues])
  num_turns = np.array([len(d.turns) for d in dialogues])
  identify = tasks.turns_to_identify(beliefs, types, num_turns)
  asker = envs.TemplateUser(domain)
  rows = []
  for i, d in enumerate(dialogues):
    asked = {asker.asked_attribute(u) for u, _ in d.turns}
    rows.append({"user_type": d.profile.user_type, "success": float(d.success),
                 "turns": int(num_turns[i]), "turns_to_identify": int(identify[i]),
                 "hit_turn_cap": float(d.hit_turn_cap), "invalid_turns": len(d.errors),
                 "decisive_asked": len(asked & set(domain.decisive)) / len(domain.decisive)})
  return rows


def metrics_of_rows(rows: Sequence[dict]) -> dict[str, float]:
  """The metrics of the module docstring from `dialogue_rows`."""
  turns = sum(r["turns"] for r in rows)
  return {
      "success_rate": float(np.mean([r["success"] for r in rows])),
      "turns_to_identify": float(np.mean([r["turns_to_identify"] for r in rows])),
      "mean_turns": float(turns / len(rows)),
      "turn_cap_rate": float(np.mean([r["hit_turn_cap"] for r in rows])),
      "invalid_turn_rate": float(sum(r["invalid_turns"] for r in rows) / turns),
      "decisive_asked": float(np.mean([r["decisive_asked"] for r in rows])),
  }


def dialogue_metrics(domain: envs.Domain, user_model: UserModel, vocab: tasks.WordVocabulary,
                     dialogues: Sequence[tasks.Dialogue], turn_cap: int) -> dict[str, float]:
  """The metrics of the module docstring over `dialogues`."""
  return metrics_of_rows(dialogue_rows(domain, user_model, vocab, dialogues, turn_cap))


METRIC_COLUMNS = (  # (metric, column title, format)
    ("success_rate", "success", "{:.3f}"), ("turns_to_identify", "turns to identify", "{:.2f}"),
    ("mean_turns", "turns", "{:.2f}"), ("turn_cap_rate", "turn cap", "{:.3f}"),
    ("invalid_turn_rate", "invalid turns", "{:.3f}"), ("decisive_asked", "decisive asked", "{:.3f}"))


def format_table(rows: dict[str, dict[str, float]], title: str) -> str:
  """Markdown: one line per named set of `dialogue_metrics` (e.g. before / after RL)."""
  lines = [title, "", "| policy | " + " | ".join(c[1] for c in METRIC_COLUMNS) + " |",
           "|---|" + "---|" * len(METRIC_COLUMNS)]
  for name, metrics in rows.items():
    lines.append(f"| {name} | " + " | ".join(fmt.format(metrics[key])
                                             for key, _, fmt in METRIC_COLUMNS) + " |")
  return "\n".join(lines)


def evaluate(decoder, fmt: tasks.DialogueFormat, domain: envs.Domain, user: envs.SimulatedUser,
             user_model: UserModel, vocab: tasks.WordVocabulary,
             profiles: Sequence[envs.UserProfile], *, turn_cap: int, max_utterance_tokens: int,
             temperature: float = 1.0, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
  """Dialogues with `profiles` (held-out users) -> (`dialogue_metrics`, `dialogue_rows`)."""
  dialogues = play_dialogues(decoder, fmt, domain, user, profiles, turn_cap=turn_cap,
                             max_utterance_tokens=max_utterance_tokens, temperature=temperature,
                             rng=jax.random.key(seed))
  rows = dialogue_rows(domain, user_model, vocab, dialogues, turn_cap)
  return metrics_of_rows(rows), rows
