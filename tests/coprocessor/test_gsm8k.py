"""GSM8K harness: the reader, answer extraction, scoring after an augmented prompt (batch == one at a
time == training's forward), generation (batch == one at a time), and the resumable job."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax.coprocessor import eval as eval_lib
from persona_jax.coprocessor import tasks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.errors import UserError
from persona_jax.nn import build_decoder, get_config
from persona_jax.nn.logprobs import token_log_probs

NUM_LATENTS = 3


def _perturb(module, seed):
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(module, jax.tree.unflatten(
      treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))


def _model(variant="full"):
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  model = CacheCoprocessor(decoder, num_latents=NUM_LATENTS, variant=variant, seed=1)
  if model.coprocessor is not None:
    _perturb(model.coprocessor, seed=2)
  return model


# Reader and answers -------------------------------------------------------------------------------
def test_reader_on_the_shared_files(shared_dir):
  data_dir = shared_dir / "data"
  test = tasks.read_gsm8k(data_dir, "test")
  train = tasks.read_gsm8k(data_dir, "train")
  assert (len(train), len(test)) == (7473, 1319)  # SOURCES.md
  assert test[0].question.startswith("Janet") and test[0].final_answer == "18"
  assert test[0].solution.endswith("#### 18") and [p.index for p in test[:3]] == [0, 1, 2]
  # Every final answer is the number on the solution's last line.
  for problem in test:
    last = problem.solution.splitlines()[-1]
    assert last.startswith("####") and eval_lib.normalize_number(last[4:]) == problem.final_answer
  subset = tasks.gsm8k_generation_subset(len(test))
  assert len(subset) == 220 and subset[:3] == [0, 6, 12] and subset[-1] == 1314
  shots = tasks.gsm8k_exemplars(train, 8)
  assert len({p.index for p in shots}) == 8 and shots == tasks.gsm8k_exemplars(train, 8)
  prompt = tasks.gsm8k_prompt(test[0].question, shots[:2])
  assert prompt.count("Question: ") == 3 and prompt.endswith(f"{test[0].question}\nAnswer:")
  assert prompt.startswith(f"Question: {shots[0].question}\nAnswer: {shots[0].solution}\n\n")


def test_reader_rejects_bad_rows(tmp_path):
  folder = tmp_path / "reasoning" / "gsm8k"
  folder.mkdir(parents=True)
  (folder / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "a\n#### 1,234"}) + "\n"
                                     + json.dumps({"question": "q2", "answer": "no number"}) + "\n")
  with pytest.raises(UserError, match=r"test.jsonl:2: .*####"):
    tasks.read_gsm8k(tmp_path, "test")
  (folder / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "a\n#### 1,234"}) + "\n")
  assert tasks.read_gsm8k(tmp_path, "test")[0].final_answer == "1234"
  with pytest.raises(UserError, match="missing"):
    tasks.read_gsm8k(tmp_path, "train")


@pytest.mark.parametrize("text,strict,lenient", [
    ("She makes 9 * 2 = $18.\n#### 18", "18", "18"),
    ("#### 1,000", "1000", "1000"),
    ("#### $5.50", "5.5", "5.5"),
    ("#### -3", "-3", "-3"),
    ("#### 18.00", "18", "18"),
    ("The answer is 42.", None, "42"),
    ("it costs $1,250.00 in total", None, "1250"),
    ("no number here", None, None),
    ("#### 7\nQuestion: 9", "7", "9"),
])
def test_answer_extraction(text, strict, lenient):
  assert eval_lib.extract_final_answer(text) == strict
  assert eval_lib.extract_last_number(text) == lenient


def test_cut_generation():
  assert eval_lib.cut_generation(" 3 + 4 = 7\n#### 7\n\nQuestion: next") == " 3 + 4 = 7\n#### 7"
  assert eval_lib.cut_generation(" so 5\n#### 5 apples\nmore") == " so 5\n#### 5 apples"
  assert eval_lib.cut_generation(" no end") == " no end"


# Scoring and generation ---------------------------------------------------------------------------
PROMPTS = [[5, 9, 17, 3, 8, 1, 4, 22, 13], [7, 2, 11], [30, 31, 32, 33, 34, 35]]
CONTINUATIONS = [[40, 41, 42, 43], [50, 51], [60, 61, 62, 63, 64, 65]]


@pytest.mark.parametrize("variant", ["full", "pause"])
def test_scoring_a_left_padded_batch_equals_one_prompt_at_a_time(variant):
  model = _model(variant)
  batched = {i: (b, a) for i, b, a in eval_lib.score_continuations(
      model, PROMPTS, CONTINUATIONS, batch_size=4, prompt_width=16, continuation_width=8)}
  assert sorted(batched) == [0, 1, 2]
  for i, (prompt, continuation) in enumerate(zip(PROMPTS, CONTINUATIONS)):
    [(_, base, aug)] = list(eval_lib.score_continuations(model, [prompt], [continuation],
                                                         batch_size=1))
    np.testing.assert_allclose(batched[i][0], base, atol=2e-5)
    np.testing.assert_allclose(batched[i][1], aug, atol=2e-5)
    assert base.shape == aug.shape == (len(continuation),)

    # Independent references: the frozen decoder over prompt + continuation, and training's
    # forward with one trace at the prompt's second-last token (the cache holds the prompt but its
    # last token; the last token is the first ahead token).
    tokens = jnp.asarray([prompt + continuation])
    logits = model.decoder(tokens).logits
    plain = -token_log_probs(logits[:, len(prompt) - 1:-1], tokens[:, len(prompt):])[0]
    np.testing.assert_allclose(base, plain, atol=2e-5)
    seq = tokens.shape[1]
    training = model.forward_traces(tokens, jnp.ones_like(tokens), jnp.arange(seq)[None],
                                    jnp.array([[len(prompt) - 2]]), len(continuation),
                                    with_baseline=True)
    np.testing.assert_allclose(aug, training["nll"][0, 0], atol=3e-5)
    np.testing.assert_allclose(base, training["baseline_nll"][0, 0], atol=2e-5)
  # The latents change the prediction (the test could fail).
  assert not np.allclose(batched[0][0], batched[0][1], atol=1e-3)


def test_generation_of_a_left_padded_batch_equals_one_prompt_at_a_time():
  model = _model()
  decode = lambda ids: " ".join(map(str, ids))
  for augment in (False, True):
    batched = dict(eval_lib.generate_texts(model, PROMPTS, decode, augment=augment,
                                           max_new_tokens=6, batch_size=2, prompt_width=16,
                                           stop_tokens=()))
    for i, prompt in enumerate(PROMPTS):
      [(_, alone)] = list(eval_lib.generate_texts(model, [prompt], decode, augment=augment,
                                                  max_new_tokens=6, batch_size=1, stop_tokens=()))
      assert batched[i] == alone and len(alone.split()) == 6


def test_gsm8k_summary_pairs_problems():
  rows = [{"kind": "nll", "shots": 0, "index": i, "baseline_nll": [1.0, 2.0],
           "augmented_nll": [1.0 - 0.1 * (i % 2), 2.0]} for i in range(20)]
  rows += [{"kind": "generation", "shots": 0, "index": i, "baseline_strict_correct": i < 5,
            "augmented_strict_correct": i < 7, "baseline_lenient_correct": i < 5,
            "augmented_lenient_correct": i < 5} for i in range(20)]
  summary = eval_lib.gsm8k_summary(rows, resamples=500)["0-shot"]
  # Closed form: 10 problems lower one token by 0.1: mean diff over 40 tokens = -1.0 / 40.
  per_token = summary["nll"]["relative_change_per_token"]
  assert per_token["value"] == pytest.approx(np.expm1(-1.0 / 40))
  assert per_token["low"] <= per_token["value"] <= per_token["high"] < 0
  strict = summary["generation"]["strict"]
  assert strict["baseline"]["value"] == 0.25 and strict["augmented"]["value"] == 0.35
  assert strict["difference"]["value"] == pytest.approx(0.10)
  assert summary["generation"]["lenient"]["difference"]["value"] == 0.0
  table = eval_lib.format_gsm8k_table(eval_lib.gsm8k_summary(rows, resamples=200))
  assert table.count("| 0-shot |") == 4


@pytest.mark.slow
def test_gsm8k_job_writes_rows_and_resumes(tmp_path, shared_dir):
  """The registered method on a tiny model: rows per problem, a rerun scores nothing new."""
  from persona_jax.coprocessor.job import Coprocessor, CoprocessorGsm8k
  from persona_jax.hf.source import DecoderSource
  from persona_jax.train.method import Run
  from persona_jax.train.trainer import TrainConfig

  def method():
    copro = Coprocessor(decoder=DecoderSource(pretrained=None, preset="tiny_llama",
                                              vocabulary="bytes"), num_latents=2)
    job = CoprocessorGsm8k(coprocessor=copro, data_dir=str(shared_dir / "data"), shots=[0, 1],
                           score_problems=6, generation_every=3, max_new_tokens=4, batch_size=4)
    job.setup(str(tmp_path))
    return job

  job = method()
  model = job.model()
  job.restored_from = ("none", 0)
  evaluation = job.evaluate(model, 0)
  lines = (tmp_path / "gsm8k_rows.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert rows[0]["kind"] == "settings"
  assert sum(r["kind"] == "nll" for r in rows) == 12  # 6 problems x 2 settings
  assert sum(r["kind"] == "generation" for r in rows) == 4  # problems 0 and 3, x 2 settings
  assert "| 1-shot | greedy accuracy (strict) |" in evaluation.tables["gsm8k_table"]
  again = method()
  again.restored_from = ("none", 0)
  second = again.evaluate(again.model(), 0)
  assert (tmp_path / "gsm8k_rows.jsonl").read_text().splitlines() == lines  # nothing re-scored
  assert second.tables == evaluation.tables
  del Run, TrainConfig
