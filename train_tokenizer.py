"""Stage 1 of D-AR: train the sequential diffusion tokenizer (paper §3.2 and §5, SPEC.md §7).

    python train_tokenizer.py --preset fmnist --data fashion-mnist --global-batch-size 256 --lpips-weight 0 \
        --repa-weight 0 --max-steps 20000 --out-dir out/tok-fmnist
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train \
        --vgg-weights vgg16-397923af.pth --repa-weights dinov2_vitb14_pretrain.pth --compile --out-dir out/tok

Objective (paper eq. 7, SPEC.md §7.4): L = fm + vq + commit + λ1·LPIPS(x̂1, x) + λ2·REPA, λ1 = λ2 = 0.5.
`Tokenizer.loss` gives the first three terms, the one-jump image estimate x̂1 and the REPA student features; this
script adds the two frozen teachers:
  * LPIPS: the `lpips` package's VGG16 variant with the linear heads shipped in its wheel; the VGG16 backbone gets
    torchvision's ImageNet weights (--vgg-weights, else torch.hub's usual download). As in the official trainer the
    loss module runs in train mode, so the Dropout(0.5) before each linear head is active (SPEC.md §7.4 quirk): it
    only adds noise to the perceptual gradient, and we keep it for fidelity.
  * REPA: DINOv2-B/14 (timm `vit_base_patch14_dinov2`, 224 px) final-norm patch tokens (B, 256, 768) against the
    projected block-8 tokens of the pixel decoder, loss mean(1 − cos). Weights: the official
    dinov2_vitb14_pretrain.pth (--repa-weights, else the usual download).
Without their weights the run stops and says how to get them or how to switch the term off (weight 0): a randomly
initialised teacher would train silently wrong.

Data: an image folder (class sub-folders or flat; short side resized, center crop, random flip) or Fashion-MNIST
(gray → 3 channels, padded to 32×32). The official trainer used a random-resized crop (SPEC.md §7.5); we keep the
center crop of the AR stage so that both stages see the same images.

Every random choice is a function of the seed and either the global sample index (data order, flip, diffusion time,
noise) or the micro-batch of the global step (LPIPS dropout). So --resume continues exactly without stored RNG
states, and a torchrun group makes the same update as one process running the same micro-batches (a single batch
of all of them differs slightly: the masked VQ terms are normalised per micro-batch, as in the official trainer).
"""
import argparse
import gzip
import itertools
import math
import os
import time
import warnings
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenizer import Tokenizer, TokenizerConfig

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


def setup(device_arg):
    """nanoGPT-style: a process group only under torchrun (RANK set). Returns rank, world size, device."""
    device = device_arg or ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


