"""MiLP jobs (`run.job = @milp.train`, see gin/milp.gin): per-user memories, the layout search, baselines.

`train(workdir)`:
  1. baselines on the test users: no memory; memory as prompt (persona + recent history in the
     prompt); one single LoRA (q_proj and v_proj of every layer) trained on each user's history;
  2. Bayesian search (Optuna's `GPSampler`) over the memory layout (number of modules, first layer,
     layer stride, rank, learning rate) on the dev users; objective: mean dev ROUGE-L (or Persona-F1);
     every trial appended to `<workdir>/trials.jsonl`; the best layout to `<workdir>/best_layout.json`;
  3. the best layout retrained on every test user (checkpoints in `<workdir>/users/<user_id>/`,
     PEFT adapters in `<workdir>/peft/<user_id>/<memory_j>/`) and evaluated;
  4. `<workdir>/results.json` and `results.md`: ROUGE-L and Persona-F1 of the four systems.

Every memory is trained by the core `Trainer` with the LM loss; its trainable filter is exactly that
memory's LoRA parameters (the decoder is frozen). One Trainer (one compiled step) serves all users of
a layout: its state is reset to the memory's initial value before each user. Responses are generated
from a copy with the memory merged into the kernels (`merged`): the same function, and the base
decoder's graph, so generation compiles once per job instead of once per layout.
"""

from __future__ import annotations

import importlib.util

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax import data as pdata
from persona_jax import nn as pnn
from persona_jax.hf.pretrained import load_job_decoder
from persona_jax.milp import eval as eval_lib
from persona_jax.milp import tasks
from persona_jax.milp.model import MemoryLayout, inject_memory, memory_filter
from persona_jax.nn.lora import MLP_PROJECTIONS
from persona_jax.train.losses import lm_loss
from persona_jax.train import workdir as workdir_lib
from persona_jax.train.trainer import TrainConfig, Trainer, TrainResult
from persona_jax.errors import MissingFileError

OBJECTIVES = ("rouge_l", "persona_f1")
SINGLE_LORA_NAME = "memory_lora"


@gin.configurable(module="milp")
@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """The layouts the search may propose; each field is an inclusive (low, high) range.

  A point (num_modules k, first_layer f, layer_stride s, rank, learning_rate) is the layout with
  modules on layers f, f + s, ..., f + (k - 1) s; points whose last layer does not exist are
  infeasible (told to the sampler as a violated constraint and never trained).
  """
  num_modules: tuple[int, int] = (1, 4)
  first_layer: tuple[int, int] = (0, 29)
  layer_stride: tuple[int, int] = (1, 8)
  rank: tuple[int, int] = (2, 16)
  learning_rate: tuple[float, float] = (3e-4, 1e-2)
  projections: tuple[str, ...] = MLP_PROJECTIONS

  def distributions(self) -> dict:
    import optuna  # pylint: disable=g-import-not-at-top
    ints = {name: optuna.distributions.IntDistribution(*getattr(self, name))
            for name in ("num_modules", "first_layer", "layer_stride")}
    return dict(ints, rank=optuna.distributions.IntDistribution(*self.rank, log=True),
                learning_rate=optuna.distributions.FloatDistribution(*self.learning_rate, log=True))

  def layout(self, params: dict) -> MemoryLayout:
    layers = tuple(params["first_layer"] + j * params["layer_stride"] for j in range(params["num_modules"]))
    return MemoryLayout(layers=layers, projections=self.projections, rank=params["rank"],
                        learning_rate=params["learning_rate"])

  def check(self, num_layers: int) -> None:
    """Raises a clear error for an empty range or a space with no feasible layout."""
    for name in ("num_modules", "first_layer", "layer_stride", "rank", "learning_rate"):
      low, high = getattr(self, name)
      if low > high or low < 0 or (name != "first_layer" and low <= 0):
        raise ValueError(f"milp.SearchSpace.{name}=({low}, {high}) is not a valid range: need "
                         f"{'0 <=' if name == 'first_layer' else '0 <'} low <= high.")
    lowest_last = self.first_layer[0] + (self.num_modules[0] - 1) * self.layer_stride[0]
    if lowest_last >= num_layers:
      raise ValueError(
          f"milp.SearchSpace has no valid point: even num_modules={self.num_modules[0]}, "
          f"first_layer={self.first_layer[0]}, layer_stride={self.layer_stride[0]} needs layer {lowest_last}, "
          f"but the decoder has layers 0..{num_layers - 1}; lower first_layer / num_modules / layer_stride.")


