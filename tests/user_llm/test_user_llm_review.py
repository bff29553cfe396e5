"""User-LLM review generation (task amazon_review): examples, batches, loss, generation with side
inputs, ROUGE-Lsum, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import main as main_lib
from persona_jax import nn as pnn
from persona_jax.data import get_vocabulary
from persona_jax.data import user_histories as uh
from persona_jax.user_llm import eval as eval_lib
from persona_jax.user_llm import model as m
from persona_jax.errors import UserError
from persona_jax.hf.source import DecoderSource
from persona_jax.user_llm import job as job_lib
from persona_jax.user_llm import tasks

GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"
BYTES = get_vocabulary("bytes")


def _review(i, title="", text=""):
  return uh.Interaction(item_id=f"P{i}", rating=1.0 + i % 5, timestamp=i, title=f"Product {i}",
                        categories=("Beauty",), review_title=title or f"title {i}", review_text=text or f"text {i}")


def _user(name, offset, heldout_title="Great gift", heldout_text="It arrived fast.\nWorks well."):
  history = tuple(_review(offset + i) for i in range(4))
  return uh.UserHistory(name, history, (_review(offset + 9, heldout_title, heldout_text),))


USERS = [_user("u1", 0), _user("u2", 20, "Too small", "Returned it.")]


@pytest.fixture(autouse=True)
def clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("field", tasks.REVIEW_FIELDS)
def test_review_examples_target_the_heldout_review_and_exclude_it_from_the_history(field):
  examples = tasks.amazon_review_examples(USERS, field)
  for example, user in zip(examples, USERS):
    heldout = user.heldout[0]
    assert example.target == (heldout.review_title if field == "title" else heldout.review_text)
    assert example.context == user.interactions and heldout not in example.context
    assert example.prompt == f"Product: {heldout.title}\nThe user's review {field}: "


def test_review_examples_reject_an_empty_target_and_an_unknown_field():
  heldout = dataclasses.replace(USERS[0].heldout[0], review_title="  ")
  empty = uh.UserHistory("u3", USERS[0].interactions, (heldout,))
  with pytest.raises(ValueError, match="'u3'.*empty title.*review_field='text'"):
    tasks.amazon_review_examples([empty], "title")
  assert tasks.amazon_review_examples([empty], "text")[0].target == USERS[0].heldout[0].review_text
  with pytest.raises(ValueError, match="review_field='rating'"):
    tasks.amazon_review_examples(USERS, "rating")


def _register(name="test.review", text_history_items=None):
  items = uh.ItemVocabulary.from_histories(USERS, include_heldout=True)
  categories = uh.ItemVocabulary(["Beauty"])
  spec = tasks.ChoiceTaskSpec(items=items, categories=categories, max_length=6,
                              text_history_items=text_history_items)
  examples = {"test": tasks.amazon_review_examples(USERS, "title")}
  return tasks.register_review_task(name, examples, spec, BYTES), examples


def test_review_batches_hold_left_padded_prompts_and_right_padded_targets_with_eos():
  task, examples = _register()
  batch = next(tasks.ReviewBatches(task, "test", max_target_length=12, references=True, batch_size=2,
                                   max_length=6, max_prompt_length=64, shuffle=False, repeat=False))
  assert batch["prompt_mask"][:, -1].all() and not batch["prompt_mask"][:, 0].any()
  for row, example in enumerate(examples["test"]):
    target = batch["target_tokens"][row][batch["target_mask"][row]]
    assert list(target) == BYTES.encode(example.target) + [BYTES.eos_id]
    prompt = batch["prompt_tokens"][row][batch["prompt_mask"][row]]
    assert BYTES.decode(list(prompt)) == example.prompt
    assert batch["references"][row] == example.target
    assert batch["history_mask"][row].sum() == 4  # the 4 earlier reviews, not the held-out one
  assert not batch["target_truncated"].any()
  # A target longer than max_target_length is cut for the loss and flagged; the reference stays whole.
  short = next(tasks.ReviewBatches(task, "test", max_target_length=5, references=True, batch_size=2,
                                   max_length=6, max_prompt_length=64, shuffle=False, repeat=False))
  assert short["target_truncated"].all() and short["target_mask"].all()
  assert short["references"] == [example.target for example in examples["test"]]
  with pytest.raises(ValueError, match="max_prompt_length"):
    next(tasks.ReviewBatches(task, "test", max_target_length=12, batch_size=2, max_length=6,
                             max_prompt_length=8, shuffle=False, repeat=False))
  # The text-prompt baseline writes the history before the same prompt.
  text_task, _ = _register("test.review.text", text_history_items=4)
  text_batch = next(tasks.ReviewBatches(text_task, "test", max_target_length=12, batch_size=2, max_length=6,
                                        max_prompt_length=None, shuffle=False, repeat=False))
  prompt = BYTES.decode(list(text_batch["prompt_tokens"][0][text_batch["prompt_mask"][0]]))
  assert "Product 0" in prompt and prompt.count("Product 9") == 1  # the held-out product: only the question
  assert prompt.endswith(examples["test"][0].prompt)


@pytest.fixture(scope="module")
def tiny_user_llm():
  """A UserLLM (random tiny llama, bytes vocabulary) with its cross-attention gates open; read only."""
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=BYTES.vocab_size), 0)
  config = m.UserEncoderConfig(num_items=40, num_categories=8, embed_dim=32, num_layers=1, num_heads=4,
                               mlp_dim=64, max_length=6)
  model = m.UserLLM(decoder, config, integration="cross_attention", num_latents=4, resampler_layers=1)
  for layer in model.cross_attention_layers:  # open the gates so the user tokens matter
    hook = model.decoder.layers[layer].after
    hook.attn_gate[...] = jnp.float32(2.0)
    hook.mlp_gate[...] = jnp.float32(2.0)
  return model


def _batch(prompt_length=10, target_length=6):
  rng = np.random.default_rng(0)
  prompt_mask = np.ones((2, prompt_length), bool)
  prompt_mask[1, :4] = False
  target_mask = np.ones((2, target_length), bool)
  target_mask[0, 4:] = False
  history_mask = np.ones((2, 6), bool)
  history_mask[1, 3:] = False
  return {"prompt_tokens": np.where(prompt_mask, rng.integers(3, 259, prompt_mask.shape), 0).astype(np.int32),
          "prompt_mask": prompt_mask,
          "target_tokens": np.where(target_mask, rng.integers(3, 259, target_mask.shape), 0).astype(np.int32),
          "target_mask": target_mask,
          "item_ids": np.where(history_mask, rng.integers(2, 40, (2, 6)), 0).astype(np.int32),
          "ratings": np.where(history_mask, rng.integers(1, 11, (2, 6)), 0).astype(np.int32),
          "genre_bits": np.where(history_mask, rng.integers(0, 256, (2, 6)), 0).astype(np.int32),
          "history_mask": history_mask, "target_truncated": np.zeros(2, bool)}


def test_review_loss_counts_only_the_target_tokens(tiny_user_llm):
  model, batch = tiny_user_llm, _batch()
  logits = nnx.jit(m.review_logits, static_argnums=2)(model, batch, "user_llm")
  loss, metrics = m.review_loss(logits, batch)
  log_probs = np.asarray(jax.nn.log_softmax(logits, -1))
  nll = [-log_probs[b, 10 + s - 1, batch["target_tokens"][b, s]]
         for b in range(2) for s in range(6) if batch["target_mask"][b, s]]
  assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(metrics["target_ce"]) == float(loss)


def test_generation_with_side_inputs_equals_teacher_forced_greedy_argmax(tiny_user_llm):
  model, batch = tiny_user_llm, _batch()
  steps = 8
  texts, generated = eval_lib.generate_reviews(model, batch, "user_llm", BYTES, steps)
  # Teacher-forced: the prompt followed by what was generated, in one forward pass with the user tokens.
  tokens = np.concatenate([batch["prompt_tokens"], generated], 1)
  mask = np.concatenate([batch["prompt_mask"], np.ones_like(generated, bool)], 1)
  logits = np.asarray(nnx.jit(lambda model, *args: model(*args))(model, batch, tokens, mask))
  greedy = logits[:, 9:9 + steps].argmax(-1)
  for row in range(2):
    stop = np.flatnonzero(generated[row] == BYTES.eos_id)
    length = int(stop[0]) + 1 if stop.size else steps
    np.testing.assert_array_equal(generated[row, :length], greedy[row, :length])
    assert texts[row] == BYTES.decode([int(t) for t in generated[row, :length] if t != BYTES.eos_id])
  # The check has teeth: without the user tokens the same decoder predicts differently.
  plain = np.asarray(nnx.jit(m.review_logits, static_argnums=2)(
      model.decoder, {**batch, "target_tokens": generated, "target_mask": np.ones_like(generated, bool)},
      "text_prompt"))
  assert not np.allclose(plain[:, 9:9 + steps], logits[:, 9:9 + steps], atol=1e-3)


def test_rouge_lsum_on_hand_examples():
  # One sentence: LCS("the cat sat", "the cat sat on the mat") = 3 -> P 1, R 1/2, F 2/3.
  assert tasks.rouge_lsum(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
  # Summary level (newline = sentence): union LCS 2 + 2 of 5 reference tokens, 4 predicted tokens:
  # R 4/5, P 1, F 8/9; averaged with an exact match (F 1).
  assert tasks.rouge_lsum(["a b\nd e", "Great gift"], ["a b c\nd e", "great gift!"]) == pytest.approx((8 / 9 + 1) / 2)
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    tasks.rouge_lsum(["a", "b"], ["a"])


def test_soft_prompt_generation_equals_a_step_by_step_reference():
  """The soft prompt generates: prefill of the user tokens + prompt as embeddings, then cached decoding,
  gives exactly the tokens of greedy decoding without a cache (the whole sequence through
  `UserLLM.__call__` at every step)."""
  decoder = pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=BYTES.vocab_size), 0)
  config = m.UserEncoderConfig(num_items=40, num_categories=8, embed_dim=32, num_layers=1, num_heads=4,
                               mlp_dim=64, max_length=6)
  model = m.UserLLM(decoder, config, integration="soft_prompt", num_latents=4, resampler_layers=1)
  batch, steps = _batch(), 6
  texts, generated = eval_lib.generate_reviews(model, batch, "user_llm", BYTES, steps)
  forward = nnx.jit(lambda model, *args: model(*args))
  tokens, mask, reference = batch["prompt_tokens"], batch["prompt_mask"], []
  for _ in range(steps):
    next_token = np.asarray(forward(model, batch, tokens, mask))[:, -1].argmax(-1).astype(np.int32)
    reference.append(next_token)
    tokens = np.concatenate([tokens, next_token[:, None]], 1)
    mask = np.concatenate([mask, np.ones((2, 1), bool)], 1)
  reference = np.stack(reference, 1)
  for row in range(2):
    stop = np.flatnonzero(reference[row] == BYTES.eos_id)
    length = int(stop[0]) + 1 if stop.size else steps
    np.testing.assert_array_equal(generated[row, :length], reference[row, :length])
    assert texts[row] == BYTES.decode([int(t) for t in reference[row, :length] if t != BYTES.eos_id])
  # Another user's history changes what is generated from the same prompt (the user tokens count).
  other = {**batch, "item_ids": np.where(batch["history_mask"], 2, 0).astype(np.int32)}
  logits = np.asarray(forward(model, batch, batch["prompt_tokens"], batch["prompt_mask"]))
  logits_other = np.asarray(forward(model, other, batch["prompt_tokens"], batch["prompt_mask"]))
  assert not np.allclose(logits, logits_other, atol=1e-4)
  # The job takes review generation with either integration.
  source = DecoderSource(pretrained=None, preset="tiny_llama", vocabulary="bytes")
  job_lib.UserLLMMethod(decoder=source, task="amazon_review", integration="soft_prompt")


@pytest.mark.slow
def test_review_smoke_run_lowers_the_target_loss_and_scores_rouge(tmp_path, shared_dir):
  del shared_dir  # the Amazon slice lives there
  workdir = tmp_path / "run"
  main_lib.run_main([str(GIN / "user_llm_review_smoke.gin")],
                    ["TrainConfig.num_steps = 30", "TrainConfig.eval_every = 15"], str(workdir))
  metrics = json.loads((workdir / "final_metrics.json").read_text())
  assert metrics["step"] == 30
  assert "eval/rougeLsum" in metrics["periodic_eval"]  # TrainConfig.eval_every is honoured
  table = json.loads((workdir / "eval_table.json").read_text())
  assert metrics["eval"]["target_ce"] < table["columns"]["untrained"]["target_ce"] - 1.0
  assert metrics["eval"]["examples"] == 23
  assert 0.0 <= metrics["eval"]["rougeLsum"] <= 1.0
  assert len(table["samples"]) == 3 and "generated:" in (workdir / "eval_table.md").read_text()
