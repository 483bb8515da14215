"""experiments/ablations.py with the tiny recipe: every study end to end over two seeds on one shared out-dir (the
baseline is trained once), the shape of its JSON and Markdown outputs and of the summary, the stages, and the
verdict rule on made-up numbers.

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


def run(out_dir, *args, seeds=("0", "1")):
    ablations.main([*args, "--recipe", "tiny", "--out-dir", str(out_dir), "--device", "cpu", "--seeds", *seeds])


VERDICTS = {"holds", "reversed", "within noise"}


SLOW = {"table6", "table7", "figure7"}  # more models per seed: the slow tier (`-m slow`) runs them


@pytest.mark.parametrize("table", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in EXPECTED])
def test_study_writes_json_and_markdown(out_dir, table):
    run(out_dir, table)
    n, ours, paper, floor = EXPECTED[table]
    result = json.loads((out_dir / f"results_{table}.json").read_text())
    assert (result["table"], result["recipe"], result["seeds"]) == (table, "tiny", [0, 1])
    assert len(result["rows"]) == n and ("floor" in result) == floor
    for row in result["rows"]:
        assert set(row["ours"]) == set(row["sd"]) == set(row["per seed"]) == ours and set(row["paper"]) <= paper
        for metric, values in row["per seed"].items():
            assert len(values) == 2 and all(math.isfinite(v) for v in values)
            assert row["ours"][metric] == pytest.approx(np.mean(values))
            assert row["sd"][metric] == pytest.approx(np.std(values, ddof=1))
    assert set().union(*(r["paper"] for r in result["rows"])) == paper
    assert result["verdict"] in VERDICTS and all(c["verdict"] in VERDICTS for c in result["claims"])
    lines = (out_dir / f"{table}.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| setting |"))
    assert lines[header + 1].startswith("|---")
    assert [line.split(" | ")[0] for line in lines[header + 2:header + 2 + n]] == \
        [f"| {r['setting']}" for r in result["rows"]]
    assert " ± " in lines[header + 2] and lines[header + 2 + n] == ""
    assert any(line.startswith(f"**Verdict: {result['verdict']}.**") for line in lines)
    for claim in result["claims"]:
        assert f"- Paper: {claim['claim']}: {claim['verdict']}." in lines
        assert all(f"  - {c['line']}" in lines for c in claim["comparisons"])


def test_paper_numbers_in_the_outputs(out_dir):
    run(out_dir, "table2")
    rows = json.loads((out_dir / "results_table2.json").read_text())["rows"]
    assert [r["paper"]["rFID"] for r in rows] == [2.35, 1.58, 1.52, 1.73, 1.93]  # paper Table 2
    assert [r["setting"] for r in rows][2] == "Adams-2, 8 steps"


def test_summary_lists_every_claim(out_dir):
    run(out_dir, "table2")
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("results_*.json"))]
    lines = (out_dir / "summary.md").read_text().splitlines()
    assert lines[0].startswith("| study | the paper's claim | paper |") and lines[1].startswith("|---")
    assert len(lines) == 2 + sum(len(r["claims"]) for r in results)
    assert "| Table 2 | Euler is best at 8 steps (rFID) | Euler 4 steps 2.35; Euler 8 steps 1.58; " in \
        "\n".join(lines)


def test_seeds_retrain_what_the_study_varies(out_dir):
    run(out_dir, "table5")
    with np.load(out_dir / "sets" / "gen-ar-s2-k8-tok0-seed1-cfg1.1-4.0-previews.npz") as f:
        images, labels, previews = f["arr_0"], f["arr_1"], f["previews"]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert previews.shape == (8, 3, 32, 32, 3) and labels.tolist() == list(range(8))
    run(out_dir, "table2")
    models = {p.name for p in (out_dir / "models").iterdir()}
    assert {"tok-s2-k8-seed0", "tok-s2-k8-seed1", "ar-s2-k8-tok0-seed0", "ar-s2-k8-tok0-seed1"} <= models
    assert "codes-tok-s2-k8-seed1" not in models  # the AR-side studies' seeds share the seed-0 tokenizer


def test_metrics_stage_reuses_the_sets(out_dir):
    run(out_dir, "table2")
    ckpt = out_dir / "models" / "tok-s2-k8-seed1" / "ckpt.pt"
    before = (ckpt.stat().st_mtime_ns, json.loads((out_dir / "results_table2.json").read_text()))
    run(out_dir, "table2", "--stage", "metrics")
    assert (ckpt.stat().st_mtime_ns, json.loads((out_dir / "results_table2.json").read_text())) == before


def test_seeds_can_come_in_several_sessions(out_dir):
    run(out_dir, "table2")
    ckpt = out_dir / "models" / "tok-s2-k8-seed1" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    run(out_dir, "table2", "--stage", "sample", seeds=("2",))
    run(out_dir, "table2", "--stage", "metrics", seeds=("0", "1", "2"))
    assert ckpt.stat().st_mtime_ns == before
    result = json.loads((out_dir / "results_table2.json").read_text())
    assert result["seeds"] == [0, 1, 2] and all(len(v) == 3 for r in result["rows"] for v in r["per seed"].values())
    run(out_dir, "table2", "--stage", "metrics", seeds=("2",))
    result = json.loads((out_dir / "results_table2.json").read_text())
    assert result["verdict"] == ablations.UNTESTED and "untested (1 seed)" in (out_dir / "table2.md").read_text()
    run(out_dir, "table2", "--stage", "metrics")  # the other tests' seeds again


def test_metrics_stage_without_sets_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"no such set; run this table with --stage sample"):
        run(tmp_path, "table2", "--stage", "metrics")


def test_an_out_dir_of_one_seed_needs_another_out_dir(tmp_path):
    settings = json.loads(json.dumps(ablations.asdict(ablations.RECIPES["tiny"])))
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "tiny", "seed": 0, "settings": settings}))
    with pytest.raises(SystemExit, match=r"^ablations.py: error: --out-dir .* holds a run of recipe tiny with other"):
        run(tmp_path, "table2")


def test_a_seed_given_twice_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "table2", seeds=("0", "1", "0"))
    assert capsys.readouterr().err == "ablations.py: error: --seeds: 0 1 0 names a seed twice\n"


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


def test_the_verdict_rule_on_made_up_numbers():
    assert ablations.compare([30.0, 31.0, 32.0], [33.0, 34.5, 35.0], lower_is_better=True)[0] == "holds"
    assert ablations.compare([33.0, 34.5, 35.0], [30.0, 31.0, 32.0], lower_is_better=True)[0] == "reversed"
    assert ablations.compare([0.9, 0.8], [0.5, 0.6], lower_is_better=False)[0] == "holds"
    verdict, difference, two_se = ablations.compare([30.0, 36.0, 31.0], [33.0, 34.0, 33.0], lower_is_better=True)
    assert verdict == "within noise" and difference == pytest.approx(1.0) and two_se == pytest.approx(
        2 * np.std([3.0, -2.0, 2.0], ddof=1) / 3 ** 0.5)  # paired: the sd of the per-seed differences
    assert ablations.compare([30.0], [33.0], lower_is_better=True) == (ablations.UNTESTED, 3.0, None)


def test_a_study_verdict_gathers_its_comparisons():
    rfid = {"Euler 4 steps": [52.0, 53.0, 54.0], "Euler 8 steps": [31.0, 32.0, 33.5],
            "Adams-2 8 steps": [35.0, 36.5, 37.0], "Euler 12 steps": [32.0, 35.0, 36.0],
            "Euler 16 steps": [33.0, 38.0, 38.5]}
    claims = ablations.judge(ablations.STUDIES["table2"], {"rFID": rfid})
    assert [c["verdict"] for c in claims] == ["holds", "reversed"]
    assert ablations.overall([c["verdict"] for c in claims]) == "reversed"
    line = claims[1]["comparisons"][0]["line"]
    assert line == ("Adams-2 8 steps rFID 36.2 ± 1.0 vs Euler 8 steps 32.2 ± 1.3: reversed "
                    "(difference −4.00, 2 SE 0.58)")
    assert ablations.overall(["holds", "within noise"]) == "within noise"
    assert ablations.judge(ablations.STUDIES["table2"], {"rFID": {k: v[:1] for k, v in rfid.items()}})[0][
        "verdict"] == ablations.UNTESTED


class NoSets:
    """A workspace stand-in for reading the studies' rows without making their sets."""
    def __getattr__(self, name):
        return lambda *args, **kwargs: ("numbers", name)


