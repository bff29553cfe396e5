"""MiLP: memory injection, per-user training, the searches (pruned points never scored, random search
and the single LoRA's learning rate at the same budget) and their resume, the teacher-forced objective
against closed forms, BM25 retrieval and the prompt cap on hand-made histories, the PEFT export, the
smoke job run twice in one workdir, bad inputs.

Tiny random llama (2 layers), bytes vocabulary, real Synthetic-Persona-Chat users from ../shared.
"""

from __future__ import annotations

import json
import math
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optuna
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.hf.source import DecoderSource
from persona_jax import data as pdata
from persona_jax.milp import eval as eval_lib
from persona_jax.milp import tasks
from persona_jax.milp.job import SEARCHES, Milp
from persona_jax.milp.model import MemoryLayout, SearchSpace, inject_memory
from persona_jax.train import jobs
from persona_jax.train.method import Run
from persona_jax.train.trainer import TrainConfig, Trainer

REPO = pathlib.Path(__file__).resolve().parents[2]
TOKENS = np.random.default_rng(0).integers(3, 259, size=(2, 16))
TINY = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")
CONFIG = TrainConfig(num_steps=3, warmup_steps=1, log_every=100, checkpoint_every=0,
                     async_checkpointing=False)


def _method(workdir, shared_dir, **overrides):
  settings = dict(
      decoder=TINY, data_dir=str(shared_dir / "data/dialogue"), num_dev_users=1, num_test_users=1,
      responses_per_user=1, num_trials=2, num_startup_trials=1, max_new_tokens=4,
      max_prompt_tokens=512, sequence_length=64, batch_size=2,
      search_space=SearchSpace(rank_choices=(2, 4), learning_rate=(1e-3, 1e-2)))
  settings.update(overrides)
  method = Milp(**settings)
  method.setup(str(workdir))
  return method


@pytest.fixture(scope="module")
def method(tmp_path_factory, shared_dir):
  return _method(tmp_path_factory.mktemp("milp"), shared_dir)


@nnx.jit
def _forward(decoder, tokens):
  return decoder(tokens).logits


def _logits(decoder):
  return np.asarray(_forward(decoder, jnp.asarray(TOKENS)))


def test_injected_memory_at_init_has_the_base_logits(method):
  decoder = nnx.clone(method.base)
  names = inject_memory(decoder, MemoryLayout(layers=(0, 1, 1), rank=4))
  assert names == ["memory_0", "memory_1", "memory_2"]
  assert len(pnn.lora_sites(decoder)) == 9  # 3 modules x gate/up/down
  np.testing.assert_array_equal(_logits(decoder), _logits(method.base))
  # Not vacuous: a non-zero B on one module moves the logits.
  adapter = decoder.layers[1].mlp.down_proj.adapters["memory_2"]
  adapter.b[...] = jnp.full(adapter.b[...].shape, 0.1)
  assert np.abs(_logits(decoder) - _logits(method.base)).max() > 1e-3


def test_training_changes_only_that_memory_and_exports_as_peft(method, tmp_path):
  import transformers
  import torch
  from persona_jax.hf import peft_model, save_peft_adapters, save_pretrained

  user = method.dev_users[0]
  layout = MemoryLayout(layers=(0, 1), rank=2, learning_rate=1e-2)
  memory = method.layout_memory(layout)
  trained, result = memory.train(Run(workdir=None, config=CONFIG), method.history_data(user))
  assert result.step == 3
  base_flat = dict(nnx.to_flat_state(nnx.state(method.base)))
  changed_memory = set()
  for path, variable in nnx.to_flat_state(nnx.state(trained)):
    value = np.asarray(variable.get_value())
    if path in base_flat:  # every base weight is bit-identical after training
      np.testing.assert_array_equal(value, np.asarray(base_flat[path].get_value()), err_msg=str(path))
    else:
      assert isinstance(variable, nnx.LoRAParam) and path[-1] in ("a", "b"), path
      if path[-1] == "b" and np.abs(value).max() > 0:  # B starts at zero
        changed_memory.add(path[-2])
  assert changed_memory == {"memory_0", "memory_1"}, changed_memory
  # The trainer's trainable state is exactly the memory's LoRA parameters.
  trainable = jax.tree.leaves(memory._trainer.state.params)  # pylint: disable=protected-access
  assert sum(x.size for x in trainable) == sum(
      a.a[...].size + a.b[...].size for _, _, _, a in pnn.lora_sites(trained))

  # A second user reuses the compiled step from a fresh memory (Trainer.reset): same as a new Trainer.
  again, _ = memory.train(Run(workdir=None, config=CONFIG), method.history_data(user))
  np.testing.assert_allclose(_logits(again), _logits(trained), atol=1e-6)

  # The user's memory as PEFT adapters on the exported base: transformers + peft give our logits.
  base_dir = save_pretrained(method.base, tmp_path / "base")
  save_peft_adapters(trained, tmp_path / "peft" / user.user_id, names=memory.names)
  hf = peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                  tmp_path / "peft" / user.user_id)
  with torch.no_grad():
    hf_logits = hf(torch.tensor(TOKENS)).logits.numpy()
  ours = _logits(trained)
  assert np.abs(hf_logits - ours).max() < 1e-5
  assert np.abs(ours - _logits(method.base)).max() > 1e-4  # the memory really changed the model


