"""Tests of train_ar.py (code extraction and AR training) on tiny models, CPU only.

    python -m pytest -q tests/test_train_ar.py

The two torchrun tests start 2 gloo processes each (a few seconds).
"""
import gzip
import json
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
import train_ar  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

V, N = 64, 32  # the tiny tokenizer's codebook and token count


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and several threads crawl on a busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*argv):
    train_ar.main(train_ar.parse_args([str(a) for a in argv]))


def make_tokenizer(path):
    """The tiny tokenizer with jittered weights: at its init the codes do not depend on the image yet."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny"))
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), path)
    return tok.eval()


def make_codes(path, codes, labels, num_classes=3):
    """A code folder as `extract` writes it, from given arrays."""
    path.mkdir(parents=True)
    np.save(path / "codes.npy", codes.astype(np.int16))
    np.save(path / "labels.npy", labels.astype(np.int64))
    meta = dict(num_images=len(codes), views=1, num_tokens=codes.shape[1], vocab_size=V, num_classes=num_classes,
                complete=True)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def learnable_codes(rows, seed=0):
    """Each row counts up from a random start with a step given by its class, so the loss can fall."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    codes = (rng.integers(0, V, (rows, 1)) + (labels[:, None] + 1) * np.arange(N)) % V  # (rows, N)
    return codes, labels


def train_args(codes_dir, out_dir, *extra):
    return ["train", "--codes", codes_dir, "--gpt-model", "GPT-tiny", "--out-dir", out_dir, "--device", "cpu",
            "--log-every", 1000, *extra]


def load(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=False)


def test_help_runs(capsys):
    for cmd in ("extract", "train"):
        with pytest.raises(SystemExit) as exit:
            train_ar.parse_args([cmd, "--help"])
        assert exit.value.code == 0 and "--device" in capsys.readouterr().out


def test_extract_matches_encode_and_resumes(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.pt")
    rng = np.random.default_rng(0)
    for k in range(7):  # two classes; sizes other than 32 exercise the resize + center crop
        (tmp_path / "imgs" / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        size = (32, 32) if k < 2 else (40, 36)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "ab"[k % 2] /
                                                                               f"{k}.png")
    out = tmp_path / "codes"
    argv = ["extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", tmp_path / "imgs", "--out", out, "--flip",
            "--batch-size", 2, "--num-workers", 0, "--device", "cpu"]
    run(*argv, "--chunk-size", 3)
    data = train_ar.make_dataset(str(tmp_path / "imgs"), 32)  # the image folder of stage 1
    first = Image.open(data.paths[0])  # a 32x32 image passes through unchanged
    assert torch.equal(data[0][0], torch.from_numpy(np.array(first)).permute(2, 0, 1).float() / 127.5 - 1)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (7, 3, 32, 32)
    with torch.no_grad():
        expected = torch.cat([tok.encode(images), tok.encode(images.flip(-1))]).numpy()  # (14, N)
    codes, labels = np.load(out / "codes.npy"), np.load(out / "labels.npy")
    assert codes.dtype == np.int16 and codes.shape == (14, N) and len(np.unique(codes[:7], axis=0)) > 1
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(labels, np.tile(data.labels, 2))
    assert sorted(data.labels) == [0, 0, 0, 0, 1, 1, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_classes"] == 2 and meta["vocab_size"] == V

    run("train", "--codes", out, "--gpt-model", "GPT-tiny", "--out-dir", tmp_path / "run", "--device", "cpu",
        "--global-batch-size", 7, "--epochs", 1)  # the training side reads this folder
    assert load(tmp_path / "run")["config"]["num_classes"] == 2

    # resume: chunk 1 (images 3-5) lost, chunk 0 marked done but altered -> only chunk 1 is redone
    os.remove(out / "done" / "1")
    mm = np.lib.format.open_memmap(out / "codes.npy", "r+")
    mm[[0, 3, 4, 5, 10]] = -1
    mm.flush()
    del mm
    meta["complete"] = False
    (out / "meta.json").write_text(json.dumps(meta))
    run(*argv, "--chunk-size", 3)
    codes = np.load(out / "codes.npy")
    np.testing.assert_array_equal(codes[1:], expected[1:])
    assert (codes[0] == -1).all()
    with pytest.raises(SystemExit, match="other settings"):
        run(*argv, "--chunk-size", 4)


def test_epoch_order_takes_each_image_once_in_one_view():
    n = 1000
    rows = train_ar.epoch_order(0, 3, n, 2)
    assert sorted(rows % n) == list(range(n)) and set(rows // n) == {0, 1}
    assert np.array_equal(rows, train_ar.epoch_order(0, 3, n, 2))
    assert not np.array_equal(rows, train_ar.epoch_order(0, 4, n, 2))
    assert (train_ar.epoch_order(0, 3, n, 1) < n).all()


def test_fashion_mnist_reader(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(16) + images.astype(np.uint8).tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(8) + bytes([7, 0, 9]))
    data = train_ar.make_dataset(str(tmp_path), 32)
    x, i = data[2]
    assert len(data) == 3 and data.num_classes == 10 and list(data.labels) == [7, 0, 9] and i == 2
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(images[2]).float() / 127.5 - 1)


def test_training_on_a_fixed_batch_lowers_the_loss(tmp_path):
    codes, labels = learnable_codes(16)
    cdir = make_codes(tmp_path / "codes", codes, labels)
    run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 16, "--epochs", 40, "--decay-epochs", 0,
                    "--lr", 3e-3, "--class-dropout", 0))
    x, y = torch.from_numpy(codes).long(), torch.from_numpy(labels)
    torch.manual_seed(0)
    before = GPT(GPT.from_checkpoint(tmp_path / "run" / "ckpt.pt").config).eval()
    after = GPT.from_checkpoint(tmp_path / "run" / "ckpt.pt")
    with torch.no_grad():
        loss0, loss1 = before(x[:, :-1], y, x)[1].item(), after(x[:, :-1], y, x)[1].item()
    assert abs(loss0 - np.log(V)) < 1e-4  # zero-initialised head: uniform logits
    assert loss1 < loss0 - 1.0, (loss0, loss1)


