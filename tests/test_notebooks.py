"""The notebooks under ``notebooks/`` execute without errors and print what they promise.

They run in a ``python3`` kernel started with this interpreter: ipykernel installs that
kernelspec into the virtualenv (``<venv>/share/jupyter/kernels/python3``), and jupyter_client
falls back to ipykernel's own spec if it is missing, so a fresh ``make test`` venv needs no
manual ``ipykernel install``. The notebook is executed in memory; the file is not rewritten.
"""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _execute(path: Path):
    """Run every cell of ``path`` (cwd = its folder) and return the executed notebook."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300,
        resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


@pytest.mark.slow
def test_quick_start_notebook():
    """01_quick_start runs (errors raise CellExecutionError), prints its calibration table
    with one row per tensor and scheme, the sim's encoding table, and draws its two figures."""
    nb = _execute(NOTEBOOKS / "01_quick_start.ipynb")

    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

    table = _stdout(_tagged(nb, "calibration-table"))
    header = r"^tensor\s+bits\s+scheme\s+range \[min, max\]\s+scale\s+offset\s+SQNR\s+max error$"
    assert re.search(header, table, re.MULTILINE), table
    assert len(re.findall(r" dB ", table)) == 18, table  # 3 tensors x 2 bitwidths x 3 schemes

    sim_out = _stdout(_tagged(nb, "sim-table"))
    assert "QuantizationSimModel (post_training_tf_enhanced" in sim_out, sim_out
    assert re.search(r"W8A8 simulated \d+\.\d\d%", sim_out), sim_out

    accuracy = _stdout(_tagged(nb, "scheme-accuracy"))
    assert re.search(r"^quant_scheme\s+W8A8\s+W4A8\s+W4A4$", accuracy, re.MULTILINE), accuracy

    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
