"""Every Colab notebook runs top to bottom in smoke mode (NCJAX_SMOKE=1: offline, embedded or
generated data, install and download cells skip themselves) on this CPU, and is stored
without outputs."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_the_three_notebooks_exist():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"metrics_quickstart.ipynb", "table3_tpu.ipynb", "finetune_your_model.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
  import nbformat
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_smoke_mode(path, monkeypatch, tmp_path):
  import nbclient
  import nbformat
  monkeypatch.setenv("NCJAX_SMOKE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("NCJAX_SMOKE_DIR", str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError naming the cell
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
