"""Issue 25 item 8: docs/tutorial.ipynb runs top to bottom (in CI), so it can never rot.

The notebook is executed in a fresh kernel in a temporary folder (its runs go there); its committed
outputs are the rendered version readers see (re-render after an edit: ``jupyter nbconvert --to
notebook --execute --inplace docs/tutorial.ipynb``, or nbclient as below).
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "tutorial.ipynb"


def _outputs(nb, kind: str) -> list:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind
    ]


@pytest.mark.slow
def test_tutorial_notebook_executes(tmp_path):
    nbformat = pytest.importorskip(
        "nbformat", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)"
    )
    nbclient = pytest.importorskip(
        "nbclient", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)"
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    committed = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert committed, "docs/tutorial.ipynb is committed without its rendered outputs"
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises CellExecutionError on the first failing cell
    assert not _outputs(nb, "error")
    text = "".join(o.text for o in _outputs(nb, "stream") if o.name == "stdout")
    assert "2 runs: 2 done" in text
    table = text[text.index("method") :].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["zero-shot", "CoOp", "MPL"]
    assert any("image/png" in o.data for o in _outputs(nb, "display_data"))  # the comparison plot
    assert "predicted:" in text and "reloaded export predicts" in text
    assert (tmp_path / "tutorial_runs" / "mpl_hub" / "README.md").is_file()