class MemoryTrainer:
  """Trains one memory (one layout, or the single-LoRA baseline) per user with the core Trainer.

  `inject(decoder) -> adapter names` adds the memory to a clone of the frozen base decoder.
  """

  def __init__(self, base: pnn.Decoder, inject: Callable[[pnn.Decoder], list[str]], learning_rate: float,
               train_config: TrainConfig, metadata: dict, layout: MemoryLayout | None = None):
    self.layout = layout
    decoder = nnx.clone(base)
    self.names = inject(decoder)
    config = dataclasses.replace(train_config, learning_rate=learning_rate)
    self.trainer = Trainer(decoder, lm_loss, config, trainable=memory_filter(self.names), workdir=None,
                           checkpoint_metadata=metadata)
    self._initial = jax.tree.map(jnp.copy, self.trainer.state)

  def reset(self, workdir: str | None = None) -> None:
    """A fresh memory (the initial value every user starts from), checkpointed under `workdir`."""
    self.trainer.state = jax.device_put(jax.tree.map(jnp.copy, self._initial), self.trainer.state_shardings)
    self.trainer.workdir = workdir

  def train_user(self, data, workdir: str | None = None) -> tuple[pnn.Decoder, TrainResult]:
    self.reset(workdir)
    result = self.trainer.train(data)
    return self.trainer.model(), result


def merged(decoder: pnn.Decoder) -> pnn.Decoder:
  """A copy with every adapter folded into the kernels: the same function with the base decoder's
  graph, so generation compiles once for all layouts and users (weights are jit arguments)."""
  copy = nnx.clone(decoder)
  pnn.merge_lora(copy)
  return copy


def _write_user_layout(user_dir: str, layout: MemoryLayout) -> None:
  """Records which layout a user's checkpoints hold; a different one there is an error, not a resume."""
  path = workdir_lib.join(user_dir, "layout.json")
  if workdir_lib.exists(path) and MemoryLayout.from_json(json.loads(workdir_lib.read_text(path))) != layout:
    raise ValueError(f"{path}: this user's checkpoints hold a memory of another layout "
                     f"({workdir_lib.read_text(path).strip()}) than now ({layout.to_json()}); use a fresh "
                     f"workdir or delete {user_dir}.")
  workdir_lib.write_json(path, layout.to_json())


