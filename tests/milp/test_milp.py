"""MiLP: memory injection, per-user training, the layout search, the PEFT export, bad inputs.

Tiny random llama (2 layers), bytes vocabulary, real Synthetic-Persona-Chat users from ../shared.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.milp import tasks
from persona_jax.milp.model import MemoryLayout, inject_memory
from persona_jax.milp.train import SearchSpace, build_job
from persona_jax.train.trainer import TrainConfig

TOKENS = np.random.default_rng(0).integers(3, 259, size=(2, 16))


def _job(workdir, shared_dir, **overrides):
  settings = dict(
      pretrained=None, model="tiny_llama", vocabulary="bytes", data_dir=str(shared_dir / "data/dialogue"),
      num_dev_users=1, num_test_users=1, responses_per_user=1, num_trials=2, num_startup_trials=1,
      max_new_tokens=4, max_prompt_tokens=512, sequence_length=64, batch_size=2,
      search_space=SearchSpace(num_modules=(1, 2), first_layer=(0, 1), layer_stride=(1, 1), rank=(2, 4),
                               learning_rate=(1e-3, 1e-2)),
      train_config=TrainConfig(num_steps=3, warmup_steps=1, log_every=100, checkpoint_every=0,
                               async_checkpointing=False))
  settings.update(overrides)
  return build_job(str(workdir), **settings)


@pytest.fixture(scope="module")
def job(tmp_path_factory, shared_dir):
  return _job(tmp_path_factory.mktemp("milp"), shared_dir)


@nnx.jit
def _forward(decoder, tokens):
  return decoder(tokens).logits


def _logits(decoder):
  return np.asarray(_forward(decoder, jnp.asarray(TOKENS)))


def test_injected_memory_at_init_has_the_base_logits(job):
  decoder = nnx.clone(job.base)
  names = inject_memory(decoder, MemoryLayout(layers=(0, 1, 1), rank=4))
  assert names == ["memory_0", "memory_1", "memory_2"]
  assert len(pnn.lora_sites(decoder)) == 9  # 3 modules x gate/up/down
  np.testing.assert_array_equal(_logits(decoder), _logits(job.base))
  # Not vacuous: a non-zero B on one module moves the logits.
  adapter = decoder.layers[1].mlp.down_proj.adapters["memory_2"]
  adapter.b[...] = jnp.full(adapter.b[...].shape, 0.1)
  assert np.abs(_logits(decoder) - _logits(job.base)).max() > 1e-3


def test_training_changes_only_that_memory_and_exports_as_peft(job, tmp_path):
  import transformers
  import torch
  from persona_jax.hf import peft_model, save_peft_adapters, save_pretrained

  user = job.dev_users[0]
  layout = MemoryLayout(layers=(0, 1), rank=2, learning_rate=1e-2)
  memory = job.memory_trainer(layout)
  trained, result = memory.train_user(job.history_data(user))
  assert result.step == 3
  base_flat = dict(nnx.to_flat_state(nnx.state(job.base)))
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
  trainable = jax.tree.leaves(memory.trainer.state.params)
  assert sum(x.size for x in trainable) == sum(
      a.a[...].size + a.b[...].size for _, _, _, a in pnn.lora_sites(trained))

  # The user's memory as PEFT adapters on the exported base: transformers + peft give our logits.
  base_dir = save_pretrained(job.base, tmp_path / "base")
  save_peft_adapters(trained, tmp_path / "peft" / user.user_id, names=memory.names)
  hf = peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "peft" / user.user_id)
  with torch.no_grad():
    hf_logits = hf(torch.tensor(TOKENS)).logits.numpy()
  ours = _logits(trained)
  assert np.abs(hf_logits - ours).max() < 1e-5
  assert np.abs(ours - _logits(job.base)).max() > 1e-4  # the memory really changed the model


@pytest.mark.slow
def test_search_runs_end_to_end_and_returns_its_best_layout(job, tmp_path):
  log = tmp_path / "trials.jsonl"
  best, records = job.search(str(log))
  logged = [json.loads(line) for line in log.read_text().splitlines()]
  assert logged == records
  feasible = [r for r in records if r["feasible"]]
  assert len(feasible) == job.num_trials
  assert all(max(r["layout"]["layers"]) <= 1 for r in feasible)
  assert all(max(r["layout"]["layers"]) > 1 for r in records if not r["feasible"])
  top = max(feasible, key=lambda r: r["objective"])
  assert best == MemoryLayout.from_json(top["layout"])
  for record in feasible:
    assert 0.0 <= record["rouge_l"] <= 1.0 and record["objective"] == record["rouge_l"]


def test_bad_inputs_raise_clear_errors(job, shared_dir, tmp_path):
  empty = tasks.User(user_id="nobody", persona=(), history=(), held_out=(), speaker="User 2")
  with pytest.raises(ValueError, match="'nobody' has no history"):
    job.history_data(empty)
  with pytest.raises(ValueError, match=r"names layer\(s\) \[5\] that do not exist"):
    inject_memory(nnx.clone(job.base), MemoryLayout(layers=(0, 5)))
  with pytest.raises(ValueError, match=r"layer\(s\) \[7\]"):
    _job(tmp_path, shared_dir, layout={"layers": [7]})
  with pytest.raises(ValueError, match="MemoryLayout.projections"):
    MemoryLayout(layers=(0,), projections=("mlp_in",))
  no_point = _job(tmp_path, shared_dir, search_space=SearchSpace(num_modules=(2, 3), first_layer=(1, 1),
                                                                 layer_stride=(1, 2)))
  with pytest.raises(ValueError, match="SearchSpace has no valid point"):
    no_point.search(str(tmp_path / "t.jsonl"))
  with pytest.raises(ValueError, match="not a valid range"):
    SearchSpace(rank=(8, 2)).check(2)
  with pytest.raises(ValueError, match="objective"):
    _job(tmp_path, shared_dir, objective="bleu")


def test_metrics_against_hand_computed_values():
  assert tasks.token_f1("I love the dogs", "dogs I love") == pytest.approx(1.0)
  # pred {i, have, cat}, ref {i, have, dog, named, rex}: 2 common, P=2/3, R=2/5.
  assert tasks.token_f1("I have a cat", "I have a dog named Rex") == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))
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
  rows = tasks.held_out_examples(name, "test")
  assert [(r["user_id"], r["response"]) for r in rows] == [
      (u.user_id, ex.response) for u in test for ex in u.held_out]
  with pytest.raises(ValueError, match="only .* users"):
    tasks.load_users(dataset, data_dir, "dev", 100_000)