def _fake_scores(description):
  """A deterministic dev score per memory, standing in for training (the search logic only)."""
  text = json.dumps(description, sort_keys=True)
  value = 1.0 + (sum(map(ord, text)) % 97) / 97.0
  return {"loss": value, "final_train_loss": value}


def test_every_point_of_the_space_is_a_memory_on_existing_layers():
  """Enumerates the whole space of a 3-layer decoder: no point is infeasible (nothing to score 0)."""
  import itertools
  space = SearchSpace(rank_choices=(2, 4), learning_rate=1e-3)
  distributions = space.distributions(3)
  names = sorted(distributions)
  points = list(itertools.product(*[range(distributions[n].low, distributions[n].high + 1)
                                    for n in names]))
  assert len(points) == 3 ** 3 * 3
  for values in points:
    params = dict(zip(names, values))
    layout = space.layout(params, 3)
    assert layout.layers and set(layout.layers) <= {0, 1, 2}
    assert params["anchor_layer"] in layout.layers
    layout.check(3)


def test_pruned_points_are_never_scored_nor_reach_the_surrogate(method, tmp_path, monkeypatch):
  """A point the space maps to no memory is told as PRUNED without a value, costs no training, and
  the GP's surrogate is fitted on the scored trials only (here two proposals are forced to be none)."""
  from optuna._gp import gp

  fits = []
  real_fit = gp.fit_kernel_params

  def recording_fit(*args, **kwargs):
    fits.append(np.asarray(kwargs["Y"]).copy())
    return real_fit(*args, **kwargs)

  monkeypatch.setattr(gp, "fit_kernel_params", recording_fit)
  scored_calls = []

  def fake_score(run, memory, users):
    scored_calls.append(memory.description)
    return _fake_scores(memory.description)

  monkeypatch.setattr(method, "score_dev", fake_score)
  real_space = method._space  # pylint: disable=protected-access
  calls = []

  def space_with_holes(name):
    distributions, describe = real_space(name)

    def holey(params):
      calls.append(params)
      return None if len(calls) in (2, 4) else describe(params)  # proposals 1 and 3: no memory

    return distributions, holey

  monkeypatch.setattr(method, "_space", space_with_holes)
  complete_before_ask = []
  real_ask = optuna.Study.ask

  def counting_ask(study, *args, **kwargs):
    complete_before_ask.append(len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))))
    return real_ask(study, *args, **kwargs)

  monkeypatch.setattr(optuna.Study, "ask", counting_ask)
  log = tmp_path / "trials.jsonl"
  method.num_trials = 4
  try:
    best, records = method.search(Run(workdir=None, config=CONFIG), str(log),
                                  sampler=optuna.samplers.GPSampler(seed=0, n_startup_trials=1))
  finally:
    method.num_trials = 2
  pruned = [r for r in records if not r["feasible"]]
  assert [r["trial"] for r in pruned] == [1, 3]
  assert all(r["objective"] is None and r["memory"] is None for r in pruned)
  scored = [r for r in records if r["feasible"]]
  assert len(scored) == 4 and len(scored_calls) == 4  # pruned points were never scored
  for record in scored:
    assert record["objective"] == _fake_scores(record["description"])["loss"]
  # Every GP fit saw exactly the scored trials so far: the pruned ones never entered it as a value.
  assert fits, "the GP never fitted (still in its startup trials?)"
  assert [len(y) for y in fits] == [n for n in complete_before_ask if n >= 1]
  assert max(len(y) for y in fits) == 3
  assert best == min(scored, key=lambda r: r["objective"])["description"]

  # Resumed from the log: the pruned trials are re-added as PRUNED (no value), nothing re-runs, and
  # the study holds no value for them.
  monkeypatch.setattr(method, "_space", real_space)
  monkeypatch.setattr(method, "score_dev", lambda *a, **k: pytest.fail("a logged trial re-ran"))
  method.num_trials = 4
  try:
    again, found = method.search(Run(workdir=None, config=CONFIG), str(log))
  finally:
    method.num_trials = 2
  assert found == records and again == best


