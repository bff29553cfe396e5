"""Tests of persona_jax.sampling.

Tiny random models: the reference for every decoding test is the plain recomputation (run the whole
sequence through the decoder without a cache, take the last position's logits, pick, append,
repeat), plus closed-form sampling frequencies. SmolLM2-135M-Instruct (slow): our batched greedy
`generate` against transformers' `generate(do_sample=False)` on the same GGUF file.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn, sampling


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gemma2"])
def decoder(request):
  # tiny_gemma2 has a sliding window of 8: shorter than prompt + generation, so the cache's
  # per-slot positions and the window are exercised too.
  return nn.build_decoder(nn.get_config(request.param), seed=3)


@pytest.fixture(scope="module")
def llama():
  return nn.build_decoder(nn.get_config("tiny_llama"), seed=1)


REFERENCE_LEN = 32


@nnx.jit
def _full_forward_log_probs(decoder, tokens):
  return jax.nn.log_softmax(decoder(tokens).logits, axis=-1)


def full_forward_log_probs(decoder, tokens: list[int]) -> np.ndarray:
  """log_softmax of the next-token logits after `tokens`, by the cache-free forward. `[vocab]`.

  The sequence is right-padded to a fixed length (one compilation); causal attention makes the
  logits at position `len(tokens) - 1` independent of what follows.
  """
  padded = np.zeros((1, REFERENCE_LEN), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_full_forward_log_probs(decoder, jnp.asarray(padded))[0, len(tokens) - 1])


def reference_greedy(decoder, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
  tokens, logprobs = list(prompt), []
  for _ in range(steps):
    log_probs = full_forward_log_probs(decoder, tokens)
    tokens.append(int(np.argmax(log_probs)))
    logprobs.append(float(log_probs[tokens[-1]]))
  return tokens[len(prompt):], logprobs


PROMPTS = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12], [200, 100]]
# Most tests share these shapes (3 prompts, 6 new tokens) so the compiled programs are reused.
STEPS = 6


def test_greedy_equals_argmax_of_full_forward(decoder):
  result = sampling.generate(decoder, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  for row, prompt in enumerate(PROMPTS):
    expected_tokens, expected_logprobs = reference_greedy(decoder, prompt, STEPS)
    assert result.tokens[row].tolist() == expected_tokens, f"row {row}"
    np.testing.assert_allclose(result.logprobs[row], expected_logprobs, atol=1e-4)
  assert result.lengths.tolist() == [STEPS] * len(PROMPTS)
  assert result.tokens.dtype == jnp.int32 and result.logprobs.dtype == jnp.float32


def test_batched_prompts_of_different_lengths_equal_each_alone(decoder):
  batched = sampling.generate(decoder, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  for row in (0, 1):  # the shortest is covered by the greedy test; spare a compilation
    alone = sampling.generate(decoder, [PROMPTS[row]], max_new_tokens=STEPS, stop_tokens=(),
                              prompt_bucket=1)  # no padding at all
    assert batched.tokens[row].tolist() == alone.tokens[0].tolist(), f"row {row}"
    np.testing.assert_allclose(batched.logprobs[row], alone.logprobs[0], atol=1e-4)


def test_stop_tokens_stop_each_row(llama):
  free = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  free_tokens = np.asarray(free.tokens)
  stop = int(free_tokens[0, 2])  # row 0 emits it at step 2 (or earlier)
  first_stop = [int(np.argmax(row == stop)) if (row == stop).any() else None for row in free_tokens]
  result = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=[stop], pad_id=-1)
  for row in range(len(PROMPTS)):
    tokens = np.asarray(result.tokens[row])
    if first_stop[row] is None:
      assert not result.done[row] and int(result.lengths[row]) == STEPS
      np.testing.assert_array_equal(tokens, free_tokens[row])
    else:
      length = first_stop[row] + 1  # the stop token is emitted and counted
      assert result.done[row] and int(result.lengths[row]) == length
      np.testing.assert_array_equal(tokens[:length], free_tokens[row, :length])
      assert (tokens[length:] == -1).all()
      assert (np.asarray(result.logprobs[row, length:]) == 0).all()


def test_loop_ends_when_all_rows_stopped(llama):
  prompt = PROMPTS[1]
  free = sampling.generate(llama, [prompt], max_new_tokens=STEPS, stop_tokens=(), prompt_bucket=1)
  stop = int(free.tokens[0, 1])
  result = sampling.generate(llama, [prompt], max_new_tokens=STEPS, stop_tokens=[stop],
                             prompt_bucket=1)
  length = int(np.argmax(np.asarray(free.tokens[0]) == stop)) + 1
  assert int(result.lengths[0]) == length and bool(result.done[0])
  # The loop stopped there: the cache holds only the prompt and the emitted tokens.
  assert int(result.state.cache[0]["length"]) == len(prompt) + length


def test_top_k_one_and_tiny_top_p_equal_greedy(llama):
  greedy = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  top_k = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=(), temperature=1.0,
                            top_k=1, rng=jax.random.key(0))
  top_p = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=(), temperature=1.0,
                            top_p=1e-6, rng=jax.random.key(0))
  np.testing.assert_array_equal(top_k.tokens, greedy.tokens)
  np.testing.assert_array_equal(top_p.tokens, greedy.tokens)
  # Log-probs are always under the unmodified distribution, whatever the truncation.
  np.testing.assert_allclose(top_k.logprobs, greedy.logprobs, atol=1e-5)


SAMPLING = dict(max_new_tokens=STEPS, stop_tokens=(), temperature=1.5, top_k=40, top_p=0.95)


def test_temperature_sampling_deterministic_per_key_and_different_across_keys(llama):
  first = sampling.generate(llama, PROMPTS, rng=jax.random.key(7), **SAMPLING)
  again = sampling.generate(llama, PROMPTS, rng=jax.random.key(7), **SAMPLING)
  other = sampling.generate(llama, PROMPTS, rng=jax.random.key(8), **SAMPLING)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))


def test_sampled_logprobs_are_log_softmax_of_full_forward(decoder):
  result = sampling.generate(decoder, PROMPTS, rng=jax.random.key(3), **SAMPLING)
  for row, prompt in enumerate(PROMPTS):
    tokens = list(prompt)
    for step in range(STEPS):
      log_probs = full_forward_log_probs(decoder, tokens)
      sampled = int(result.tokens[row, step])
      assert sampled in np.argsort(-log_probs)[:SAMPLING["top_k"]]  # top-k respected
      np.testing.assert_allclose(float(result.logprobs[row, step]), log_probs[sampled], atol=1e-4)
      tokens.append(sampled)


def test_sample_tokens_top_k_top_p_closed_form():
  # Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (mass before token 1 is 0.5 < 0.7,
  # before token 2 it is 0.8), so they are drawn with 0.5/0.8 and 0.3/0.8.
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  nucleus = np.asarray(jax.vmap(lambda k: sampling.sample_tokens(
      logits, k, greedy=False, top_p=0.7)[0])(keys))
  assert set(nucleus.tolist()) == {0, 1}
  assert abs((nucleus == 0).mean() - 0.625) < 0.03
  top3 = np.asarray(jax.vmap(lambda k: sampling.sample_tokens(logits, k, greedy=False, top_k=3)[0])(keys))
  assert set(top3.tolist()) == {0, 1, 2}
  assert abs((top3 == 2).mean() - 0.15 / 0.95) < 0.03
  # Temperature 0.5 squares the probabilities (then renormalizes).
  cold = np.asarray(jax.vmap(lambda k: sampling.sample_tokens(
      logits, k, greedy=False, temperature=0.5)[0])(keys))
  squared = np.asarray([0.25, 0.09, 0.0225, 0.0025])
  assert abs((cold == 0).mean() - squared[0] / squared.sum()) < 0.03


def test_prefill_then_decode_equals_generate_and_continues(llama):
  prompt_tokens, prompt_mask = sampling.pad_prompts(PROMPTS, length_multiple=16)
  whole = sampling.generate(llama, (prompt_tokens, prompt_mask), max_new_tokens=STEPS,
                            stop_tokens=())
  state = sampling.prefill(llama, prompt_tokens, prompt_mask, max_len=64)
  first = sampling.decode(llama, state, max_new_tokens=STEPS // 2)
  second = sampling.decode(llama, first.state, max_new_tokens=STEPS // 2)
  np.testing.assert_array_equal(np.concatenate([first.tokens, second.tokens], axis=1), whole.tokens)
  np.testing.assert_allclose(np.concatenate([first.logprobs, second.logprobs], axis=1),
                             whole.logprobs, atol=1e-5)


def test_method_can_append_to_the_cache_between_prefill_and_decode(llama):
  """The coprocessor pattern: prefill, append embeddings to the cache, decode.

  Appending the embeddings of tokens B after prompt A must decode like the prompt A + B.
  """
  prompt_a, suffix_b = PROMPTS[0], [23, 42, 7]
  state = sampling.prefill(llama, np.asarray([prompt_a]), np.ones((1, len(prompt_a)), bool),
                           max_len=64)
  start = int(state.cache[0]["length"])
  key_valid = state.key_valid.at[:, start:start + len(suffix_b)].set(True)
  positions = state.next_positions[:, None] + jnp.arange(len(suffix_b))
  out = llama(embeddings=llama.embed(jnp.asarray([suffix_b])), positions=positions,
              attention_mask=nn.cache_mask(key_valid, len(suffix_b), start), cache=state.cache)
  appended = sampling.PrefillState(cache=out.cache, logits=out.logits[:, -1], key_valid=key_valid,
                                   next_positions=state.next_positions + len(suffix_b))
  result = sampling.decode(llama, appended, max_new_tokens=STEPS)
  expected, _ = reference_greedy(llama, prompt_a + suffix_b, STEPS)
  assert result.tokens[0].tolist() == expected


def test_compiles_once_per_shape_bucket_and_weights_are_arguments(llama):
  sampling.generate(llama, [[1, 2, 3]], max_new_tokens=5)
  prefill_programs = sampling._prefill_program._cache_size()
  decode_programs = sampling._decode_donating._cache_size()
  other_weights = nn.build_decoder(llama.config, seed=99)
  a = sampling.generate(llama, [[1, 2, 3, 4, 5, 6]], max_new_tokens=5)  # same 16-token bucket
  b = sampling.generate(other_weights, [[1, 2, 3, 4, 5, 6]], max_new_tokens=5)
  assert sampling._prefill_program._cache_size() == prefill_programs
  assert sampling._decode_donating._cache_size() == decode_programs
  assert not np.array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))  # weights really differ


def test_user_errors_are_clear(llama):
  with pytest.raises(ValueError, match="left-padded"):
    sampling.prefill(llama, np.asarray([[1, 2, 0]]), np.asarray([[True, True, False]]), max_len=8)
  with pytest.raises(ValueError, match="explicit `rng`"):
    sampling.generate(llama, [[1, 2]], max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="at least one token"):
    sampling.generate(llama, [[1, 2], []], max_new_tokens=2)
  state = sampling.prefill(llama, np.asarray([[1, 2, 3]]), np.ones((1, 3), bool), max_len=8)
  with pytest.raises(ValueError, match="larger max_len"):
    sampling.decode(llama, state, max_new_tokens=6)


# SmolLM2-135M-Instruct against transformers on the same GGUF -------------------------------------
SMOLLM2 = "smollm2-135m-instruct"
CHATS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
]


@pytest.fixture(scope="module")
def smollm2_hf():
  """transformers' own model read from the same GGUF file, fp32."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from persona_jax.hf import SHORT_NAMES  # pylint: disable=g-import-not-at-top
  entry = SHORT_NAMES[SMOLLM2]
  spec = importlib.util.find_spec(entry.package)
  if spec is None:
    pytest.skip(f"SmolLM2 GGUF not installed: {entry.install}")
  return transformers.AutoModelForCausalLM.from_pretrained(
      list(spec.submodule_search_locations)[0], gguf_file=entry.filename, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
  from persona_jax.hf import load_pretrained  # pylint: disable=g-import-not-at-top
  return load_pretrained(SMOLLM2)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate_and_answers_paris(smollm2_hf, smollm2):
  """Our batched greedy `generate` (three chat prompts, left-padded together) equals transformers'
  `generate(do_sample=False)` run on each prompt alone, token for token up to and including EOS."""
  torch = pytest.importorskip("torch")
  from persona_jax.hf import apply_chat_template  # pylint: disable=g-import-not-at-top
  max_new_tokens = 24
  prompts = [
      smollm2.tokenizer.encode(apply_chat_template(
          smollm2.chat_template, [{"role": "user", "content": chat}], True,
          **smollm2.special_tokens)).ids
      for chat in CHATS]
  eos = smollm2.config.eos_token_id
  ours = sampling.generate(smollm2.decoder, prompts, max_new_tokens=max_new_tokens,
                           stop_tokens=[eos])
  for row, prompt in enumerate(prompts):
    with torch.inference_mode():
      sequence = smollm2_hf.generate(
          torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
          do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    want = sequence[0, len(prompt):].tolist()
    if eos in want:
      want = want[:want.index(eos) + 1]
    length = int(ours.lengths[row])
    assert ours.tokens[row, :length].tolist() == want, f"prompt {CHATS[row]!r}"
    assert bool(ours.done[row]) == (want[-1] == eos)
  answer = smollm2.tokenizer.decode(ours.tokens[0, :int(ours.lengths[0])].tolist())
  assert "Paris" in answer, answer


@pytest.mark.parametrize("decode_weights", ["bfloat16", "int8"])
def test_decode_weights_generate_equals_converted_decoder_and_compiles_once(llama, decode_weights):
  from persona_jax.nn import quantization  # pylint: disable=g-import-not-at-top
  converted = quantization.convert_decoder_weights(llama, decode_weights)
  expected = sampling.generate(converted, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  prefill_programs = sampling._prefill_program._cache_size()
  decode_programs = sampling._decode_donating._cache_size()
  result = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=(),
                             decode_weights=decode_weights)
  other = sampling.generate(nn.build_decoder(llama.config, seed=98), PROMPTS, max_new_tokens=STEPS,
                            stop_tokens=(), decode_weights=decode_weights)
  np.testing.assert_array_equal(result.tokens, expected.tokens)
  np.testing.assert_array_equal(result.logprobs, expected.logprobs)
  # One compilation per shape bucket: converting new weights does not recompile.
  assert sampling._prefill_program._cache_size() == prefill_programs
  assert sampling._decode_donating._cache_size() == decode_programs
  assert not np.array_equal(np.asarray(result.logprobs), np.asarray(other.logprobs))
  # Greedy from int8/bf16 weights stays close to fp32 on a tiny random model.
  full = sampling.generate(llama, PROMPTS, max_new_tokens=STEPS, stop_tokens=())
  assert np.abs(np.asarray(result.logprobs) - np.asarray(full.logprobs)).max() < 0.5
