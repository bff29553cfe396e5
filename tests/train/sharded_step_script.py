"""One train step on a (data 2, fsdp 2, tensor 2) mesh of 8 simulated CPU devices vs one device.

Run as a subprocess by test_sharding.py: the device count flag must be set before jax is imported.
Prints one JSON line with the comparison results.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from persona_jax.train import TrainConfig, Trainer, lm_loss, make_mesh  # noqa: E402
from tiny import CountingIterator, tiny_model  # noqa: E402


def one_step(mesh):
  # Adam's first update is ~lr * g / |g|, which amplifies round-off in near-zero gradients by 1/|g|;
  # lr 1e-3 keeps that amplified round-off well under the 1e-5 tolerance while every parameter moves
  # by ~1e-3.
  config = TrainConfig(num_steps=10, learning_rate=1e-3, warmup_steps=0)
  trainer = Trainer(tiny_model(), lm_loss, config, mesh=mesh)
  metrics = trainer.step(next(CountingIterator(batch_size=8, seq_len=16)))
  params = jax.tree.map(np.asarray, jax.device_get(trainer.state.params))
  specs = {str(s.spec) for s in jax.tree.leaves(
      jax.tree.map(lambda x: x.sharding, trainer.state.params))}
  opt_specs = {str(x.sharding.spec) for x in jax.tree.leaves(trainer.state.opt_state)
               if hasattr(x, "sharding")}
  return float(metrics["loss"]), params, specs, opt_specs


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


assert jax.device_count() == 8, jax.devices()
single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
sharded = make_mesh(2, 2, 2)
loss_1, params_1, _, _ = one_step(single)
loss_8, params_8, specs_8, opt_specs_8 = one_step(sharded)
initial = jax.tree.map(np.asarray, jax.device_get(
    Trainer(tiny_model(), lm_loss, TrainConfig(), mesh=single).state.params))
print(json.dumps({
    "loss_single": loss_1, "loss_sharded": loss_8,
    "param_diff": max_diff(params_1, params_8),
    "param_change": max_diff(params_1, initial),
    "param_specs": sorted(specs_8), "opt_specs": sorted(opt_specs_8),
}))
