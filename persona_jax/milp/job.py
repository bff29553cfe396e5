"""MiLP's method (`run.method = 'milp'`, see gin/milp.gin): per-user memories, the layout search, baselines.

`fit` (the generic `train` job) trains:
  1. the single-LoRA baseline: one LoRA (q_proj and v_proj of every layer) on each test user's
     history (checkpoints in `<workdir>/single_lora/<user_id>/`);
  2. the Bayesian search (Optuna's `GPSampler`) over the memory layout (number of modules, first
     layer, layer stride, rank, learning rate) on the dev users; objective: mean dev ROUGE-L (or
     Persona-F1); every trial appended to `<workdir>/trials.jsonl`, the best layout written to
     `<workdir>/best_layout.json`. Skipped when `milp.job.layout` names a layout;
  3. the best layout on every test user (checkpoints in `<workdir>/users/<user_id>/`, PEFT adapters in
     `<workdir>/peft/<user_id>/<memory_j>/`: the job's product, which `persona_jax.export` copies
     beside the exported base decoder).
`evaluate` (after training, and the generic `evaluate` job, which restores every memory from its
checkpoint): the test users' held-out responses from four systems (no memory; memory as prompt:
persona + recent history in the prompt; the single LoRA; the searched memory), scored by ROUGE-L and
Persona-F1: `<workdir>/results.{md,json}`, `trials.md` and `eval_examples.jsonl`.

Rerunning the same command in the same workdir trains nothing new: each user's memory resumes from its
checkpoint (already at `TrainConfig.num_steps`), and the search re-adds its logged trials to the
study (`trials.jsonl`; `search.json` records the settings they were scored with, and a rerun with
other settings is refused) and proposes only the trials still missing.

Periodic evaluation (`TrainConfig.eval_every`): during each memory's training, the held-out responses
of the user it is trained on are generated and scored (`eval/rouge_l`, `eval/persona_f1`).

Every memory is trained by the core `Trainer` with the LM loss; its trainable filter is exactly that
memory's LoRA parameters (the decoder is frozen). One Trainer (one compiled step) serves all users of
a layout (`Trainer.reset` before each user). Responses are generated from a copy with the memory
merged into the kernels (`model.merged`): the same function and the base decoder's graph, so
generation compiles once per run instead of once per layout.
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

OBJECTIVES = ("rouge_l", "persona_f1")
SINGLE_LORA_NAME = "memory_lora"
USERS_DIR = "users"  # the searched memory of each test user
SINGLE_LORA_DIR = "single_lora"  # the single-LoRA baseline of each test user
MEMORY_FILE = "memory.json"  # in each user's directory: which memory its checkpoints hold
TRIALS_FILE = "trials.jsonl"
SEARCH_FILE = "search.json"
BEST_LAYOUT_FILE = "best_layout.json"
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
    num_dev_users / num_test_users: users the search scores layouts on / the final table is on.
    history_fraction / context_turns / responses_per_user: see `tasks.load_users`.
    layout: a memory layout (dict of `MemoryLayout` fields) to train on the test users without a
      search; None (default): the search's best.
    search_space / objective / num_trials / num_startup_trials / max_trial_asks: the Bayesian search
      (`num_startup_trials` random proposals before the GP; `max_trial_asks` default 4 * num_trials).
    sequence_length / batch_size: rows of each memory's training (the user's packed history).
    max_new_tokens / max_prompt_tokens: response generation (longer prompts are an error).
    prompt_history_turns: past turns in the memory-as-prompt baseline.
    single_lora_rank / single_lora_learning_rate: the single-LoRA baseline.
    seed: memory initialization and data order.
  Each memory trains `TrainConfig.num_steps` steps per user at the layout's learning rate.
  """

  def __init__(self, *, decoder: DecoderSource | None = None,
               dataset: str = "synthetic_persona_chat", data_dir: str = "../shared/data/dialogue",
               num_dev_users: int = 4, num_test_users: int = 4, history_fraction: float = 0.5,
               context_turns: int = 2, responses_per_user: int = 2, layout: dict | None = None,
               search_space: SearchSpace | None = None, objective: str = "rouge_l",
               num_trials: int = 8, num_startup_trials: int = 3, max_trial_asks: int | None = None,
               sequence_length: int = 128, batch_size: int = 4, max_new_tokens: int = 24,
               max_prompt_tokens: int = 256, prompt_history_turns: int = 6,
               single_lora_rank: int = 8, single_lora_learning_rate: float = 1e-3, seed: int = 0):
    if objective not in OBJECTIVES:
      raise UserError(f"milp.job.objective={objective!r}; choose from {OBJECTIVES}.")
    self.source = decoder or DecoderSource()
    self.dataset, self.data_dir = dataset, data_dir
    self.num_dev_users, self.num_test_users = num_dev_users, num_test_users
    self.history_fraction, self.context_turns = history_fraction, context_turns
    self.responses_per_user = responses_per_user
    self.layout = MemoryLayout.from_json(dict(layout)) if layout is not None else None
    self.search_space = search_space or SearchSpace()
    self.objective, self.num_trials = objective, num_trials
    self.num_startup_trials = num_startup_trials
    self.max_trial_asks = max_trial_asks or 4 * num_trials
    self.sequence_length, self.batch_size = sequence_length, batch_size
    self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
    self.prompt_history_turns = prompt_history_turns
    self.single_lora_rank, self.single_lora_learning_rate = single_lora_rank, single_lora_learning_rate
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
      # At most one layout's memory (one compiled step) besides the single-LoRA baseline.
      for other in [k for k, m in self._memories.items() if "layout" in m.description]:
        del self._memories[other]
      self._memories[key] = make()
    return self._memories[key]

  def layout_memory(self, layout: MemoryLayout) -> Memory:
    """The memory of `layout` (its Trainer reused for every user)."""
    description = {"layout": layout.to_json(), "seed": self.seed}
    return self._memory(description, lambda: Memory(
        self.base, lambda decoder: inject_memory(decoder, layout, seed=self.seed),
        layout.learning_rate, description, self.base_info))

  def single_lora_memory(self) -> Memory:
    """The single-LoRA baseline: one LoRA on q_proj and v_proj of every layer."""
    rank = self.single_lora_rank
    description = {"single_lora": {"rank": rank, "learning_rate": self.single_lora_learning_rate},
                   "seed": self.seed}

    def inject(decoder):
      pnn.inject_lora(decoder, projections=("q_proj", "v_proj"), rank=rank, alpha=2.0 * rank,
                      name=SINGLE_LORA_NAME, seed=self.seed)
      return [SINGLE_LORA_NAME]

    return self._memory(description, lambda: Memory(
        self.base, inject, self.single_lora_learning_rate, description, self.base_info))

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
    held = json.loads(workdir_lib.read_text(path))
    if "layout" in held:
      memory = self.layout_memory(MemoryLayout.from_json(held["layout"]))
    else:
      memory = self.single_lora_memory()
      if held != json.loads(json.dumps(memory.description)):
        raise UserError(f"{path}: the single-LoRA baseline there is {held}, the settings now ask for "
                        f"{memory.description}; bind the training run's settings.")
    decoder = memory.restore(user_dir)
    if decoder is None:
      raise MissingFileError(f"{user_dir}: no checkpoint of user {user_id!r}; train first "
                             "(run.job = @train).")
    return decoder

  # Responses ------------------------------------------------------------------------------------
  def respond(self, decoder: pnn.Decoder, prompts: Sequence[str]) -> list[str]:
    """Greedy responses of `decoder` (adapters merged first, so generation compiles once)."""
    batch_size = max(len(u.held_out) for u in self.dev_users + self.test_users)
    return eval_lib.generate_responses(merged(decoder), self.vocabulary, prompts,
                                       max_new_tokens=self.max_new_tokens,
                                       max_prompt_tokens=self.max_prompt_tokens,
                                       batch_size=batch_size)

  def periodic_metrics(self, model, step):
    """ROUGE-L / Persona-F1 of the held-out responses of the user whose memory is training."""
    del step
    examples = [(u, ex) for u in self._periodic_users for ex in u.held_out]
    if not examples:
      return {}
    scores = eval_lib.score(self.respond(model, [ex.prompt for _, ex in examples]), examples)
    return {"rouge_l": scores["rouge_l"], "persona_f1": scores["persona_f1"]}

  def score_dev(self, run: Run, memory: Memory, users: Sequence[tasks.User]) -> dict:
    """Trains `memory` on each user (no checkpoints) and scores their held-out responses."""
    examples, responses, losses = [], [], []
    for user in users:
      self._periodic_users = [user]
      model, result = memory.train(run, self.history_data(user), None)
      self._note(result)
      losses.append(result.metrics["loss"])
      examples += [(user, ex) for ex in user.held_out]
      responses += self.respond(model, [ex.prompt for ex in user.held_out])
    scores = eval_lib.score(responses, examples)
    scores["final_train_loss"] = statistics.fmean(losses)
    return scores

  # Search ---------------------------------------------------------------------------------------
  def _search_settings(self, run: Run) -> dict:
    """What a logged trial's score depends on (recorded in search.json)."""
    return json.loads(json.dumps({
        "search_space": self.search_space.to_json(), "objective": self.objective,
        "dev_users": [u.user_id for u in self.dev_users], "dataset": self.dataset,
        "history_fraction": self.history_fraction, "context_turns": self.context_turns,
        "responses_per_user": self.responses_per_user, "sequence_length": self.sequence_length,
        "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
        "base": self.base_info,
        "train": {name: getattr(run.config, name) for name in _SEARCH_TRAIN_FIELDS}}))

  def _logged_trials(self, run: Run, log_path: str) -> list[dict]:
    """The trials logged by an earlier run of the same search (checked against search.json)."""
    settings_path = os.path.join(os.path.dirname(log_path), SEARCH_FILE)
    settings = self._search_settings(run)
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

  def search(self, run: Run, log_path: str | None = None) -> tuple[MemoryLayout, list[dict]]:
    """Bayesian search over `search_space` on the dev users; returns (best layout, trial records).

    Runs until `num_trials` feasible trials are evaluated (infeasible proposals are told to the
    sampler as constraint violations and cost no training), at most `max_trial_asks` proposals in
    all. Trials already in the log (an earlier run of the same command) are told to the study again
    and not re-run.
    """
    import optuna  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("torch") is None:
      raise ImportError("MiLP's Bayesian search uses Optuna's GPSampler, which needs torch: "
                        "pip install -e '.[milp]'")
    num_layers = self.base.config.num_layers
    self.search_space.check(num_layers)
    log_path = log_path or workdir_lib.join(self.workdir, TRIALS_FILE)
    records = self._logged_trials(run, log_path)
    sampler = optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=self.num_startup_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    distributions = self.search_space.distributions()
    for record in records:
      violation = max(self.search_space.layout(record["params"]).layers) - (num_layers - 1)
      try:
        study.add_trial(optuna.trial.create_trial(
            params=record["params"], distributions=distributions,
            value=record["objective"] if record["feasible"] else 0.0,
            constraints={"layers_beyond_decoder": float(violation)}))
      except (ValueError, KeyError) as error:
        raise UserError(f"{log_path}: trial {record.get('trial')} does not fit the search space now "
                        f"({error}); use a fresh workdir or delete {log_path}.") from error
    evaluated = sum(1 for r in records if r["feasible"])
    if records and is_chief():
      print(f"milp search: {len(records)} logged trials ({evaluated} feasible) from {log_path}; "
            f"{max(0, self.num_trials - evaluated)} to go.", flush=True)
    logged = "".join(json.dumps(r) + "\n" for r in records)
    while evaluated < self.num_trials and len(records) < self.max_trial_asks:
      trial = study.ask(distributions)
      layout = self.search_space.layout(trial.params)
      violation = max(layout.layers) - (num_layers - 1)
      trial.set_constraint("layers_beyond_decoder", violation)  # feasible when <= 0
      record = {"trial": trial.number, "params": trial.params, "layout": layout.to_json(),
                "feasible": violation <= 0}
      started = time.time()
      if violation > 0:
        study.tell(trial, 0.0)  # the constraint, not this value, tells the sampler to avoid it
        record.update(objective=None)
      else:
        scores = self.score_dev(run, self.layout_memory(layout), self.dev_users)
        study.tell(trial, scores[self.objective])
        evaluated += 1
        record.update(objective=scores[self.objective], rouge_l=scores["rouge_l"],
                      persona_f1=scores["persona_f1"], final_train_loss=scores["final_train_loss"])
      record["seconds"] = round(time.time() - started, 2)
      records.append(record)
      logged += json.dumps(record) + "\n"
      if is_chief():
        workdir_lib.write_text(log_path, logged)  # the whole log each trial: works on gs:// too
        shown = "infeasible" if violation > 0 else f"{self.objective} {record['objective']:.4f}"
        print(f"milp trial {trial.number}: layers {list(layout.layers)} rank {layout.rank} "
              f"lr {layout.learning_rate:.2e}: {shown}", flush=True)
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
      raise UserError(f"milp search: none of {len(records)} proposals was feasible (max_trial_asks="
                      f"{self.max_trial_asks}); narrow milp.SearchSpace to the decoder's "
                      f"{num_layers} layers.")
    best = max(feasible, key=lambda r: r["objective"])
    return MemoryLayout.from_json(best["layout"]), records

  # The contract ---------------------------------------------------------------------------------
  def fit(self, run: Run) -> FitResult:
    """The single-LoRA baseline, the search, the best layout on the test users (see the module doc)."""
    timings, metrics = {}, {}
    try:
      started = time.time()
      losses = self.train_users(run, self.single_lora_memory(), self.test_users, SINGLE_LORA_DIR)
      if losses:
        metrics["single_lora_loss"] = statistics.fmean(losses)
      timings["single_lora"] = round(time.time() - started, 1)
      started = time.time()
      best = self.layout if self.layout is not None else self.search(run)[0]
      timings["search"] = round(time.time() - started, 1)
      if is_chief():
        workdir_lib.write_json(workdir_lib.join(self.workdir, BEST_LAYOUT_FILE), best.to_json())
      started = time.time()
      losses = self.train_users(run, self.layout_memory(best), self.test_users, USERS_DIR,
                                export_peft=True)
      if losses:
        metrics["loss"] = statistics.fmean(losses)
      timings["milp_searched"] = round(time.time() - started, 1)
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
    """The four systems on the test users (the memories restored from their checkpoints)."""
    del step
    users = self.test_users
    results, rows = {}, []

    def add(system: str, responses: list[str]) -> None:
      examples = [(u, ex) for u in users for ex in u.held_out]
      results[system] = eval_lib.score(responses, examples)
      rows.extend(eval_lib.example_rows(system, responses, examples))

    def per_user(kind: str) -> list[str]:
      return [r for u in users for r in self.respond(self.restore_user(kind, u.user_id),
                                                     [ex.prompt for ex in u.held_out])]

    add("no_memory", self.respond(model, [ex.prompt for u in users for ex in u.held_out]))
    add("memory_as_prompt", self.respond(model, [
        eval_lib.memory_prompt(u, ex, self.prompt_history_turns) for u in users for ex in u.held_out]))
    add("single_lora", per_user(SINGLE_LORA_DIR))
    add("milp_searched", per_user(USERS_DIR))

    best_path = workdir_lib.join(self.workdir, BEST_LAYOUT_FILE)
    best = json.loads(workdir_lib.read_text(best_path)) if workdir_lib.exists(best_path) else None
    trials_path = workdir_lib.join(self.workdir, TRIALS_FILE)
    trials = ([json.loads(line) for line in workdir_lib.read_text(trials_path).splitlines()
               if line.strip()] if workdir_lib.exists(trials_path) else [])
    summary = {"dataset": self.dataset, "base": self.source.describe(),
               "dev_users": [u.user_id for u in self.dev_users],
               "test_users": [u.user_id for u in users], "objective": self.objective,
               "best_layout": best, "trials": trials, "results": results,
               "seconds": dict(self._timings)}
    shown = (f"best layout: layers {best['layers']}, rank {best['rank']}, lr "
             f"{best['learning_rate']:.2e}" if best else "no layout recorded")
    tables = {"results": eval_lib.results_table(
        results, f"MiLP on {self.dataset}, {len(users)} test users ({shown})")}
    if trials:
      tables["trials"] = "### MiLP search trials (dev users)\n\n" + eval_lib.trial_table(trials)
    metrics = {f"{system}/{name}": scores[name] for system, scores in results.items()
               for name in ("rouge_l", "persona_f1")}
    return Evaluation(metrics=metrics, tables=tables, results={"results": summary}, examples=rows)
