"""Tests of sample.py on tiny random models, CPU (the CUDA-graph check skips without a GPU).

    python -m pytest -q tests/test_sample.py

The torchrun test starts 2 gloo processes (a few seconds).
"""
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
from model import GPT, GPTConfig, decode_one_token  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402


def jitter(module, scale):
    """Random weights everywhere: at the official init the gates, adaLN and output head are zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny tokenizer (32 tokens in 8 groups of 4, codebook 64, 32 px) and a matching GPT-tiny, in our format."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tok = jitter(Tokenizer(TokenizerConfig.from_name("tiny")), 0.1)
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), d / "tok.pt")
    for name, overrides in (("gpt", {}), ("gpt_rev", dict(reverse_order=True)), ("gpt_big", dict(vocab_size=128))):
        gpt = jitter(GPT(GPTConfig.from_name("GPT-tiny", **overrides)), 0.5)
        torch.save(dict(kind="gpt", config=asdict(gpt.config), model=gpt.state_dict(), ema=None), d / f"{name}.pt")
    return d


def args(ckpts, *argv, gpt="gpt.pt"):
    return sample.parse_args(["--tokenizer-ckpt", str(ckpts / "tok.pt"), "--gpt-ckpt", str(ckpts / gpt),
                              "--device", "cpu", *map(str, argv)])


def models(a):
    return sample.load_models(a, torch.device("cpu"))


@pytest.mark.parametrize("solver", ["adams2", "euler"])
def test_streamed_decoding_equals_offline(ckpts, solver):
    a = args(ckpts, "--solver", solver, "--cfg-scale", "1.5,3.0")
    tok, gpt = models(a)
    labels = torch.tensor([0, 3, 9])
    tokens, noise, image, previews = sample.sample_batch(gpt, tok, labels, a, torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 32) and previews.shape == (3, 8, 32, 32, 3)
    offline = tok.decode(tokens, noise=noise, method=solver)
    assert offline.std() > 0.1  # a real image, not a constant
    torch.testing.assert_close(image, offline, atol=1e-5, rtol=1e-5)
    for k in (1, 4):  # previews are stored as uint8: equal up to the rounding of the conversion
        ref = sample.to_uint8(tok.decode(tokens, noise=noise, method=solver, groups=k)).int()
        assert (previews[:, k - 1].int() - ref).abs().max() <= 1
    assert torch.equal(previews[:, -1], sample.to_uint8(image))  # the last preview is the image
    assert not torch.equal(previews[:, 0], previews[:, -1])


def test_reverse_order_flips_before_decoding(ckpts):
    a = args(ckpts, gpt="gpt_rev.pt")
    tok, gpt = models(a)
    labels = torch.tensor([1, 2])
    tokens, noise, image, _ = sample.sample_batch(gpt, tok, labels, a, torch.Generator().manual_seed(2))
    generated = sample.generate(gpt, labels, cfg_scale=a.cfg_scale, generator=_after_noise(2, noise.shape))
    assert torch.equal(tokens, generated.flip(1))
    torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="reverse_order"):
        sample.main(args(ckpts, "--prefix-image", _ref_image(ckpts), "--prefix-tokens", 8, gpt="gpt_rev.pt"))


def _after_noise(seed, shape):
    """A generator in the state sample_batch leaves it in after drawing the noise."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g


def _ref_image(ckpts):
    path = ckpts / "ref.png"
    if not path.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def test_layout_control_keeps_the_reference_prefix(ckpts):
    k = 12
    a = args(ckpts, "--prefix-image", _ref_image(ckpts), "--prefix-tokens", k)
    tok, gpt = models(a)
    prefix = sample.prefix_codes(tok, a, torch.device("cpu"))
    assert prefix.shape == (1, k)
    labels = torch.tensor([0, 5, 7, 7])
    tokens, noise, image, _ = sample.sample_batch(gpt, tok, labels, a, torch.Generator().manual_seed(3),
                                                  prefix=prefix)
    assert torch.equal(tokens[:, :k], prefix.expand(4, -1))  # the reference's codes exactly
    assert not torch.equal(tokens[2, k:], tokens[3, k:])  # the rest is sampled (same class, different draws)
    torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="prefix-tokens"):
        sample.prefix_codes(tok, args(ckpts, "--prefix-image", _ref_image(ckpts), "--prefix-tokens", 32),
                            torch.device("cpu"))