# ---- data (train_ar.py's code extraction reads the same images) ----
class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image> (labels = sorted class folders, as ImageNet) or a flat folder of images (label 0).
    Each image is resized (short side) and center-cropped to `size`, in [-1, 1]."""

    def __init__(self, root, size):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        folders = [(root / c, i) for i, c in enumerate(classes)] if classes else [(root, 0)]
        files = [(p, i) for d, i in folders for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            raise SystemExit(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
        self.paths = [p for p, _ in files]
        self.labels = np.array([i for _, i in files], dtype=np.int64)
        self.num_classes, self.size = max(len(classes), 1), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        s = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * s)), max(self.size, round(img.height * s))),
                         Image.BICUBIC)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1  # (3, S, S)
        return x, i


class FashionMNIST(torch.utils.data.Dataset):
    """The 60k training images from the idx .gz files: gray copied to 3 channels, padded with black to 32x32."""

    def __init__(self, root, size):
        if size != 32:
            raise SystemExit(f"Fashion-MNIST images are 32x32 after padding, but the tokenizer expects {size} "
                             f"(use --preset fmnist or tiny, or --image-size 32)")
        with gzip.open(Path(root) / "train-images-idx3-ubyte.gz") as f:
            self.images = torch.from_numpy(np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28).copy())
        with gzip.open(Path(root) / "train-labels-idx1-ubyte.gz") as f:
            self.labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        self.num_classes = 10

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = F.pad(self.images[i].float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)  # (32, 32)
        return x.expand(3, 32, 32), i


def make_dataset(data, size):
    root = Path(os.environ.get("FASHION_MNIST_DIR", FMNIST_DIR) if data == "fashion-mnist" else data)
    if (root / "train-images-idx3-ubyte.gz").exists():
        return FashionMNIST(root, size)
    if data == "fashion-mnist":
        raise SystemExit(f"Fashion-MNIST not found in {root}: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                         f"or point FASHION_MNIST_DIR (or --data) at a folder holding train-images-idx3-ubyte.gz")
    if root.is_dir():
        return ImageFolder(root, size)
    raise SystemExit(f"--data {data}: not a folder of images or of the Fashion-MNIST .gz files")


class TrainStream(torch.utils.data.Dataset):
    """Item g is sample g of the training stream: image perm_e[g mod n] of epoch e = g // n, its flip, raw time
    t ~ U[0, 1) and noise x0, all drawn from (seed, g) alone, whatever the split over ranks and micro-steps."""

    def __init__(self, images, seed):
        self.images, self.seed, self.epoch, self.perm = images, seed, -1, None

    def __getitem__(self, g):
        epoch, i = divmod(g, len(self.images))
        if epoch != self.epoch:  # one shuffle per epoch (each loader worker computes it once)
            self.perm, self.epoch = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.images)), epoch
        x = self.images[self.perm[i]][0]  # (3, S, S)
        rng = np.random.default_rng([self.seed, 1, g])
        if rng.random() < 0.5:
            x = x.flip(-1)
        t = torch.tensor(rng.random(), dtype=torch.float32)
        noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))  # (3, S, S)
        return x, t, noise


def stream_positions(start_step, global_batch, world, rank):
    """The stream positions this rank reads, in order: step s consumes [s·B, (s+1)·B); rank r takes the r-th of
    `world` equal slices, which the loader cuts into its micro-batches (the same split as train_ar.py)."""
    share = global_batch // world
    for step in itertools.count(start_step):
        start = step * global_batch + rank * share
        yield from range(start, start + share)


# ---- the frozen teachers ----
def load_teacher_weights(path, url, what, flag, weight_flag):
    if path is None:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception as e:
            raise SystemExit(f"the {what} weights could not be downloaded from {url} ({type(e).__name__}: {e}).\n"
                             f"Download that file where there is internet and pass {flag} PATH, or pass "
                             f"{weight_flag} 0 to train without this loss term.") from None
    if not Path(path).is_file():
        raise SystemExit(f"{flag} {path}: no such file. Get the {what} weights from {url}, or pass {weight_flag} 0 "
                         f"to train without this loss term.")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(vgg_weights):
    """LPIPS-VGG v0.1: linear heads from the lpips wheel, backbone = torchvision VGG16 `features` (§7.4)."""
    import lpips  # optional dependency: only needed with LPIPS on
    sd = load_teacher_weights(vgg_weights, VGG16_URL, "VGG16 (torchvision, ImageNet)", "--vgg-weights",
                              "--lpips-weight")
    with warnings.catch_warnings():  # lpips asks torchvision for VGG16 with the deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # random backbone, replaced now
    # torchvision `features.i` → lpips `slice{k}.i`, the slices ending after relu1_2, 2_2, 3_3, 4_3, 5_3
    ends = [4, 9, 16, 23, 30]
    backbone = {}
    for key, value in sd.items():
        if key.startswith("features.") and int(key.split(".")[1]) < ends[-1]:
            i = int(key.split(".")[1])
            backbone[f"slice{1 + sum(i >= e for e in ends)}.{key[len('features.'):]}"] = value
    try:
        net.net.load_state_dict(backbone)
    except RuntimeError as e:
        raise SystemExit(f"--vgg-weights does not hold torchvision's VGG16 `features.*` weights:\n{e}") from None
    return net.requires_grad_(False).to(memory_format=torch.channels_last)  # NHWC: cuDNN's fast bf16 layout


def build_dino(repa_weights):
    """DINOv2-B/14 without registers at 224 px. The official run used torch hub's model at its native 518 px grid,
    whose 37×37 position table is resized on the fly (bicubic, scale (16 + 0.1)/37, no antialias); we resize the
    table the same way once at load time."""
    import timm  # optional dependency: only needed with REPA on
    sd = dict(load_teacher_weights(repa_weights, DINOV2_URL, "DINOv2 ViT-B/14", "--repa-weights", "--repa-weight"))
    dino = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    sd.pop("mask_token", None)  # used by DINOv2's own training only
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != dino.pos_embed.shape:
        old, new = math.isqrt(pos.shape[1] - 1), dino.patch_embed.grid_size[0]
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, scale_factor=(new + 0.1) / old, mode="bicubic", antialias=False)
        sd["pos_embed"] = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    try:
        dino.load_state_dict(sd)
    except RuntimeError as e:
        raise SystemExit(f"--repa-weights does not hold DINOv2 ViT-B/14 weights:\n{e}") from None
    return dino.requires_grad_(False)


class Objective(nn.Module):
    """The tokenizer loss with its frozen teachers: returns (total loss, dict of terms, codes)."""

    def __init__(self, tok, lpips_net, lpips_weight, dino, repa_weight):
        super().__init__()
        self.tok, self.lpips, self.dino = tok, lpips_net, dino
        self.lpips_weight, self.repa_weight = lpips_weight, repa_weight
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images, t, noise):
        out = self.tok.loss(images, t, noise)
        terms = dict(fm=out["fm"], vq=out["vq"], commit=out["commit"])
        loss = out["fm"] + out["vq"] + out["commit"]
        if self.lpips is not None:  # input image vs. the one-jump estimate, both in [-1, 1]
            terms["lpips"] = self.lpips(out["x1_hat"], images).mean()
            loss = loss + self.lpips_weight * terms["lpips"]
        if self.dino is not None:  # ImageNet normalisation, then bicubic resize to 224 (in this order, §7.4)
            x = F.interpolate(((images + 1) / 2 - self.mean) / self.std, size=(224, 224), mode="bicubic")
            with torch.no_grad():
                target = self.dino.forward_features(x)[:, self.dino.num_prefix_tokens:]  # (B, 256, 768)
            terms["repa"] = (1 - F.cosine_similarity(out["repa"].float(), target.float(), dim=-1)).mean()
            loss = loss + self.repa_weight * terms["repa"]
        return loss, terms, out["codes"]


def flops_per_image(objective, images, t, noise):
    """Matmul, convolution and attention FLOPs of one training step per image as PyTorch executes it: tokenizer
    forward + backward, the frozen VGG16 forwards and the backward through its input, the DINOv2 forward. On CUDA
    the count includes the attention kernels' recomputation of the scores in the backward (about 1.6% of the total
    for tokenizer_v1); CPU attention kernels are not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        objective(images[:1], t[:1], noise[:1])[0].backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---- checkpoints and pictures ----
