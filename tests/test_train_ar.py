"""Tests of train_ar.py (code extraction and AR training) on tiny models, CPU only.

    python -m pytest -q tests/test_train_ar.py

The two torchrun tests start 2 gloo processes each (a few seconds).
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_ar  # noqa: E402
import trainer  # noqa: E402
from data import center_crop_arr, from_uint8, make_dataset  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_data import hostile_images  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402

V, N = 64, 32  # the tiny tokenizer's codebook and token count


def run(*argv):
    train_ar.main([str(a) for a in argv])


def make_tokenizer(path):
    """The tiny tokenizer with jittered weights: at its init the codes do not depend on the image yet."""
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny"))
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), path)
    return tok.eval()


def make_images(folder, sizes):
    """Random images of the given (H, W) sizes, alternating between class folders a and b."""
    rng = np.random.default_rng(0)
    for k, size in enumerate(sizes):
        (folder / "ab"[k % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / "ab"[k % 2] / f"{k}.png")
    return folder


def make_codes(path, codes, labels, num_classes=3, **meta):
    """A code folder as `extract` writes it, from given arrays."""
    path.mkdir(parents=True)
    np.save(path / "codes.npy", codes.astype(np.int16))
    np.save(path / "labels.npy", labels.astype(np.int64))
    meta = {**dict(num_images=len(codes), views=1, num_tokens=codes.shape[1], vocab_size=V, num_classes=num_classes,
                   complete=True), **meta}
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
    return torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)


def test_help_runs(capsys):
    for cmd in ("extract", "train"):
        with pytest.raises(SystemExit) as exit:
            train_ar.parse_args([cmd, "--help"])
        assert exit.value.code == 0 and "--device" in capsys.readouterr().out


def test_extract_matches_encode_and_resumes(tmp_path):
    tok = make_tokenizer(tmp_path / "tok.pt")
    imgs = make_images(tmp_path / "imgs", [(32, 32)] * 2 + [(40, 36)] * 5)  # other sizes: ADM centre crop
    out = tmp_path / "codes"
    argv = ["extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", imgs, "--out", out, "--views", "flip",
            "--batch-size", 2, "--num-workers", 0, "--device", "cpu"]
    run(*argv, "--chunk-size", 3)
    data = make_dataset(str(imgs), 32)  # the image folder of stage 1
    first = Image.open(data.paths[0])  # a 32x32 image passes through unchanged
    assert torch.equal(data[0][0], from_uint8(np.array(first)[None])[0])
    images = torch.stack([data[i][0] for i in range(len(data))])  # (7, 3, 32, 32)
    with torch.no_grad():
        expected = torch.cat([tok.encode(images), tok.encode(images.flip(-1))]).numpy()  # (14, N)
    codes, labels = np.load(out / "codes.npy"), np.load(out / "labels.npy")
    assert codes.dtype == np.int16 and codes.shape == (14, N) and len(np.unique(codes[:7], axis=0)) > 1
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(labels, np.tile(data.labels, 2))
    assert sorted(data.labels) == [0, 0, 0, 0, 1, 1, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["num_classes"] == 2 and meta["vocab_size"] == V and meta["skipped"] == []

    run("train", "--codes", out, "--gpt-model", "GPT-tiny", "--out-dir", tmp_path / "run", "--device", "cpu",
        "--global-batch-size", 7, "--epochs", 1)  # the training side reads this folder
    assert load(tmp_path / "run")["config"]["num_classes"] == 2

    # resume: chunk 1 (images 3-5) lost, chunk 0 marked done but altered -> only chunk 1 is redone
    os.remove(out / "done" / "1")
    mm = np.lib.format.open_memmap(out / "codes.npy", "r+")
    mm[[0, 3, 4, 5, 10]] = -1
    mm.flush()
    del mm
    (out / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    run(*argv, "--chunk-size", 3)
    codes = np.load(out / "codes.npy")
    np.testing.assert_array_equal(codes[1:], expected[1:])
    assert (codes[0] == -1).all()
    with pytest.raises(SystemExit, match="other settings"):
        run(*argv, "--chunk-size", 4)


def test_ten_crop_views_are_torchvision_tencrop_of_the_1_1x_centre_crop(tmp_path):
    TenCrop = pytest.importorskip("torchvision.transforms").TenCrop
    tok = make_tokenizer(tmp_path / "tok.pt")
    imgs = make_images(tmp_path / "imgs", [(50, 60), (40, 40), (36, 70)])
    out = tmp_path / "codes"
    run("extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", imgs, "--out", out, "--batch-size", 2,
        "--num-workers", 0, "--device", "cpu")  # ten-crop is the default for image folders
    data = make_dataset(str(imgs), 32)
    views = train_ar.Views(data, "ten-crop", 32)
    for i, path in enumerate(data.paths):
        crop = Image.fromarray(center_crop_arr(Image.open(path).convert("RGB"), int(1.1 * 32)))  # 35 px
        expected = from_uint8(np.stack([np.asarray(c) for c in TenCrop(32)(crop)]))  # (10, 3, 32, 32)
        assert torch.equal(views[i][0], expected)
    assert not torch.equal(expected[0], expected[4]) and not torch.equal(expected[0], expected[5])
    codes = np.load(out / "codes.npy")
    n = len(data)
    with torch.no_grad():
        for v in range(10):  # row v·n + i holds view v of image i
            np.testing.assert_array_equal(codes[v * n:(v + 1) * n],
                                          tok.encode(torch.stack([views[i][0][v] for i in range(n)])).numpy())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["views"] == 10 and meta["augmentation"] == "ten-crop" and codes.shape == (10 * n, N)


def test_a_signal_stops_extraction_between_batches_and_a_rerun_finishes_it(tmp_path, signal_on_calls, monkeypatch):
    make_tokenizer(tmp_path / "tok.pt")
    imgs = make_images(tmp_path / "imgs", [(32, 32)] * 7)
    argv = ["extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", imgs, "--views", "single", "--batch-size", 2,
            "--chunk-size", 2, "--num-workers", 0, "--device", "cpu"]
    run(*argv, "--out", tmp_path / "straight")
    signal_on_calls(Tokenizer, "encode", {1})  # in the second batch, which completes chunk 1
    with pytest.raises(SystemExit) as e:
        run(*argv, "--out", tmp_path / "codes")
    assert e.value.code == "train_ar.py extract: stopped by SIGTERM: 2 chunks are complete; the same command " \
                          "finishes the others (the same codes)"
    assert sorted(os.listdir(tmp_path / "codes" / "done")) == ["0", "1"]
    with pytest.raises(ValueError, match="no complete extraction"):
        train_ar.load_codes(tmp_path / "codes")
    monkeypatch.undo()
    run(*argv, "--out", tmp_path / "codes")
    codes = train_ar.load_codes(tmp_path / "codes")[0]
    np.testing.assert_array_equal(codes, np.load(tmp_path / "straight" / "codes.npy"))


def fake_fashion_mnist(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes(16) + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes(8) + bytes(range(n)))
    return folder


def test_fashion_mnist_extracts_single_views_and_refuses_ten_crop(tmp_path):
    make_tokenizer(tmp_path / "tok.pt")
    fm = fake_fashion_mnist(tmp_path / "fm")
    argv = ["extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", fm, "--num-workers", 0, "--device", "cpu"]
    run(*argv, "--out", tmp_path / "codes")
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert meta["views"] == 1 and meta["augmentation"] == "single" and meta["num_classes"] == 10
    with pytest.raises(SystemExit, match="ten-crop: Fashion-MNIST"):
        run(*argv, "--out", tmp_path / "ten", "--views", "ten-crop")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out \S*file/codes: cannot create that folder"):
        run(*argv, "--out", tmp_path / "file" / "codes")
    with pytest.raises(SystemExit, match=r"error: checkpoint \S*nothing\.pt does not exist"):
        run(*argv[:1], "--tokenizer-ckpt", tmp_path / "nothing.pt", *argv[3:], "--out", tmp_path / "c2")


def test_corrupt_image_is_named_skipped_and_never_trained_on(tmp_path, capsys):
    make_tokenizer(tmp_path / "tok.pt")
    imgs = make_images(tmp_path / "imgs", [(32, 32)] * 5)
    (imgs / "a" / "2.png").write_bytes(b"not a png")
    out = tmp_path / "codes"
    run("extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", imgs, "--out", out, "--views", "single",
        "--num-workers", 0, "--device", "cpu", "--chunk-size", 2)
    printed = capsys.readouterr().out
    assert "2.png" in printed and "skipped 1 unreadable images" in printed
    meta = json.loads((out / "meta.json").read_text())
    bad = [i for i, p in enumerate(make_dataset(str(imgs), 32).paths) if p.name == "2.png"]
    assert meta["complete"] and meta["skipped"] == bad
    _, _, _, images = train_ar.load_codes(out)
    order = trainer.Order(images, 4, 0, torch.device("cpu")).epoch(0)
    assert sorted(order.tolist()) == sorted(set(range(5)) - set(bad))


def test_hostile_images_in_a_folder_are_named_skipped_and_counted(tmp_path, capsys):
    make_tokenizer(tmp_path / "tok.pt")
    imgs = make_images(tmp_path / "imgs", [(32, 32)] * 2)
    bad = hostile_images(imgs / "a")  # not the format of their name, truncated, a bomb, a 1×40000 strip
    out = tmp_path / "codes"
    run("extract", "--tokenizer-ckpt", tmp_path / "tok.pt", "--data", imgs, "--out", out, "--views", "single",
        "--num-workers", 0, "--device", "cpu")
    printed = capsys.readouterr().out
    for name in bad:
        assert f"skipping {imgs / 'a' / name}: not a readable image" in printed
    assert f"skipped {len(bad)} unreadable images" in printed
    _, _, meta, images = train_ar.load_codes(out)
    assert len(meta["skipped"]) == len(bad) and len(images) == 3  # 0.png, 1.png and good.png


FAST = pytest.mark.parametrize("fast", [[], ["--data-on-device"]], ids=["loader", "on-device"])


@FAST
def test_training_on_a_fixed_batch_lowers_the_loss(tmp_path, fast):
    codes, labels = learnable_codes(16)
    cdir = make_codes(tmp_path / "codes", codes, labels)
    run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 16, "--epochs", 40, "--decay-epochs", 0,
                    "--lr", 3e-3, "--class-dropout", 0, *fast))
    x, y = torch.from_numpy(codes).long(), torch.from_numpy(labels)
    torch.manual_seed(0)
    before = GPT(GPT.from_checkpoint(tmp_path / "run" / "ckpt.pt").config).eval()
    after = GPT.from_checkpoint(tmp_path / "run" / "ckpt.pt")
    with torch.no_grad():
        loss0, loss1 = before(x[:, :-1], y, x)[1].item(), after(x[:, :-1], y, x)[1].item()
    assert abs(loss0 - np.log(V)) < 1e-4  # zero-initialised head: uniform logits
    assert loss1 < loss0 - 1.0, (loss0, loss1)


@FAST
def test_resume_is_exact(tmp_path, fast):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(24))
    common = ["--global-batch-size", 8, "--grad-accum", 2, "--epochs", 2, "--decay-epochs", 1, "--ema",
              "--ema-decay", 0.9, "--dropout", 0.1, *fast]  # 6 steps, 2 epochs, dropout on: its masks must repeat
    run(*train_args(cdir, tmp_path / "straight", *common))
    run(*train_args(cdir, tmp_path / "resumed", *common, "--max-steps", 2))
    assert load(tmp_path / "resumed")["step"] == 2
    run(*train_args(cdir, tmp_path / "resumed", *common, "--resume"))
    a, b = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert a["step"] == b["step"] == 6
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["step"] == 6
    assert_same_run(a, b)
    with pytest.raises(SystemExit, match="flags give"):
        run(*train_args(cdir, tmp_path / "resumed", *common, "--resume", "--reverse-order"))


def assert_same_run(a, b):
    """Two checkpoints hold the same step, weights, EMA and AdamW state, bit for bit."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for name, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in state.items())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_after_the_step_and_resume_is_exact(tmp_path, signal_on_calls, monkeypatch, signum):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(24))
    common = ["--global-batch-size", 8, "--grad-accum", 2, "--epochs", 2, "--decay-epochs", 1, "--ema",
              "--ema-decay", 0.9, "--dropout", 0.1, "--ckpt-every", 100]  # 6 steps, one scheduled checkpoint: the last
    run(*train_args(cdir, tmp_path / "straight", *common))
    signal_on_calls(GPT, "forward", {4}, signum)  # the first micro-batch of step 3 (0-based forward call 4)
    with pytest.raises(SystemExit) as e:
        run(*train_args(cdir, tmp_path / "resumed", *common))
    name = signal.Signals(signum).name
    assert e.value.code == f"train_ar.py train: stopped by {name} after step 3/6: {tmp_path / 'resumed' / 'ckpt.pt'} " \
                          f"holds it; the same command with --resume continues the run exactly"
    assert load(tmp_path / "resumed")["step"] == 3 and not (tmp_path / "resumed" / "summary.json").exists()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    monkeypatch.undo()
    run(*train_args(cdir, tmp_path / "resumed", *common, "--resume"))
    assert_same_run(load(tmp_path / "straight"), load(tmp_path / "resumed"))


