"""experiments/diffusion_baseline.py on a tiny config (CPU, seconds): it trains, samples, guides on the velocity and
refuses bad input in one line.

    python -m pytest -q tests/test_diffusion_baseline.py
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import diffusion_baseline as baseline  # noqa: E402
from test_evaluate import fake_fashion_mnist  # noqa: E402
from tokenizer import TokenizerConfig  # noqa: E402


def test_trains_then_samples_a_labelled_npz(tmp_path, monkeypatch):
    data = fake_fashion_mnist(tmp_path / "fmnist", n=32)
    baseline.main(["train", "--preset", "tiny", "--data", str(data), "--out-dir", str(tmp_path / "run"),
                   "--data-on-device", "--device", "cpu", "--global-batch-size", "8", "--max-steps", "4",
                   "--warmup-steps", "1", "--decay-steps", "2", "--log-every", "2"])
    assert (tmp_path / "run" / "summary.json").is_file()
    npz = tmp_path / "s.npz"
    args = ["sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--npz", str(npz), "--num-samples", "12",
            "--batch-size", "5", "--cfg-scale", "2", "--device", "cpu"]
    baseline.main(args)
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 0
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    first = images.copy()
    baseline.main(args)  # a batch's noise comes from the seed and its first index only
    with np.load(npz) as f:
        assert np.array_equal(f["arr_0"], first)
    calls = []  # one velocity per solver step and batch: 3 batches of at most 5
    velocity = baseline.ClassDiffusion.velocity
    monkeypatch.setattr(baseline.ClassDiffusion, "velocity", lambda m, *a: calls.append(1) or velocity(m, *a))
    baseline.main(args + ["--steps", "3"])  # more or fewer solver steps than the tokenizer's 8
    assert len(calls) == 3 * 3


def test_guidance_acts_on_the_velocity():
    torch.manual_seed(0)
    model = baseline.ClassDiffusion(TokenizerConfig.from_name("tiny", repa=False)).eval()
    with torch.no_grad():  # the official init zeroes the output: give the network something to say
        for p in model.parameters():
            p.normal_(std=0.1)
    x, t, labels = torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 4, 9])
    cond = model.velocity(x, t, (labels, None))
    uncond = model.velocity(x, t, (torch.full_like(labels, 10), None))
    guided = model.velocity(x, t, (labels, 3.0))
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--ckpt", "x.pt", "--npz", "s.npz", "--cfg-scale", "0.5"], "--cfg-scale: '0.5' must be"),
    (["train", "--lr", "-1"], "--lr: '-1' must be"),
    (["sample", "--ckpt", "missing.pt", "--npz", "s.npz", "--device", "cpu"], "missing.pt does not exist"),
])
def test_bad_input_ends_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        baseline.main(argv)
    text = str(e.value) if e.value.code not in (0, 2) else capsys.readouterr().err
    assert message in text and len(text.strip().splitlines()) <= 2  # argparse: usage + error


def test_refuses_a_checkpoint_of_another_script(tmp_path):
    torch.save(dict(kind="tokenizer", config={}, model={}, ema=None), tmp_path / "t.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of experiments/diffusion_baseline.py"):
        baseline.main(["sample", "--ckpt", str(tmp_path / "t.pt"), "--npz", str(tmp_path / "s.npz"),
                       "--device", "cpu"])
