"""MiLP's method (`run.method = 'milp'`, see gin/milp.gin): per-user memories, the layout search, baselines.

`fit` (the generic `train` job) runs three searches at the same budget (`num_trials` scored trials
each, on the dev users, objective: the teacher-forced loss of the dev users' held-out responses,
`eval.response_nll`, unless `objective` names a generation metric), then trains each search's best on
every test user:
  1. `milp_searched`: Optuna's `GPSampler` over the per-layer memory layout (`model.SearchSpace`:
     every layer off or on with its own rank, and the learning rate) -> `<workdir>/users/<user_id>/`
     (checkpoints) and `<workdir>/peft/<user_id>/<memory_j>/` (the job's product: PEFT adapters that
     `persona_jax.export` copies beside the exported base decoder). Skipped when `milp.job.layout`
     names a layout;
  2. `milp_random`: `RandomSampler` over the same space, same number of trials -> `random/<user_id>/`;
  3. `single_lora`: one LoRA (q_proj and v_proj of every layer), its learning rate tuned by the GP
     with the same number of trials (a fixed rate when `single_lora_learning_rate` is one number) ->
     `single_lora/<user_id>/`.
Every point of the layout space is a memory on existing layers (`SearchSpace`: per-layer switches
built from the decoder's depth, plus an anchor layer that is always on), so no trial is infeasible.
Should a space map a point to no memory, the search tells it to Optuna as PRUNED, without a value (the
GP fits COMPLETE trials only, so never a made-up score); it costs no training and is not a trial.

Each search appends its trials to its log (`trials.jsonl`, `random_trials.jsonl`,
`single_lora_trials.jsonl`) with the settings they were scored with (`search.json`,
`random_search.json`, `single_lora_search.json`; a rerun with other settings is refused); its best is
written to `best_layout.json` / `random_best_layout.json` / `single_lora_best.json`. Rerunning the
same command trains nothing new: logged trials are re-added to the study and not re-run, each user's
memory resumes from its checkpoint.

`evaluate` (after training, and the generic `evaluate` job, which restores every memory from its
checkpoint): the test users' held-out responses from six systems (no memory; memory as prompt; BM25
retrieval of memory items into the prompt, both capped at `memory_prompt_tokens`; the tuned single
LoRA; the random-search memory; the GP-searched memory): per example the teacher-forced loss, the
greedy response's ROUGE-L and Persona-F1; per system the mean with a 95% bootstrap CI and the paired
difference to no memory (`persona_jax.evaluation.stats`): `<workdir>/results.{md,json}`,
`trials.md` and `eval_examples.jsonl`.

Periodic evaluation (`TrainConfig.eval_every`): during each memory's training, the held-out responses
of the user it is trained on are generated and scored (`eval/rouge_l`, `eval/persona_f1`).

Every memory is trained by the core `Trainer` with the LM loss; its trainable filter is exactly that
memory's LoRA parameters (the decoder is frozen). One Trainer (one compiled step) serves all users of
a memory (`Trainer.reset` before each user). Responses and losses are computed on a copy with the
memory merged into the kernels (`model.merged`): the same function and the base decoder's graph, so
they compile once per run instead of once per layout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import gin
import jax
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.errors import MissingFileError, UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.milp import eval as eval_lib
from persona_jax.milp import tasks
from persona_jax.milp.model import MemoryLayout, SearchSpace, inject_memory, memory_filter, merged
from persona_jax.train import checkpointing
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.losses import lm_loss
from persona_jax.train.method import Evaluation, FitResult, Method, Run, is_chief, register_method
from persona_jax.train.trainer import TrainResult

OBJECTIVES = ("loss", "rouge_l", "persona_f1")  # loss is minimized, the others maximized
SINGLE_LORA_NAME = "memory_lora"
USERS_DIR = "users"  # the searched memory of each test user
RANDOM_DIR = "random"  # the random-search memory of each test user
SINGLE_LORA_DIR = "single_lora"  # the single-LoRA baseline of each test user
MEMORY_FILE = "memory.json"  # in each user's directory: which memory its checkpoints hold
TRIALS_FILE = "trials.jsonl"
SEARCH_FILE = "search.json"
BEST_LAYOUT_FILE = "best_layout.json"


@dataclasses.dataclass(frozen=True)
class _Search:
  log: str  # the trials, one JSON a line
  settings: str  # what the trials were scored with
  best: str  # the best memory's description
  users_dir: str  # where the best memory of each test user is trained


# The three searches of `fit`, in order (the system names of the results table).
SEARCHES = {
    "milp_searched": _Search(TRIALS_FILE, SEARCH_FILE, BEST_LAYOUT_FILE, USERS_DIR),
    "milp_random": _Search("random_trials.jsonl", "random_search.json", "random_best_layout.json",
                           RANDOM_DIR),
    "single_lora": _Search("single_lora_trials.jsonl", "single_lora_search.json",
                           "single_lora_best.json", SINGLE_LORA_DIR),
}
# The TrainConfig fields a logged trial's score depends on (a rerun with others is a new search).
_SEARCH_TRAIN_FIELDS = ("num_steps", "warmup_steps", "final_learning_rate_fraction", "weight_decay",
                        "max_grad_norm", "seed")

__all__ = ["Memory", "Milp", "OBJECTIVES", "SearchSpace"]


class _Stopped(Exception):
  """A memory's training was preempted (SIGTERM): the run stops and reports it."""

  def __init__(self, result: TrainResult):
    super().__init__(f"preempted at step {result.step}")
    self.result = result


