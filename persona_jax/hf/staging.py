"""Writing an output directory all at once: a failed export leaves the previous one in place."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


def checked_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> pathlib.Path:
  """The absolute `out_dir`; refuses a file, or a non-empty directory unless `overwrite`."""
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  if out_dir.exists() and not out_dir.is_dir():
    raise FileExistsError(f"{out_dir} exists and is not a directory; choose another out_dir.")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True to replace it, or choose an empty "
                          "directory.")
  return out_dir


@contextlib.contextmanager
def staged_directory(out_dir: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields an empty directory beside `out_dir` to write into; when the block ends it replaces
  `out_dir` (two renames), and when the block raises it is deleted and `out_dir` is untouched."""
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
  try:
    yield staging
    if out_dir.exists():
      backup = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
      os.rename(out_dir, backup / "old")
      os.rename(staging, out_dir)
      shutil.rmtree(backup, ignore_errors=True)
    else:
      os.rename(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