@dataclasses.dataclass
class MilpJob:
  """What `train` and the benchmark share. `trainer` is the best (or configured) layout's Trainer;
  `restore_user(user_id)` loads that user's trained memory into it (checkpoints under
  `<workdir>/users/<user_id>/`)."""
  workdir: str
  base: pnn.Decoder
  vocabulary: Any
  source: str | None
  dataset: str
  dev_users: list
  test_users: list
  layout: MemoryLayout
  search_space: SearchSpace
  train_config: TrainConfig
  objective: str
  num_trials: int
  num_startup_trials: int
  max_trial_asks: int
  sequence_length: int
  batch_size: int
  max_new_tokens: int
  max_prompt_tokens: int
  prompt_history_turns: int
  single_lora_rank: int
  single_lora_learning_rate: float
  seed: int
  _trainers: dict = dataclasses.field(default_factory=dict)

  # Memories ---------------------------------------------------------------------------------------
  def memory_trainer(self, layout: MemoryLayout) -> MemoryTrainer:
    if layout not in self._trainers:
      self._trainers.clear()  # one layout's compiled step at a time
      self._trainers[layout] = MemoryTrainer(
          self.base, functools.partial(inject_memory, layout=layout, seed=self.seed), layout.learning_rate,
          self.train_config, {"layout": layout.to_json(), "base": self.source}, layout=layout)
    return self._trainers[layout]

  @property
  def trainer(self) -> Trainer:
    return self.memory_trainer(self.layout).trainer

  def restore_user(self, user_id: str) -> pnn.Decoder:
    """The decoder with `user_id`'s trained memory, from its checkpoint (and the layout saved beside it)."""
    layout_path = workdir_lib.join(self.user_dir(user_id), "layout.json")
    if not workdir_lib.exists(layout_path):
      raise MissingFileError(f"{layout_path}: missing; user {user_id!r} has no trained memory in this "
                              "workdir: run the milp job first (it trains the test users' memories).")
    memory = self.memory_trainer(MemoryLayout.from_json(json.loads(workdir_lib.read_text(layout_path))))
    memory.reset(self.user_dir(user_id))
    if memory.trainer.restore() is None:
      raise MissingFileError(f"{self.user_dir(user_id)}: no checkpoint of user {user_id!r}; run the milp "
                              "job first (it trains the test users' memories).")
    return memory.trainer.model()

  def user_dir(self, user_id: str) -> str:
    return workdir_lib.join(self.workdir, "users", user_id)

  def history_data(self, user: tasks.User):
    task = tasks.history_task(user, self.vocabulary, workdir_lib.join(self.workdir, "histories"))
    return pdata.make_iterator(task, split="train", sequence_length=self.sequence_length,
                               batch_size=self.batch_size, seed=self.seed, pack=True)

  def _respond(self, decoder, prompts):
    return eval_lib.generate_responses(decoder, self.vocabulary, prompts, max_new_tokens=self.max_new_tokens,
                                       max_prompt_tokens=self.max_prompt_tokens,
                                       batch_size=max(len(u.held_out) for u in self.dev_users + self.test_users))

  def evaluate_memory(self, memory: MemoryTrainer, users: Sequence[tasks.User],
                      export_dir: str | None = None, checkpoint: bool = False) -> dict:
    """Trains `memory` on each user's history, answers their held-out prompts; mean scores."""
    examples, responses, losses = [], [], []
    for user in users:
      user_dir = self.user_dir(user.user_id) if checkpoint else None
      if user_dir is not None and memory.layout is not None:
        _write_user_layout(user_dir, memory.layout)
      model, result = memory.train_user(self.history_data(user), user_dir)
      losses.append(result.metrics["loss"])
      examples += [(user, ex) for ex in user.held_out]
      responses += self._respond(merged(model), [ex.prompt for ex in user.held_out])
      if export_dir is not None:
        from persona_jax.hf.peft import save_peft_adapters  # pylint: disable=g-import-not-at-top
        save_peft_adapters(model, workdir_lib.join(export_dir, user.user_id), names=memory.names,
                           base_model_name_or_path=self.source, overwrite=True)
    scores = eval_lib.score(responses, examples)
    scores["final_train_loss"] = sum(losses) / len(losses)
    scores["responses"] = [{"user_id": u.user_id, "response": r, "reference": ex.response}
                           for r, (u, ex) in zip(responses, examples)]
    return scores

  # Baselines ------------------------------------------------------------------------------------
  def no_memory(self, users) -> dict:
    examples = [(u, ex) for u in users for ex in u.held_out]
    responses = self._respond(self.base, [ex.prompt for _, ex in examples])
    return dict(eval_lib.score(responses, examples),
                responses=[{"user_id": u.user_id, "response": r, "reference": ex.response}
                           for r, (u, ex) in zip(responses, examples)])

  def memory_as_prompt(self, users) -> dict:
    examples = [(u, ex) for u in users for ex in u.held_out]
    prompts = [eval_lib.memory_prompt(u, ex, self.prompt_history_turns) for u, ex in examples]
    responses = self._respond(self.base, prompts)
    return dict(eval_lib.score(responses, examples),
                responses=[{"user_id": u.user_id, "response": r, "reference": ex.response}
                           for r, (u, ex) in zip(responses, examples)])

  def single_lora(self, users) -> dict:
    rank = self.single_lora_rank

    def inject(decoder):
      pnn.inject_lora(decoder, projections=("q_proj", "v_proj"), rank=rank, alpha=2.0 * rank,
                      name=SINGLE_LORA_NAME, seed=self.seed)
      return [SINGLE_LORA_NAME]

    self._trainers.clear()
    memory = MemoryTrainer(self.base, inject, self.single_lora_learning_rate, self.train_config,
                           {"baseline": "single_lora", "rank": rank, "base": self.source})
    return self.evaluate_memory(memory, users)

  # Search ---------------------------------------------------------------------------------------
  def search(self, log_path: str | None = None) -> tuple[MemoryLayout, list[dict]]:
    """Bayesian search over `search_space` on the dev users; returns (best layout, trial records).

    Runs until `num_trials` feasible trials are evaluated (infeasible proposals are told to the sampler
    as constraint violations and cost no training), at most `max_trial_asks` proposals in all.
    """
    import optuna  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("torch") is None:
      raise ImportError("MiLP's Bayesian search uses Optuna's GPSampler, which needs torch: "
                        "pip install -e '.[milp]'")
    num_layers = self.base.config.num_layers
    self.search_space.check(num_layers)
    log_path = log_path or workdir_lib.join(self.workdir, "trials.jsonl")
    logged = workdir_lib.read_text(log_path) if workdir_lib.exists(log_path) else ""
    sampler = optuna.samplers.GPSampler(seed=self.seed, n_startup_trials=self.num_startup_trials)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    distributions = self.search_space.distributions()
    records, evaluated = [], 0
    for _ in range(self.max_trial_asks):
      if evaluated == self.num_trials:
        break
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
        scores = self.evaluate_memory(self.memory_trainer(layout), self.dev_users)
        study.tell(trial, scores[self.objective])
        evaluated += 1
        record.update(objective=scores[self.objective], rouge_l=scores["rouge_l"],
                      persona_f1=scores["persona_f1"], final_train_loss=scores["final_train_loss"])
      record["seconds"] = round(time.time() - started, 2)
      records.append(record)
      logged += json.dumps(record) + "\n"
      workdir_lib.write_text(log_path, logged)  # the whole log each trial: works on gs:// too
      if jax.process_index() == 0:
        shown = "infeasible" if violation > 0 else f"{self.objective} {record['objective']:.4f}"
        print(f"milp trial {trial.number}: layers {list(layout.layers)} rank {layout.rank} "
              f"lr {layout.learning_rate:.2e}: {shown}", flush=True)
    feasible = [r for r in records if r["feasible"]]
    if not feasible:
      raise ValueError(f"milp search: none of {len(records)} proposals was feasible (max_trial_asks="
                       f"{self.max_trial_asks}); narrow milp.SearchSpace to the decoder's "
                       f"{num_layers} layers.")
    best = max(feasible, key=lambda r: r["objective"])
    return MemoryLayout.from_json(best["layout"]), records


