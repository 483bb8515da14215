"""experiments/plot_fid.py: the SVG of FID against compute is well-formed, has one line and one dot per measured
point of each model, and bad input ends in one line.

    python -m pytest -q tests/test_plot_fid.py
"""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import plot_fid  # noqa: E402

POINTS = {"x": "training compute (PFLOP)", "y": "FID-10k", "floor": 2.38,
        "series": {"D-AR": [[68, 8.19], [17, 12.3]], "plain diffusion": [[17, 17.4], [34, 13.3], [68, 9.19]]}}
NS = "{http://www.w3.org/2000/svg}"


def test_one_line_per_model_one_dot_per_point(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(POINTS))
    plot_fid.main([str(tmp_path / "p.json"), str(tmp_path / "f.svg")])
    root = ET.parse(tmp_path / "f.svg").getroot()
    lines = root.findall(f"{NS}polyline")
    assert [len(p.get("points").split()) for p in lines] == [2, 3]
    assert len(root.findall(f"{NS}circle")) == 5
    xs = [float(p.split(",")[0]) for p in lines[0].get("points").split()]
    assert xs == sorted(xs)  # points joined in order of compute
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert {"D-AR", "plain diffusion", "FID-10k", "real vs real 2.38"} <= set(texts)


def test_ticks_reach_past_the_largest_value():
    assert plot_fid.ticks(68) == [0, 20, 40, 60, 80]
    assert plot_fid.ticks(17.4) == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("spec, out, message", [
    ({"x": "c", "y": "f", "series": {}}, "f.svg", "non-empty series"),
    ({"x": "c", "y": "f", "series": {"a": [[1, "2"]]}}, "f.svg", "pairs of numbers"),
    (POINTS, "f.png", "must end in .svg"),
    ({**POINTS, "floor": "2.38"}, "f.svg", "floor must be a number"),
    ({**POINTS, "series": [[1, 2]]}, "f.svg", "series a dict"),
    ([1, 2], "f.svg", "needs keys x, y"),
])
def test_bad_input_is_one_line(tmp_path, capsys, spec, out, message):
    (tmp_path / "p.json").write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as e:
        plot_fid.main([str(tmp_path / "p.json"), str(tmp_path / out)])
    assert str(e.value).startswith("plot_fid.py: error: ") and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / out).exists()