@pytest.mark.parametrize("table", EXPECTED)
def test_the_claims_go_the_way_of_the_papers_numbers(table):
    study = ablations.STUDIES[table]
    rows = {r.label: dict(zip(study.columns, r.paper or ())) for r in study.rows(NoSets())}
    for claim in study.claims:
        for a, b in claim.pairs:
            assert a in rows and b in rows, (claim.text, a, b)
            if claim.metric in rows[a] and claim.metric in rows[b]:
                better = rows[a][claim.metric] < rows[b][claim.metric]
                assert better == (claim.metric in ablations.LOWER_IS_BETTER), (claim.text, a, b)


def test_codebook_use_is_the_trainers_final_figure(out_dir):
    run(out_dir, "table6", seeds=("0",))  # one seed: two more tokenizers, not four
    rows = json.loads((out_dir / "results_table6.json").read_text())["rows"]
    for row, shift in zip(rows, (1, 2, 4)):
        for seed, value in zip((0,), row["per seed"]["Codebook use"], strict=True):
            summary = json.loads((out_dir / "models" / ablations.tokenizer_name(shift, seed=seed) / "summary.json")
                                 .read_text())
            assert value == pytest.approx(summary["codebook_used"] / 100)


@pytest.mark.slow
def test_ar_loss_is_the_trainers_final_figure(out_dir):
    run(out_dir, "figure7")
    rows = json.loads((out_dir / "results_figure7.json").read_text())["rows"]
    for row, groups in zip(rows, (1, 4, 8, 16)):
        for seed, value in zip((0, 1), row["per seed"]["AR loss"]):
            name = ablations.ar_name(groups=groups, tok_seed=seed, seed=seed)  # figure7 retrains both per seed
            assert value == json.loads((out_dir / "models" / name / "summary.json").read_text())["loss"]
