"""Stage 1 of D-AR: train the sequential diffusion tokenizer (paper §3.1, §4 and §5).

    python train_tokenizer.py --preset fmnist --data fashion-mnist --data-on-device --cuda-graph --compile \
        --global-batch-size 512 --max-steps 18000 --lr 1.6e-3 --decay-steps 3600 --lpips-weight 0 --repa-weight 0 \
        --out-dir out/tok-fmnist          # the shipped Fashion-MNIST tokenizer, 11 minutes on one GPU
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train \
        --vgg-weights vgg16-397923af.pth --repa-weights dinov2_vitb14_pretrain.pth --compile --out-dir out/tok

Objective (paper eq. 7): L = fm + vq + commit + λ1·LPIPS(x̂1, x) + λ2·REPA, λ1 = λ2 = 0.5.
`Tokenizer.loss` gives the first three terms, the one-jump image estimate x̂1 and the REPA student features; this
script adds the two frozen teachers:
  * LPIPS: the `lpips` package's VGG16 variant with the linear heads shipped in its wheel; the VGG16 backbone gets
    torchvision's ImageNet weights (--vgg-weights, else torch.hub's usual download). As in the official trainer the
    loss module runs in train mode, so the Dropout(0.5) before each linear head is active: it only adds noise to
    the perceptual gradient, and we keep it for fidelity.
  * REPA: DINOv2-B/14 (timm `vit_base_patch14_dinov2`, 224 px) final-norm patch tokens (B, 256, 768) against the
    projected block-8 tokens of the pixel decoder, loss mean(1 − cos). Weights: the official
    dinov2_vitb14_pretrain.pth (--repa-weights, else the usual download).
Without their weights the run stops and says how to get them or how to switch the term off (weight 0): a randomly
initialised teacher would train silently wrong.

Data: an image folder (class sub-folders or flat; ADM's centre crop, random flip) or Fashion-MNIST (gray → 3
channels, padded to 32×32). The official trainer resized the short side to a random length in [256, 320] and took a
random 256-px crop; we keep the centre crop of the AR stage so that both stages see the same images. An unreadable
image stops the run with its name (it cannot be skipped without changing the data stream of every later step).

Every random choice is a function of the seed and either the global sample index (data order, flip, diffusion time,
noise) or the micro-batch of the global step (LPIPS dropout). So --resume continues exactly without stored RNG
states, and a torchrun group makes the same update as one process running the same micro-batches (a single batch
of all of them differs slightly: the masked VQ terms are normalised per micro-batch, as in the official trainer).

A step whose loss or gradient norm is not finite is skipped on the device, without waiting for the GPU: weights,
AdamW moments and EMA stay as they were. The next log line counts the skips, 5 skips in a row stop the run, and a
checkpoint whose weights are not all finite is never written (the previous one is kept).

--cuda-graph (with --data-on-device) captures the whole optimizer step in one CUDA graph and replays it: a small
model's step is otherwise bound by the host launching hundreds of small kernels. The first steps after a start or a
resume run eagerly (they compile and create AdamW's state) and are real steps; every step does the same math.
"""
import itertools
import math
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

from data import (ArgumentParser, FashionMNIST, Meter, StepGraph, all_finite, atomic_save, checkpoint_path,
                  default_workers, ema_update, from_uint8, make_dataset, nonnegative_float,
                  nonnegative_int, positive_float, positive_int, probability, set_capturable, set_lr, setup_device,
                  skip_flag, to_uint8)
from tokenizer import Tokenizer, TokenizerConfig, load_checkpoint

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