@pytest.mark.slow
def test_a_second_trainer_on_the_folder_is_refused_and_sigterm_stops_the_first(tmp_path):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(8))
    argv = train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 10 ** 5, "--log-every", 20)
    first = subprocess.Popen([sys.executable, str(ROOT / "train_ar.py"), *map(str, argv)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    next(line for line in first.stdout if line.startswith("step 20/"))
    with pytest.raises(SystemExit) as e:
        run(*argv, "--overwrite")
    assert e.value.code.startswith(f"train_ar.py train: error: --out-dir {tmp_path / 'run'} is in use by pid "
                                   f"{first.pid} on ") and "\n" not in e.value.code
    first.send_signal(signal.SIGTERM)  # as a scheduler does before it preempts a job
    _, err = first.communicate(timeout=60)
    step = load(tmp_path / "run")["step"]
    assert first.returncode == 1 and err.splitlines() == [
        f"train_ar.py train: stopped by SIGTERM after step {step}/200000: {tmp_path / 'run' / 'ckpt.pt'} holds it; the "
        f"same command with --resume continues the run exactly"]
    run(*argv, "--resume", "--max-steps", step + 1)  # the lock went with the first run
    assert load(tmp_path / "run")["step"] == step + 1


@pytest.mark.slow
def test_killed_without_warning_again_and_again_and_resumed_ends_bit_identical(tmp_path):
    """SIGKILL (no handler runs) while starting up, mid-step and mid-checkpoint (one is written every step), then
    --resume from whatever is on disk, five times; the run ends as the uninterrupted one."""
    cdir = make_codes(tmp_path / "codes", *learnable_codes(16))
    common = ["--global-batch-size", 4, "--grad-accum", 2, "--epochs", 10, "--decay-epochs", 2, "--ema", "--ema-decay",
              0.9, "--dropout", 0.1, "--ckpt-every", 1, "--log-every", 1]  # 40 steps

    def start(out, *extra):
        return subprocess.Popen([sys.executable, str(ROOT / "train_ar.py"), *map(str, train_args(cdir, out, *common)),
                                 *extra], text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert start(tmp_path / "straight").wait(120) == 0
    rng, steps = np.random.default_rng(0), []
    for kill in range(5):
        ckpt = tmp_path / "killed" / "ckpt.pt"
        proc = start(tmp_path / "killed", *["--resume"] * ckpt.exists())
        if kill:  # the first dies while starting up, the others a few steps on, at any point of a step
            target = f"step {(steps[-1] + rng.integers(1, 8))}/"
            next(line for line in proc.stdout if line.startswith(target))
            time.sleep(rng.uniform(0, 0.1))
        proc.kill()
        proc.wait()
        steps.append(load(tmp_path / "killed")["step"] if ckpt.exists() else 0)
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] < 40, steps  # each run went on from the last
    assert start(tmp_path / "killed", "--resume").wait(120) == 0
    assert_same_run(load(tmp_path / "straight"), load(tmp_path / "killed"))
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # what a killed checkpoint write left is cleared


def test_refuses_to_start_over_a_checkpoint(tmp_path, capsys):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(8))
    common = ["--global-batch-size", 4, "--epochs", 1]
    run(*train_args(cdir, tmp_path / "run", *common))
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"ckpt\.pt already exists: pass --resume .* or --overwrite"):
        run(*train_args(cdir, tmp_path / "run", *common, "--seed", 1))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    assert (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(SystemExit, match="no complete extraction"):  # starts over, stops before its end
        run(*train_args(tmp_path / "nowhere", tmp_path / "run", *common, "--overwrite"))
    assert not (tmp_path / "run" / "summary.json").exists()  # so no summary: it marks a finished run
    run(*train_args(cdir, tmp_path / "run", *common, "--seed", 1, "--overwrite"))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() != before
    with pytest.raises(SystemExit):
        run(*train_args(cdir, tmp_path / "run", *common, "--resume", "--overwrite"))
    assert "not allowed with argument" in capsys.readouterr().err


def nan_on_calls(monkeypatch, calls):
    """GPT.forward returns a NaN loss on the given (0-based) calls."""
    forward, count = GPT.forward, iter(range(10 ** 6))

    def patched(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, loss * float("nan") if next(count) in calls else loss
    monkeypatch.setattr(GPT, "forward", patched)


def test_a_non_finite_step_is_skipped_whole(tmp_path, monkeypatch, capsys):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(8))
    common = ["--global-batch-size", 4, "--epochs", 1, "--ema", "--ema-decay", 0.5, "--log-every", 1]
    run(*train_args(cdir, tmp_path / "one", *common, "--max-steps", 1))
    nan_on_calls(monkeypatch, {1})  # the second of 2 steps
    run(*train_args(cdir, tmp_path / "two", *common))
    assert "skipped 1 |" in capsys.readouterr().out
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["step"] == 1 and b["step"] == 2
    for key in ("model", "ema"):  # the skipped step changed neither the weights nor the EMA
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    for name, state in a["optimizer"]["state"].items():  # nor AdamW's moments and step count
        assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in state.items())


