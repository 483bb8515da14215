"""experiments/fid_fmnist.py, the FID-10k protocol, on tiny random models, 20 fake images a side and a stand-in for
Inception (CPU, seconds): every row is written, with the figures each kind of row promises.

    python -m pytest -q tests/test_fid_fmnist.py
"""
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fid_fmnist  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_evaluate import TinyFeatures, fake_fashion_mnist  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402


def test_floor_reconstructions_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_fashion_mnist(tmp_path / "fmnist", n=20)))
    monkeypatch.setattr(fid_fmnist, "N", 20)
    monkeypatch.setattr(fid_fmnist.evaluate, "find_inception_weights", lambda: None)
    monkeypatch.setattr(fid_fmnist.evaluate, "load_inception", lambda path: TinyFeatures())
    torch.manual_seed(0)
    tok, gpt = Tokenizer(TokenizerConfig.from_name("tiny")), GPT(GPTConfig.from_name("GPT-tiny"))
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), tmp_path / "t.pt")
    torch.save(dict(kind="gpt", config=asdict(gpt.config), model=gpt.state_dict(), ema=None), tmp_path / "g.pt")
    out = tmp_path / "rows.json"
    fid_fmnist.main(["--tokenizer-ckpt", str(tmp_path / "t.pt"), "--gpt-ckpt", str(tmp_path / "g.pt"), "--floor",
                     "--recon", "--cfg", "1", "1,3", "--seeds", "0", "1", "--steps", "4", "--device", "cpu",
                     "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == [
        "floor: 20 training images", "reconstructions, 4 steps, seed 0", "reconstructions, 4 steps, seed 1",
        "samples, 4 steps, CFG 1, seed 0", "samples, 4 steps, CFG 1, seed 1", "samples, 4 steps, CFG 1,3, seed 0",
        "samples, 4 steps, CFG 1,3, seed 1"]
    for r in rows:
        assert math.isfinite(r["FID"]) and r["FID"] >= -1e-6 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 <= r["class accuracy"] <= 1
    assert all(0 < r["PSNR"] < 60 for r in rows[1:3])
    assert rows[3]["FID"] != rows[4]["FID"]  # two seeds of sampling, two sets of images
    fid_fmnist.main(["--tokenizer-ckpt", str(tmp_path / "t.pt"), "--gpt-ckpt", str(tmp_path / "g.pt"), "--recon",
                     "--cfg", "1", "--solver", "adams2", "euler", "--steps", "4", "2", "--device", "cpu",
                     "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == [
        "reconstructions, 4 steps, seed 0", "samples, 4 steps, CFG 1, seed 0", "reconstructions, 2 steps, seed 0",
        "samples, 2 steps, CFG 1, seed 0", "reconstructions, euler, 4 steps, seed 0",
        "samples, euler, 4 steps, CFG 1, seed 0", "reconstructions, euler, 2 steps, seed 0",
        "samples, euler, 2 steps, CFG 1, seed 0"]
    fid_fmnist.main(["--tokenizer-ckpt", str(tmp_path / "t.pt"), "--gpt-ckpt", str(tmp_path / "missing.pt"),
                     "--recon", "--steps", "4", "--device", "cpu", "--out", str(out)])  # no GPT read
    assert [r["what"] for r in json.loads(out.read_text())] == ["reconstructions, 4 steps, seed 0"]
    fid_fmnist.main(["--tokenizer-ckpt", str(tmp_path / "t.pt"), "--gpt-ckpt", str(tmp_path / "g.pt"), "--cfg", "1",
                     "--temperature", "1", "0.5", "--steps", "2", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == ["samples, 2 steps, CFG 1, seed 0",
                                         "samples, 2 steps, CFG 1, temperature 0.5, seed 0"]


def test_the_protocol_takes_10000_images():
    judge = object.__new__(fid_fmnist.Judge)
    with pytest.raises(ValueError, match="10000 images of 32 x 32 x 3"):
        judge(torch.zeros(5, 32, 32, 3).numpy())


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "1", "--gpt-ckpt", "missing.pt"], "fid_fmnist.py: error: checkpoint missing.pt does not exist"),
    (["--recon", "--tokenizer-ckpt", "missing.pt"], "fid_fmnist.py: error: checkpoint missing.pt does not exist"),
    (["--floor", "--out", "no/such/folder/rows.json"], "fid_fmnist.py: error: no/such/folder/rows.json: the folder"),
])
def test_bad_input_ends_in_one_line_before_any_work(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid_fmnist, "Judge", None)  # never reached: the inputs are checked first
    with pytest.raises(SystemExit) as e:
        fid_fmnist.main([*argv, "--device", "cpu"])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
