"""experiments/ablations.py with the tiny recipe: every study end to end on one shared out-dir (the baseline is
trained once), the shape of its JSON and Markdown outputs, the stages, and the verdicts on made-up numbers.

    python -m pytest -q tests/test_ablations.py
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ablations  # noqa: E402
from data import fmnist_dir  # noqa: E402

pytestmark = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST is not installed")

# per study: rows, the metrics of our rows, the paper's columns, and whether there is a real-vs-real floor
RECON, GEN = {"rFID", "PSNR", "Class kept"}, {"FID", "Precision", "Recall", "Class accuracy"}
EXPECTED = {
    "table2": (5, RECON, {"rFID"}, False),
    "table4": (4, GEN, {"FID", "Precision", "Recall"}, True),
    "table5": (4, GEN, {"FID", "Precision", "Recall"}, True),
    "table6": (3, RECON | {"Codebook use"}, {"rFID", "Codebook use"}, False),
    "figure7": (4, RECON | GEN | {"AR loss"}, {"rFID", "FID"}, True),
    "table7": (10, GEN, {"FID", "Precision", "Recall"}, True),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread_trainers():
    """The trainers run as subprocesses: one thread each, as the one_thread fixture gives this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ablations")


def run(out_dir, *args):
    ablations.main([*args, "--recipe", "tiny", "--out-dir", str(out_dir), "--device", "cpu"])


@pytest.mark.parametrize("table", [pytest.param(t, marks=pytest.mark.slow) if t == "figure7" else t for t in EXPECTED])
def test_study_writes_json_and_markdown(out_dir, table):
    run(out_dir, table)
    n, ours, paper, floor = EXPECTED[table]
    result = json.loads((out_dir / f"results_{table}.json").read_text())
    assert (result["table"], result["recipe"], result["seed"]) == (table, "tiny", 0)
    assert len(result["rows"]) == n and ("floor" in result) == floor
    for row in result["rows"]:
        assert set(row["ours"]) == ours and set(row["paper"]) <= paper
        assert all(math.isfinite(v) for v in row["ours"].values() if isinstance(v, float))
    assert set().union(*(r["paper"] for r in result["rows"])) == paper
    assert result["verdict"].startswith("Paper: ") and "hold" in result["verdict"]
    lines = (out_dir / f"{table}.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
    assert lines[header + 1].startswith("|---")
    assert [line.split(" | ")[0] for line in lines[header + 2:header + 2 + n]] == \
        [f"| {r['setting']}" for r in result["rows"]]
    assert lines[header + 2 + n] == "" and f"**Verdict.** {result['verdict']}" in lines


def test_paper_numbers_in_the_outputs(out_dir):
    run(out_dir, "table2")
    rows = json.loads((out_dir / "results_table2.json").read_text())["rows"]
    assert [r["paper"]["rFID"] for r in rows] == [2.35, 1.58, 1.52, 1.73, 1.93]  # paper Table 2
    assert [r["setting"] for r in rows][2] == "Adams-2, 8 steps"


def test_sets_are_shared_and_previews_kept(out_dir):
    run(out_dir, "table5")
    with np.load(out_dir / "sets" / "gen-ar-s2-k8-cfg1.1-4.0-previews.npz") as f:
        images, labels, previews = f["arr_0"], f["arr_1"], f["previews"]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert previews.shape == (8, 3, 32, 32, 3) and labels.tolist() == list(range(8))
    models = sorted(p.name for p in (out_dir / "models").iterdir())
    assert models.count("tok-s2-k8") == 1 and "ar-s2-k8" in models


def test_metrics_stage_reuses_the_sets(out_dir):
    run(out_dir, "table6")
    ckpt = out_dir / "models" / "tok-s1-k8" / "ckpt.pt"
    before = (ckpt.stat().st_mtime_ns, json.loads((out_dir / "results_table6.json").read_text()))
    run(out_dir, "table6", "--stage", "metrics")
    assert (ckpt.stat().st_mtime_ns, json.loads((out_dir / "results_table6.json").read_text())) == before


def test_metrics_stage_without_sets_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no such set; run this table with --stage sample"):
        run(tmp_path, "table2", "--stage", "metrics")


def test_another_seed_needs_another_out_dir(out_dir):
    run(out_dir, "table2")
    with pytest.raises(SystemExit, match="holds a run of recipe tiny, seed 0"):
        run(out_dir, "table2", "--seed", "1")


def test_a_training_cut_short_resumes(tmp_path, monkeypatch):
    calls = []

    def trainer(argv, cwd):  # finishes the training: its summary.json
        calls.append(argv[1:])
        (tmp_path / "summary.json").write_text('{"step": 3, "loss": 1.5}')
        return subprocess.CompletedProcess(argv, 0)
    monkeypatch.setattr(ablations.subprocess, "run", trainer)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert ablations.train_once(tmp_path, "train_ar.py", "train", "--max-steps", "3") == {"step": 3, "loss": 1.5}
    ablations.train_once(tmp_path, "train_ar.py", "train", "--max-steps", "3")
    assert calls == [["train_ar.py", "train", "--max-steps", "3", "--resume"]]  # resumed once, then done


def test_a_failed_training_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ablations.subprocess, "run", lambda argv, cwd: subprocess.CompletedProcess(argv, 1))
    with pytest.raises(SystemExit, match=r"^ablations.py: error: train_ar.py train \.\.\. failed"):
        ablations.train_once(tmp_path, "train_ar.py", "train", "--max-steps", "3")


def test_verdicts_follow_the_numbers():
    good = {"euler-4": 3.0, "euler-8": 2.0, "adams2-8": 1.9, "euler-12": 2.1, "euler-16": 2.2}
    assert "NOT" not in ablations.verdict_table2({"rFID": good})
    assert "NOT" in ablations.verdict_table2({"rFID": {**good, "euler-4": 1.0}})
    assert "NOT" not in ablations.verdict_table5({"FID": {1: 9.0, 2: 5.0, 3: 4.0, 4: 3.0}})
    assert "NOT" in ablations.verdict_table5({"FID": {1: 9.0, 2: 5.0, 3: 6.0, 4: 3.0}})
    fid = {f"normal {c}": 3.0 for c in ablations.CFG} | {f"reversed {c}": 4.0 for c in ablations.CFG}
    assert "worse at 5 of 5" in ablations.verdict_table7({"FID": fid})
    assert "NOT" in ablations.verdict_table7({"FID": {**fid, "reversed 1.5": 2.0}})


def test_codebook_use_is_the_trainers_final_figure(out_dir):
    run(out_dir, "table6")
    rows = json.loads((out_dir / "results_table6.json").read_text())["rows"]
    for row, shift in zip(rows, (1, 2, 4)):
        summary = json.loads((out_dir / "models" / ablations.tokenizer_name(shift) / "summary.json").read_text())
        assert row["ours"]["Codebook use"] == pytest.approx(summary["codebook_used"] / 100)


@pytest.mark.slow
def test_ar_loss_is_the_trainers_final_figure(out_dir):
    run(out_dir, "figure7")
    rows = json.loads((out_dir / "results_figure7.json").read_text())["rows"]
    for row, groups in zip(rows, (1, 4, 8, 16)):
        summary = json.loads((out_dir / "models" / ablations.ar_name(groups=groups) / "summary.json").read_text())
        assert row["ours"]["AR loss"] == summary["loss"]
