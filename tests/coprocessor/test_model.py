"""The cache coprocessor's forward: trace isolation, one pass == a loop, inference == training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax.coprocessor import masks
from persona_jax.coprocessor.model import CacheCoprocessor
from persona_jax.nn import (build_decoder, cache_mask, get_config, init_cache, positions_from_mask)

NUM_LATENTS = 3
AHEAD = 4
SEQ = 24


def _perturb(module, seed):
  """Moves every parameter of `module` off its initial value (so coprocessor != decoder)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(module, jax.tree.unflatten(treedef, noisy))


@nnx.jit(static_argnums=(5, 6))
def _forward(model, tokens, segment_ids, positions, trace_positions, ahead, with_baseline=True):
  return model.forward_traces(tokens, segment_ids, positions, trace_positions, ahead,
                              with_baseline=with_baseline)


def _model(preset="tiny_llama", variant="full"):
  decoder = build_decoder(get_config(preset), seed=0)
  model = CacheCoprocessor(decoder, num_latents=NUM_LATENTS, variant=variant, lora_rank=4, seed=1)
  if model.coprocessor is not None:
    _perturb(model.coprocessor, seed=2)
  return model


def _batch(packed=False):
  tokens = jax.random.randint(jax.random.key(3), (2, SEQ), 0, 256)
  if packed:  # row 0: two documents; row 1: one document and padding
    segment_ids = jnp.array([[1] * 11 + [2] * 13, [1] * 20 + [0] * 4], jnp.int32)
    positions = jnp.array([list(range(11)) + list(range(13)), list(range(20)) + [0] * 4], jnp.int32)
  else:
    segment_ids = jnp.ones((2, SEQ), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
  return tokens, segment_ids, positions


@pytest.mark.parametrize("preset,variant", [("tiny_llama", "full"), ("tiny_gemma2", "full"),
                                            ("tiny_llama", "pause"), ("tiny_llama", "activations"),
                                            ("tiny_gemma", "lora")])
def test_single_pass_equals_loop_over_traces(preset, variant):
  model = _model(preset, variant)
  tokens, segment_ids, positions = _batch(packed=True)
  trace_positions, valid = masks.sample_trace_positions(jax.random.key(4), segment_ids, 4, AHEAD)
  assert bool(valid.all())
  together = _forward(model, tokens, segment_ids, positions, trace_positions, AHEAD)
  for k in range(trace_positions.shape[1]):
    alone = _forward(model, tokens, segment_ids, positions, trace_positions[:, k:k + 1], AHEAD)
    np.testing.assert_allclose(together["nll"][:, k], alone["nll"][:, 0], atol=2e-5)
    np.testing.assert_allclose(together["baseline_nll"][:, k], alone["baseline_nll"][:, 0], atol=2e-5)


@pytest.mark.parametrize("variant", ["full", "activations"])
def test_trace_sees_no_later_original_and_no_other_trace(variant):
  model = _model("tiny_llama", variant)
  tokens, segment_ids, positions = _batch(packed=True)
  trace_positions = jnp.array([[3, 14, 8], [5, 12, 9]], jnp.int32)
  originals = model.encode_originals(tokens, segment_ids, positions, num_traces=3, ahead_tokens=AHEAD)
  kv = [(layer["k"], layer["v"]) for layer in originals["cache"]]

  def trace_loss(kv, hidden, row, k, trace_positions=trace_positions):
    cache = tuple(dict(layer, k=k_, v=v_) for layer, (k_, v_) in zip(originals["cache"], kv))
    nll = model.augmented_nll({"cache": cache, "hidden": hidden}, tokens, segment_ids, positions,
                              trace_positions, AHEAD)["nll"]
    return nll[row, k].sum()

  trace_grads = jax.jit(jax.grad(trace_loss, argnums=(0, 1)))

  for row in range(2):
    for k in range(3):
      p = int(trace_positions[row, k])
      seg = int(segment_ids[row, p])
      grad_kv, grad_hidden = trace_grads(kv, originals["hidden"], row, k)
      visible = (np.arange(SEQ) <= p) & (np.asarray(segment_ids[row]) == seg)
      # Per original slot: largest |gradient| over layers, k/v, heads and features.
      per_slot = np.max([np.abs(np.asarray(g[row, :SEQ])).max(axis=(1, 2)) for pair in grad_kv
                         for g in pair], axis=0)
      if variant == "activations":
        per_slot = np.maximum(per_slot, np.abs(np.asarray(grad_hidden[row])).max(axis=-1))
      assert np.all(per_slot[~visible] == 0.0), (row, k, np.nonzero(per_slot[~visible]))
      assert np.all(per_slot[visible] > 0.0)

  # Moving the other traces does not change trace 0's loss.
  loss = jax.jit(trace_loss)
  base = loss(kv, originals["hidden"], 0, 0)
  moved = trace_positions.at[:, 1:].set(jnp.array([[6, 17], [2, 15]]))
  np.testing.assert_allclose(loss(kv, originals["hidden"], 0, 0, moved), base, rtol=1e-6)


def test_coprocessor_starts_as_the_decoder():
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  for variant in ("full", "lora", "activations"):
    model = CacheCoprocessor(decoder, num_latents=2, variant=variant)
    base = nnx.state(model.coprocessor, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    jax.tree.map(np.testing.assert_array_equal, base, nnx.state(decoder, nnx.Param))
  scratch = CacheCoprocessor(decoder, num_latents=2, variant="scratch")
  assert not np.array_equal(scratch.coprocessor.embedding[...], decoder.embedding[...])


def test_trainable_filter_selects_the_variant_parameters():
  decoder = build_decoder(get_config("tiny_llama"), seed=0)
  decoder_params = nnx.state(decoder, nnx.Param)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  unused_embedding = decoder.embedding[...].size  # the coprocessor never looks up tokens
  for variant, expected in [("full", count(decoder_params) - unused_embedding), ("pause", 0)]:
    model = CacheCoprocessor(decoder, num_latents=2, variant=variant)
    trainable = nnx.state(model, model.trainable_filter())
    assert count(trainable) == expected + 2 * decoder.config.embed_dim
  lora = CacheCoprocessor(decoder, num_latents=2, variant="lora", lora_rank=4)
  trainable = nnx.state(lora, lora.trainable_filter())
  assert count(trainable) == count(nnx.state(lora, nnx.LoRAParam)) + 2 * decoder.config.embed_dim


@pytest.mark.parametrize("preset,variant", [("tiny_llama", "full"), ("tiny_gemma2", "full"),
                                            ("tiny_llama", "pause")])
def test_inference_augmentation_matches_training_forward(preset, variant):
  """Left-padded prompts: cache all but the last token, augment, feed the rest: training's NLL."""
  model = _model(preset, variant)
  full = jax.random.randint(jax.random.key(5), (2, 16), 0, 256)
  prompt_lengths = [9, 6]
  width = max(prompt_lengths) - 1  # the cache holds each prompt but its last token
  cache_size = width + NUM_LATENTS + AHEAD
  heads = np.zeros((2, width), np.int32)
  head_mask = np.zeros((2, width), bool)
  for row, length in enumerate(prompt_lengths):  # left padding
    heads[row, width - (length - 1):] = full[row, :length - 1]
    head_mask[row, width - (length - 1):] = True
  key_valid = jnp.pad(jnp.asarray(head_mask), ((0, 0), (0, cache_size - width)))
  cache = init_cache(model.decoder.config, 2, cache_size)
  prefill = model.decoder(jnp.asarray(heads), positions=positions_from_mask(head_mask),
                          attention_mask=cache_mask(key_valid, width, 0), cache=cache)
  last_tokens = jnp.asarray([full[r, l - 1] for r, l in enumerate(prompt_lengths)])
  cache, key_valid, next_positions, first_logits = model.augment_cache(
      prefill.cache, key_valid, jnp.asarray(head_mask.sum(axis=1), jnp.int32), last_tokens)

  # Teacher-force the rest: the tokens after each prompt, one fewer than the targets.
  targets = np.stack([np.asarray(full[r, l:l + AHEAD]) for r, l in enumerate(prompt_lengths)])
  start = cache[0]["length"]
  key_valid = key_valid | ((jnp.arange(cache_size) >= start) &
                           (jnp.arange(cache_size) < start + AHEAD - 1))[None]
  forced = model.decoder(jnp.asarray(targets[:, :-1]),
                         positions=next_positions[:, None] + jnp.arange(AHEAD - 1),
                         attention_mask=cache_mask(key_valid, AHEAD - 1, start), cache=cache)
  logits = jnp.concatenate([first_logits[:, None], forced.logits], axis=1)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  inference_nll = -np.take_along_axis(np.asarray(log_probs), targets[..., None], axis=-1)[..., 0]

  for row, length in enumerate(prompt_lengths):
    tokens = full[row:row + 1]
    # Training's trace point p = the last cached token; its first ahead token is the prompt's last.
    training = _forward(model, tokens, jnp.ones_like(tokens), jnp.arange(16)[None],
                        jnp.array([[length - 2]]), AHEAD, False)["nll"][0, 0]
    np.testing.assert_allclose(inference_nll[row], training, atol=3e-5)


def test_trace_position_sampling():
  segment_ids = jnp.array([[1] * 10 + [2] * 6 + [0] * 4, [1] * 5 + [0] * 15], jnp.int32)
  positions, valid = masks.sample_trace_positions(jax.random.key(0), segment_ids, 6, 3)
  ok = np.asarray(masks.valid_trace_points(segment_ids, 3))
  np.testing.assert_array_equal(np.nonzero(ok[0])[0], list(range(7)) + [10, 11, 12])
  for row in range(2):
    chosen = np.asarray(positions[row])[np.asarray(valid[row])]
    assert len(set(chosen.tolist())) == len(chosen)  # distinct
    assert ok[row, chosen].all()
  assert int(valid[1].sum()) == 2  # only positions 0 and 1 leave 3 tokens ahead
  spaced, spaced_valid = masks.evenly_spaced_trace_positions(segment_ids, 3, 3)
  assert bool(spaced_valid[0].all()) and ok[0, np.asarray(spaced[0])].all()
  assert len(set(np.asarray(spaced[0]).tolist())) == 3
  # Every valid point is drawn about equally often.
  counts = np.zeros(20)
  for seed in range(300):
    p, v = masks.sample_trace_positions(jax.random.key(seed), segment_ids[:1], 2, 3)
    counts[np.asarray(p[0])] += 1
  assert counts[ok[0]].min() > 0.5 * counts[ok[0]].mean()


def test_generate_augments_once_then_decodes():
  from persona_jax import sampling
  from persona_jax.coprocessor import generate

  model = _model("tiny_llama", "full")
  prompts = [[5, 9, 17, 3, 8, 1, 4], [7, 2, 11]]
  plain = generate(model, prompts, max_new_tokens=5, augment=False, stop_tokens=())
  reference = sampling.generate(model.decoder, prompts, max_new_tokens=5, stop_tokens=())
  np.testing.assert_array_equal(plain.tokens, reference.tokens)  # no coprocessor: decoder unchanged

  augmented = generate(model, prompts, max_new_tokens=5, stop_tokens=())
  # Its first token is the argmax of augment_cache's logits (cache: the prompt but its last token).
  for row, prompt in enumerate(prompts):
    head = len(prompt) - 1
    cache = init_cache(model.decoder.config, 1, 32)
    valid = jnp.arange(32)[None] < head
    prefilled = model.decoder(jnp.asarray([prompt[:-1]]), attention_mask=cache_mask(valid, head, 0),
                              cache=cache)
    _, _, _, logits = model.augment_cache(prefilled.cache, valid, jnp.array([head]),
                                          jnp.array([prompt[-1]]))
    assert int(augmented.tokens[row, 0]) == int(jnp.argmax(logits[0]))
  assert not np.array_equal(augmented.tokens, plain.tokens)