def test_default_run_writes_preview_strips(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(args(ckpts, "--out", out, "--save-each", tmp_path / "each"))
    assert Image.open(out).size == (8 * 34, 10 * 34)  # 10 classes × 8 previews of 32 px with 2 px gaps
    assert len(list((tmp_path / "each").glob("*_previews.png"))) == 10
    assert len(list((tmp_path / "each").glob("*_class?.png"))) == 10


def test_npz_holds_the_samples(ckpts, tmp_path):
    path = tmp_path / "s.npz"
    sample.main(args(ckpts, "--num-samples", 5, "--batch-size", 2, "--npz", path, "--out", ""))
    with np.load(path) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 10
    assert labels.dtype == np.int64 and labels.shape == (5,) and labels.min() >= 0 and labels.max() < 10
    # the last batch (one sample) is seeded by its first index: rerun it alone through sample_batch
    a = args(ckpts)
    tok, gpt = models(a)
    g = torch.Generator().manual_seed(a.seed + 4)
    _, _, image, _ = sample.sample_batch(gpt, tok, torch.from_numpy(labels[4:]), a, g, keep_previews=False)
    assert np.array_equal(sample.to_uint8(image).numpy(), images[4:])


def test_torchrun_npz_matches_one_process(ckpts, tmp_path):
    common = ["--tokenizer-ckpt", ckpts / "tok.pt", "--gpt-ckpt", ckpts / "gpt.pt", "--device", "cpu",
              "--num-samples", 6, "--batch-size", 3, "--out", ""]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes, so that the float arithmetic is the same
    try:
        sample.main(sample.parse_args([str(c) for c in [*common, "--npz", tmp_path / "one.npz"]]))
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "sample.py"), *map(str, [*common, "--npz", tmp_path / "two.npz"])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not list(tmp_path.glob("two.npz.rank*"))  # the per-rank parts are merged and removed


def test_clear_errors(ckpts, tmp_path):
    with pytest.raises(SystemExit, match=r"labels \[10\] out of range"):
        sample.main(args(ckpts, "--labels", 3, 10))
    with pytest.raises(SystemExit, match="does not exist"):
        sample.main(sample.parse_args(["--tokenizer-ckpt", str(tmp_path / "nope.pt"), "--device", "cpu"]))
    with pytest.raises(SystemExit, match="128 codes"):
        sample.main(args(ckpts, gpt="gpt_big.pt"))
    with pytest.raises(SystemExit, match="tokenizer checkpoint, not an AR model"):
        sample.main(args(ckpts, gpt="tok.pt"))


def test_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--prefix-image" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_tokens_equal_eager(ckpts):
    a = args(ckpts)
    tok, gpt = sample.load_models(a, torch.device("cuda"))
    labels = torch.arange(4, device="cuda")
    results = []
    for graphs in (False, True):
        g = torch.Generator("cuda")
        step = sample.GraphedDecoder(gpt, 4, True, 1.0, 0, 1.0, g, window=8, graphs=graphs)
        g.manual_seed(0)
        results.append(sample.generate(gpt, labels, cfg_scale=4.0, generator=g, decode_fn=step))
    assert torch.equal(*results)
    g = torch.Generator("cuda").manual_seed(0)  # the full-cache eager step: same tokens up to rare argmax flips
    full = sample.generate(gpt, labels, cfg_scale=4.0, generator=g, decode_fn=decode_one_token)
    assert (full == results[0]).float().mean() > 0.9
    # the streamed decode on its side stream, fed by graph replays, still equals the offline decode
    # (cuDNN runs the pixel network's 1×1 convolutions in TF32 by default: 1e-3 differences between the two orders)
    g = torch.Generator("cuda").manual_seed(1)
    step = sample.GraphedDecoder(gpt, 4, True, 1.0, 0, 1.0, g, window=8)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        tokens, noise, image, previews = sample.sample_batch(gpt, tok, labels, a, g, step)
        torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-3, rtol=1e-3)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    ref = sample.to_uint8(tok.decode(tokens, noise=noise, groups=2)).int()
    assert (previews[:, 1].int() - ref).abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_main_runs(ckpts, tmp_path):
    sample.main(args(ckpts, "--device", "cuda", "--num-samples", 5, "--batch-size", 2, "--npz", tmp_path / "s.npz",
                     "--out", tmp_path / "g.png"))
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_0"].std() > 10
