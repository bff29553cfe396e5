"""Logical-axis sharding constraints on activations, as MaxText places them.

Model code names the axes of an activation (`with_logical_constraint(x, ("activation_batch",
"activation_length", "activation_embed"))`); the mapping of those names onto mesh axes lives in
`persona_jax.train.partitioning.LOGICAL_AXIS_RULES`, which installs it for the duration of a trace
with `partitioning.activation_sharding(mesh, rules)` (the Trainer does, around its loss). Outside that
context, and on a one-device mesh, the helper returns its input untouched: the traced program is the
same as without it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Sequence

import jax

# (mesh, to_spec(logical_axes, shape) -> PartitionSpec) while a sharded trace is running, else None.
_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("persona_jax_activation_sharding",
                                                          default=None)

BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")


@contextlib.contextmanager
def logical_constraints(mesh, to_spec: Callable[[Sequence[str | None], Sequence[int]], object]):
  """Within this context `with_logical_constraint` constrains activations on `mesh`."""
  token = _CONTEXT.set((mesh, to_spec) if mesh is not None and mesh.size > 1 else None)
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`jax.lax.with_sharding_constraint` of `x` by logical axis names; a no-op outside a mesh."""
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, to_spec = context
  spec = to_spec(tuple(logical_axes), x.shape)
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
