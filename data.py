"""Images, datasets and safe I/O for every script: command lines, the device, the image format, datasets, files.

    images in the model's format: (B, 3, H, W) float in [-1, 1];  on disk and for FID: (B, H, W, 3) uint8

One definition of each thing the scripts share, so that training, sampling and evaluation see the same pixels and
handle files the same way: `center_crop_arr` (ADM's centre crop, which the official AR trainer and evaluation use),
`to_uint8` (the conversion of the official FID script), all of Fashion-MNIST (the reader, the class names, 28×28
gray padded with black to 32×32 RGB), `atomic_save` (a file is either the old one or the complete new one, never
half written), `interruptible` (SIGTERM and Ctrl-C stop a loop where its files are complete), `lock_folder` (one
run per output folder) and `exit_on_error` (every way a run can end, in one line).
"""
import argparse
import fcntl
import gzip
import json
import math
import os
import re
import signal
import socket
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # the shipped model, found from any working folder
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist; FASHION_MNIST_DIR overrides
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
READ_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")  # the only ones read (Pillow knows dozens, some via other programs)
MAX_SIDE_RATIO = 32  # longest side over shortest: a 1×10⁶ strip would be resized to 32×32·10⁶ pixels before its crop
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # what sample.py writes
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger images are refused (a decompression bomb would exhaust memory)


# ---- command lines ----
class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`prog: error: ...`), without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, test, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {what}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number ≥ 1")
nonnegative_int = _number(int, lambda v: v >= 0, "a whole number ≥ 0")
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), "a finite number > 0")
nonnegative_float = _number(float, lambda v: v >= 0 and np.isfinite(v), "a finite number ≥ 0")
probability = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
seed_int = _number(int, lambda v: 0 <= v < 2 ** 63, "a whole number in [0, 2^63)")  # a generator's seed, + an index


def setup_device(name=None):
    """nanoGPT-style: a process group only under torchrun (RANK set). Returns rank, world size, device.
    name: 'cuda', 'cpu', 'mps' or None for the best available."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use cuda, cpu or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available (use --device cpu)")
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ---- the image format ----
def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 by 127.5·x + 128, truncated: the official FID script's rule."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def from_uint8(images):
    """(B, H, W, 3) uint8 array or tensor → (B, 3, H, W) float in [-1, 1]."""
    images = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # (a writable copy)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def center_crop_arr(image, size):
    """ADM's centre crop of a PIL image → (size, size, 3) uint8: halve with a box filter while the short side is at
    least 2·size, resize the short side to size (bicubic), cut the centre square."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), Image.BOX)
    scale = size / min(image.size)
    arr = np.array(image.resize(tuple(round(s * scale) for s in image.size), Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def open_image(path, max_pixels=None):
    """A PIL RGB image from a file or binary file object of one of READ_FORMATS; a missing, unreadable, corrupt,
    truncated, oversized (max_pixels, default MAX_IMAGE_PIXELS: a decompression bomb) or elongated (a crop would
    resize it to a huge strip) file raises ValueError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=READ_FORMATS) as im:
                w, h = im.size
                if w * h > (max_pixels or MAX_IMAGE_PIXELS):
                    raise ValueError(f"{w}×{h} pixels is more than {max_pixels or MAX_IMAGE_PIXELS} allowed")
                if max(w, h) > MAX_SIDE_RATIO * min(w, h):
                    raise ValueError(f"{w}×{h} pixels: the aspect ratio is over {MAX_SIDE_RATIO}:1")
                return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: not a readable image ({str(e)[:200]})") from None


def load_image(path, size):
    """An image file → (3, size, size) float in [-1, 1], centre-cropped like the training images."""
    return from_uint8(center_crop_arr(open_image(path), size)[None])[0]


# ---- datasets ----
def fmnist_dir():
    return Path(os.environ.get("FASHION_MNIST_DIR", FMNIST_DIR))


def load_fashion_mnist(split, root=None):
    """uint8 images (N, 28, 28) and int64 labels (N,) of the 'train' (60k) or 'test' (10k) split."""
    root = Path(root or fmnist_dir())
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [root / f"{prefix}-{kind}-idx{dim}-ubyte.gz" for kind, dim in (("images", 3), ("labels", 1))]
    if not all(p.is_file() for p in paths):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: `apt-get install dataset-fashion-mnist`, or "
                                f"point FASHION_MNIST_DIR at a folder with {paths[0].name} and {paths[1].name}")
    try:
        with gzip.open(paths[0]) as f:
            images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(paths[1]) as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"Fashion-MNIST files in {root} are damaged ({e})") from None
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def fmnist_rgb32(images):
    """(N, 28, 28) uint8 → (N, 32, 32, 3) uint8: padded with black to 32 and gray copied to 3 channels."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)


def reference_image(image, size):
    """A PIL RGB image → (1, 3, size, size) in [-1, 1], made as the training images were: a 28×28 image for a
    32-pixel model is taken for a Fashion-MNIST item and padded with black like fmnist_rgb32, any other gets ADM's
    centre crop."""
    if image.size == (28, 28) and size == 32:
        return from_uint8(np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)))[None])
    return from_uint8(center_crop_arr(image, size)[None])


