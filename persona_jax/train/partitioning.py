"""Device mesh, logical-axis rules and shardings for parameters, optimizer state and batches.

Model code only names logical axes (`embed`, `heads`, `kv`, `mlp`, `vocab`, `norm`; see the
`out_sharding` metadata of `persona_jax.nn` parameters). The ordered table `LOGICAL_AXIS_RULES` maps
them onto the mesh axes `data`, `fsdp` and `tensor`; changing the parallelism means changing that table
or the mesh shape, never model code.

Multi-process runs (a TPU pod slice, several GPU hosts, or several CPU processes on one machine)
start through `maybe_initialize_distributed()`, which calls `jax.distributed.initialize()` when the
environment asks for it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from persona_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered: for each logical axis the candidate mesh axes are tried in order; the first that is not
# already used by another dim of the same array and that divides the dim wins. Tuples shard one dim
# over several mesh axes. `None` means replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # examples split over every data-parallel axis
    ("batch", "data"),
    ("vocab", "tensor"),  # embedding rows / logits columns
    ("embed", "fsdp"),  # the residual width: ZeRO-3-style parameter sharding
    ("heads", "tensor"),  # query heads (Megatron column/row split)
    ("kv", "tensor"),  # key/value heads
    ("mlp", "tensor"),  # MLP hidden width
    ("norm", None),  # norm scales are tiny: replicate
    ("seq", None),
    # Activations (`persona_jax.nn.sharding.with_logical_constraint`, applied by the trainer's trace
    # through `activation_sharding`): examples over the data-parallel axes, heads / MLP width /
    # vocabulary over `tensor`; the residual width and the length stay whole on each device.
    ("activation_batch", ("data", "fsdp")),
    ("activation_batch", "data"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

logger = logging.getLogger(__name__)


# Distributed start --------------------------------------------------------------------------------
def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

  Recognized environments (checked in order):
    * `PERSONA_JAX_COORDINATOR` (host:port), `PERSONA_JAX_NUM_PROCESSES`, `PERSONA_JAX_PROCESS_ID`:
      explicit multi-process start (GPU hosts, or several CPU processes on one machine).
    * `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`): JAX's own variables;
      `initialize()` reads them itself.
    * A Cloud TPU VM pod (`TPU_WORKER_HOSTNAMES` lists more than one host, or `MEGASCALE_COORDINATOR_ADDRESS`
      is set): `initialize()` discovers the coordinator from the TPU metadata.
    * SLURM (`SLURM_JOB_ID` with more than one task) and Open MPI: `initialize()` auto-detects them.
  Returns True when it initialized (or JAX was already initialized), False for a single process.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  if "PERSONA_JAX_COORDINATOR" in env:
    missing = [k for k in ("PERSONA_JAX_NUM_PROCESSES", "PERSONA_JAX_PROCESS_ID") if k not in env]
    if missing:
      raise UserError(f"PERSONA_JAX_COORDINATOR is set but {missing} are not: set all three "
                       "(coordinator host:port, number of processes, this process's id).")
    jax.distributed.initialize(coordinator_address=env["PERSONA_JAX_COORDINATOR"],
                               num_processes=int(env["PERSONA_JAX_NUM_PROCESSES"]),
                               process_id=int(env["PERSONA_JAX_PROCESS_ID"]))
    return True
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  slurm_tasks = int(env.get("SLURM_NTASKS", "1") or 1)
  mpi_size = int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1)
  if ("JAX_COORDINATOR_ADDRESS" in env or len(tpu_hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env
      or slurm_tasks > 1 or mpi_size > 1):
    jax.distributed.initialize()
    return True
  return False


# Mesh ---------------------------------------------------------------------------------------------
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over `devices` (default: all devices of all processes).

  One size may be -1: it takes whatever is left of the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError(f"Mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}): at most one may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise UserError(f"Mesh sizes (data={data}, fsdp={fsdp}, tensor={tensor}) do not fit "
                     f"{len(devices)} devices: their product must divide the device count.")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise UserError(f"Mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) uses "
                     f"{math.prod(sizes)} devices but {len(devices)} are available; set one size to -1.")
  if devices == list(jax.devices()):
    # make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(tuple(sizes), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


# Logical axes -> PartitionSpec --------------------------------------------------------------------
def _mesh_axis_size(mesh: Mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
                    name: str = "") -> PartitionSpec:
  """Maps one array's logical axis names to a `PartitionSpec` on `mesh`.

  A dim is sharded only if its size is divisible by the mesh axes' total size; otherwise the next rule
  for the same logical name is tried, and if none fits the dim is replicated (logged at debug level).
  Mesh axes of size 1 are dropped (sharding over them is a no-op).
  """
  if len(logical_axes) != len(shape):
    raise UserError(f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of "
                     f"shape {tuple(shape)}.")
  used: set[str] = set()
  spec = []
  for logical, size in zip(logical_axes, shape):
    chosen = None
    if logical is not None:
      candidates = [mesh_axes for rule_name, mesh_axes in rules if rule_name == logical]
      for mesh_axes in candidates:
        if mesh_axes is None:
          break
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if not axes or used.intersection(axes):
          continue
        if size % _mesh_axis_size(mesh, axes):
          logger.debug("%s: dim %r of size %d is not divisible by mesh axes %s (size %d); trying the "
                       "next rule / replicating.", name, logical, size, axes, _mesh_axis_size(mesh, axes))
          continue
        chosen = axes[0] if len(axes) == 1 else axes
        used.update(axes)
        break
    spec.append(chosen)
  return PartitionSpec(*spec)


def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Context manager: while tracing inside it, the model's `with_logical_constraint` calls constrain
  activations on `mesh` through `rules` (a dim that does not divide is replicated, as for
  parameters). On a one-device mesh it changes nothing."""
  from persona_jax.nn import sharding  # pylint: disable=g-import-not-at-top

  rules = tuple(rules)
  return sharding.logical_constraints(
      mesh, lambda axes, shape: logical_to_spec(axes, shape, mesh, rules, name="activation"))


