"""Tests of data.py: python -m pytest -q tests/test_data.py"""
import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data


def test_parser_errors_are_one_line(capsys):
    p = data.ArgumentParser(prog="x.py")
    p.add_argument("--n", type=data.positive_int)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--n", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("x.py: error: argument --n") and "≥ 1" in err


@pytest.mark.parametrize("kind, text", [(data.positive_int, "0"), (data.positive_int, "1.5"),
                                        (data.nonnegative_int, "-1"), (data.positive_float, "nan"),
                                        (data.positive_float, "0"), (data.nonnegative_float, "inf"),
                                        (data.nonnegative_float, "abc")])
def test_number_types_refuse(kind, text):
    with pytest.raises(argparse.ArgumentTypeError):
        kind(text)


def test_number_types_accept():
    assert data.positive_int("3") == 3 and data.nonnegative_int("0") == 0
    assert data.positive_float("0.5") == 0.5 and data.nonnegative_float("0") == 0.0


def test_uint8_round_trip_is_the_fid_rule():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    u = data.to_uint8(x)  # 127.5·x + 128, truncated and clamped
    assert u.shape == (1, 1, 6, 3) and u.dtype == torch.uint8
    assert u[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]
    back = data.from_uint8(u)
    assert back.shape == (1, 3, 1, 6) and back.min() >= -1 and back.max() <= 1


def test_center_crop_arr_halves_then_crops():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 140:160] = 255  # a white stripe in the middle survives the centre crop
    out = data.center_crop_arr(Image.fromarray(arr), 20)
    assert out.shape == (20, 20, 3)
    assert out[:, 10].mean() > 200 and out[:, 0].mean() < 10


def test_open_image_names_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png"):
        data.open_image(bad)
    with pytest.raises(ValueError, match="no such file"):
        data.open_image(tmp_path / "missing.png")
    good = tmp_path / "good.png"
    Image.new("L", (40, 30), 200).save(good)
    x = data.load_image(good, 16)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.full_like(x, 200 / 127.5 - 1))


