"""Activation sharding constraints on 8 simulated CPU devices (run by test_sharding.py).

Checks, in one JSON line: which constraints the trainer's trace places (by logical name -> spec) on a
(data 2, fsdp 2, tensor 2) mesh and on one device, and that a step with them equals the one-device
step, for the unrolled and the scanned decoder and with the fused chunked loss.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.extend.core  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from persona_jax import nn as pnn  # noqa: E402
from persona_jax.train import TrainConfig, Trainer, lm_loss, make_mesh, partitioning  # noqa: E402
from tiny import CountingIterator  # noqa: E402


def constraint_specs(mesh, config):
  """Specs of the sharding constraints in the traced loss (a jaxpr walk, scan bodies included)."""
  model = pnn.build_decoder(config, seed=0)
  graphdef, state = nnx.split(model)
  batch = next(CountingIterator(batch_size=8, seq_len=16))

  def loss(s):
    with partitioning.activation_sharding(mesh):
      return lm_loss(nnx.merge(graphdef, s), batch)[0]

  specs = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "sharding_constraint":
        specs.append(str(eqn.params["sharding"].spec))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(loss)(state).jaxpr)
  return specs


def one_step(mesh, config):
  trainer = Trainer(pnn.build_decoder(config, seed=0), lm_loss,
                    TrainConfig(num_steps=10, learning_rate=1e-3, warmup_steps=0), mesh=mesh)
  metrics = trainer.step(next(CountingIterator(batch_size=8, seq_len=16)))
  return float(metrics["loss"]), jax.tree.map(np.asarray, jax.device_get(trainer.state.params))


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


assert jax.device_count() == 8, jax.devices()
single = make_mesh(1, 1, 1, devices=jax.devices()[:1])
sharded = make_mesh(2, 2, 2)
base = pnn.get_config("tiny_llama")
out = {"specs_sharded": constraint_specs(sharded, base), "specs_single": constraint_specs(single, base),
       "specs_scanned": constraint_specs(sharded, base.replace(scan_layers=True))}
for name, config in (("unrolled", base), ("scanned", base.replace(scan_layers=True)),
                     ("fused_loss", base.replace(loss_chunk_tokens=32))):
  loss_1, params_1 = one_step(single, config)
  loss_8, params_8 = one_step(sharded, config)
  out[name] = {"loss_single": loss_1, "loss_sharded": loss_8, "param_diff": max_diff(params_1, params_8)}
print(json.dumps(out))