def _variable_axes(variable: nnx.Variable) -> tuple | None:
  metadata = variable.get_metadata()
  axes = metadata.get("out_sharding", metadata.get("sharding_names"))
  return tuple(axes) if axes is not None else None


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding`s for an NNX state, as a pure nested dict matching `state.to_pure_dict()`.

  Variables without logical-axis metadata are replicated.
  """
  def one(path, variable):
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    axes = _variable_axes(variable)
    if axes is None or not hasattr(value, "shape"):
      return NamedSharding(mesh, PartitionSpec())
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules, name=name))

  shardings = jax.tree_util.tree_map_with_path(
      one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(shardings).to_pure_dict() if isinstance(shardings, nnx.State) else shardings


def optimizer_state_shardings(tx, params_shardings: Any, abstract_opt_state: Any, mesh: Mesh) -> Any:
  """Shardings for an optax state: per-parameter leaves (Adam moments) follow their parameter,
  everything else (step counts, scalars) is replicated."""
  import optax  # local: partitioning has no optax dependency otherwise

  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, params_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def check_batch_divides(mesh: Mesh, batch_size: int,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, what: str = "The batch") -> None:
  """Raises ValueError unless `batch_size` rows split evenly over the mesh's data-parallel devices
  (otherwise the batch would be silently replicated: every device computing every row)."""
  parallel = data_parallel_size(mesh, rules)
  if batch_size % parallel:
    shape = ", ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
    raise UserError(
        f"{what} has {batch_size} rows, which do not split over the {parallel} data-parallel devices of "
        f"the mesh ({shape}); it would be replicated on every device instead. Fix: make the global "
        f"batch size a multiple of {parallel}, or change the mesh (TrainConfig.mesh_data / mesh_fsdp).")


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, *,
                   allow_replicated: bool = False) -> NamedSharding:
  """Sharding of a `[batch, ...]` array: the batch dim over the data-parallel axes, the rest replicated.

  A batch that does not divide over the data-parallel devices raises (see `check_batch_divides`)
  unless `allow_replicated` (evaluation of a last, partial batch): then it is replicated.
  """
  if not allow_replicated:
    check_batch_divides(mesh, batch_size, rules)
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh,
                         rules, name="batch")
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> int:
  """How many ways the batch dim is split (the global batch must be a multiple of this)."""
  for name, axes in rules:
    if name == "batch" and axes is not None:
      return _mesh_axis_size(mesh, tuple(a for a in ((axes,) if isinstance(axes, str) else axes)))
  return 1


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
                 process_local: bool = False, *, allow_replicated: bool = False
                 ) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, sharded over its batch dim.

  Args:
    batch: `{name: [rows, ...]}` numpy arrays.
    process_local: False: every process holds the same full global batch (a deterministic pipeline
      read in full by every process) and contributes the shards its devices hold. True: each process
      holds only its own slice of rows (`persona_jax.data` with `shard_index=jax.process_index()`,
      `num_shards=jax.process_count()`); the global batch is their concatenation in process order.
    allow_replicated: replicate a batch whose rows do not divide over the data-parallel devices
      instead of raising (evaluation only).
  Returns:
    `{name: jax.Array [global_rows, ...]}`.
  """
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if process_local:
      global_rows = value.shape[0] * jax.process_count()
      sharding = batch_sharding(mesh, value.ndim, global_rows, rules, allow_replicated=allow_replicated)
      out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                        (global_rows,) + value.shape[1:])
    else:
      sharding = batch_sharding(mesh, value.ndim, value.shape[0], rules,
                                allow_replicated=allow_replicated)
      out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
  return out
