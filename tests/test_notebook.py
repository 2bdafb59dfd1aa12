"""examples/quantize_and_run.ipynb executes top to bottom (nbclient), so the notebook cannot rot: it quantizes the
repo's model three ways, loads each checkpoint back through fastround's transformers integration, generates,
measures perplexity and plots the per-layer error. A failing cell fails this test with the cell's traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quantize_and_run.ipynb"


# The SignRound recipe and the perplexity text at a test's size: every cell still runs the same calls, and what is
# asserted (layers, table rows, error lines, model-free == RTN, perplexity < 2x bf16) holds at any size.
SMALLER = {"iters=50,": "iters=5,", "nsamples=32, seqlen=256": "nsamples=8, seqlen=128", "[: 8 * 512]": "[: 2 * 512]"}


def test_notebook_executes(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for old, new in SMALLER.items():
        cells = [cell for cell in nb.cells if cell.cell_type == "code" and old in cell.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"the notebook no longer has {old!r}"
        cells[0].source = cells[0].source.replace(old, new)
    # The notebook finds the repo's model by walking up from its working directory, as in a user's checkout.
    work = tmp_path / "examples"
    work.mkdir()
    (tmp_path / "models").symlink_to(NOTEBOOK.parent.parent / "models", target_is_directory=True)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")
               for cell in nb.cells if cell.cell_type == "code"]
    served = next(o for o in outputs if "served by" in o)
    assert served.count("served by QuantLinear") == 3, served  # fastround's layer, not upstream's or a dense one
    table = next(o for o in outputs if "perplexity" in o and "vs bf16" in o)
    for method in ("bf16", "model-free RTN", "RTN", "SignRound light"):
        assert method in table, table
    errors = next(o for o in outputs if "mean relative error" in o)
    assert errors.count("mean relative error") == 3, errors
    # Model-free and regular-flow RTN write the same bytes, so their layers dequantize to the same weights.
    per_method = dict(line.rsplit(" mean relative error ", 1) for line in errors.strip().splitlines())
    assert per_method["model-free RTN".ljust(16)] == per_method["RTN".ljust(16)], per_method
    shutil.rmtree(work, ignore_errors=True)
