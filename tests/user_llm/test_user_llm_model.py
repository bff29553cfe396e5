"""User-LLM modules: causality, zero-gate identity, Perceiver shapes, strategies, bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.train.trainer import TrainConfig, Trainer
from persona_jax.user_llm import model as m

CONFIG = m.UserEncoderConfig(num_items=40, num_categories=8, embed_dim=32, num_layers=1, num_heads=4,
                             mlp_dim=64, max_length=12)


def features(batch=2, length=12, seed=0, real=None):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), bool)
  if real is not None:
    mask[:, real:] = False
  out = {"item_ids": rng.integers(2, 40, (batch, length)), "ratings": rng.integers(1, 11, (batch, length)),
         "genre_bits": rng.integers(0, 256, (batch, length)), "history_mask": mask}
  out = {k: np.where(mask, v, 0).astype(np.int32) if k != "history_mask" else v for k, v in out.items()}
  return {k: jnp.asarray(v) for k, v in out.items()}


def prompt_batch(batch=2, length=9, seed=1, vocab=256):
  rng = np.random.default_rng(seed)
  mask = np.ones((batch, length), bool)
  mask[0, :3] = False  # left padding
  tokens = np.where(mask, rng.integers(3, vocab, (batch, length)), 0)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


@pytest.mark.parametrize("fusion", m.FUSIONS)
def test_user_encoder_is_causal(fusion):
  encoder = m.UserEncoder(m.UserEncoderConfig(**{**CONFIG.__dict__, "fusion": fusion}), rngs=nnx.Rngs(0))
  base = features()
  changed = dict(base)
  for name, value in (("item_ids", 7), ("ratings", 3), ("genre_bits", 5)):
    changed[name] = base[name].at[:, 6].set(value)
  out_base, out_changed = encoder(base), encoder(changed)
  np.testing.assert_array_equal(out_base[:, :6], out_changed[:, :6])  # earlier items unchanged
  assert not np.allclose(out_base[:, 6:], out_changed[:, 6:])           # later ones do change


def test_next_item_loss_recall_matches_numpy():
  encoder = m.UserEncoder(CONFIG, rngs=nnx.Rngs(0))
  batch = features(real=9)
  _, metrics = m.next_item_loss(encoder, batch, recall_at=(1, 5))
  logits = np.asarray(encoder.next_item_logits(encoder(batch))["item"])[:, :8]  # positions 0..7 predict 1..8
  targets = np.asarray(batch["item_ids"])[:, 1:9]
  top5 = np.argsort(-logits, axis=-1)[..., :5]
  expected = np.mean([targets[b, t] in top5[b, t] for b in range(2) for t in range(8)])
  assert float(metrics["recall@5"]) == pytest.approx(expected)
  assert float(metrics["recall@1"]) == pytest.approx(np.mean(top5[..., 0] == targets))


def _decoder():
  return pnn.build_decoder(pnn.get_config("tiny_llama"), seed=3)


def test_zero_gate_leaves_decoder_logits_exactly_unchanged():
  tokens, mask = prompt_batch()
  frozen = _decoder()
  expected = frozen(tokens, positions=pnn.positions_from_mask(mask),
                    attention_mask=pnn.padded_causal_mask(mask)).logits
  model = m.UserLLM(_decoder(), CONFIG, integration="cross_attention", cross_attention_layers=[0, 1])
  got = model(features(), tokens, mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  # A non-zero gate does change them: the test can fail.
  model.decoder.layers[1].after.attn_gate[...] = jnp.asarray(0.5)
  assert not np.allclose(np.asarray(model(features(), tokens, mask)), np.asarray(expected))


@pytest.mark.parametrize("strategy", ["enc", "lora"])
def test_user_llm_leaves_the_given_decoder_untouched(strategy):
  decoder = _decoder()
  tokens, mask = prompt_batch()
  run = lambda d: np.asarray(d(tokens, positions=pnn.positions_from_mask(mask),
                               attention_mask=pnn.padded_causal_mask(mask)).logits)
  paths, expected = _paths(nnx.state(decoder)), run(decoder)
  model = m.UserLLM(decoder, CONFIG, integration="cross_attention", strategy=strategy,
                    cross_attention_layers=[0, 1], lora_rank=2)
  # The User-LLM's own copy got the hooks (and adapters); the caller's decoder has none of them.
  assert all(model.decoder.layers[layer].after is not None for layer in (0, 1))
  assert all(layer.after is None for layer in decoder.layers)
  assert _paths(nnx.state(decoder)) == paths
  if strategy == "lora":
    assert nnx.state(model.decoder, nnx.LoRAParam) and not nnx.state(decoder, nnx.LoRAParam)
  np.testing.assert_array_equal(run(decoder), expected)
  # The same decoder can build a second User-LLM (an `after` hook already there would be refused).
  m.UserLLM(decoder, CONFIG, integration="cross_attention", cross_attention_layers=[0, 1])
  # The weights are shared, not copied.
  assert model.decoder.embedding[...] is decoder.embedding[...]


def test_perceiver_output_shape_does_not_depend_on_history_length():
  resampler = m.PerceiverResampler(32, num_latents=5, num_layers=2, num_heads=4, rngs=nnx.Rngs(0))
  for length in (1, 4, 12, 50):
    out = resampler(jnp.ones((3, length, 32)), jnp.ones((3, length), bool))
    assert out.shape == (3, 5, 32)


def test_empty_history_gives_finite_user_tokens_and_logits():
  model = m.UserLLM(_decoder(), CONFIG, integration="soft_prompt", num_latents=4)
  empty = features(real=0)
  tokens, mask = prompt_batch()
  user = model.user_tokens(empty)
  assert user.shape == (2, 4, 64) and bool(jnp.all(jnp.isfinite(user)))
  # With no items, the user tokens are the resampler's learned prior: the same for every user.
  np.testing.assert_allclose(np.asarray(user[0]), np.asarray(user[1]), rtol=1e-6, atol=1e-6)
  assert bool(jnp.all(jnp.isfinite(model(empty, tokens, mask))))


def test_history_longer_than_max_length_is_rejected_by_the_encoder():
  encoder = m.UserEncoder(CONFIG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="history length 13 > max_length=12.*most recent"):
    encoder(features(length=13))


def test_soft_prompt_user_tokens_change_the_logits():
  tokens, mask = prompt_batch()
  model = m.UserLLM(_decoder(), CONFIG, integration="soft_prompt", num_latents=3)
  a, b = model(features(seed=0), tokens, mask), model(features(seed=5), tokens, mask)
  assert a.shape == (2, 9, 256) and not np.allclose(np.asarray(a), np.asarray(b))


def _paths(state) -> set[str]:
  return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}


def _leaves(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(value.get_value() if hasattr(value, "get_value") else value)
          for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# Which groups of parameters each strategy trains (True) or freezes (False).
EXPECTED = {
    "full": {"decoder_base": True, "lora": None, "user_encoder": True, "resampler": True, "after": True},
    "lora": {"decoder_base": False, "lora": True, "user_encoder": True, "resampler": True, "after": True},
    "enc": {"decoder_base": False, "lora": None, "user_encoder": True, "resampler": True, "after": True},
    "proj": {"decoder_base": False, "lora": None, "user_encoder": False, "resampler": True, "after": True},
}


def _group(path: str) -> str:
  if "adapters" in path:
    return "lora"
  if "/after/" in path:
    return "after"
  if path.startswith("decoder"):
    return "decoder_base"
  if path.startswith("user_encoder"):
    return "user_encoder"
  return "resampler"  # resampler and projection


@pytest.mark.slow
@pytest.mark.parametrize("strategy", m.STRATEGIES)
def test_each_strategy_updates_exactly_what_it_names(strategy):
  model = m.UserLLM(_decoder(), CONFIG, integration="cross_attention", strategy=strategy,
                    cross_attention_layers=[1], lora_rank=2)
  before = _leaves(model)
  batch = {**{k: np.asarray(v) for k, v in features(batch=4, real=10).items()}}
  tokens, mask = prompt_batch(batch=4)
  batch.update(prompt_tokens=np.asarray(tokens), prompt_mask=np.asarray(mask),
               options=np.tile(np.arange(65, 70, dtype=np.int32), (4, 1)), label=np.asarray([0, 1, 2, 3], np.int32))

  def loss_fn(module, data, rng):
    del rng
    return m.choice_loss(module.option_logits(data), data["label"])

  trainer = Trainer(model, loss_fn, TrainConfig(num_steps=3, learning_rate=1e-2, warmup_steps=0, max_grad_norm=None),
                    trainable=model.trainable_filter())
  trainable_paths = _paths(nnx.state(model, model.trainable_filter()))
  for _ in range(3):  # gates and LoRA `b` start at zero: the other weights move from step 2 on
    trainer.step(batch)
  after = _leaves(trainer.model())
  used_encoder_heads = ("item_head", "rating_head", "genre_head")  # pretraining heads: no gradient here
  for path, value in before.items():
    group = _group(path)
    expected = EXPECTED[strategy][group]
    changed = not np.array_equal(value, after[path])
    assert (path in trainable_paths) == bool(expected), path
    if not expected:
      assert not changed, f"{strategy}: frozen {path} changed"
  for group, expected in EXPECTED[strategy].items():
    if expected:
      moved = [p for p in before if _group(p) == group and not any(h in p for h in used_encoder_heads)
               and not np.array_equal(before[p], after[p])]
      assert moved, f"{strategy}: nothing in {group} was updated"
