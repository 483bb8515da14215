"""The walkthrough notebook runs top to bottom on a CPU, every exercise's change (as its answer gives it) runs, and
the figures saved in the notebook are current:

    python3 -m pytest -q tests/test_walkthrough.py

After a change to the notebook or to the code it calls, re-execute it and save it with its outputs (this also
rewrites assets/walkthrough_groups.png, the README's figure, from the cell tagged `readme-figure`):

    python3 tests/test_walkthrough.py
"""
import base64
import copy
import io
import os
import re
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
EXERCISE_BUDGET_S = 120  # the exercises' changed cells and the cells they re-run
TOLERANCE = 8  # uint8 levels a pixel of a figure may move: floating-point noise, antialiased edges
MAX_MOVED = 0.002  # the fraction of a figure's pixels that may move further
RERUN = "re-execute the notebook: python3 tests/test_walkthrough.py"
# an answer's change: "*Change* (§4): `old` → `new` (or `other new`), then re-run §5." (§0: the first code cell)
CHANGE = re.compile(r"\*Change\* \((?:§(\d+)|the first code cell)\): `([^`]+)` → `([^`]+)`(?: \(or `([^`]+)`\))?"
                    r"(?:, then re-run §(\d+))?")

pytestmark = pytest.mark.slow


def sections(nb):
    """The section number of each cell: that of the last "## N." heading above it, 0 before the first."""
    out, current = [], 0
    for cell in nb.cells:
        heading = re.match(r"## (\d+)\.", cell.source) if cell.cell_type == "markdown" else None
        current = int(heading.group(1)) if heading else current
        out.append(current)
    return out


def exercises(nb):
    """The answers' changes: [(exercise, cell index, changed source, indices of the cells to run after it)], one per
    alternative, the latest section first (a section's cells then never read what an earlier exercise left)."""
    answers = next(c.source for c in nb.cells if c.source.startswith("### Answers"))
    section = sections(nb)
    runs = []
    for number, text in re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", answers, re.M | re.S):
        change = CHANGE.search(text)
        assert change, f"answer {number} gives no *Change* (§N): `old` → `new`"
        s, old, *news, rerun = change.groups()
        s = int(s or 0)
        cells = [i for i, c in enumerate(nb.cells) if section[i] == s and c.cell_type == "code" and old in c.source]
        assert len(cells) == 1, f"answer {number}: `{old}` is in {len(cells)} code cells of §{s}, not in exactly one"
        index = cells[0]
        after = [i for i in range(index + 1, len(nb.cells)) if section[i] == s or rerun and section[i] == int(rerun)]
        runs += [(int(number), index, nb.cells[index].source.replace(old, new), after) for new in news if new]
    return sorted(runs, key=lambda run: -section[run[1]])


def execute(nb, exercise_runs=(), seconds=None):
    """Runs nb in place in a fresh python3 kernel whose working folder is docs/, as a reader's Jupyter would be; then,
    in the same kernel, each exercise run on copies of its cells (nb keeps its own outputs). → {exercise: the error
    its cells raised, or None}; `seconds` (a dict) gets the times of the "notebook" (kernel start included) and of
    the "exercises"."""
    client = NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    errors, seconds, start = {}, {} if seconds is None else seconds, time.perf_counter()
    with client.setup_kernel():
        client.execute(cleanup_kc=False)
        seconds["notebook"] = time.perf_counter() - start
        cells = list(nb.cells)  # execute_cell puts the cell it ran into nb: the notebook's own go back afterwards
        for number, index, source, after in exercise_runs:
            changed = copy.deepcopy(cells[index])
            changed.source = source
            try:
                for i, cell in [(index, changed)] + [(i, copy.deepcopy(cells[i])) for i in after]:
                    client.execute_cell(cell, i)
                errors.setdefault(number, None)
            except (CellExecutionError, CellTimeoutError) as e:
                errors[number] = e
        nb.cells[:] = cells
    seconds["exercises"] = time.perf_counter() - start - seconds["notebook"]
    return errors


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
    """The committed notebook, executed once for all tests, then its exercises: (notebook, the error a cell raised or
    None, {"notebook": seconds, "exercises": seconds}, {exercise: the error its change raised or None})."""
    from data import load_fashion_mnist
    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("the notebook needs Fashion-MNIST: apt-get install dataset-fashion-mnist")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    seconds = {}
    try:
        errors, error = execute(nb, exercises(nb), seconds), None
    except (CellExecutionError, CellTimeoutError) as e:
        errors, error = {}, e
    return nb, error, seconds, errors


def test_notebook_runs_on_a_cpu(executed):
    nb, error, seconds, _ = executed
    assert error is None, f"a cell of {NOTEBOOK.name} raised:\n{str(error)[-3000:]}"
    assert seconds["notebook"] <= BUDGET_S, f"{NOTEBOOK.name} took {seconds['notebook']:.0f} s, more than {BUDGET_S} s"
    assert pngs(nb, "readme-figure"), "no cell tagged readme-figure shows a figure"


def test_every_exercise_runs(executed):
    nb, error, seconds, errors = executed
    if error is not None:
        pytest.fail(f"{NOTEBOOK.name} did not run to the end (see test_notebook_runs_on_a_cpu)")
    questions = next(c.source for c in nb.cells if re.match(r"## \d+\. Exercises", c.source))
    numbers = re.findall(r"^(\d+)\. \*\*", questions, re.M)
    assert sorted(errors) == [int(n) for n in numbers], "every exercise needs an answer with a *Change*"
    for number, e in errors.items():
        assert e is None, f"exercise {number}'s change, as its answer gives it, raised:\n{str(e)[-3000:]}"
    assert seconds["exercises"] <= EXERCISE_BUDGET_S, f"the exercises took {seconds['exercises']:.0f} s"


def test_saved_figures_are_current(executed):
    nb, error, *_ = executed
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
