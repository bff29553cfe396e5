"""The lm-evaluation-harness adapter: offline tasks over the local GSM8K JSONL (a task YAML with
`dataset_path: json`), run by `lm_eval.simple_evaluate` on a tiny random decoder with the bytes
vocabulary; the harness's loglikelihoods equal the decoder's own, its generations equal the sampler's,
and a method's hook (a callable) replaces the forward pass."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persona_jax import nn as pnn
from persona_jax import sampling
from persona_jax.data import get_vocabulary
from persona_jax.evaluation.lm_eval_adapter import DecoderLM, lm_eval_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GSM8K = REPO_ROOT.parent / "shared" / "data" / "reasoning" / "gsm8k" / "test.jsonl"
NUM_DOCS = 3

TASKS_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
output_type: {output_type}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{target}"
{extra}
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def decoder():
  return pnn.build_decoder(pnn.get_config("tiny_llama", vocab_size=259), seed=0)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  if not GSM8K.is_file():
    pytest.skip(f"{GSM8K} not found: the local GSM8K lies beside the checkout.")
  path = tmp_path_factory.mktemp("gsm8k") / "test.jsonl"
  with GSM8K.open() as lines:  # a few short questions keep the test fast
    docs = [json.loads(line) for line in lines]
  docs = sorted(docs, key=lambda d: len(d["question"]))[:NUM_DOCS]
  path.write_text("".join(json.dumps(d) + "\n" for d in docs))
  return path, docs


def _task_dir(tmp_path, data_file):
  answer = "{{answer.split('####')[-1].strip()}}"
  specs = {
      "gsm8k_local_loglikelihood": ("loglikelihood", " " + answer,
                                    "metric_list:\n  - metric: acc\n  - metric: perplexity"),
      "gsm8k_local_generate": ("generate_until", answer,
                               "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
                               "  do_sample: false\nmetric_list:\n  - metric: exact_match"),
      "gsm8k_local_rolling": ("loglikelihood_rolling", "{{question}}",
                              "metric_list:\n  - metric: word_perplexity"),
  }
  for name, (output_type, target, extra) in specs.items():
    (tmp_path / f"{name}.yaml").write_text(TASKS_YAML.format(
        name=name, data_file=data_file, output_type=output_type, target=target, extra=extra))
  return tmp_path, list(specs)


def _own_log_likelihood(decoder, context, continuation):
  """log p(continuation | context) from one plain forward pass of the decoder (no padding)."""
  tokens = jnp.asarray([context + continuation], jnp.int32)
  log_probs = jax.nn.log_softmax(decoder(tokens[:, :-1]).logits[0].astype(jnp.float32), axis=-1)
  targets = np.asarray(context + continuation)[1:]
  picked = np.asarray(log_probs)[np.arange(len(targets)), targets]
  return float(picked[len(context) - 1:].sum())


def test_lm_eval_is_not_imported_by_the_core():
  code = ("import sys, persona_jax.evaluation.lm_eval_adapter, persona_jax.evaluation, persona_jax.train;"
          "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_harness_loglikelihoods_and_generations_equal_the_decoders_own(tmp_path, decoder, data_file):
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval.tasks import TaskManager

  path, docs = data_file
  task_dir, tasks = _task_dir(tmp_path, path)
  model = lm_eval_model(decoder, "bytes", batch_size=4, length_bucket=32, max_gen_toks=6)
  results = lm_eval.simple_evaluate(model=model, tasks=tasks,
                                    task_manager=TaskManager(include_path=str(task_dir)),
                                    log_samples=True, num_fewshot=0, bootstrap_iters=0,
                                    random_seed=0, numpy_random_seed=0, torch_random_seed=0)
  samples = results["samples"]
  vocabulary = get_vocabulary("bytes")
  encode = lambda text: [int(t) for t in vocabulary.encode(text)]

  # loglikelihood: the harness's (sum log p, is_greedy) per document equals one plain forward pass.
  rows = sorted(samples["gsm8k_local_loglikelihood"], key=lambda s: s["doc_id"])
  assert len(rows) == NUM_DOCS
  for row in rows:
    doc = docs[row["doc_id"]]
    context = encode(f"Question: {doc['question']}\nAnswer:")
    continuation = encode(" " + doc["answer"].split("####")[-1].strip())
    (log_likelihood, is_greedy), = row["resps"][0]
    np.testing.assert_allclose(float(log_likelihood),
                               _own_log_likelihood(decoder, context, continuation), rtol=1e-5)
    assert isinstance(is_greedy, bool) or is_greedy in ("True", "False")
  assert 0.0 <= results["results"]["gsm8k_local_loglikelihood"]["acc,none"] <= 1.0

  # generate_until: greedy text equals the sampler's own output, cut at the stop string.
  rows = sorted(samples["gsm8k_local_generate"], key=lambda s: s["doc_id"])
  prompts = [encode(f"Question: {docs[r['doc_id']]['question']}\nAnswer:") for r in rows]
  for row, prompt in zip(rows, prompts):
    result = sampling.generate(decoder, [prompt], max_new_tokens=6, stop_tokens=(vocabulary.eos_id,))
    own = [int(t) for t in np.asarray(result.tokens)[0, :int(result.lengths[0])] if t != vocabulary.eos_id]
    assert row["resps"][0][0] == vocabulary.decode(own).split("\n")[0]

  # loglikelihood_rolling: one window (the question fits max_length), conditioned on the prefix token.
  rows = sorted(samples["gsm8k_local_rolling"], key=lambda s: s["doc_id"])
  for row in rows:
    text = encode(docs[row["doc_id"]]["question"])
    own = _own_log_likelihood(decoder, [model.adapter.prefix_token_id], text)
    np.testing.assert_allclose(float(row["resps"][0][0]), own, rtol=1e-5)


def test_rolling_windows_cover_every_token_once_and_agree_with_one_window(decoder):
  long_lm = DecoderLM(decoder, "bytes", batch_size=2, length_bucket=8, max_length=64)
  short_lm = DecoderLM(decoder, "bytes", batch_size=2, length_bucket=8, max_length=16)
  text = "Natalia sold clips to 48 of her friends in April."
  tokens = short_lm.encode(text)
  windows = short_lm.rolling_windows(tokens)
  assert len(windows) == 4 and [t for _, c in windows for t in c] == tokens
  assert all(len(context) + len(continuation) - 1 <= 16 for context, continuation in windows)
  # With max_length covering the text there is one window: the decoder's own log-likelihood.
  (single,) = long_lm.loglikelihood_rolling([(text,)])
  np.testing.assert_allclose(single, _own_log_likelihood(decoder, [long_lm.prefix_token_id], tokens),
                             rtol=1e-5)
  windowed = short_lm.loglikelihood_rolling([(text,)])[0]
  assert np.isfinite(windowed) and windowed != pytest.approx(single)  # less context per window


def test_a_method_supplies_its_own_forward_through_a_callable(decoder):
  calls = []

  def memory_logits_fn(tokens):  # e.g. a decoder with injected memory: here a bias toward token 42
    calls.append(tokens.shape)
    return decoder(tokens).logits + 100.0 * jax.nn.one_hot(42, 259)

  def memory_generate_fn(prompts, max_new_tokens, stop_tokens, temperature):
    return [[42 + 3] * max_new_tokens for _ in prompts]  # bytes vocabulary: byte b is id b + 3

  lm = DecoderLM(decoder, "bytes", batch_size=2, logits_fn=memory_logits_fn,
                 generate_fn=memory_generate_fn)
  (log_likelihood, is_greedy), = lm.score([([5, 6, 7], [42, 42])])
  assert is_greedy and log_likelihood > -1e-3 and calls == [(2, 64)]
  assert lm.generate_until([("Q:", {"until": ["*"], "max_gen_toks": 3})]) == [""]  # cut at the stop
  assert lm.generate_until([("Q:", {"until": ["\n"], "max_gen_toks": 3})]) == ["***"]


def test_bad_requests_are_clear_errors(decoder):
  lm = DecoderLM(decoder, "bytes", max_length=8)
  with pytest.raises(ValueError, match="empty continuation"):
    lm.score([([1, 2], [])])
  with pytest.raises(ValueError, match="does not fit max_length=8"):
    lm.score([([1], list(range(3, 13)))])
  with pytest.raises(ValueError, match="needs a decoder"):
    DecoderLM(None, "bytes")