def save_checkpoint(obj, path):
    """torch.save to path.tmp, flushed to disk, then an atomic rename: a crash mid-write keeps the old file."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


@torch.no_grad()
def save_reconstructions(tok, images, noise, path):
    """One row per image: input | reconstruction | previews decoded from the first 1, 2, ... groups (§6.5)."""
    codes = tok.encode(images)
    cols = [images, tok.decode(codes, noise=noise)]
    cols += [tok.decode(codes, noise=noise, groups=k) for k in range(1, tok.config.num_denoising_steps)]
    grid = torch.stack(cols, dim=1)  # (B, cols, 3, H, W)
    B, C, _, H, W = grid.shape
    grid = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 3, 1, 4, 2).reshape(B * H, C * W, 3)
    Image.fromarray(grid.cpu().numpy()).save(path)


# ---- training ----
def main(args):
    rank, world, device = setup(args.device)
    master = rank == 0
    overrides = {} if args.image_size is None else dict(sampling_resolution=args.image_size)
    cfg = TokenizerConfig.from_name(args.preset, **overrides)
    B, A = args.global_batch_size, args.grad_accum
    if B % (world * A):
        raise SystemExit(f"--global-batch-size {B} is not divisible by {world} ranks x {A} micro-steps")
    micro = B // (world * A)
    if args.repa_weight and (cfg.dd_depth <= cfg.repa_layer or cfg.repa_dim != 768):
        raise SystemExit(f"preset {args.preset} has no REPA head for DINOv2-B's 768-d features "
                         f"(dd_depth {cfg.dd_depth}, repa_layer {cfg.repa_layer}, repa_dim {cfg.repa_dim}): "
                         f"pass --repa-weight 0")
    images = make_dataset(args.data, cfg.image_size)
    lpips_net = build_lpips(args.vgg_weights) if args.lpips_weight else None
    dino = build_dino(args.repa_weights) if args.repa_weight else None

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    tok = Tokenizer(cfg)
    if dino is None and tok.diff_decoder.net.repa_out is not None:
        tok.diff_decoder.net.repa_out.requires_grad_(False)  # no REPA term: the projector gets no gradient
    # train mode matters only for LPIPS: its dropout stays on, as in the official run (the others have none)
    objective = Objective(tok, lpips_net, args.lpips_weight, dino, args.repa_weight).to(device).train()
    params = list(tok.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    ema = deepcopy(tok).requires_grad_(False).eval()  # what inference loads (SPEC.md §7.5)
    step, ckpt_path = 0, Path(args.out_dir) / "ckpt.pt"
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != asdict(cfg):
            raise SystemExit(f"{ckpt_path} holds {ckpt['config']},\nbut the flags give {asdict(cfg)}")
        tok.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]

    stream = TrainStream(images, args.seed)
    n_show = min(args.num_show, len(images))
    show = torch.stack([images[i][0] for i in range(n_show)]).to(device)  # fixed images for the PNG grids
    show_noise = torch.randn(show.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    probe = [v[None].to(device) for v in stream[0]]
    fpi = flops_per_image(objective, *probe)

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest VGG convolutions
    if args.compile:  # regional: the repeated blocks share one compiled graph each, so it takes seconds, not minutes
        for blocks in (tok.encoder_layers, tok.decoder_layers, tok.diff_decoder.net.blocks):
            for block in blocks:
                block.compile(dynamic=False)
    model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else objective
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    loader = torch.utils.data.DataLoader(stream, micro, sampler=stream_positions(step, B, world, rank),
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0)
    batches = iter(loader)

    def save():
        if master:
            save_checkpoint(dict(kind="tokenizer", config=asdict(cfg), model=tok.state_dict(), ema=ema.state_dict(),
                                 optimizer=opt.state_dict(), step=step, args=vars(args)), ckpt_path)
        if world > 1:
            dist.barrier()

    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"{cfg}\n{sum(p.numel() for p in params) / 1e6:.1f}M parameters, {len(images)} images, "
              f"micro-batch {micro} x {A} accumulation x {world} ranks, {fpi / 1e9:.1f} GFLOP per image-step, "
              f"steps {step} -> {args.max_steps}")
    sums, used = {}, torch.zeros(cfg.vq_codebook_size, device=device)
    t0, t_step = time.time(), step
    while step < args.max_steps:
        lr = args.lr * step / args.warmup_steps if step < args.warmup_steps else args.lr  # 0 at step 0, as official
        for group in opt.param_groups:
            group["lr"] = lr
        for m in range(A):
            # LPIPS dropout: seeded per micro-batch of the global step, so a micro-batch draws the same masks
            # whichever rank or micro-step runs it
            torch.manual_seed(int(np.random.SeedSequence([args.seed, 2, step, rank * A + m]).generate_state(1)[0]))
            x, t, noise = (v.to(device, non_blocking=True) for v in next(batches))  # (b, 3, S, S), (b,), (b, 3, S, S)
            if world > 1:
                model.require_backward_grad_sync = m == A - 1  # all-reduce only on the last micro-step
            with ctx:
                loss, terms, codes = model(x, t, noise)
            (loss / A).backward()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / A
            used[codes.flatten()] = 1
        sums["grad"] = sums.get("grad", 0) + torch.nn.utils.clip_grad_norm_(params, args.grad_clip).float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in params], 1 - args.ema_decay)
        step += 1
        if step % args.log_every == 0 or step == args.max_steps:
            stats = torch.stack(list(sums.values())) / (step - t_step)
            if world > 1:
                dist.all_reduce(stats)
                dist.all_reduce(used, op=dist.ReduceOp.MAX)
                stats /= world
            stats = stats.tolist()  # waits for the GPU, so the timing below is honest
            dt = time.time() - t0
            img_s = (step - t_step) * B / dt
            if master:
                terms = " ".join(f"{k} {v:.4f}" for k, v in zip(sums, stats))
                mfu = fpi * img_s / (world * args.peak_tflops * 1e12)
                print(f"step {step} | {terms} | codebook used {used.mean().item():.1%} | lr {lr:.2e} | "
                      f"{img_s:.0f} img/s | MFU {mfu:.1%}", flush=True)
            sums, t0, t_step = {}, time.time(), step
            used.zero_()
        if master and (step % args.show_every == 0 or step == args.max_steps):
            save_reconstructions(ema, show, show_noise, Path(args.out_dir) / f"recon_{step:07d}.png")
        if step % args.ckpt_every == 0 or step == args.max_steps:
            save()
    if world > 1:
        dist.destroy_process_group()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tokenizer_v1", help="tokenizer size: tokenizer_v1, fmnist or tiny")
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders or flat), 'fashion-mnist', or a folder of its idx .gz files")
    p.add_argument("--image-size", type=int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--out-dir", default="out/tokenizer", help="where ckpt.pt and the reconstruction PNGs go")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--global-batch-size", type=int, default=1024, help="images per optimizer step (paper: 1024)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max-steps", type=int, default=210000, help="optimizer steps (paper: 210k)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate after warm-up (constant, paper §5)")
    p.add_argument("--warmup-steps", type=int, default=500, help="linear warm-up from 0 (official: 500)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (official: 0.95)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (official: 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay per step (paper: 0.999)")
    p.add_argument("--lpips-weight", type=float, default=0.5, help="λ1 of the LPIPS term; 0 switches it off")
    p.add_argument("--repa-weight", type=float, default=0.5, help="λ2 of the REPA term; 0 switches it off")
    p.add_argument("--vgg-weights", default=None, help=f"torchvision VGG16 file for LPIPS (else {VGG16_URL})")
    p.add_argument("--repa-weights", default=None, help=f"DINOv2 ViT-B/14 file for REPA (else {DINOV2_URL})")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--num-workers", type=int, default=8, help="data loader worker processes per rank")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--log-every", type=int, default=100, help="print a log line every this many steps")
    p.add_argument("--ckpt-every", type=int, default=5000, help="write the checkpoint every this many steps")
    p.add_argument("--show-every", type=int, default=5000, help="write a reconstruction PNG every this many steps")
    p.add_argument("--num-show", type=int, default=8, help="images in the reconstruction PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, data order, flips, times, noise, dropout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(get_args())