@gin.configurable("job", module="milp")
def build_job(workdir: str, *, pretrained: str | None = "smollm2-135m-instruct", model: str | None = None,
              vocabulary: Any = None, dataset: str = "synthetic_persona_chat",
              data_dir: str = "../shared/data/dialogue", num_dev_users: int = 4, num_test_users: int = 4,
              history_fraction: float = 0.5, context_turns: int = 2, responses_per_user: int = 2,
              layout: dict | None = None, search_space: SearchSpace | None = None,
              objective: str = "rouge_l", num_trials: int = 8, num_startup_trials: int = 3,
              max_trial_asks: int | None = None, sequence_length: int = 128, batch_size: int = 4,
              max_new_tokens: int = 24, max_prompt_tokens: int = 256, prompt_history_turns: int = 6,
              single_lora_rank: int = 8, single_lora_learning_rate: float = 1e-3, seed: int = 0,
              train_config: TrainConfig | None = None) -> MilpJob:
  """Builds the frozen decoder, the users and the settings of a MiLP run.

  Args:
    workdir: trials.jsonl, best_layout.json, per-user checkpoints and PEFT adapters, results.
    pretrained / model: the frozen decoder (a `load_pretrained` source, or a random preset for tests).
    vocabulary: tokenizer (default: the pretrained model's; "bytes" with presets).
    dataset / data_dir: `tasks.DATASETS` entry and the dialogue folder.
    num_dev_users / num_test_users: users the search scores layouts on / the final table is on.
    history_fraction / context_turns / responses_per_user: see `tasks.load_users`.
    layout: the memory layout used without a search (dict of `MemoryLayout` fields); default: the
      search's best in `<workdir>/best_layout.json` if present, else 4 modules on the middle layers.
    search_space / objective / num_trials / num_startup_trials / max_trial_asks: the Bayesian search
      (`num_startup_trials` random proposals before the GP; `max_trial_asks` default 4 * num_trials).
    sequence_length / batch_size: rows of each memory's training (the user's packed history).
    max_new_tokens / max_prompt_tokens: response generation (longer prompts are an error).
    prompt_history_turns: past turns in the memory-as-prompt baseline.
    single_lora_rank / single_lora_learning_rate: the single-LoRA baseline.
    train_config: each memory's training (num_steps per user; learning_rate comes from the layout).
  """
  if workdir_lib.is_url(workdir):
    raise ValueError(f"milp.job: workdir {workdir!r} is a URL; MiLP writes user histories (read by SeqIO "
                     "as local files) and PEFT adapters with local file APIs: use a local workdir (or a "
                     "gcsfuse mount).")
  if objective not in OBJECTIVES:
    raise ValueError(f"milp.job.objective={objective!r}; choose from {OBJECTIVES}.")
  if vocabulary is None:
    vocabulary = pretrained if pretrained is not None else "bytes"
  vocab = pdata.get_vocabulary(vocabulary)
  loaded = load_job_decoder("milp.job", pretrained, model, vocab_size=vocab.vocab_size, seed=seed)
  base, source = loaded.decoder, loaded.base.get("pretrained")
  if base.config.vocab_size < vocab.vocab_size:
    raise ValueError(f"milp.job: vocabulary has {vocab.vocab_size} ids but the decoder has "
                     f"{base.config.vocab_size} rows.")
  load = functools.partial(tasks.load_users, dataset, data_dir, history_fraction=history_fraction,
                           context_turns=context_turns, responses_per_user=responses_per_user)
  dev_users, test_users = load("dev", num_dev_users), load("test", num_test_users)
  tasks.responses_task(dataset, {"dev": dev_users, "test": test_users})
  num_layers = base.config.num_layers
  best_path = workdir_lib.join(workdir, "best_layout.json")
  if layout is not None:
    chosen = MemoryLayout.from_json(dict(layout))
  elif workdir_lib.exists(best_path):
    chosen = MemoryLayout.from_json(json.loads(workdir_lib.read_text(best_path)))
  else:
    middle = num_layers // 2
    chosen = MemoryLayout(layers=tuple(range(max(0, middle - 2), min(num_layers, middle + 2))))
  chosen.check(num_layers)
  return MilpJob(workdir=workdir, base=base, vocabulary=vocab, source=source, dataset=dataset,
                 dev_users=dev_users, test_users=test_users, layout=chosen,
                 search_space=search_space or SearchSpace(), train_config=train_config or TrainConfig(),
                 objective=objective, num_trials=num_trials, num_startup_trials=num_startup_trials,
                 max_trial_asks=max_trial_asks or 4 * num_trials, sequence_length=sequence_length,
                 batch_size=batch_size, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                 prompt_history_turns=prompt_history_turns, single_lora_rank=single_lora_rank,
                 single_lora_learning_rate=single_lora_learning_rate, seed=seed)