def test_non_finite_steps_stop_the_run_and_keep_the_checkpoint(tmp_path, monkeypatch):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(16))
    common = ["--global-batch-size", 2, "--epochs", 1]  # 8 steps
    run(*train_args(cdir, tmp_path / "run", *common, "--max-steps", 2))
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"stopped at step 8: 5 steps in a row had a non-finite loss"):
        run(*train_args(cdir, tmp_path / "run", *common, "--resume", "--lr", 1e30))  # diverges after 1 step
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good  # not overwritten by the diverged run
    nan_on_calls(monkeypatch, {0, 1, 2, 3, 4})  # the first five steps of the next run
    with pytest.raises(SystemExit, match=r"stopped at step 8: 5 steps in a row"):
        run(*train_args(cdir, tmp_path / "run", *common, "--resume"))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good


@pytest.mark.parametrize("bad, message", [
    ("meta", "meta.json: not a readable JSON file"),
    ("sizes", r"codes\.npy holds int16 \(8, 32\), but meta\.json says \(16, 32\)"),
    ("views", r"labels\.npy holds int64 \(8,\), but meta\.json says \(16,\)"),
    ("labels", r"labels 0\.\.5, outside the 3 classes"),
    ("codes", r"codes\.npy: no such file"),
    ("incomplete", "no complete extraction"),
    ("tokens", r"tokens outside the vocabulary \[0, 64\)"),
    ("archive", r"codes\.npy: an archive of arrays, not one \.npy array"),
    ("objects", r"codes\.npy: not a readable \.npy file"),
    ("truncated", r"codes\.npy: not a readable \.npy file \(mmap length is greater than file size\)"),
    ("floats", r"codes\.npy holds float32 \(8, 32\), but meta\.json says \(8, 32\) integers"),
])
def test_bad_code_folders_fail_in_one_line(tmp_path, bad, message):
    codes, labels = learnable_codes(8)
    if bad == "labels":
        labels[3] = 5
    if bad == "tokens":
        codes[2, 4] = V
    cdir = make_codes(tmp_path / "codes", codes, labels, **({"views": 2} if bad == "views" else {}))
    meta = json.loads((cdir / "meta.json").read_text())
    if bad == "meta":
        (cdir / "meta.json").write_text("{not json")
    if bad == "sizes":
        (cdir / "meta.json").write_text(json.dumps({**meta, "num_images": 16}))
    if bad == "views":
        np.save(cdir / "codes.npy", np.concatenate([codes, codes]).astype(np.int16))
    if bad == "codes":
        os.remove(cdir / "codes.npy")
    if bad == "incomplete":
        (cdir / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    if bad == "archive":
        np.savez(cdir / "codes.npz", codes=codes)
        os.replace(cdir / "codes.npz", cdir / "codes.npy")
    if bad == "objects":  # loading it would run code
        np.save(cdir / "codes.npy", np.array([{}] * 8, dtype=object), allow_pickle=True)
    if bad == "truncated":
        (cdir / "codes.npy").write_bytes((cdir / "codes.npy").read_bytes()[:300])
    if bad == "floats":
        np.save(cdir / "codes.npy", codes.astype(np.float32))
    with pytest.raises(SystemExit, match=message) as e:
        run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 1))
    assert "\n" not in str(e.value.code) and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", 0], "--global-batch-size: '0' must be a whole number ≥ 1"),
    (["--grad-accum", 0], "--grad-accum: '0' must be"),
    (["--ckpt-every", 0], "--ckpt-every: '0' must be"),
    (["--gpt-model", "GPT-huge"], "unknown GPT preset 'GPT-huge'"),
    (["--class-dropout", 1.5], "must be a number in [0, 1)"),
])
def test_bad_flags_fail_in_one_line(tmp_path, capsys, flags, message):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(8))
    with pytest.raises(SystemExit) as e:
        run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 1), *flags)
    text = capsys.readouterr().err.strip() if isinstance(e.value.code, int) else e.value.code
    assert e.value.code != 0 and text.startswith("train_ar.py train: error: ") and "\n" not in text, text
    assert message in text