def tokenizer_config(preset, image_size, repa, time_shift=None, groups=None):
    """The preset at the training resolution, time shift and number of token groups, checked against the patch
    sizes and the REPA teacher. K groups of N/K tokens are decoded in max(K, 8) steps: fewer than 8 groups still
    take 8 solver steps (paper Figure 7), each group conditioning several of them."""
    overrides = {} if image_size is None else dict(sampling_resolution=image_size)
    if time_shift is not None:
        overrides["time_shift"] = time_shift
    if groups is not None:
        N = TokenizerConfig.from_name(preset).num_all_queries
        if N % groups:
            raise ValueError(f"--groups {groups} does not divide preset {preset}'s {N} tokens")
        overrides.update(num_query_groups=groups, queries_per_step=N // groups, num_denoising_steps=max(groups, 8))
    cfg = TokenizerConfig.from_name(preset, **overrides)
    S = cfg.sampling_resolution
    if S % cfg.encoder_patch_size or S % cfg.dd_patch_size:
        raise ValueError(f"--image-size {S} is not a multiple of preset {preset}'s patch sizes "
                         f"{cfg.encoder_patch_size} and {cfg.dd_patch_size}")
    if repa and not (cfg.repa and cfg.repa_dim == 768):
        raise ValueError(f"preset {preset} has no REPA head for DINOv2-B's 768-d features (repa {cfg.repa}, "
                         f"repa_dim {cfg.repa_dim}): pass --repa-weight 0")
    return cfg


# ---- data ----
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


class DeviceStream:
    """The fast path (--data-on-device, one process): the training set resident on the device as uint8 (Fashion-MNIST
    is 184 MB), and step s's samples made there without the host waiting: stream positions [s·B, (s+1)·B) through
    epoch e's permutation (a generator seeded by (seed, e)), then flips, raw times and noise from a generator seeded
    by (seed, s). Resume stays exact; the draws differ from the loader path's (another generator)."""

    def __init__(self, images, seed, device):
        self.images, self.seed, self.device = images, seed, device  # (n, S, S, 3) uint8 on the device
        self.perms, self.gen = {}, torch.Generator(device)

    def seeded(self, *key):
        return self.gen.manual_seed(int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]))

    def perm(self, epoch):
        if epoch not in self.perms:  # keeps the current and the next epoch's
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 1}
            self.perms[epoch] = torch.randperm(len(self.images), generator=self.seeded(3, epoch), device=self.device)
        return self.perms[epoch]

    def __call__(self, step, B, accum):
        """Step `step`'s `accum` micro-batches [(x, t, noise), ...]: (b, 3, S, S), (b,), (b, 3, S, S), b = B/accum."""
        n, first = len(self.images), step * B
        idx = torch.cat([self.perm(e)[max(first - e * n, 0):min(first + B - e * n, n)]
                         for e in range(first // n, (first + B - 1) // n + 1)])  # (B,)
        x = from_uint8(self.images[idx])  # (B, 3, S, S)
        g = self.seeded(4, step)
        flip = torch.rand(B, generator=g, device=self.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = torch.rand(B, generator=g, device=self.device)
        noise = torch.randn(x.shape, generator=g, device=self.device)
        return list(zip(x.chunk(accum), t.chunk(accum), noise.chunk(accum)))


def resident_images(images, device):
    """The whole dataset as (n, S, S, 3) uint8 on the device: Fashion-MNIST's array, or each image of a folder once."""
    if isinstance(images, FashionMNIST):
        return images.images.to(device)
    return torch.cat([to_uint8(images[i][0][None]) for i in range(len(images))]).to(device)


def stream_positions(start_step, global_batch, world, rank):
    """The stream positions this rank reads, in order: step s consumes [s·B, (s+1)·B); rank r takes the r-th of
    `world` equal slices, which the loader cuts into its micro-batches (the same split as train_ar.py)."""
    share = global_batch // world
    for step in itertools.count(start_step):
        start = step * global_batch + rank * share
        yield from range(start, start + share)


# ---- the frozen teachers ----
def load_teacher_weights(path, url, what, flag, weight_flag):
    """A teacher's state dict from `path`, else downloaded from `url`; loading never runs code (weights_only)."""
    if path is None:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
        except Exception as e:  # no network, proxy, disk full, ...: say what to do instead
            raise ValueError(f"the {what} weights could not be downloaded from {url} ({type(e).__name__}: {e}); "
                             f"download that file elsewhere and pass {flag} PATH, or pass {weight_flag} 0 to train "
                             f"without this loss term") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; get the {what} weights from {url}, or pass "
                                f"{weight_flag} 0 to train without this loss term")
    try:
        sd = load_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{flag} {path} does not hold a state dict of the {what} weights")
    return sd


def fit(module, sd, flag, path, what):
    """module.load_state_dict(sd), with a one-line error naming the file."""
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:  # PyTorch lists every missing, unexpected or mis-shaped key: keep the first
        reason = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{flag} {path} does not hold {what} weights ({reason[:200]})") from None


def build_lpips(vgg_weights):
    """LPIPS-VGG v0.1: linear heads from the lpips wheel, backbone = torchvision VGG16 `features`."""
    try:
        import lpips  # optional dependency: only needed with LPIPS on
    except ImportError:
        raise ValueError("the LPIPS term needs the lpips package (pip install lpips); or pass --lpips-weight 0") \
            from None
    sd = load_teacher_weights(vgg_weights, VGG16_URL, "VGG16 (torchvision, ImageNet)", "--vgg-weights",
                              "--lpips-weight")
    with warnings.catch_warnings():  # lpips asks torchvision for VGG16 with the deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # random backbone, replaced now
    # torchvision `features.i` → lpips `slice{k}.i`, the slices ending after relu1_2, 2_2, 3_3, 4_3, 5_3
    ends = [4, 9, 16, 23, 30]
    backbone = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1].isdigit() and int(parts[1]) < ends[-1]:
            i = int(parts[1])
            backbone[f"slice{1 + sum(i >= e for e in ends)}.{key[len('features.'):]}"] = value
    fit(net.net, backbone, "--vgg-weights", vgg_weights, "torchvision's VGG16 `features.*`")
    return net.requires_grad_(False).to(memory_format=torch.channels_last)  # NHWC: cuDNN's fast bf16 layout


def build_dino(repa_weights):
    """DINOv2-B/14 without registers at 224 px. The official run used torch hub's model at its native 518 px grid,
    whose 37×37 position table is resized on the fly (bicubic, scale (16 + 0.1)/37, no antialias); we resize the
    table the same way once at load time."""
    try:
        import timm  # optional dependency: only needed with REPA on
    except ImportError:
        raise ValueError("the REPA term needs the timm package (pip install timm), or pass --repa-weight 0") from None
    sd = dict(load_teacher_weights(repa_weights, DINOV2_URL, "DINOv2 ViT-B/14", "--repa-weights", "--repa-weight"))
    dino = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    sd.pop("mask_token", None)  # used by DINOv2's own training only
    pos = sd.get("pos_embed")
    if pos is not None and pos.dim() == 3 and pos.shape != dino.pos_embed.shape:
        old, new = math.isqrt(pos.shape[1] - 1), dino.patch_embed.grid_size[0]
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, scale_factor=(new + 0.1) / old, mode="bicubic", antialias=False)
        sd["pos_embed"] = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    fit(dino, sd, "--repa-weights", repa_weights, "DINOv2 ViT-B/14")
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
        if self.dino is not None:  # ImageNet normalisation, then bicubic resize to 224 (in this order, as official)
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
def restore(path, tok, ema, opt, cfg):
    """Restores weights, EMA and optimizer from one of our checkpoints; returns the step."""
    ckpt = load_checkpoint(path)  # weights_only: loading never runs code
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "tokenizer" or "optimizer" not in ckpt:
        raise ValueError(f"{path} is not a tokenizer training checkpoint of this script")
    stored = dict(ckpt["config"])
    stored.setdefault("repa", stored.get("dd_depth", 12) > stored.get("repa_layer", 8))  # before `repa` was a field
    if {**asdict(cfg), **stored} != asdict(cfg):  # fields added since the file was written keep their defaults
        raise ValueError(f"{path} holds {stored}, but the flags give {asdict(cfg)}")
    tok.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def save_checkpoint(path, tok, ema, opt, cfg, step, args, master):
    """Rank 0 writes (atomically); every rank first checks the weights, which are never written non-finite."""
    if not all_finite(list(tok.parameters()) + list(ema.parameters())):
        raise ValueError(f"step {step}: the weights are not finite; {path} keeps the checkpoint it had (lower --lr)")
    if master:
        ckpt = dict(kind="tokenizer", config=asdict(cfg), model=tok.state_dict(), ema=ema.state_dict(),
                    optimizer=opt.state_dict(), step=step, args=args)
        atomic_save(path, lambda f: torch.save(ckpt, f))
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def save_reconstructions(tok, images, noise, path):
    """One row per image: input | reconstruction | previews decoded from the first 1, 2, ... groups (paper §3.3)."""
    codes = tok.encode(images)
    cols = [images, tok.decode(codes, noise=noise)]
    cols += [tok.decode(codes, noise=noise, groups=k) for k in range(1, tok.config.num_query_groups)]
    grid = torch.stack(cols, dim=1)  # (B, C, 3, H, W)
    B, C, _, H, W = grid.shape
    grid = to_uint8(grid.flatten(0, 1)).reshape(B, C, H, W, 3).permute(0, 2, 1, 3, 4).reshape(B * H, C * W, 3)
    atomic_save(path, lambda f: Image.fromarray(grid.cpu().numpy()).save(f, format="PNG"))


# ---- one step ----
def get_lr(step, lr, warmup, decay, total):
    """Linear warm-up from 0 at step 0 (as the official trainer), then constant (paper §5: 2e-4); with decay > 0 the
    last `decay` of the `total` steps fall linearly towards 0, which short runs need (the paper's does not)."""
    if step < warmup:
        return lr * step / warmup
    decay_start = max(warmup, total - decay)
    return lr if step < decay_start else lr * (total - step) / (total - decay_start)


def dropout_seed(seed, step, micro_batch):
    """The RNG seed of one micro-batch of the global step: LPIPS dropout draws the same masks whichever rank or
    micro-step runs it."""
    return int(np.random.SeedSequence([seed, 2, step, micro_batch]).generate_state(1)[0])


def train_step(model, tok, opt, ema, ema_decay, grad_clip, batches, seeds, ctx, used):
    """One optimizer step over this rank's micro-batches [(x, t, noise), ...], all on the device: forward, backward,
    gradient clipping, AdamW and EMA, skipped as a whole when the loss or gradient norm is not finite. Marks the
    codes seen in `used`. Returns the step's terms (loss, its parts, gradient norm) and the skip flag, as device
    tensors: nothing waits for the GPU. seeds: one per micro-batch for LPIPS dropout, or None (the graphed step,
    which has no dropout and cannot reseed inside a capture)."""
    terms = 0.0
    for m, (x, t, noise) in enumerate(batches):  # (b, 3, S, S), (b,), (b, 3, S, S)
        if seeds is not None:
            torch.manual_seed(seeds[m])
        if isinstance(model, DDP):
            model.require_backward_grad_sync = m == len(batches) - 1  # all-reduce only on the last micro-step
        with ctx:
            loss, parts, codes = model(x, t, noise)
        (loss / len(batches)).backward()
        terms = terms + torch.stack([loss, *parts.values()]).detach().float() / len(batches)
        used.index_fill_(0, codes.flatten(), 1)  # no sort, unlike used[codes] = 1
    params = list(tok.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    skip = skip_flag(terms[0], grad_norm)
    opt.found_inf.copy_(skip)  # the fused kernel leaves weights, moments and step count as they were
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(list(ema.parameters()), params, ema_decay, skip)
    return torch.cat([terms, grad_norm.float()[None]]), skip


def check_cuda_graph(args, device):
    """One-line errors for the flags --cuda-graph cannot run with (torchrun is refused with --data-on-device)."""
    if not args.data_on_device:
        raise ValueError("--cuda-graph captures the --data-on-device step: pass --data-on-device too")
    if args.lpips_weight or args.repa_weight:
        raise ValueError("--cuda-graph needs --lpips-weight 0 and --repa-weight 0 (LPIPS reseeds its dropout per "
                         "micro-batch, which a captured step cannot)")
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, not {device.type}")


# ---- training ----
def build(cfg, device, lpips_net, lpips_weight, dino, repa_weight, lr, betas, weight_decay):
    """Tokenizer, its EMA copy, the objective with the teachers, and fused AdamW."""
    tok = Tokenizer(cfg)
    if dino is None and tok.diff_decoder.net.repa_out is not None:
        tok.diff_decoder.net.repa_out.requires_grad_(False)  # no REPA term: the projector gets no gradient
    # train mode matters only for LPIPS: its dropout stays on, as in the official run (the others have none)
    objective = Objective(tok, lpips_net, lpips_weight, dino, repa_weight).to(device).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    opt.found_inf = torch.zeros((), device=device)  # set to 1 per skipped step (see train_step)
    ema = deepcopy(tok).requires_grad_(False).eval()  # what inference loads
    return tok, ema, objective, opt


def data_loader(stream, micro, step, B, world, rank, num_workers, device):
    """Micro-batches (x, t, noise) of the stream from `step` on, forever."""
    loader = torch.utils.data.DataLoader(stream, micro, sampler=stream_positions(step, B, world, rank),
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=num_workers > 0)
    return iter(loader)


def log(meter, step, lr, used, images_per_step, fpi, peak_flops, master):
    terms, skipped, steps, dt = meter.read(step)  # waits for the GPU, so the timing below is honest
    if dist.is_initialized():
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    img_s = steps * images_per_step / dt
    if master:
        text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
        print(f"step {step} | {text} | skipped {skipped} | codebook used {used.mean().item():.1%} | lr {lr:.2e} | "
              f"{img_s:.0f} img/s | MFU {fpi * img_s / peak_flops:.1%}", flush=True)
    used.zero_()


def train_main(args):
    rank, world, device = setup_device(args.device)
    master = rank == 0
    cfg = tokenizer_config(args.preset, args.image_size, args.repa_weight > 0, args.time_shift, args.groups)
    B, A = args.global_batch_size, args.grad_accum
    if B % (world * A):
        raise ValueError(f"--global-batch-size {B} is not divisible by {world} ranks × {A} micro-steps")
    if args.data_on_device and world > 1:
        raise ValueError("--data-on-device is the one-process fast path: launch without torchrun")
    if args.cuda_graph:
        check_cuda_graph(args, device)
    ckpt_path = checkpoint_path(args.out_dir, args.resume, args.overwrite)
    images = make_dataset(args.data, cfg.sampling_resolution)
    lpips_net = build_lpips(args.vgg_weights) if args.lpips_weight else None
    dino = build_dino(args.repa_weights) if args.repa_weight else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    tok, ema, objective, opt = build(cfg, device, lpips_net, args.lpips_weight, dino, args.repa_weight, args.lr,
                                     (args.beta1, args.beta2), args.weight_decay)
    step = restore(ckpt_path, tok, ema, opt, cfg) if args.resume else 0
    set_capturable(opt, args.cuda_graph, device)
    stream = TrainStream(images, args.seed)
    show = torch.stack([images[i][0] for i in range(min(args.num_show, len(images)))]).to(device)  # fixed images
    show_noise = torch.randn(show.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    fpi = flops_per_image(objective, *(v[None].to(device) for v in stream[0]))

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest VGG convolutions
    if args.compile:  # regional: the repeated blocks share one compiled graph each, so it takes seconds, not minutes
        for blocks in (tok.encoder_layers, tok.decoder_layers, tok.diff_decoder.net.blocks):
            for block in blocks:
                block.compile(dynamic=False)
    model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else objective
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if args.data_on_device:
        resident = DeviceStream(resident_images(images, device), args.seed, device)
        batches = (resident(s, B, A) for s in itertools.count(step))
    else:
        loader = data_loader(stream, B // (world * A), step, B, world, rank, args.num_workers, device)
        batches = ([tuple(v.to(device, non_blocking=True) for v in next(loader)) for _ in range(A)]
                   for _ in itertools.count())
    if master:
        print(f"{cfg}\n{sum(p.numel() for p in tok.parameters()) / 1e6:.1f}M parameters, {len(images)} images, "
              f"micro-batch {B // (world * A)} × {A} accumulation × {world} ranks, {fpi / 1e9:.1f} GFLOP per "
              f"image-step, steps {step} -> {args.max_steps}", flush=True)
    names = ["loss", "fm", "vq", "commit"] + ["lpips"] * (lpips_net is not None) + ["repa"] * (dino is not None)
    meter, used = Meter(names + ["grad"], device), torch.zeros(cfg.vq_codebook_size, device=device)
    graphed = StepGraph(lambda micro: train_step(model, tok, opt, ema, args.ema_decay, args.grad_clip, micro, None,
                                                 ctx, used)) if args.cuda_graph else None
    while step < args.max_steps:
        lr = get_lr(step, args.lr, args.warmup_steps, args.decay_steps, args.max_steps)
        set_lr(opt, lr)
        micro = next(batches)
        if graphed:
            terms, skip = graphed(micro)
        else:
            seeds = [dropout_seed(args.seed, step, rank * A + m) for m in range(A)]
            terms, skip = train_step(model, tok, opt, ema, args.ema_decay, args.grad_clip, micro, seeds, ctx, used)
        meter.add(terms, skip)
        step += 1
        last = step == args.max_steps
        if step % args.log_every == 0 or last:
            log(meter, step, lr, used, B, fpi, world * args.peak_tflops * 1e12, master)
        if master and (step % args.show_every == 0 or last):
            save_reconstructions(ema, show, show_noise, ckpt_path.parent / f"recon_{step:07d}.png")
        if step % args.ckpt_every == 0 or last:
            meter.check(step)
            save_checkpoint(ckpt_path, tok, ema, opt, cfg, step, vars(args), master)
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    args = get_args(argv)
    try:
        train_main(args)
    except (ValueError, FileNotFoundError) as e:
        # an error raised in a data loader worker (an unreadable image) arrives with the worker's traceback inside
        # its message, whose last line is the error itself
        message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__name__}: ")
        raise SystemExit(f"train_tokenizer.py: error: {message}") from None


def get_args(argv=None):
    p = ArgumentParser(prog="train_tokenizer.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tokenizer_v1", help="tokenizer size: tokenizer_v1, fmnist or tiny")
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders or flat), 'fashion-mnist', or a folder of its idx .gz files")
    p.add_argument("--image-size", type=positive_int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--time-shift", type=positive_float, default=None,
                   help="flow-matching time shift s of shift(t) = t / (t + s(1 - t)) (default: the preset's, 2; "
                        "paper Table 6 compares 1, 2, 4)")
    p.add_argument("--groups", type=positive_int, default=None,
                   help="number K of token groups (must divide the preset's tokens N): groups of N/K tokens, decoded "
                        "in max(K, 8) steps (paper Figure 7: 1, 4, 8, 16; default: the preset's, 8)")
    p.add_argument("--out-dir", default="out/tokenizer", help="where ckpt.pt and the reconstruction PNGs go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    mode.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint")
    p.add_argument("--global-batch-size", type=positive_int, default=1024,
                   help="images per optimizer step (paper: 1024)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--max-steps", type=positive_int, default=210000, help="optimizer steps (paper: 210k)")
    p.add_argument("--lr", type=positive_float, default=2e-4,
                   help="learning rate after warm-up (paper §5: constant; see --decay-steps)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=500, help="linear warm-up from 0 (official: 500)")
    p.add_argument("--decay-steps", type=nonnegative_int, default=0,
                   help="the last this many of --max-steps decay the learning rate linearly towards 0 (paper: 0)")
    p.add_argument("--beta1", type=probability, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=probability, default=0.95, help="AdamW beta2 (official: 0.95)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay (official: 0)")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    p.add_argument("--ema-decay", type=probability, default=0.999, help="EMA decay per step (paper: 0.999)")
    p.add_argument("--lpips-weight", type=nonnegative_float, default=0.5,
                   help="λ1 of the LPIPS term; 0 switches it off")
    p.add_argument("--repa-weight", type=nonnegative_float, default=0.5,
                   help="λ2 of the REPA term; 0 switches it off")
    p.add_argument("--vgg-weights", default=None, help=f"torchvision VGG16 file for LPIPS (else {VGG16_URL})")
    p.add_argument("--repa-weights", default=None, help=f"DINOv2 ViT-B/14 file for REPA (else {DINOV2_URL})")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--num-workers", type=nonnegative_int, default=default_workers(),
                   help="data loader worker processes per rank (default: the usable cores, at most 8)")
    p.add_argument("--data-on-device", action="store_true",
                   help="fast path for small models and data sets, one process (GPU or CPU): the whole data set "
                        "resident on the device as uint8, its order, flips, times and noise drawn there per step, no "
                        "loader workers. Another random stream than the loader's, equally exact on --resume")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --data-on-device on CUDA, LPIPS and REPA off: replay the whole optimizer step as one "
                        "CUDA graph (the first 3 steps of a run run eagerly), for small models whose eager step is "
                        "bound by the host launching kernels")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0,
                   help="per-GPU peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--log-every", type=positive_int, default=100, help="print a log line every this many steps")
    p.add_argument("--ckpt-every", type=positive_int, default=5000, help="write the checkpoint every this many steps")
    p.add_argument("--show-every", type=positive_int, default=5000,
                   help="write a reconstruction PNG every this many steps")
    p.add_argument("--num-show", type=positive_int, default=8, help="images in the reconstruction PNG")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of the init, data order, flips, times, noise, dropout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