SYSTEMS = ("no_memory", "memory_as_prompt", "single_lora", "milp_searched")


def results_table(results: dict, title: str) -> str:
  lines = [f"### {title}", "", "| system | ROUGE-L | Persona-F1 | responses |", "|---|---|---|---|"]
  for system in SYSTEMS:
    if system in results:
      r = results[system]
      lines.append(f"| {system} | {r['rouge_l']:.4f} | {r['persona_f1']:.4f} | {int(r['num_responses'])} |")
  return "\n".join(lines) + "\n"


@gin.configurable("train", module="milp")
def train(workdir: str, **overrides) -> dict[str, Any]:
  """Baselines, search, best layout retrained on the test users; writes results.{json,md}."""
  job = build_job(workdir, **overrides)
  chief = jax.process_index() == 0
  timings, results = {}, {}
  for system, run in (("no_memory", job.no_memory), ("memory_as_prompt", job.memory_as_prompt),
                      ("single_lora", job.single_lora)):
    started = time.time()
    results[system] = run(job.test_users)
    timings[system] = round(time.time() - started, 1)
    if chief:
      print(f"milp {system}: ROUGE-L {results[system]['rouge_l']:.4f}, Persona-F1 "
            f"{results[system]['persona_f1']:.4f}", flush=True)
  started = time.time()
  best, records = job.search()
  timings["search"] = round(time.time() - started, 1)
  job.layout = best
  workdir_lib.write_json(workdir_lib.join(workdir, "best_layout.json"), best.to_json())
  started = time.time()
  results["milp_searched"] = job.evaluate_memory(job.memory_trainer(best), job.test_users,
                                                 export_dir=workdir_lib.join(workdir, "peft"), checkpoint=True)
  timings["milp_searched"] = round(time.time() - started, 1)
  summary = {"dataset": job.dataset, "base": job.source or "random preset",
             "dev_users": [u.user_id for u in job.dev_users],
             "test_users": [u.user_id for u in job.test_users], "objective": job.objective,
             "best_layout": best.to_json(), "trials": records, "results": results, "seconds": timings}
  table = results_table(results, f"MiLP on {job.dataset}, {len(job.test_users)} test users (best layout: "
                                 f"layers {list(best.layers)}, rank {best.rank}, lr {best.learning_rate:.2e})")
  if chief:
    workdir_lib.write_json(workdir_lib.join(workdir, "results.json"), summary)
    workdir_lib.write_text(workdir_lib.join(workdir, "results.md"), table)
    print(table, flush=True)
  return summary
