"""MiLP: memory injection, per-user training, the layout search and its resume, the PEFT export, the
smoke job run twice in one workdir, bad inputs.

Tiny random llama (2 layers), bytes vocabulary, real Synthetic-Persona-Chat users from ../shared.
"""

from __future__ import annotations

import json
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.hf.source import DecoderSource
from persona_jax.milp import tasks
from persona_jax.milp.job import Milp
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
      search_space=SearchSpace(num_modules=(1, 2), first_layer=(0, 1), layer_stride=(1, 1),
                               rank=(2, 4), learning_rate=(1e-3, 1e-2)))
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


def test_search_resumes_from_its_log_without_training(method, tmp_path, monkeypatch):
  """A rerun re-adds the logged trials to the study; with num_trials of them it trains nothing."""
  space = method.search_space
  log = tmp_path / "trials.jsonl"
  records = []
  for number, (params, objective) in enumerate([
      (dict(num_modules=2, first_layer=1, layer_stride=1, rank=2, learning_rate=1e-3), None),
      (dict(num_modules=1, first_layer=0, layer_stride=1, rank=2, learning_rate=2e-3), 0.25),
      (dict(num_modules=2, first_layer=0, layer_stride=1, rank=4, learning_rate=5e-3), 0.5)]):
    feasible = objective is not None
    records.append({"trial": number, "params": params, "layout": space.layout(params).to_json(),
                    "feasible": feasible, "objective": objective, "seconds": 0.0,
                    **({"rouge_l": objective, "persona_f1": 0.0} if feasible else {})})
  log.write_text("".join(json.dumps(r) + "\n" for r in records))

  def no_training(*args, **kwargs):
    raise AssertionError("a logged trial was trained again")

  monkeypatch.setattr(Trainer, "step", no_training)
  run = Run(workdir=None, config=CONFIG)
  best, found = method.search(run, str(log))
  assert found == records
  assert best == space.layout(records[2]["params"])
  assert (tmp_path / "search.json").is_file()
  # Another search's log is refused, never mixed in.
  other = Run(workdir=None, config=TrainConfig(num_steps=5, warmup_steps=1))
  with pytest.raises(ValueError, match="trials of another search"):
    method.search(other, str(log))


@pytest.mark.slow
def test_search_runs_end_to_end_and_returns_its_best_layout(method, tmp_path):
  log = tmp_path / "trials.jsonl"
  best, records = method.search(Run(workdir=None, config=CONFIG), str(log))
  logged = [json.loads(line) for line in log.read_text().splitlines()]
  assert logged == records
  feasible = [r for r in records if r["feasible"]]
  assert len(feasible) == method.num_trials
  assert all(max(r["layout"]["layers"]) <= 1 for r in feasible)
  assert all(max(r["layout"]["layers"]) > 1 for r in records if not r["feasible"])
  top = max(feasible, key=lambda r: r["objective"])
  assert best == MemoryLayout.from_json(top["layout"])
  for record in feasible:
    assert 0.0 <= record["rouge_l"] <= 1.0 and record["objective"] == record["rouge_l"]


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
  assert set(results["results"]) == {"no_memory", "memory_as_prompt", "single_lora", "milp_searched"}
  trials = (workdir / "trials.jsonl").read_text()
  assert sum(json.loads(line)["feasible"] for line in trials.splitlines()) == 2
  user = results["test_users"][0]
  assert (workdir / "peft" / user / "memory_0" / "adapter_config.json").is_file()
  assert (workdir / "users" / user / "checkpoints").is_dir()
  assert (workdir / "single_lora" / user / "checkpoints").is_dir()

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
  no_point = _method(tmp_path, shared_dir, search_space=SearchSpace(
      num_modules=(2, 3), first_layer=(1, 1), layer_stride=(1, 2)))
  with pytest.raises(ValueError, match="SearchSpace has no valid point"):
    no_point.search(Run(workdir=None, config=CONFIG), str(tmp_path / "t.jsonl"))
  with pytest.raises(ValueError, match="not a valid range"):
    SearchSpace(rank=(8, 2)).check(2)
  with pytest.raises(ValueError, match="objective"):
    Milp(decoder=TINY, objective="bleu")
  with pytest.raises(ValueError, match="needs a workdir"):
    Milp(decoder=TINY).setup(None)
  with pytest.raises(ValueError, match="is a URL"):
    Milp(decoder=TINY).setup("gs://bucket/run")
  with pytest.raises(ValueError, match="no trained memory"):
    method.restore_user("users", method.test_users[0].user_id)


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
