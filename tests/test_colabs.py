"""Every colabs/*.ipynb runs top to bottom on the CPU (nbclient), from the repository root.

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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_top_to_bottom(path, shared_dir):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
      f"{path.name}: commit notebooks with empty outputs")
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO_ROOT)}})
  try:
    client.execute()
  except CellExecutionError as error:
    pytest.fail(f"{path.name} failed:\n{error}")
