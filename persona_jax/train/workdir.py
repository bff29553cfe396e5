"""Work directories that are local paths or bucket URLs (`gs://bucket/run` on a TPU pod).

`os.path.abspath("gs://b/run")` is the local directory `./gs:/b/run`, so jobs never call `os` file
functions on a workdir: they resolve it with `resolve` and write their small files (config, tables,
metrics) with `write_text` / `write_json`, which go through `etils.epath` (local files, or
`tf.io.gfile` / fsspec for URLs). Orbax's CheckpointManager takes the same URLs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...)."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """An absolute local path (`~` expanded), or the URL unchanged."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(workdir: str | os.PathLike, *names: str) -> str:
  return os.fspath(epath.Path(workdir).joinpath(*names))


def makedirs(path: str | os.PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` (local or URL), creating its parent directories."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def write_json(path: str | os.PathLike, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2) + "\n")


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text()


def exists(path: str | os.PathLike) -> bool:
  return epath.Path(path).exists()