class FashionMNIST(torch.utils.data.Dataset):
    """A Fashion-MNIST split as (3, 32, 32) images in [-1, 1] and their index (labels in .labels)."""

    def __init__(self, split="train", root=None):
        images, self.labels = load_fashion_mnist(split, root)
        self.images = torch.from_numpy(fmnist_rgb32(images))  # (N, 32, 32, 3) uint8
        self.num_classes = len(FMNIST_CLASSES)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return from_uint8(self.images[i][None])[0], i


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image> (labels = sorted class folders, as ImageNet) or a flat folder of images (label 0),
    each centre-cropped to `size`. A corrupt file raises ValueError naming it."""

    def __init__(self, root, size):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        folders = [(root / c, i) for i, c in enumerate(classes)] if classes else [(root, 0)]
        files = [(p, i) for d, i in folders for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
        self.paths = [p for p, _ in files]
        self.labels = np.array([i for _, i in files], dtype=np.int64)
        self.num_classes, self.size = max(len(classes), 1), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_image(self.paths[i], self.size), i


def make_dataset(data, size):
    """--data: 'fashion-mnist' (or a folder of its .gz files) or an image folder → a Dataset of (image, index)."""
    root = fmnist_dir() if data == "fashion-mnist" else Path(data)
    if (root / "train-images-idx3-ubyte.gz").exists():
        if size != 32:
            raise ValueError(f"Fashion-MNIST images are 32×32 after padding, but the tokenizer expects {size}")
        return FashionMNIST("train", root)
    if data == "fashion-mnist":
        load_fashion_mnist("train", root)  # raises the message that says how to install it
    if root.is_dir():
        return ImageFolder(root, size)
    raise ValueError(f"--data {data}: not a folder of images or of the Fashion-MNIST .gz files")


# ---- files ----
def atomic_save(path, write):
    """Calls write(f) on a temporary file beside `path`, flushes it to disk, then renames it to `path`: an
    interrupted run leaves the old file or the complete new one. write gets a binary file object, e.g.
    `lambda f: torch.save(obj, f)`, `lambda f: np.savez(f, arr_0=x)` or `lambda f: image.save(f, format="PNG")`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def check_writable(path, suffixes=None):
    """Raises ValueError unless `path` can be created (its folder exists and is writable) and has one of `suffixes`:
    scripts check their outputs before the work, not after."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{path}: the file name must end in {' or '.join(sorted(suffixes))}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: the folder {folder} is not writable")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file name")


# ---- sample outputs: each written to a temporary name and renamed (atomic_save), never half written ----
def grid(images, ncol):
    """(n, H, W, 3) uint8 array → one (rows·(H+2), ncol·(W+2), 3) array with 2-pixel black gaps."""
    n, H, W, _ = images.shape
    rows = math.ceil(n / ncol)
    out = np.zeros((rows * (H + 2), ncol * (W + 2), 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        out[r * (H + 2) + 1: r * (H + 2) + 1 + H, c * (W + 2) + 1: c * (W + 2) + 1 + W] = im
    return out


def save_image(path, array):
    fmt = IMAGE_FORMATS[Path(path).suffix.lower()]
    atomic_save(path, lambda f: Image.fromarray(array).save(f, format=fmt))


def save_each(folder, images, strips, indices, labels):
    """One PNG per sample (and its preview strip), named by the sample's index and class."""
    os.makedirs(folder, exist_ok=True)
    for j, i in enumerate(indices.tolist()):
        name = os.path.join(folder, f"{i:06d}_class{int(labels[i])}")
        save_image(name + ".png", images[j])
        if strips is not None:
            save_image(name + "_previews.png", grid(strips[j], strips.shape[1]))


