"""Evaluation over a sharded iterator: each process scores its own slice; these reduce across
processes so the table process 0 writes covers every slice (a no-op with one process)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def sum_across_processes(tree: Any) -> Any:
  """Element-wise sum of a pytree of host arrays over all processes (same structure everywhere)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  gathered = multihost_utils.process_allgather(jax.tree.map(np.asarray, tree), tiled=False)
  return jax.tree.map(lambda x: np.asarray(x).sum(axis=0), gathered)


def gather_rows(rows: np.ndarray) -> np.ndarray:
  """Concatenates each process's `[n_i, ...]` rows in process order (sizes may differ)."""
  rows = np.asarray(rows)
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  sizes = multihost_utils.process_allgather(np.asarray([rows.shape[0]]), tiled=False).reshape(-1)
  padded = np.zeros((int(sizes.max()),) + rows.shape[1:], rows.dtype)
  padded[:rows.shape[0]] = rows
  gathered = multihost_utils.process_allgather(padded, tiled=False)
  return np.concatenate([gathered[i, :int(n)] for i, n in enumerate(sizes)], axis=0)