class Memory:
  """One kind of memory (a layout, or the single-LoRA baseline) trained for many users.

  `initial` is a clone of the frozen base with the memory injected at its initial value (what every
  user starts from); one core `Trainer` (built by `Run.trainer` on first use, then `reset` to
  `initial` for each user) trains it, so the step compiles once for all users.

  description: what the memory is (JSON); recorded as `memory.json` in each user's directory and in
    the checkpoints' metadata.
  """

  def __init__(self, base: pnn.Decoder, inject: Callable[[pnn.Decoder], list[str]],
               learning_rate: float, description: dict, base_info: dict | None = None):
    self.initial = nnx.clone(base)
    self.names = inject(self.initial)
    self.learning_rate = learning_rate
    self.description = description
    self.base_info = base_info or {}
    self.trainable = memory_filter(self.names)
    self._trainer = None

  def train(self, run: Run, data, workdir: str | None = None) -> tuple[pnn.Decoder, TrainResult]:
    """Trains a fresh memory on `data` up to `run.config.num_steps` (resuming from `workdir`'s
    checkpoint when there is one); returns the decoder with the trained memory and the result."""
    if self._trainer is None:
      config = dataclasses.replace(run.config, learning_rate=self.learning_rate)
      self._trainer = run.trainer(self.initial, lm_loss, self.trainable, workdir=workdir,
                                  checkpoint_metadata={"memory": self.description,
                                                       "base": self.base_info},
                                  config=config, process_local_batches=False)
    else:
      self._trainer.reset(self.initial, workdir)
    result = run.train(self._trainer, data)
    return self._trainer.model(), result

  def restore(self, workdir: str) -> pnn.Decoder | None:
    """The decoder with the memory trained under `workdir` (parameters only), or None."""
    decoder = nnx.clone(self.initial)
    step = checkpointing.restore_trainable(workdir, decoder, self.trainable)
    return None if step is None else decoder


