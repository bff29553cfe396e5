"""Test setup: CPU only, quiet TensorFlow, TFDS pointed at the shared prepared data dir if present."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
if "TFDS_DATA_DIR" not in os.environ and (SHARED / "tfds").is_dir():
  os.environ["TFDS_DATA_DIR"] = str(SHARED / "tfds")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """../shared beside the checkout (real data sets); tests that need it skip with a reason if absent."""
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} not found: real data sets live beside the checkout.")
  return SHARED
