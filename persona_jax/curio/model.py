"""CURIO's modules: the user model (belief over user types) and the agent policy.

  * `UserModel`: a small classifier of its own on what the user said so far: a multi-hot of the
    user's words (`tasks.reply_features`) -> a hidden layer -> logits over the K user types. It gives
    the belief b_t for every prefix of a dialogue at once: `[batch, turns + 1, vocab] ->
    [batch, turns + 1, K]`. Trained with `user_model_loss` on simulated dialogues.
  * `build_policy`: the agent, the run's decoder (`DecoderSource`) producing utterances, wrapped in
    the RL core's `PolicyWithValue` (value head for the turn-level baseline / GAE): a random preset
    over the word vocabulary (tiny, the CPU benchmark) or a pretrained decoder with LoRA (SmolLM2,
    gin default).
  * `imitation_loss`: the warm start's next-token cross-entropy on the agent's tokens only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persona_jax import nn as pnn
from persona_jax.nn import padded_causal_mask, positions_from_mask
from persona_jax.nn.layers import Linear, logical_param
from persona_jax.rl import PolicyWithValue
from persona_jax.train.losses import weighted_cross_entropy


class UserModel(nnx.Module):
  """Belief over user types from the user's words so far (a one-hidden-layer MLP)."""

  def __init__(self, vocab_size: int, num_types: int, hidden_dim: int = 64, *, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.vocab_size = vocab_size
    self.num_types = num_types
    self.hidden = Linear(vocab_size, hidden_dim, in_axis="vocab", out_axis="mlp", rngs=rngs)
    self.hidden_bias = logical_param(jnp.zeros((hidden_dim,)), ("mlp",))
    self.out = Linear(hidden_dim, num_types, in_axis="mlp", out_axis=None, rngs=rngs)
    self.out_bias = logical_param(jnp.zeros((num_types,)), (None,))

  def __call__(self, features: jax.Array) -> jax.Array:
    """Logits `[..., K]` from multi-hot user-word features `[..., vocab]`."""
    h = jax.nn.relu(self.hidden(features.astype(jnp.float32)) + self.hidden_bias[...])
    return self.out(h) + self.out_bias[...]

  def beliefs(self, features: jax.Array) -> jax.Array:
    """b = softmax(logits) `[..., K]`, fp32."""
    return jax.nn.softmax(self(features), axis=-1)


def user_model_loss(model: UserModel, batch: dict, rng: jax.Array):
  """Cross-entropy of the true type at every dialogue prefix (`features [B, T+1, V]`,
  `user_type [B]`); metrics include the accuracy after the whole dialogue (`final_accuracy`)."""
  del rng
  logits = model(batch["features"])  # [B, T+1, K]
  targets = jnp.broadcast_to(batch["user_type"][:, None], logits.shape[:2])
  loss, metrics = weighted_cross_entropy(logits, targets, jnp.ones(targets.shape, jnp.float32))
  final_correct = jnp.argmax(logits[:, -1], axis=-1) == batch["user_type"]
  return loss, {"cross_entropy": loss, "accuracy": metrics["accuracy"],
                "final_accuracy": jnp.mean(final_correct.astype(jnp.float32))}


def build_policy(decoder: pnn.Decoder, *, lora_rank: int = 0) -> PolicyWithValue:
  """The agent: `PolicyWithValue` over `decoder`; `lora_rank` > 0 adds LoRA on the q/v projections
  (then only LoRA + value head train, `PolicyWithValue.trainable_filter(lora=True)`)."""
  if lora_rank > 0:
    pnn.inject_lora(decoder, projections=("q_proj", "v_proj"), rank=lora_rank, alpha=2.0 * lora_rank,
                    name="curio")
  return PolicyWithValue(decoder)


def imitation_loss(model: PolicyWithValue, batch: dict, rng: jax.Array):
  """Next-token cross-entropy on the agent's tokens (`tokens`, `input_mask`, `agent_mask` `[B, S]`)."""
  del rng
  tokens, input_mask = batch["tokens"], batch["input_mask"]
  out = model.decoder(tokens, positions=positions_from_mask(input_mask),
                      attention_mask=padded_causal_mask(input_mask))
  return weighted_cross_entropy(out.logits[:, :-1], tokens[:, 1:], batch["agent_mask"][:, 1:])