@FAST
def test_reverse_order_flips_the_sequence(tmp_path, fast):
    codes, labels = learnable_codes(8)
    fwd = make_codes(tmp_path / "fwd", codes, labels)
    rev = make_codes(tmp_path / "rev", codes[:, ::-1], labels)
    common = ["--global-batch-size", 4, "--epochs", 1, *fast]
    run(*train_args(rev, tmp_path / "a", *common, "--reverse-order"))  # reversed twice = the plain sequences
    run(*train_args(fwd, tmp_path / "b", *common))
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["config"]["reverse_order"] and not b["config"]["reverse_order"]
    assert GPT.from_checkpoint(tmp_path / "a" / "ckpt.pt").config.reverse_order  # samplers read it from here


@pytest.mark.slow
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


def torchrun(script, *argv, logs):
    """torchrun with 2 gloo processes on the CPU, each rank's stdout and stderr in logs/**/<rank>/ (a Popen)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--log-dir", str(logs), "--redirects", "3", str(ROOT / script), *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_dead_rank_ends_the_others_in_one_line_and_the_checkpoint_is_whole(tmp_path, kill_rank):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(16))
    proc = torchrun("train_ar.py", *train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 10 ** 5,
                                               "--ckpt-every", 20), logs=tmp_path / "logs")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "ckpt.pt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    kill_rank(proc, 1)
    start = time.time()
    assert proc.wait(60) != 0 and time.time() - start < 30  # not hanging in a collective
    err = next((tmp_path / "logs").rglob("0/stderr.log")).read_text().splitlines()
    assert len(err) == 1 and err[0].startswith("train_ar.py train: error: rank 0: another process of this run "
                                               "stopped (") and err[0].endswith("the files written so far are complete")
    assert load(tmp_path / "run")["step"] % 20 == 0  # whole, at a scheduled step


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_resume_is_exact(tmp_path):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(16))
    common = ["--global-batch-size", 4, "--epochs", 50, "--decay-epochs", 10, "--ema", "--log-every", 1, "--ckpt-every",
              1000]
    straight = torchrun("train_ar.py", *train_args(cdir, tmp_path / "straight", *common), logs=tmp_path / "l1")
    assert straight.wait(300) == 0
    proc = torchrun("train_ar.py", *train_args(cdir, tmp_path / "split", *common), logs=tmp_path / "l2")
    deadline = time.time() + 120
    while not any("step 5/" in f.read_text() for f in (tmp_path / "l2").rglob("0/stdout.log")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to each rank at its own moment
    assert proc.wait(60) != 0
    step = load(tmp_path / "split")["step"]
    err = [f.read_text() for f in sorted((tmp_path / "l2").rglob("*/stderr.log"))]
    assert err == [f"train_ar.py train: stopped by SIGTERM after step {step}/200: {tmp_path / 'split' / 'ckpt.pt'} "
                   f"holds it; the same command with --resume continues the run exactly\n", ""], err
    assert torchrun("train_ar.py", *train_args(cdir, tmp_path / "split", *common, "--resume"),
                    logs=tmp_path / "l3").wait(300) == 0
    assert_same_run(load(tmp_path / "straight"), load(tmp_path / "split"))


def test_data_on_device_draws_each_image_once_per_epoch_and_refuses_torchrun(tmp_path, monkeypatch):
    codes, labels = learnable_codes(12)
    cdir = make_codes(tmp_path / "codes", codes, labels, views=2, num_images=6)
    codes, labels, meta, images = train_ar.load_codes(cdir)

    def batches(step, *flags):
        argv = train_args(cdir, "out", "--global-batch-size", 3, "--class-dropout", 0.5, *flags)
        args = train_ar.parse_args([str(a) for a in argv])
        return train_ar.batches(codes, labels, images, meta, args, step, 1, 0, torch.device("cpu"))
    data = batches(0, "--data-on-device")
    steps = [next(data) for _ in range(2)]
    epoch = torch.cat([step[0][0] for step in steps])  # (6, N): each image once, in one of its 2 views
    rows = [int(np.flatnonzero((codes == x.numpy()).all(1))[0]) for x in epoch]
    assert sorted(r % 6 for r in rows) == list(range(6))
    for other in (batches(1, "--data-on-device"), batches(1)):  # a function of (seed, step) alone, on either path
        assert all(torch.equal(a, b) for a, b in zip(next(other)[0], steps[1][0]))
    monkeypatch.setattr(trainer, "setup_device", lambda name: (0, 2, torch.device("cpu")))
    with pytest.raises(SystemExit, match="--data-on-device is the one-process fast path"):
        run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 1, "--data-on-device"))


@pytest.mark.parametrize("flags, message", [
    (["--cuda-graph"], "--cuda-graph captures the --data-on-device step: pass --data-on-device too"),
    (["--cuda-graph", "--data-on-device"], "--cuda-graph needs a CUDA device, not cpu"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path, flags, message):
    cdir = make_codes(tmp_path / "codes", *learnable_codes(8))
    with pytest.raises(SystemExit) as e:
        run(*train_args(cdir, tmp_path / "run", "--global-batch-size", 4, "--epochs", 1, *flags))
    assert e.value.code.startswith("train_ar.py train: error: ") and "\n" not in e.value.code
    assert message in e.value.code and not (tmp_path / "run" / "ckpt.pt").exists()


def graph_runs(tmp_path, *flags):
    """An eager run, a graphed run and a graphed run resumed halfway: 12 steps over 3 epochs of 4, dropout on (a
    replay must draw its step's masks), the lr decaying over the last epoch (2^-9 · k/4: exact in the graphed
    AdamW's float32 lr tensor). Seed 1: no two replayed batches have the same sum, cpu_graphs' fingerprint of a
    batch. Returns the runs' folders, the settings and the codes."""
    cdir = make_codes(tmp_path / "codes", *learnable_codes(32))
    common = ["--global-batch-size", 8, "--grad-accum", 2, "--epochs", 3, "--decay-epochs", 1, "--lr", 2 ** -9,
              "--min-lr", 0, "--ema", "--ema-decay", 0.9, "--dropout", 0.1, "--data-on-device", "--seed", 1, *flags]
    run(*train_args(cdir, tmp_path / "eager", *common))
    run(*train_args(cdir, tmp_path / "graph", *common, "--cuda-graph"))
    run(*train_args(cdir, tmp_path / "split", *common, "--cuda-graph", "--max-steps", 6))
    run(*train_args(cdir, tmp_path / "split", *common, "--cuda-graph", "--resume"))
    return [tmp_path / run for run in ("eager", "graph", "split")], common, cdir


def test_graphed_steps_match_eager_steps_and_resume_exactly(tmp_path, cpu_graphs):
    replays = cpu_graphs(trainer)
    (eager, *graphed), common, cdir = graph_runs(tmp_path)
    assert len(replays) == 9 + 3 + 3 and len(set(replays[:9])) == 9  # 3 eager steps per run, then one replay each
    a = load(eager)
    for b in map(load, graphed):
        assert a["step"] == b["step"] == 12
        for key in ("model", "ema"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        for name, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][name][k]) for k, v in state.items())
    common[common.index("--epochs") + 1] = 4
    run(*train_args(cdir, graphed[1], *common, "--resume"))  # a graphed run's checkpoint continues eagerly
    assert all(type(g["lr"]) is float and not g["capturable"] for g in load(graphed[1])["optimizer"]["param_groups"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_on_cuda_matches_eager_and_resumes(tmp_path, monkeypatch):
    captures = []
    capture = trainer.StepGraph.capture
    monkeypatch.setattr(trainer.StepGraph, "capture", lambda self: captures.append(1) or capture(self))
    (eager, *graphed), _, _ = graph_runs(tmp_path, "--device", "cuda")
    assert len(captures) == 3  # the graphed run and both parts of the resumed one (6 steps each)
    a = load(eager)
    for b in map(load, graphed):
        for key in ("model", "ema"):
            for k in a[key]:
                torch.testing.assert_close(a[key][k], b[key][k], rtol=0, atol=1e-5)