def test_random_search_and_learning_rate_tuning_get_the_same_number_of_trials(method, tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(method, "score_dev",
                      lambda run, memory, users: _fake_scores(memory.description))
  method.workdir_backup, method.workdir = method.workdir, str(tmp_path)
  samplers = {}
  real_sampler = method._sampler  # pylint: disable=protected-access

  def sampler(name):
    samplers[name] = real_sampler(name)
    return samplers[name]

  monkeypatch.setattr(method, "_sampler", sampler)
  try:
    bests = {name: method._best(Run(workdir=None, config=CONFIG), name)  # pylint: disable=protected-access
             for name in SEARCHES}
  finally:
    method.workdir = method.workdir_backup
  assert isinstance(samplers["milp_random"], optuna.samplers.RandomSampler)
  assert isinstance(samplers["milp_searched"], optuna.samplers.GPSampler)
  assert isinstance(samplers["single_lora"], optuna.samplers.GPSampler)
  counts = {}
  for name, where in SEARCHES.items():
    records = [json.loads(line) for line in (tmp_path / where.log).read_text().splitlines()]
    counts[name] = sum(r["feasible"] for r in records)
    assert json.loads((tmp_path / where.settings).read_text())["search"] == name
  assert counts == {name: method.num_trials for name in SEARCHES}, counts
  assert "layout" in bests["milp_random"] and "layout" in bests["milp_searched"]
  rate = bests["single_lora"]["single_lora"]["learning_rate"]
  assert method.single_lora_learning_rate[0] <= rate <= method.single_lora_learning_rate[1]


def test_search_resumes_from_its_log_without_training(method, tmp_path, monkeypatch):
  """A rerun re-adds the logged trials to the study; with num_trials of them it trains nothing."""
  space = method.search_space
  log = tmp_path / "trials.jsonl"
  records = []
  for number, (choices, objective) in enumerate([((0, 0), None), ((1, 0), 2.5), ((2, 1), 1.5)]):
    params = {"layer_00": choices[0], "layer_01": choices[1], "anchor_layer": 0,
              "learning_rate": 2e-3}
    feasible = objective is not None  # trial 0: pruned (logged as a space with holes would)
    layout = space.layout(params, 2) if feasible else None
    description = None if layout is None else {"layout": layout.to_json(), "seed": 0}
    records.append({"trial": number, "params": params,
                    "memory": None if layout is None else layout.to_json(),
                    "description": description, "feasible": feasible, "objective": objective,
                    "seconds": 0.0, **({"loss": objective} if feasible else {})})
  log.write_text("".join(json.dumps(r) + "\n" for r in records))

  def no_training(*args, **kwargs):
    raise AssertionError("a logged trial was trained again")

  monkeypatch.setattr(Trainer, "step", no_training)
  run = Run(workdir=None, config=CONFIG)
  best, found = method.search(run, str(log))
  assert found == records
  assert best == records[2]["description"]  # the lowest loss
  assert MemoryLayout.from_json(best["layout"]) == MemoryLayout(layers=(0, 1), rank=(4, 2),
                                                                learning_rate=2e-3)
  assert (tmp_path / "search.json").is_file()
  # Another search's log is refused, never mixed in.
  other = Run(workdir=None, config=TrainConfig(num_steps=5, warmup_steps=1))
  with pytest.raises(ValueError, match="trials of another search"):
    method.search(other, str(log))


def test_search_space_is_per_layer_on_off_and_size():
  space = SearchSpace(rank_choices=(2, 4, 8), learning_rate=(1e-4, 1e-2))
  distributions = space.distributions(5)
  assert sorted(distributions) == ["anchor_layer"] + [f"layer_0{l}" for l in range(5)] + [
      "learning_rate"]
  assert (distributions["anchor_layer"].low, distributions["anchor_layer"].high) == (0, 4)
  assert all(distributions[f"layer_0{l}"].low == 0 and distributions[f"layer_0{l}"].high == 3
             for l in range(5))
  params = {"layer_00": 0, "layer_01": 3, "layer_02": 0, "layer_03": 1, "layer_04": 2,
            "anchor_layer": 3, "learning_rate": 5e-3}
  layout = space.layout(params, 5)  # non-contiguous layers, each its own size
  assert layout.layers == (1, 3, 4) and layout.ranks == (8, 2, 4) and layout.learning_rate == 5e-3
  # The anchor layer is always on: its own switch off gives it the smallest rank.
  off = space.layout(dict(params, layer_01=0, layer_03=0, layer_04=0, anchor_layer=2), 5)
  assert off.layers == (2,) and off.ranks == (2,)
  fixed = SearchSpace(learning_rate=1e-3)
  assert "learning_rate" not in fixed.distributions(3)
  assert fixed.layout({"layer_00": 1, "layer_01": 0, "layer_02": 0, "anchor_layer": 0},
                      3).learning_rate == 1e-3
  # A layout with per-module ranks injects modules of those ranks.
  decoder = nnx.clone(TINY.load("milp.job", vocab_size=259).decoder)
  inject_memory(decoder, MemoryLayout(layers=(0, 1), rank=(2, 4)))
  assert decoder.layers[0].mlp.up_proj.adapters["memory_0"].a[...].shape[-1] == 2
  assert decoder.layers[1].mlp.up_proj.adapters["memory_1"].a[...].shape[-1] == 4


def test_objective_is_the_teacher_forced_loss_of_the_response(method):
  """Closed forms: a decoder with every weight zero predicts uniformly, so each response costs exactly
  log(vocab) nats/token; on a random decoder the value is the mean NLL of the response tokens alone,
  computed here without padding from the full-sequence logits."""
  vocabulary = method.vocabulary
  prompts = ["User 1: hi there\nUser 2:", "User 1: what do you do?\nUser 2:"]
  responses = ["hello!", "I teach  math in a school"]
  zero = nnx.clone(method.base)
  nnx.update(zero, jax.tree.map(jnp.zeros_like, nnx.state(zero, nnx.Param)))
  uniform = eval_lib.response_nll(zero, vocabulary, prompts, responses, max_prompt_tokens=64,
                                  max_response_tokens=48, batch_size=4)
  np.testing.assert_allclose(uniform, [math.log(zero.config.vocab_size)] * 2, rtol=1e-6)

  values = eval_lib.response_nll(method.base, vocabulary, prompts, responses, max_prompt_tokens=64,
                                 max_response_tokens=48, batch_size=4)
  for prompt, response, value in zip(prompts, responses, values):
    prompt_ids = list(vocabulary.encode(prompt))
    target_ids = list(vocabulary.encode(" " + response.strip() + "\n"))
    ids = np.asarray([prompt_ids + target_ids])
    logits = np.asarray(_forward(method.base, jnp.asarray(ids)), np.float64)[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    nll = [-log_probs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(target_ids)]
    assert value == pytest.approx(float(np.mean(nll)), rel=1e-4)
  assert values[0] != pytest.approx(values[1], rel=1e-3)  # not a constant


def _user(history, persona=()):
  return tasks.User(user_id="hand", persona=tuple(persona), history=tuple(history), held_out=(),
                    speaker="User 2")


def test_bm25_retrieval_returns_the_expected_turns_of_a_hand_made_history():
  history = ["User 1: How was your weekend?",
             "User 2: I went hiking in the mountains with my dog.",
             "User 1: Do you cook?",
             "User 2: I bake sourdough bread every Sunday morning.",
             "User 2: My dog is a golden retriever named Rex."]
  user = _user(history, persona=["I am a nurse.", "I like jazz music."])
  items = eval_lib.memory_items(user)
  assert items[:2] == ["Persona: I am a nurse.", "Persona: I like jazz music."]
  assert eval_lib.bm25_top_k(items, "Which mountains did you go hiking in?", 1) == [history[1]]
  assert eval_lib.bm25_top_k(items, "What bread do you bake on Sunday?", 1) == [history[3]]
  top = eval_lib.bm25_top_k(items, "Tell me about the dog Rex", 2)
  assert top == [history[4], history[1]]  # both dog turns, the one naming Rex first
  assert eval_lib.bm25_top_k(items, "jazz", 3) == ["Persona: I like jazz music."]  # score-0 items dropped
  assert eval_lib.bm25_top_k(items, "zebra quantum", 3) == []

  # The prompt cap: whole items while they fit (bytes vocabulary: one token per byte, +1 newline).
  vocabulary = pdata.get_vocabulary("bytes")
  example = tasks.HeldOutExample(prompt="User 1: and the dog Rex?\nUser 2:", response="x")
  budget = len(history[4]) + 1 + len(history[1]) + 1
  prompt = eval_lib.retrieval_prompt(user, example, 2, vocabulary, budget)
  assert prompt == history[4] + "\n" + history[1] + "\n" + example.prompt
  assert eval_lib.retrieval_prompt(user, example, 2, vocabulary, budget - 1) == (
      history[4] + "\n" + example.prompt)
  # A turn the prompt already shows (its context) is not retrieved again.
  shown = tasks.HeldOutExample(prompt=history[4] + "\nUser 1: and the dog Rex?\nUser 2:", response="x")
  assert eval_lib.retrieval_prompt(user, shown, 1, vocabulary, 1000) == history[1] + "\n" + shown.prompt
  # Memory as prompt under the same cap: persona first, then the most recent turns, in order.
  persona_cost = sum(len(line) + 1 for line in items[:2])
  capped = eval_lib.memory_prompt(user, example, 6, vocabulary, persona_cost + len(history[4]) + 1)
  assert capped == "\n".join(items[:2] + [history[4]]) + "\n" + example.prompt


@pytest.mark.slow
def test_search_runs_end_to_end_and_returns_its_best_layout(method, tmp_path):
  log = tmp_path / "trials.jsonl"
  best, records = method.search(Run(workdir=None, config=CONFIG), str(log))
  logged = [json.loads(line) for line in log.read_text().splitlines()]
  assert logged == records
  feasible = [r for r in records if r["feasible"]]
  assert len(feasible) == method.num_trials
  top = min(feasible, key=lambda r: r["objective"])
  assert best == top["description"]
  for record in feasible:  # the objective is the dev users' teacher-forced loss
    assert record["objective"] == record["loss"] and 0.0 < record["loss"] < 20.0


def _run_smoke(workdir, shared_dir, *bindings):
  """`python -m persona_jax.main --gin_file=gin/milp_smoke.gin` in this process."""
  gin.clear_config()
  jobs.discover_methods()
  gin.parse_config_files_and_bindings(
      [str(REPO / "gin/milp_smoke.gin")],
      [f"milp.job.data_dir = '{shared_dir / 'data/dialogue'}'", *bindings])
  try:
    return jobs.run(str(workdir))
  finally:
    gin.clear_config()


@pytest.mark.slow
def test_smoke_job_twice_in_one_workdir_trains_nothing_new(tmp_path, shared_dir, capsys,
                                                           monkeypatch):
  workdir = tmp_path / "run"
  first = _run_smoke(workdir, shared_dir, "TrainConfig.eval_every = 2")
  stdout = capsys.readouterr().out
  assert "eval at step 2: eval/persona_f1" in stdout  # TrainConfig.eval_every honoured
  assert set(first["periodic_eval"]) == {"eval/rouge_l", "eval/persona_f1"}
  assert first["method"] == "milp" and first["step"] == 3 and "loss" in first["train"]
  assert "| milp_searched |" in (workdir / "results.md").read_text()
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["results"]) == set(eval_lib.SYSTEMS)
  for system, entry in results["results"].items():
    assert entry["count"] == 2 and entry["loss"]["low"] <= entry["loss"]["value"] <= entry["loss"]["high"]
    assert ("loss_vs_no_memory" in entry) == (system != "no_memory")
  trials = (workdir / "trials.jsonl").read_text()
  for where in SEARCHES.values():
    logged = (workdir / where.log).read_text().splitlines()
    assert sum(json.loads(line)["feasible"] for line in logged) == 2
  user = results["test_users"][0]
  assert (workdir / "peft" / user / "memory_0" / "adapter_config.json").is_file()
  for kind in ("users", "random", "single_lora"):
    assert (workdir / kind / user / "checkpoints").is_dir()

  # The same command again: it finishes, trains nothing (no optimizer step at all), re-runs no
  # trial, and reports the same table.
  def no_training(*args, **kwargs):
    raise AssertionError("the rerun trained again")

  monkeypatch.setattr(Trainer, "step", no_training)
  second = _run_smoke(workdir, shared_dir, "TrainConfig.eval_every = 2")
  stdout = capsys.readouterr().out
  assert "milp trial" not in stdout and "Resumed from checkpoint step 3" in stdout
  assert (workdir / "trials.jsonl").read_text() == trials
  assert second["step"] == 3 and second["eval"] == first["eval"]
  assert json.loads((workdir / "results.json").read_text())["results"] == results["results"]

  # The evaluate job restores every memory from its checkpoint and reproduces the table.
  restored = _run_smoke(workdir, shared_dir, "run.job = @evaluate")
  assert restored["eval"] == first["eval"]
  assert (workdir / "results_restored.md").is_file()


def test_bad_inputs_raise_clear_errors(method, shared_dir, tmp_path):
  empty = tasks.User(user_id="nobody", persona=(), history=(), held_out=(), speaker="User 2")
  with pytest.raises(ValueError, match="'nobody' has no history"):
    method.history_data(empty)
  with pytest.raises(ValueError, match=r"names layer\(s\) \[5\] that do not exist"):
    inject_memory(nnx.clone(method.base), MemoryLayout(layers=(0, 5)))
  with pytest.raises(ValueError, match=r"layer\(s\) \[7\]"):
    _method(tmp_path, shared_dir, layout={"layers": [7]})
  with pytest.raises(ValueError, match="MemoryLayout.projections"):
    MemoryLayout(layers=(0,), projections=("mlp_in",))
  with pytest.raises(ValueError, match="rank_choices"):
    SearchSpace(rank_choices=(8, 2)).check()
  with pytest.raises(ValueError, match="learning_rate"):
    SearchSpace(learning_rate=(1e-2, 1e-3)).check()
  with pytest.raises(ValueError, match="2 ranks for 1 layers"):
    MemoryLayout(layers=(0,), rank=(2, 4))
  with pytest.raises(ValueError, match="objective"):
    Milp(decoder=TINY, objective="bleu")
  with pytest.raises(ValueError, match="needs a workdir"):
    Milp(decoder=TINY).setup(None)
  with pytest.raises(ValueError, match="is a URL"):
    Milp(decoder=TINY).setup("gs://bucket/run")
  with pytest.raises(ValueError, match="no trained memory"):
    method.restore_user("users", method.test_users[0].user_id)
  with pytest.raises(ValueError, match="a prompt has"):
    eval_lib.response_nll(method.base, method.vocabulary, ["x" * 40], ["y"], max_prompt_tokens=8)


def test_metrics_against_hand_computed_values():
  assert tasks.token_f1("I love the dogs", "dogs I love") == pytest.approx(1.0)
  # pred {i, have, cat}, ref {i, have, dog, named, rex}: 2 common, P=2/3, R=2/5.
  assert tasks.token_f1("I have a cat", "I have a dog named Rex") == pytest.approx(
      2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
  assert tasks.persona_f1("I have a cat", ["I like tea.", "I have a cat."]) == pytest.approx(1.0)
  assert tasks.persona_f1("anything", []) == 0.0
  assert tasks.rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
  assert tasks.rouge_l("dogs bark", "the cat sat") == 0.0


@pytest.mark.parametrize("dataset", tasks.DATASETS)
def test_users_and_seqio_responses_task_from_the_real_files(dataset, shared_dir):
  data_dir = shared_dir / "data/dialogue"
  dev = tasks.load_users(dataset, data_dir, "dev", 2, responses_per_user=2)
  test = tasks.load_users(dataset, data_dir, "test", 2, responses_per_user=2)
  assert not {u.user_id for u in dev} & {u.user_id for u in test}
  for user in dev + test:
    assert user.persona and user.history and 1 <= len(user.held_out) <= 2
    for example in user.held_out:  # the response is the user's own later turn, absent from the history
      assert example.prompt.endswith(f"\n{user.speaker}:") and example.response
      assert f"{user.speaker}: {example.response}" not in user.history
  name = tasks.responses_task(dataset, {"dev": dev, "test": test})
  assert name.startswith(f"milp.responses.{dataset}.")
  assert tasks.responses_task(dataset, {"dev": dev, "test": test}) == name  # same rows, same task
  rows = tasks.held_out_examples(name, "test")
  assert [(r["user_id"], r["response"]) for r in rows] == [
      (u.user_id, ex.response) for u in test for ex in u.held_out]
  with pytest.raises(ValueError, match="only .* users"):
    tasks.load_users(dataset, data_dir, "dev", 100_000)