@register_method("milp")
@gin.configurable("job", module="milp")
class Milp(Method):
  """Per-user memory as LoRA modules in a frozen decoder, its layout found by Bayesian search.

  Args:
    decoder: the frozen decoder's source (default `DecoderSource()` with its gin bindings).
    dataset / data_dir: a `tasks.DATASETS` entry and the dialogue folder.
    num_dev_users / num_test_users: users the searches score on / the final table is on.
    history_fraction / context_turns / responses_per_user: see `tasks.load_users`.
    layout: a memory layout (dict of `MemoryLayout` fields) to train on the test users without the
      GP search; None (default): the search's best.
    search_space / objective / num_trials / num_startup_trials / max_trial_asks: the searches
      (`objective`: 'loss' = mean teacher-forced NLL of the dev users' held-out responses, minimized;
      'rouge_l' / 'persona_f1' of greedy responses, maximized; `num_trials` scored trials per search;
      `num_startup_trials` random proposals before the GP; `max_trial_asks`, default 4 * num_trials,
      bounds proposals including pruned ones).
    sequence_length / batch_size: rows of each memory's training (the user's packed history).
    max_new_tokens / max_prompt_tokens: response generation (longer prompts are an error).
    max_response_tokens: reference tokens scored by the teacher-forced loss (longer ones are cut).
    prompt_history_turns: past turns in the memory-as-prompt baseline.
    memory_prompt_tokens: the cap on the memory text put in the prompt (memory as prompt, BM25).
    retrieval_top_k: memory items BM25 retrieves per held-out prompt.
    single_lora_rank / single_lora_learning_rate: the single-LoRA baseline; a (low, high) learning
      rate is tuned (log scale) by the GP with `num_trials` trials, a number is used as is.
    seed: memory initialization, data order and the samplers.
  Each memory trains `TrainConfig.num_steps` steps per user at its own learning rate.
  """

  def __init__(self, *, decoder: DecoderSource | None = None,
               dataset: str = "synthetic_persona_chat", data_dir: str = "../shared/data/dialogue",
               num_dev_users: int = 5, num_test_users: int = 20, history_fraction: float = 0.5,
               context_turns: int = 2, responses_per_user: int = 2, layout: dict | None = None,
               search_space: SearchSpace | None = None, objective: str = "loss",
               num_trials: int = 6, num_startup_trials: int = 3, max_trial_asks: int | None = None,
               sequence_length: int = 128, batch_size: int = 4, max_new_tokens: int = 24,
               max_prompt_tokens: int = 256, max_response_tokens: int = 64,
               prompt_history_turns: int = 6, memory_prompt_tokens: int = 96,
               retrieval_top_k: int = 4, single_lora_rank: int = 8,
               single_lora_learning_rate: float | tuple[float, float] = (3e-4, 1e-2), seed: int = 0):
    if objective not in OBJECTIVES:
      raise UserError(f"milp.job.objective={objective!r}; choose from {OBJECTIVES}.")
    self.source = decoder or DecoderSource()
    self.dataset, self.data_dir = dataset, data_dir
    self.num_dev_users, self.num_test_users = num_dev_users, num_test_users
    self.history_fraction, self.context_turns = history_fraction, context_turns
    self.responses_per_user = responses_per_user
    self.layout = MemoryLayout.from_json(dict(layout)) if layout is not None else None
    self.search_space = search_space or SearchSpace()
    self.search_space.check()
    self.objective, self.num_trials = objective, num_trials
    self.num_startup_trials = num_startup_trials
    self.max_trial_asks = max_trial_asks or 4 * num_trials
    self.sequence_length, self.batch_size = sequence_length, batch_size
    self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
    self.max_response_tokens = max_response_tokens
    self.prompt_history_turns = prompt_history_turns
    self.memory_prompt_tokens, self.retrieval_top_k = memory_prompt_tokens, retrieval_top_k
    self.single_lora_rank = single_lora_rank
    self.single_lora_learning_rate = (
        tuple(float(x) for x in single_lora_learning_rate)
        if isinstance(single_lora_learning_rate, (tuple, list)) else float(single_lora_learning_rate))
    self.seed = seed
    self._memories: dict[str, Memory] = {}
    self._periodic_users: list[tasks.User] = []
    self._last_eval: dict[str, float] = {}
    self._timings: dict[str, float] = {}

  # Set up ---------------------------------------------------------------------------------------
  def setup(self, workdir):
    if workdir is None:
      raise UserError("milp.job needs a workdir: it writes the users' histories, their memories' "
                      "checkpoints and PEFT adapters there; pass --workdir.")
    if workdir_lib.is_url(workdir):
      raise UserError(f"milp.job: workdir {workdir!r} is a URL; MiLP writes user histories (read by "
                      "SeqIO as local files) and PEFT adapters with local file APIs: use a local "
                      "workdir (or a gcsfuse mount).")
    self.workdir = str(workdir)
    self.vocabulary = pdata.get_vocabulary(self.source.vocabulary_source())
    loaded = self.source.load("milp.job", vocab_size=self.vocabulary.vocab_size, seed=self.seed)
    self.base, self.base_info = loaded.decoder, loaded.base
    self.base_name = loaded.base.get("pretrained")  # the PEFT adapters' base_model_name_or_path
    if self.base.config.vocab_size < self.vocabulary.vocab_size:
      raise UserError(f"milp.job: the vocabulary has {self.vocabulary.vocab_size} ids but the decoder "
                      f"has {self.base.config.vocab_size} rows; use the model's own tokenizer as "
                      "DecoderSource.vocabulary.")
    if self.layout is not None:
      self.layout.check(self.base.config.num_layers)

    def load(split, num_users):
      return tasks.load_users(self.dataset, self.data_dir, split, num_users,
                              history_fraction=self.history_fraction,
                              context_turns=self.context_turns,
                              responses_per_user=self.responses_per_user)

    self.dev_users, self.test_users = load("dev", self.num_dev_users), load("test", self.num_test_users)
    self.responses_task = tasks.responses_task(self.dataset, {"dev": self.dev_users,
                                                              "test": self.test_users})

  def description(self) -> str:
    return (f"{self.dataset}, {len(self.dev_users)} dev / {len(self.test_users)} test users, "
            f"objective {self.objective}, decoder {self.source.describe()}")

  def tokenizer_source(self):
    source = self.source.vocabulary_source()
    return None if source == "bytes" else source

  # Memories -------------------------------------------------------------------------------------
  def _memory(self, description: dict, make: Callable[[], Memory]) -> Memory:
    key = json.dumps(description, sort_keys=True)
    if key not in self._memories:
      self._memories.clear()  # one memory (one compiled step) at a time
      self._memories[key] = make()
    return self._memories[key]

  def layout_memory(self, layout: MemoryLayout) -> Memory:
    """The memory of `layout` (its Trainer reused for every user)."""
    description = {"layout": layout.to_json(), "seed": self.seed}
    return self._memory(description, lambda: Memory(
        self.base, lambda decoder: inject_memory(decoder, layout, seed=self.seed),
        layout.learning_rate, description, self.base_info))

  def single_lora_memory(self, learning_rate: float | None = None) -> Memory:
    """The single-LoRA baseline: one LoRA on q_proj and v_proj of every layer."""
    rank = self.single_lora_rank
    if learning_rate is None:
      if isinstance(self.single_lora_learning_rate, tuple):
        raise UserError("milp: the single LoRA's learning rate is searched; pass the tuned one.")
      learning_rate = self.single_lora_learning_rate
    description = {"single_lora": {"rank": rank, "learning_rate": float(learning_rate)},
                   "seed": self.seed}

    def inject(decoder):
      pnn.inject_lora(decoder, projections=("q_proj", "v_proj"), rank=rank, alpha=2.0 * rank,
                      name=SINGLE_LORA_NAME, seed=self.seed)
      return [SINGLE_LORA_NAME]

    return self._memory(description, lambda: Memory(
        self.base, inject, float(learning_rate), description, self.base_info))

  def memory_of(self, description: dict) -> Memory:
    """The memory a `Memory.description` (a trial's or a user's memory.json) names."""
    if "layout" in description:
      return self.layout_memory(MemoryLayout.from_json(description["layout"]))
    single = description["single_lora"]
    if single["rank"] != self.single_lora_rank:
      raise UserError(f"milp: a single LoRA of rank {single['rank']} was trained, the settings now ask "
                      f"for rank {self.single_lora_rank}; bind the training run's settings.")
    return self.single_lora_memory(single["learning_rate"])

  def user_dir(self, kind: str, user_id: str) -> str:
    """`<workdir>/<kind>/<user_id>` (kind: `USERS_DIR` or `SINGLE_LORA_DIR`)."""
    return workdir_lib.join(self.workdir, kind, user_id)

  def history_data(self, user: tasks.User):
    return tasks.history_iterator(user, self.vocabulary, workdir_lib.join(self.workdir, "histories"),
                                  sequence_length=self.sequence_length, batch_size=self.batch_size,
                                  seed=self.seed)

  def _claim(self, user_dir: str, memory: Memory) -> None:
    """Records which memory a user's checkpoints hold; another one there is an error, not a resume."""
    path = workdir_lib.join(user_dir, MEMORY_FILE)
    if workdir_lib.exists(path):
      held = json.loads(workdir_lib.read_text(path))
      if held != json.loads(json.dumps(memory.description)):
        raise UserError(f"{path}: this user's checkpoints hold another memory ({held}) than now "
                        f"({memory.description}); use a fresh workdir or delete {user_dir}.")
    elif is_chief():
      workdir_lib.write_json(path, memory.description)

  def _note(self, result: TrainResult) -> None:
    if result.eval_metrics:
      self._last_eval = dict(result.eval_metrics)
    if result.preempted:
      raise _Stopped(result)

  def train_users(self, run: Run, memory: Memory, users: Sequence[tasks.User], kind: str, *,
                  export_peft: bool = False) -> list[float]:
    """Trains `memory` on each user's history under `<workdir>/<kind>/<user_id>/` (resuming there);
    returns the final train losses of the memories trained in this call (none for finished ones)."""
    losses = []
    for user in users:
      user_dir = self.user_dir(kind, user.user_id)
      self._claim(user_dir, memory)
      self._periodic_users = [user]
      model, result = memory.train(run, self.history_data(user), user_dir)
      self._note(result)
      if "loss" in result.metrics:  # absent when the checkpoint was already at num_steps
        losses.append(result.metrics["loss"])
      if export_peft and is_chief():
        from persona_jax.hf.peft import save_peft_adapters  # pylint: disable=g-import-not-at-top
        save_peft_adapters(model, workdir_lib.join(self.workdir, "peft", user.user_id),
                           names=memory.names, base_model_name_or_path=self.base_name,
                           overwrite=True)
    return losses

  def restore_user(self, kind: str, user_id: str) -> pnn.Decoder:
    """The decoder with `user_id`'s trained memory of `kind` (from its checkpoint and memory.json)."""
    user_dir = self.user_dir(kind, user_id)
    path = workdir_lib.join(user_dir, MEMORY_FILE)
    if not workdir_lib.exists(path):
      raise MissingFileError(f"{path}: missing; user {user_id!r} has no trained memory in this "
                             "workdir: train first (run.job = @train).")
    decoder = self.memory_of(json.loads(workdir_lib.read_text(path))).restore(user_dir)
    if decoder is None:
      raise MissingFileError(f"{user_dir}: no checkpoint of user {user_id!r}; train first "
                             "(run.job = @train).")
    return decoder

  # Responses ------------------------------------------------------------------------------------
  def _eval_batch_size(self) -> int:
    return max(len(u.held_out) for u in self.dev_users + self.test_users)

  def respond(self, decoder: pnn.Decoder, prompts: Sequence[str]) -> list[str]:
    """Greedy responses of `decoder` (adapters merged first, so generation compiles once)."""
    return eval_lib.generate_responses(merged(decoder), self.vocabulary, prompts,
                                       max_new_tokens=self.max_new_tokens,
                                       max_prompt_tokens=self.max_prompt_tokens,
                                       batch_size=self._eval_batch_size())

  def response_losses(self, decoder: pnn.Decoder, prompts: Sequence[str],
                      responses: Sequence[str]) -> list[float]:
    """Teacher-forced loss of each reference response given its prompt (`eval.response_nll`)."""
    return eval_lib.response_nll(merged(decoder), self.vocabulary, prompts, responses,
                                 max_prompt_tokens=self.max_prompt_tokens,
                                 max_response_tokens=self.max_response_tokens,
                                 batch_size=self._eval_batch_size())

  def periodic_metrics(self, model, step):
    """ROUGE-L / Persona-F1 of the held-out responses of the user whose memory is training."""
    del step
    examples = [(u, ex) for u in self._periodic_users for ex in u.held_out]
    if not examples:
      return {}
    scores = eval_lib.score(self.respond(model, [ex.prompt for _, ex in examples]), examples)
    return {"rouge_l": scores["rouge_l"], "persona_f1": scores["persona_f1"]}

  def score_dev(self, run: Run, memory: Memory, users: Sequence[tasks.User]) -> dict:
    """Trains `memory` on each user (no checkpoints) and scores their held-out responses: the mean
    teacher-forced loss over all examples (`loss`), and ROUGE-L / Persona-F1 of greedy responses
    only when one of them is the objective (generation is the expensive part)."""
    examples, responses, losses, train_losses = [], [], [], []
    for user in users:
      self._periodic_users = [user]
      model, result = memory.train(run, self.history_data(user), None)
      self._note(result)
      train_losses.append(result.metrics["loss"])
      prompts = [ex.prompt for ex in user.held_out]
      examples += [(user, ex) for ex in user.held_out]
      losses += self.response_losses(model, prompts, [ex.response for ex in user.held_out])
      if self.objective != "loss":
        responses += self.respond(model, prompts)
    scores = {"loss": statistics.fmean(losses), "final_train_loss": statistics.fmean(train_losses)}
    if self.objective != "loss":
      scores.update(eval_lib.score(responses, examples))
    return scores

  # Search ---------------------------------------------------------------------------------------
  def _search_settings(self, run: Run, name: str) -> dict:
    """What a logged trial's score depends on (recorded in the search's settings file)."""
    space = (self.search_space.to_json() if name != "single_lora" else
             {"rank": self.single_lora_rank, "learning_rate": self.single_lora_learning_rate})
    return json.loads(json.dumps({
        "search": name, "space": space, "objective": self.objective,
        "num_startup_trials": self.num_startup_trials,
        "dev_users": [u.user_id for u in self.dev_users], "dataset": self.dataset,
        "history_fraction": self.history_fraction, "context_turns": self.context_turns,
        "responses_per_user": self.responses_per_user, "sequence_length": self.sequence_length,
        "batch_size": self.batch_size, "max_response_tokens": self.max_response_tokens,
        "max_new_tokens": self.max_new_tokens, "seed": self.seed, "base": self.base_info,
        "train": {field: getattr(run.config, field) for field in _SEARCH_TRAIN_FIELDS}}))

  def _logged_trials(self, run: Run, name: str, log_path: str) -> list[dict]:
    """The trials logged by an earlier run of the same search (checked against its settings)."""
    settings_path = os.path.join(os.path.dirname(log_path), SEARCHES[name].settings)
    settings = self._search_settings(run, name)
    records = []
    if workdir_lib.exists(log_path):
      records = [json.loads(line) for line in workdir_lib.read_text(log_path).splitlines()
                 if line.strip()]
    if records and workdir_lib.exists(settings_path):
      logged = json.loads(workdir_lib.read_text(settings_path))
      changed = sorted(k for k in set(logged) | set(settings) if logged.get(k) != settings.get(k))
      if changed:
        raise UserError(f"{log_path} holds trials of another search (settings {changed} differ from "
                        f"{settings_path}); use a fresh workdir, or delete {log_path} and "
                        f"{settings_path} to search again.")
    if is_chief():
      workdir_lib.write_json(settings_path, settings)
    return records

  def _space(self, name: str):
    """(Optuna distributions, params -> memory description or None for a point that is no memory)."""
    import optuna  # pylint: disable=g-import-not-at-top
    if name == "single_lora":
      rates = self.single_lora_learning_rate
      if not isinstance(rates, tuple):
        raise UserError("milp: single_lora_learning_rate is a number: nothing to tune.")
      return ({"learning_rate": optuna.distributions.FloatDistribution(*rates, log=True)},
              lambda params: self.single_lora_memory(params["learning_rate"]).description)
    num_layers = self.base.config.num_layers

    def describe(params):
      return {"layout": self.search_space.layout(params, num_layers).to_json(), "seed": self.seed}

    return self.search_space.distributions(num_layers), describe

  def _sampler(self, name: str):
    import optuna  # pylint: disable=g-import-not-at-top
    if name == "milp_random":
      return optuna.samplers.RandomSampler(seed=self.seed)
    if importlib.util.find_spec("torch") is None:
      raise ImportError("MiLP's Bayesian search uses Optuna's GPSampler, which needs torch: "
                        "pip install -e '.[milp]'")
    return optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=self.num_startup_trials)

  def search(self, run: Run, log_path: str | None = None, name: str = "milp_searched",
             sampler=None) -> tuple[dict, list[dict]]:
    """One of `SEARCHES` on the dev users; returns (the best trial's memory description, records).

    Runs until `num_trials` trials are scored, at most `max_trial_asks` proposals in all. A point
    the space maps to no memory (none in `SearchSpace`) is told to the study as PRUNED, without a
    value: Optuna's GPSampler fits its surrogate on COMPLETE trials only, so it never sees a made-up
    score. Trials
    already in the log (an earlier run of the same command) are re-added and not re-run.
    """
    import optuna  # pylint: disable=g-import-not-at-top
    from optuna.trial import TrialState  # pylint: disable=g-import-not-at-top
    log_path = log_path or workdir_lib.join(self.workdir, SEARCHES[name].log)
    records = self._logged_trials(run, name, log_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    minimize = self.objective == "loss"
    study = optuna.create_study(direction="minimize" if minimize else "maximize",
                                sampler=sampler or self._sampler(name))
    distributions, describe = self._space(name)
    for record in records:
      try:
        study.add_trial(optuna.trial.create_trial(
            params=record["params"], distributions=distributions,
            value=record["objective"] if record["feasible"] else None,
            state=TrialState.COMPLETE if record["feasible"] else TrialState.PRUNED))
      except (ValueError, KeyError) as error:
        raise UserError(f"{log_path}: trial {record.get('trial')} does not fit the search space now "
                        f"({error}); use a fresh workdir or delete {log_path}.") from error
    scored = sum(1 for r in records if r["feasible"])
    if records and is_chief():
      print(f"milp {name}: {len(records)} logged trials ({scored} scored) from {log_path}; "
            f"{max(0, self.num_trials - scored)} to go.", flush=True)
    logged = "".join(json.dumps(r) + "\n" for r in records)
    while scored < self.num_trials and len(records) < self.max_trial_asks:
      trial = study.ask(distributions)
      description = describe(trial.params)
      record = {"trial": trial.number, "params": trial.params,
                "memory": None if description is None else next(
                    v for k, v in description.items() if k != "seed"),
                "description": description, "feasible": description is not None}
      started = time.time()
      if description is None:
        study.tell(trial, state=TrialState.PRUNED)  # no value: nothing for the surrogate to fit
        record.update(objective=None)
      else:
        scores = self.score_dev(run, self.memory_of(description), self.dev_users)
        study.tell(trial, scores[self.objective])
        scored += 1
        record.update(objective=scores[self.objective], **scores)
      record["seconds"] = round(time.time() - started, 2)
      records.append(record)
      logged += json.dumps(record) + "\n"
      if is_chief():
        workdir_lib.write_text(log_path, logged)  # the whole log each trial: works on gs:// too
        shown = "pruned (no memory)" if description is None else (
            f"{self.objective} {record['objective']:.4f}")
        print(f"milp {name} trial {trial.number}: {json.dumps(record['memory'])}: {shown}",
              flush=True)
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
      raise UserError(f"milp {name}: none of {len(records)} proposals was a memory (max_trial_asks="
                      f"{self.max_trial_asks}).")
    best = (min if minimize else max)(feasible, key=lambda r: r["objective"])
    return best["description"], records

  def _best(self, run: Run, name: str) -> dict:
    """The memory description `name`'s test users are trained with (searched, or given)."""
    if name == "milp_searched" and self.layout is not None:
      return {"layout": self.layout.to_json(), "seed": self.seed}
    if name == "single_lora" and not isinstance(self.single_lora_learning_rate, tuple):
      return self.single_lora_memory().description
    return self.search(run, name=name)[0]

  # The contract ---------------------------------------------------------------------------------
  def fit(self, run: Run) -> FitResult:
    """The three searches and their best memories on the test users (see the module doc)."""
    timings, metrics = {}, {}
    try:
      for name, where in SEARCHES.items():
        started = time.time()
        best = self._best(run, name)
        if is_chief():
          workdir_lib.write_json(workdir_lib.join(self.workdir, where.best), best)
        timings[f"{name}_search"] = round(time.time() - started, 1)
        started = time.time()
        losses = self.train_users(run, self.memory_of(best), self.test_users, where.users_dir,
                                  export_peft=name == "milp_searched")
        if losses:
          metrics["loss" if name == "milp_searched" else f"{name}_loss"] = statistics.fmean(losses)
        timings[f"{name}_train"] = round(time.time() - started, 1)
    except _Stopped as stopped:
      return FitResult(result=stopped.result, model=self.base)
    self._timings = timings
    return FitResult(result=TrainResult(step=run.config.num_steps, metrics=metrics,
                                        eval_metrics=self._last_eval), model=self.base)

  def restore(self, run: Run):
    """The product is the per-user PEFT memories (`peft/`), not a checkpoint: the base, step None."""
    del run
    return self.base, None

  def evaluate(self, model, step) -> Evaluation:
    """The six systems on the test users (the memories restored from their checkpoints)."""
    del step
    users = self.test_users
    examples = [(u, ex) for u in users for ex in u.held_out]
    rows = []

    def add(system: str, decoder_of: Callable[[tasks.User], pnn.Decoder],
            prompt_of: Callable[[tasks.User, tasks.HeldOutExample], str]) -> None:
      responses, losses, prompts = [], [], []
      for user in users:
        decoder = decoder_of(user)
        user_prompts = [prompt_of(user, ex) for ex in user.held_out]
        responses += self.respond(decoder, user_prompts)
        losses += self.response_losses(decoder, user_prompts, [ex.response for ex in user.held_out])
        prompts += user_prompts
      rows.extend(eval_lib.example_rows(system, responses, examples, losses, prompts))

    def plain(user, example):
      del user
      return example.prompt

    add("no_memory", lambda user: model, plain)
    add("memory_as_prompt", lambda user: model, lambda user, ex: eval_lib.memory_prompt(
        user, ex, self.prompt_history_turns, self.vocabulary, self.memory_prompt_tokens))
    add("bm25_retrieval", lambda user: model, lambda user, ex: eval_lib.retrieval_prompt(
        user, ex, self.retrieval_top_k, self.vocabulary, self.memory_prompt_tokens))
    for name in ("single_lora", "milp_random", "milp_searched"):
      kind = SEARCHES[name].users_dir
      add(name, lambda user, kind=kind: self.restore_user(kind, user.user_id), plain)
    summary = eval_lib.summarize(rows)

    searches = {}
    for name, where in SEARCHES.items():
      best_path = workdir_lib.join(self.workdir, where.best)
      log_path = workdir_lib.join(self.workdir, where.log)
      searches[name] = {
          "best": json.loads(workdir_lib.read_text(best_path)) if workdir_lib.exists(best_path)
                  else None,
          "trials": ([json.loads(line) for line in workdir_lib.read_text(log_path).splitlines()
                      if line.strip()] if workdir_lib.exists(log_path) else [])}
    results = {"dataset": self.dataset, "base": self.source.describe(),
               "dev_users": [u.user_id for u in self.dev_users],
               "test_users": [u.user_id for u in users], "objective": self.objective,
               "memory_prompt_tokens": self.memory_prompt_tokens,
               "retrieval_top_k": self.retrieval_top_k, "searches": searches,
               "results": summary, "seconds": dict(self._timings)}
    tables = {"results": eval_lib.results_table(
        summary, f"MiLP on {self.dataset}, {len(users)} test users, {len(examples)} held-out "
        "responses (mean [95% bootstrap CI]; Δ = paired difference to no memory)")}
    trials = "".join(f"### {name} trials (dev users)\n\n" + eval_lib.trial_table(entry["trials"]) + "\n"
                     for name, entry in searches.items() if entry["trials"])
    if trials:
      tables["trials"] = trials
    metrics = {f"{system}/{metric}": entry[metric]["value"] for system, entry in summary.items()
               for metric in eval_lib.METRICS}
    return Evaluation(metrics=metrics, tables=tables, results={"results": results}, examples=rows)