def save_npz(path, images, labels, rank, world):
    """An ADM-style archive at exactly `path`: arr_0 (n, H, W, 3) uint8, arr_1 (n,) int64. Under torchrun each rank
    writes its part beside it, named by this run (another run's parts are never merged), and rank 0 merges the parts
    in rank order; where a rank fails, no merged file is written."""
    def write(target, images, labels):
        atomic_save(target, lambda f: np.savez(f, arr_0=images, arr_1=labels.astype(np.int64)))
    if world == 1:
        return write(path, images, labels)
    run = [os.urandom(6).hex()]
    dist.broadcast_object_list(run)
    parts = [f"{path}.{run[0]}.rank{r}" for r in range(world)]
    write(parts[rank], images, labels)
    try:
        dist.barrier()
        if rank == 0:
            arrays = []
            for part in parts:
                with np.load(part) as f:
                    arrays.append((f["arr_0"], f["arr_1"]))
            write(path, np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))
            for part in parts:
                os.remove(part)
    except BaseException:
        Path(parts[rank]).unlink(missing_ok=True)
        raise


def save_grid(path, images, strips):
    """With previews one row per sample (the preview after each group, the last being the image), else a square
    grid of the first 64 images."""
    if strips is not None:
        picture = grid(strips.reshape(-1, *strips.shape[2:]), strips.shape[1])
    else:
        picture = grid(images[:64], math.ceil(math.sqrt(len(images[:64]))))
    save_image(path, picture)


def previews_gif(strips, f, scale=4, ms=500, hold=4):
    """strips (n, S, H, W, 3) uint8 → an animated GIF written to the binary file f (also demo.py's "save GIF"):
    frame k shows every sample's preview after solver step k, up to 8 in a row, enlarged `scale`× without smoothing;
    the last frame, the images, stays `hold`× longer."""
    n, K = strips.shape[:2]
    frames = []
    for k in range(K):
        im = Image.fromarray(grid(strips[:, k], min(n, 8)))
        frames.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=[ms] * (K - 1) + [ms * hold],
                   loop=0)


# ---- how a run ends: signals, locks, one-line messages ----
class Interrupted(Exception):
    """A loop inside `interruptible` stopped after SIGTERM or SIGINT; the message says what is kept and how to go on."""


RECEIVED = []  # the names of the signals received inside `interruptible` (signal handlers are process-wide)


@contextmanager
def interruptible():
    """Inside, SIGTERM (a scheduler's notice before it preempts a job) and SIGINT (Ctrl-C) are recorded instead of
    ending the program mid-write: its loop asks `interrupted()` where every file it has written is complete (after an
    optimizer step, a batch, a chunk) and stops there. A second Ctrl-C stops at once."""
    def record(signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and name in RECEIVED:
            raise KeyboardInterrupt
        RECEIVED.append(name)
    old = {s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        RECEIVED.clear()


def interrupted():
    """The first signal received inside `interruptible` ('SIGTERM', 'SIGINT'), or None."""
    return RECEIVED[0] if RECEIVED else None


LOCKS = {}  # folder → its open .lock file: the lock holds while the file is open


def lock_folder(folder, flag):
    """An exclusive lock on `folder` (flock on folder/.lock) until `exit_on_error` ends: a second run writing there is
    refused in one line. The kernel drops the lock of a process that dies, so a crashed run leaves none behind; once
    held, the temporary files such a run left (atomic_save's) are removed."""
    folder = Path(folder)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{flag} {folder} is in use by {owner}: wait for that run to end, or choose another "
                         f"{flag}") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    LOCKS[folder] = f
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def exit_on_error(prog, main, args):
    """main(args), every way it can fail or stop ending in one line: a ValueError or FileNotFoundError (bad input), a
    signal (Interrupted, or a second Ctrl-C), another torchrun process that died (a failed collective). Releases the
    folder locks. Signals are recorded (`interruptible`) while main runs: it stops where it asks `interrupted()`."""
    try:
        with interruptible():
            main(args)
    except (ValueError, FileNotFoundError) as e:
        message = str(e).strip()
        if "Traceback" in message:  # raised in a loader worker: the last line of its traceback is the error
            message = message.splitlines()[-1].removeprefix(f"{type(e).__name__}: ")
        raise SystemExit(f"{prog}: error: {message}") from None
    except Interrupted as e:
        raise SystemExit(f"{prog}: {e}" if os.environ.get("RANK", "0") == "0" else 1) from None
    except KeyboardInterrupt:
        raise SystemExit(f"{prog}: stopped at once by Ctrl-C; the files written so far are complete") from None
    except RuntimeError as e:  # a collective whose peer died: gloo's and NCCL's errors name their library
        if not (dist.is_initialized() and ("gloo" in str(e) or "NCCL" in str(e))):
            raise
        reason = re.sub(r"^\[\S*\] ", "", str(e).strip().splitlines()[0]).split(". ")[0]  # no source line
        raise SystemExit(f"{prog}: error: rank {dist.get_rank()}: another process of this run stopped ({reason}); "
                         f"the files written so far are complete") from None
    finally:
        while LOCKS:
            LOCKS.popitem()[1].close()
