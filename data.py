"""What every script shares: command lines, the device, the image format, datasets, checkpoints and safe writes.

    images in the model's format: (B, 3, H, W) float in [-1, 1];  on disk and for FID: (B, H, W, 3) uint8

One definition of each thing the scripts share, so that training, sampling and evaluation see the same pixels and
handle files the same way: `center_crop_arr` (ADM's centre crop, which the official AR trainer and evaluation use),
`to_uint8` (the conversion of the official FID script), the Fashion-MNIST reader (28×28 gray, padded with black to
32×32 RGB), `load_checkpoint` (tensors and plain data only: a file never runs code), `atomic_save` (a file is either
the old one or the complete new one, never half written), and the few pieces both trainers use to refuse
non-finite steps and checkpoints.
"""
import argparse
import gzip
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # the shipped model, found from any working folder
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist; FASHION_MNIST_DIR overrides
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
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


def open_image(path):
    """A PIL RGB image; an unreadable, corrupt or oversized file raises ValueError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{im.width}×{im.height} pixels is more than {MAX_IMAGE_PIXELS} allowed")
                return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


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


class FashionMNIST(torch.utils.data.Dataset):
    """A Fashion-MNIST split as (3, 32, 32) images in [-1, 1] and their index (labels in .labels)."""

    def __init__(self, split="train", root=None):
        images, self.labels = load_fashion_mnist(split, root)
        self.images = torch.from_numpy(fmnist_rgb32(images))  # (N, 32, 32, 3) uint8
        self.num_classes = 10

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


# ---- training runs: what both trainers share ----
MAX_SKIPS = 5  # this many non-finite steps in a row stop the run


def default_workers():
    """Data loader workers per rank: at most 8, and no more than this rank's share of the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def checkpoint_path(out_dir, resume, overwrite):
    """out_dir/ckpt.pt, made ready for writing; refuses to start over an existing checkpoint unless told how."""
    path = Path(out_dir) / "ckpt.pt"
    if resume and not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if path.exists() and not (resume or overwrite):
        raise ValueError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir}: cannot create it ({e.strerror})") from None
    check_writable(path)
    return path


def all_finite(tensors):
    """Whether every tensor (this rank's shard under FSDP) is finite on every rank: one host synchronisation."""
    ok = torch.stack([torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]).float()
    ok = ok.min()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def skip_flag(loss, grad_norm):
    """1.0 where the loss or the gradient norm is not finite on some rank, else 0.0, as a device tensor."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    skip = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    if dist.is_initialized():  # the same decision on every rank (an asynchronous collective on the GPU)
        dist.all_reduce(skip, op=dist.ReduceOp.MAX)
    return skip


def ema_update(ema, params, decay, skip):
    """ema ← ema + (1 − decay)(1 − skip)·(param − ema) on every tensor; skip is a device flag (1.0: leave the EMA
    as it was). The weight stays a device tensor: `_foreach_lerp_` takes it as a Python scalar, which would make
    the host wait for the GPU at every step; `_foreach_mul_` takes a tensor."""
    params = [p.detach() for p in params]
    delta = torch._foreach_sub(params, ema)
    torch._foreach_mul_(delta, (1 - decay) * (1 - skip))
    torch._foreach_add_(ema, delta)


class StepGraph:
    """One optimizer step as a CUDA graph (--cuda-graph; PyTorch's whole-network capture). `step(batches)` runs
    eagerly on a side stream for the first `warmup` calls: real training steps, which also compile, pick cuDNN
    algorithms and create AdamW's state. The next call captures it once (zero_grad(set_to_none=True) at the end
    of every step leaves no gradients, so the captured backward allocates them in the graph's pool), and every call
    from then on replays it. Each call copies its micro-batches [(tensor, ...), ...] into the static ones the graph
    reads; it returns the graph's static outputs, which the next call overwrites. `step` must not make the host wait
    nor reseed: a replay's random draws come from the default CUDA generator's seed at the time of the replay (the
    generator is registered with the graph), so torch.manual_seed before a call seeds it as it seeds an eager step."""

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph = self.inputs = self.outputs = self.side = None

    def __call__(self, batches):
        if self.inputs is None:  # copies: the graph reads these addresses at every replay
            self.inputs = [tuple(v.clone() for v in micro) for micro in batches]
        else:
            torch._foreach_copy_([v for micro in self.inputs for v in micro], [v for micro in batches for v in micro])
        if self.calls < self.warmup:
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
                self.outputs = self.step(self.inputs)
            torch.cuda.current_stream().wait_stream(self.side)
        else:
            if self.graph is None:
                self.graph = self.capture()
            self.graph.replay()
        self.calls += 1
        return self.outputs

    def capture(self):
        """Records the step without running it (torch.cuda.graph waits for the device first)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.step(self.inputs)
        return graph


def set_capturable(opt, on, device):
    """AdamW for the graphed step (on) or for eager steps; either undoes what a checkpoint written in the other mode
    restored. A captured step reads the learning rate from a device tensor that set_lr fills per step (a Python
    number would be frozen into the graph); eager steps keep the Python number, as before the flag existed."""
    for group in opt.param_groups:
        group["capturable"] = on
        group["lr"] = torch.zeros((), device=device) if on else float(group["lr"])


def set_lr(opt, lr):
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # a kernel: the host does not wait
        else:
            group["lr"] = lr


class Meter:
    """Device-side sums between two log lines: the terms of the applied steps, the skipped steps and the longest run
    of consecutive skips. Only `check` and `read` wait for the GPU."""

    def __init__(self, names, device):
        self.names, self.sums = names, torch.zeros(len(names), device=device)
        self.skips, self.run, self.longest = (torch.zeros((), device=device) for _ in range(3))
        self.steps, self.t0 = 0, time.time()

    def add(self, terms, skip):
        self.sums += torch.where(skip > 0, 0.0, terms)
        self.skips += skip
        self.run.add_(1).mul_(skip)  # consecutive skips up to this step
        torch.maximum(self.longest, self.run, out=self.longest)
        self.steps += 1

    def check(self, step):
        """Raises once MAX_SKIPS steps in a row were skipped."""
        if self.longest.item() >= MAX_SKIPS:
            raise ValueError(f"stopped at step {step}: {self.longest.item():.0f} steps in a row had a non-finite "
                             f"loss or gradient norm and were skipped (at most {MAX_SKIPS - 1} allowed); lower --lr "
                             f"or check the data")

    def read(self, step):
        """({term: mean over the applied steps and the ranks}, skipped steps, steps, seconds) since the last read."""
        self.check(step)
        sums = self.sums.clone()
        if dist.is_initialized():
            dist.all_reduce(sums)
            sums /= dist.get_world_size()
        applied = self.steps - int(self.skips.item())
        means = dict(zip(self.names, (sums / applied).tolist() if applied else [float("nan")] * len(self.names)))
        out = means, self.steps - applied, self.steps, time.time() - self.t0
        self.sums.zero_(), self.skips.zero_(), self.longest.copy_(self.run)
        self.steps, self.t0 = 0, time.time()
        return out