def test_open_image_refuses_huge_images(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(ValueError, match="big.png"):
        data.open_image(path)


def hostile_images(folder):
    """Files an image reader meets in the wild, each with what open_image must say about it."""
    good = folder / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    Image.new("RGB", (10, 10)).save(folder / "tiff.png", format="TIFF")  # not the format its name says
    Image.new("P", (10, 10)).save(folder / "anim.png", format="GIF")
    (folder / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # Pillow runs Ghostscript
    (folder / "half.png").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    buf = io.BytesIO()
    Image.open(good).save(buf, format="JPEG")
    (folder / "half.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")  # 81M pixels in 10 kB
    Image.new("L", (1, 40000)).save(folder / "strip.png")  # resized to 32×1.28M before a 32-px crop
    return {"tiff.png": "cannot identify", "anim.png": "cannot identify", "eps.png": "cannot identify",
            "half.png": "truncated", "half.jpg": "(?i:truncated)", "bomb.png": "pixels is more than",
            "strip.png": "aspect ratio is over 32:1"}


def test_open_image_reads_only_whole_images_of_its_formats(tmp_path):
    for name, message in hostile_images(tmp_path).items():
        with pytest.raises(ValueError, match=rf"^{tmp_path / name}: not a readable image \(.*{message}") as e:
            data.open_image(tmp_path / name)
        assert "\n" not in str(e.value)
    assert data.open_image(tmp_path / "good.png").size == (64, 64)
    assert data.open_image(io.BytesIO((tmp_path / "good.png").read_bytes())).size == (64, 64)
    with pytest.raises(ValueError, match="64×64 pixels is more than 1000 allowed"):
        data.open_image(tmp_path / "good.png", max_pixels=1000)


def test_image_folder_labels_and_crop(tmp_path):
    for c in ("b", "a"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (24, 12), (255, 0, 0)).save(tmp_path / c / "x.png")
    ds = data.ImageFolder(tmp_path, 8)
    assert ds.num_classes == 2 and ds.labels.tolist() == [0, 1]
    x, i = ds[1]
    assert x.shape == (3, 8, 8) and i == 1 and x[0].min() == 1 and x[1].max() == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.ImageFolder(tmp_path / "empty", 8)


def test_fashion_mnist_is_padded_gray():
    try:
        ds = data.FashionMNIST("test")
    except FileNotFoundError:
        pytest.skip("dataset-fashion-mnist is not installed")
    x, i = ds[0]
    assert len(ds) == 10000 and ds.num_classes == 10 and i == 0
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # the 2-pixel black border of the padding


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_fashion_mnist("train", tmp_path)


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "out.bin"
    data.atomic_save(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half of the new")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.atomic_save(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left behind


def test_atomic_save_npz_keeps_the_exact_path(tmp_path):
    path = tmp_path / "samples"  # np.savez(path) would write samples.npz; through a file object it cannot
    data.atomic_save(path, lambda f: np.savez(f, arr_0=np.zeros(3)))
    assert np.load(path)["arr_0"].shape == (3,)


def test_a_folder_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    (tmp_path / ".ckpt.pt.x1y2.tmp").write_bytes(b"left by a run killed mid-write")
    script = f"import data, time; data.lock_folder({str(tmp_path)!r}, '--out'); print('locked', flush=True); " \
             "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(data.__file__).parent)
    try:
        assert holder.stdout.readline() == "locked\n" and not (tmp_path / ".ckpt.pt.x1y2.tmp").exists()
        with pytest.raises(ValueError, match=rf"--out {tmp_path} is in use by pid {holder.pid} on \S+: wait for that "
                                             rf"run to end, or choose another --out"):
            data.lock_folder(tmp_path, "--out")
    finally:
        holder.kill()  # a crash: no clean-up runs, the kernel drops the lock
        holder.wait()
    data.lock_folder(tmp_path, "--out")
    data.LOCKS.pop(tmp_path).close()


def test_check_writable(tmp_path):
    data.check_writable(tmp_path / "a.png", {".png"})
    with pytest.raises(ValueError, match="must end in .png"):
        data.check_writable(tmp_path / "a.jpg", {".png"})
    with pytest.raises(ValueError, match="does not exist"):
        data.check_writable(tmp_path / "missing" / "a.png")
    with pytest.raises(ValueError, match="is a folder"):
        data.check_writable(tmp_path)


def test_setup_device_refuses_unknown_and_missing_devices():
    with pytest.raises(ValueError, match="not a device"):
        data.setup_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            data.setup_device("cuda")
    assert data.setup_device("cpu") == (0, 1, torch.device("cpu"))


def test_reference_image_pads_a_fashion_mnist_item_and_crops_the_rest():
    gray = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    x = data.reference_image(Image.fromarray(gray).convert("RGB"), 32)  # (1, 3, 32, 32)
    assert torch.equal(x, data.from_uint8(data.fmnist_rgb32(gray[None])))  # as the training images
    big = Image.new("RGB", (40, 30), (255, 0, 0))
    expected = data.from_uint8(data.center_crop_arr(big, 16)[None])
    assert torch.equal(data.reference_image(big, 16), expected) and len(data.FMNIST_CLASSES) == 10


def test_reference_images_are_preprocessed_like_training_images():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    x = data.reference_image(Image.fromarray(gray).convert("RGB"), 32)  # Fashion-MNIST: padded with black
    assert x.shape == (1, 3, 32, 32)
    assert np.array_equal(data.to_uint8(x)[0, 2:30, 2:30, 0].numpy(), gray) and (x[0, :, :2] == -1).all()
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    y = data.reference_image(wide, 32)  # ADM centre crop of the middle 300×300
    assert y.shape == (1, 3, 32, 32) and y.abs().max() <= 1
