"""The walkthrough notebook runs top to bottom on a CPU, and the figures saved in it are current:

    python3 -m pytest -q tests/test_walkthrough.py

After a change to the notebook or to the code it calls, re-execute it and save it with its outputs (this also
rewrites assets/walkthrough_groups.png, the README's figure, from the cell tagged `readme-figure`):

    python3 tests/test_walkthrough.py
"""
import base64
import io
import os
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "walkthrough.ipynb"
FIGURE = ROOT / "assets" / "walkthrough_groups.png"  # the output of the cell tagged readme-figure
BUDGET_S = 180  # the whole notebook, kernel start included, on a 2-core CPU
TOLERANCE = 8  # uint8 levels a pixel of a figure may move: floating-point noise, antialiased edges
MAX_MOVED = 0.002  # the fraction of a figure's pixels that may move further
RERUN = "re-execute the notebook: python3 tests/test_walkthrough.py"

pytestmark = pytest.mark.slow


def execute(nb):
    """Runs nb in place in a fresh python3 kernel whose working folder is docs/, as a reader's Jupyter would be."""
    client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    return client.execute()


def pngs(nb, tag=None):
    """[(cell index, PNG bytes)] of the notebook's image outputs, in order (only the cells tagged `tag` if given)."""
    out = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or tag and tag not in cell.metadata.get("tags", []):
            continue
        for output in cell.outputs:
            if "image/png" in output.get("data", {}):
                out.append((i, base64.b64decode(output.data["image/png"])))
    return out


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def executed():
    """The committed notebook, executed once for both tests: (notebook, the error a cell raised or None, seconds)."""
    from data import load_fashion_mnist
    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("the notebook needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    try:
        execute(nb)
        error = None
    except (CellExecutionError, CellTimeoutError) as e:
        error = e
    return nb, error, time.perf_counter() - start


def test_notebook_runs_on_a_cpu(executed):
    nb, error, seconds = executed
    assert error is None, f"a cell of {NOTEBOOK.name} raised:\n{str(error)[-3000:]}"
    assert seconds <= BUDGET_S, f"{NOTEBOOK.name} took {seconds:.0f} s, more than its {BUDGET_S} s"
    assert pngs(nb, "readme-figure"), "no cell tagged readme-figure shows a figure"


def test_saved_figures_are_current(executed):
    nb, error, _ = executed
    if error is not None:
        pytest.fail(f"{NOTEBOOK.name} did not run to the end (see test_notebook_runs_on_a_cpu)")
    saved, fresh = pngs(nbformat.read(NOTEBOOK, as_version=4)), pngs(nb)
    assert [i for i, _ in saved] == [i for i, _ in fresh], f"the notebook's figures are not the saved ones; {RERUN}"
    for (i, old), (_, new) in zip(saved, fresh):
        old, new = pixels(old), pixels(new)
        assert old.shape == new.shape, f"the figure of cell {i} is {new.shape[:2]}, saved {old.shape[:2]}; {RERUN}"
        moved = np.mean(np.abs(old - new).max(-1) > TOLERANCE)
        assert moved <= MAX_MOVED, f"{moved:.2%} of the pixels of cell {i}'s figure differ from the saved one; {RERUN}"
    (_, readme), = pngs(nbformat.read(NOTEBOOK, as_version=4), "readme-figure")
    assert FIGURE.read_bytes() == readme, f"{FIGURE.relative_to(ROOT)} is not the notebook's figure; {RERUN}"


def replace(path, data):
    """Writes bytes to a temporary file beside `path`, then renames it: never a half-written notebook."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


if __name__ == "__main__":
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.perf_counter()
    execute(nb)
    print(f"executed {NOTEBOOK.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s")
    replace(NOTEBOOK, (nbformat.writes(nb) + "\n").encode())
    (_, figure), = pngs(nb, "readme-figure")
    replace(FIGURE, figure)
    print(f"wrote {NOTEBOOK.relative_to(ROOT)} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB) and {FIGURE.relative_to(ROOT)}")
