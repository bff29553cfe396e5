"""Partitioning: logical-axis rules, the 8-device sharded step, and two processes via jax.distributed."""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from persona_jax.train import partitioning


def _abstract_mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), partitioning.MESH_AXES)


def test_rules_shard_divisible_dims_and_replicate_the_rest():
  mesh = _abstract_mesh(2, 2, 2)
  assert partitioning.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == PartitionSpec("tensor", "fsdp")
  assert partitioning.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == PartitionSpec("fsdp", "tensor")
  # 9 heads * 64 = 576 is divisible by 2, but 3 kv heads * 1 (head_dim 1) = 3 is not: replicated.
  assert partitioning.logical_to_spec(("embed", "kv"), (64, 3), mesh) == PartitionSpec("fsdp", None)
  assert partitioning.logical_to_spec(("norm",), (64,), mesh) == PartitionSpec(None)
  # The batch takes data x fsdp when divisible by 4, falls back to data alone when only by 2.
  assert partitioning.logical_to_spec(("batch", None), (8, 5), mesh) == PartitionSpec(("data", "fsdp"), None)
  assert partitioning.logical_to_spec(("batch", None), (6, 5), mesh) == PartitionSpec("data", None)
  # Mesh axes of size 1 are not used.
  assert partitioning.logical_to_spec(("vocab", "embed"), (256, 64), _abstract_mesh(4, 1, 1)) == PartitionSpec(None, None)


def test_make_mesh_fills_minus_one_and_rejects_bad_shapes():
  mesh = partitioning.make_mesh(-1, 1, 1)
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one may be -1"):
    partitioning.make_mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="devices"):
    partitioning.make_mesh(3, 1, 1, devices=jax.devices() * 2)


@pytest.mark.slow
def test_sharded_step_on_8_devices_matches_one_device(run_script):
  """(data 2, fsdp 2, tensor 2) on 8 simulated CPU devices vs 1 device: same loss and parameters."""
  out = json.loads(run_script("sharded_step_script.py").stdout.strip().splitlines()[-1])
  assert abs(out["loss_single"] - out["loss_sharded"]) < 1e-5
  assert out["param_diff"] < 1e-5
  assert out["param_change"] > 5e-4  # the step really moved the parameters
  # The parameters really were sharded over fsdp and tensor, and Adam's moments follow them.
  assert "P('fsdp', 'tensor')" in out["param_specs"] and "P('tensor', 'fsdp')" in out["param_specs"]
  assert set(out["param_specs"]) <= set(out["opt_specs"])


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_to_the_same_loss_as_one(subprocess_env, tmp_path):
  script = str(pathlib.Path(__file__).with_name("distributed_script.py"))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, script, "2", str(i), str(port), str(tmp_path / f"p{i}.json")],
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  single = subprocess.run([sys.executable, script, "1", "0", "0", str(tmp_path / "single.json")],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
  reference = json.loads((tmp_path / "single.json").read_text())["losses"]
  for i in range(2):
    losses = json.loads((tmp_path / f"p{i}.json").read_text())["losses"]
    for mode in ("global", "process_local"):
      assert len(losses[mode]) == 3
      assert losses[mode] == pytest.approx(reference["global"], abs=1e-5), (i, mode)


def test_activation_constraint_is_a_no_op_outside_a_mesh():
  import jax.numpy as jnp
  from persona_jax.nn.sharding import with_logical_constraint
  x = jnp.ones((2, 3, 4))
  assert with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed")) is x
  with partitioning.activation_sharding(partitioning.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    assert with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed")) is x


def test_activation_rules_map_names_like_maxtext():
  mesh = _abstract_mesh(2, 2, 2)
  rules = partitioning.LOGICAL_AXIS_RULES
  spec = lambda axes, shape: partitioning.logical_to_spec(axes, shape, mesh, rules)
  assert spec(("activation_batch", "activation_length", "activation_embed"), (8, 16, 64)) == \
      PartitionSpec(("data", "fsdp"), None, None)
  assert spec(("activation_batch", "activation_length", "activation_heads", None), (2, 16, 4, 16)) == \
      PartitionSpec("data", None, "tensor", None)
  # SmolLM2's 3 kv heads do not split over tensor=2: replicated, as for parameters.
  assert spec(("activation_batch", "activation_length", "activation_kv_heads", None), (8, 16, 3, 64)) == \
      PartitionSpec(("data", "fsdp"), None, None, None)


@pytest.mark.slow
def test_activation_constraints_on_8_devices_keep_the_step(run_script):
  """The trainer's trace constrains activations by logical name on a (2, 2, 2) mesh (none on one
  device), and the sharded step still equals the one-device step (unrolled, scanned, fused loss)."""
  out = json.loads(run_script("activation_sharding_script.py", timeout=900).stdout.strip().splitlines()[-1])
  assert out["specs_single"] == []
  specs = out["specs_sharded"]
  layers = 2  # tiny_llama
  # Per layer: block output, q, k, v, attention output, MLP hidden; plus embeddings and logits.
  assert len(specs) == 6 * layers + 2, specs
  assert specs.count("P(('data', 'fsdp'), None, None)") == layers + 1  # residual stream
  assert specs.count("P(('data', 'fsdp'), None, 'tensor', None)") == 3 * layers  # q, k, v heads
  assert specs.count("P(('data', 'fsdp'), None, 'tensor')") == 2 * layers + 1  # attn out, mlp, vocab
  assert set(out["specs_scanned"]) == set(specs)  # the scan body carries the same constraints
  for name in ("unrolled", "scanned", "fused_loss"):
    assert abs(out[name]["loss_single"] - out[name]["loss_sharded"]) < 1e-5, (name, out[name])
    assert out[name]["param_diff"] < 1e-5, (name, out[name])