def test_resume_is_exact(tmp_path):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(24))
    common = ["--global-batch-size", 8, "--grad-accum", 2, "--epochs", 2, "--decay-epochs", 1, "--ema",
              "--ema-decay", 0.9, "--dropout", 0.1]  # 6 steps over 2 epochs, dropout on: its masks must repeat too
    run(*train_args(cdir, tmp_path / "straight", *common))
    run(*train_args(cdir, tmp_path / "resumed", *common, "--max-steps", 2))
    assert load(tmp_path / "resumed")["step"] == 2
    run(*train_args(cdir, tmp_path / "resumed", *common, "--resume"))
    a, b = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for name, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in state.items())
    with pytest.raises(SystemExit, match="flags give"):
        run(*train_args(cdir, tmp_path / "resumed", *common, "--resume", "--reverse-order"))


def test_reverse_order_flips_the_sequence(tmp_path):
    codes, labels = learnable_codes(8)
    fwd = make_codes(tmp_path / "fwd", codes, labels)
    rev = make_codes(tmp_path / "rev", codes[:, ::-1], labels)
    common = ["--global-batch-size", 4, "--epochs", 1]
    run(*train_args(rev, tmp_path / "a", *common, "--reverse-order"))  # reversed twice = the plain sequences
    run(*train_args(fwd, tmp_path / "b", *common))
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["config"]["reverse_order"] and not b["config"]["reverse_order"]
    assert GPT.from_checkpoint(tmp_path / "a" / "ckpt.pt").config.reverse_order  # samplers read it from here


@pytest.mark.parametrize("flags", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_step_matches_one_process(tmp_path, flags):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(16))
    # class dropout stays on: its mask is drawn per global sample, so it must agree between the two runs
    common = ["--global-batch-size", 8, "--epochs", 1, "--max-steps", 1, "--class-dropout", 0.5]
    run(*train_args(cdir, tmp_path / "one", *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_ar.py"), *map(str, train_args(cdir, tmp_path / "two", *common, *flags))]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["config"] == b["config"] and b["step"] == 1
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=0)
    torch.manual_seed(0)  # the trainer's initial weights: the step must have moved them
    init = GPT(GPTConfig(**a["config"])).state_dict()
    assert any(not torch.equal(a["model"][k], init[k]) for k in init)
