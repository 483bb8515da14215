"""Stage 1 of D-AR: train the sequential diffusion tokenizer (paper §3.1, §4 and §5).

    python train_tokenizer.py --preset fmnist --data fashion-mnist --lpips-weight 0 --repa-weight 0 ...  # README.md
    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset tokenizer_v1 --data /data/imagenet/train \
        --vgg-weights vgg16-397923af.pth --repa-weights dinov2_vitb14_pretrain.pth --compile --out-dir out/tok

Objective (paper eq. 7): L = fm + vq + commit + λ1·LPIPS(x̂1, x) + λ2·REPA, λ1 = λ2 = 0.5. `Tokenizer.loss` gives the
first three terms, the one-jump estimate x̂1 and the REPA student features; this script adds two frozen teachers,
and stops where their weights are missing (a random teacher would train silently wrong):
  * LPIPS: the `lpips` package's VGG16 variant (its linear heads, torchvision's ImageNet backbone), in train mode as
    in the official trainer: the Dropout(0.5) before each head adds noise to the perceptual gradient; kept for fidelity.
  * REPA: DINOv2-B/14 (timm, 224 px) final-norm patch tokens (B, 256, 768) against the projected block-8 tokens of
    the pixel decoder, loss mean(1 − cos).
Data: an image folder (ADM's centre crop, random flip) or Fashion-MNIST. The official trainer took a random 256-px crop
of a short side resized into [256, 320]; we keep the AR stage's centre crop so that both stages see the same images.
An unreadable image stops the run with its name (skipping it would change the data of every later step).
Randomness: the flips, times t, noise x0 and LPIPS dropout of micro-batch j of a step come from (seed, step, j), on the
device on either data path: --resume continues exactly, both paths train alike, and torchrun equals one process running
the same micro-batches (not one batch of them all: VQ terms are normalised per micro-batch, as officially).
"""
import itertools
import math
import warnings
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data import (ArgumentParser, FashionMNIST, atomic_save, exit_on_error, from_uint8, make_dataset,
                  nonnegative_float, nonnegative_int, positive_float, positive_int, to_uint8)
from tokenizer import Tokenizer, TokenizerConfig, load_checkpoint
from trainer import (DRAWS, DROPOUT, Order, Trainer, add_common_args, add_data_args, generator,
                     get_lr, seed_of, setup)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"


def tokenizer_config(preset, image_size, repa, time_shift=None, groups=None):
    """The preset with the flags' overrides, checked; K < 8 groups still take 8 solver steps (paper Figure 7)."""
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
def augment(x, g):
    """(b, 3, S, S) images → (x flipped at random, raw times t ~ U[0, 1) (b,), noise x0 (b, 3, S, S)), drawn from g."""
    flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
    t = torch.rand(len(x), generator=g, device=x.device)
    noise = torch.randn(x.shape, generator=g, device=x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x), t, noise


def batches(dataset, args, step, world, rank, device):
    """This rank's micro-batches [(x, t, noise), ...] of every step from `step` on: its slice of the step's images, on
    the device or from loader workers, augmented on the device from (seed, step, micro-batch of the global step)."""
    B, A = args.global_batch_size, args.grad_accum
    order = Order(torch.arange(len(dataset)), B, args.seed, device if args.data_on_device else torch.device("cpu"))
    if args.data_on_device:  # one process; (n, S, S, 3) uint8: Fashion-MNIST's array, or each folder image read once
        fmnist = isinstance(dataset, FashionMNIST)
        images = (dataset.images if fmnist else torch.cat([to_uint8(x[None]) for x, _ in dataset])).to(device)
        # contiguous as the loader's images: a channels-last batch would take other convolution kernels
        micro = (from_uint8(images[order(s)]).contiguous().chunk(A) for s in itertools.count(step))
    else:
        positions = (i for s in itertools.count(step) for i in order(s).view(world, -1)[rank].tolist())
        loader = iter(torch.utils.data.DataLoader(dataset, B // (world * A), sampler=positions,
                                                  num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                                  persistent_workers=args.num_workers > 0))
        micro = ([next(loader)[0].to(device, non_blocking=True) for _ in range(A)] for _ in itertools.count())
    for s, xs in zip(itertools.count(step), micro):
        yield [augment(x, generator(device, args.seed, DRAWS, s, rank * A + m)) for m, x in enumerate(xs)]


# ---- the frozen teachers ----
def load_teacher_weights(path, url, what, flag, weight_flag):
    """A teacher's state dict from `path`, else downloaded from `url`; loading never runs code (weights_only)."""
    instead = f"or pass {weight_flag} 0 to train without this loss term"
    if path is None:
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
        except Exception as e:  # no network, proxy, disk full, ...: say what to do instead
            raise ValueError(f"the {what} weights could not be downloaded from {url} ({type(e).__name__}: {e}); "
                             f"download that file elsewhere and pass {flag} PATH, {instead}") from None
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; get the {what} weights from {url}, {instead}")
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
        raise ValueError("LPIPS needs the lpips package (pip install lpips), or pass --lpips-weight 0") from None
    sd = load_teacher_weights(vgg_weights, VGG16_URL, "torchvision VGG16", "--vgg-weights", "--lpips-weight")
    with warnings.catch_warnings():  # lpips asks torchvision for VGG16 with the deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # random backbone, replaced now
    # lpips cuts torchvision's `features` into slices after relu1_2, 2_2, 3_3, 4_3, 5_3: `features.i` → `slice{k}.i`
    names = {"features." + key.split(".", 1)[1]: key for key in net.net.state_dict()}
    backbone = {names[key]: value for key, value in sd.items() if key in names}
    fit(net.net, backbone, "--vgg-weights", vgg_weights, "torchvision's VGG16 `features.*`")
    return net.requires_grad_(False).to(memory_format=torch.channels_last)  # NHWC: cuDNN's fast bf16 layout


def build_dino(repa_weights):
    """DINOv2-B/14 without registers at 224 px. The official run resized the 37×37 position table of torch hub's 518-px
    model on the fly (bicubic, scale (16 + 0.1)/37, no antialias); we do the same once, at load time."""
    try:
        import timm  # optional dependency: only needed with REPA on
    except ImportError:
        raise ValueError("REPA needs the timm package (pip install timm), or pass --repa-weight 0") from None
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
    """Matmul, convolution and attention FLOPs of one training step per image as PyTorch executes it (teachers
    included; on CUDA with the attention backward's recomputation of the scores, CPU attention not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        objective(images[:1], t[:1], noise[:1])[0].backward()
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---- pictures ----
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


# ---- training ----
def build(args, cfg, image, rank, device, path):
    """The run, the EMA tokenizer (what inference loads), the FLOPs per image and the codes used since the last log."""
    lpips_net = build_lpips(args.vgg_weights) if args.lpips_weight else None
    dino = build_dino(args.repa_weights) if args.repa_weight else None
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    tok = Tokenizer(cfg)
    if dino is None and tok.diff_decoder.net.repa_out is not None:
        tok.diff_decoder.net.repa_out.requires_grad_(False)  # no REPA term: the projector gets no gradient
    # train mode matters only for LPIPS: its dropout stays on, as in the official run (the others have none)
    objective = Objective(tok, lpips_net, args.lpips_weight, dino, args.repa_weight).to(device).train()
    ema = deepcopy(tok).requires_grad_(False).eval()
    fpi = flops_per_image(objective, image[None], torch.zeros(1, device=device), torch.zeros_like(image[None]))
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest VGG convolutions
    if args.compile:  # regional: the repeated blocks share one compiled graph each, so it takes seconds, not minutes
        for blocks in (tok.encoder_layers, tok.decoder_layers, tok.diff_decoder.net.blocks):
            for block in blocks:
                block.compile(dynamic=False)
    used = torch.zeros(cfg.vq_codebook_size, device=device)

    def forward(m, x, t, noise):  # (b, 3, S, S), (b,), (b, 3, S, S)
        if lpips_net is not None:  # its dropout: the same masks whichever rank or micro-step runs micro-batch m
            torch.manual_seed(seed_of(args.seed, DROPOUT, run.step, rank * args.grad_accum + m))
        loss, terms, codes = run.model(x, t, noise)
        used.index_fill_(0, codes.flatten(), 1)  # no sort, unlike used[codes] = 1
        return torch.stack([loss, *terms.values()])
    names = ["loss", "fm", "vq", "commit"] + ["lpips"] * (lpips_net is not None) + ["repa"] * (dino is not None)
    run = Trainer(tok, objective, forward, names, list(ema.parameters()), args, device, "tokenizer", cfg, path,
                  bf16=device.type == "cuda")
    return run, ema, fpi, used


def train_main(args):
    if args.cuda_graph and (args.lpips_weight or args.repa_weight):
        raise ValueError("--cuda-graph needs --lpips-weight 0 and --repa-weight 0 (LPIPS reseeds its dropout per "
                         "micro-batch, which a captured step cannot)")
    cfg = tokenizer_config(args.preset, args.image_size, args.repa_weight > 0, args.time_shift, args.groups)
    rank, world, device, path = setup(args)
    dataset = make_dataset(args.data, cfg.sampling_resolution)
    show = torch.stack([dataset[i][0] for i in range(min(args.num_show, len(dataset)))]).to(device)  # fixed images
    show_noise = torch.randn(show.shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    run, ema, fpi, used = build(args, cfg, show[0], rank, device, path)
    data = batches(dataset, args, run.step, world, rank, device)
    B, A, end = args.global_batch_size, args.grad_accum, args.max_steps
    if rank == 0:
        print(f"{cfg}\n{sum(p.numel() for p in ema.parameters()) / 1e6:.1f}M parameters, {len(dataset)} images, "
              f"micro-batch {B // (world * A)} × {A} accumulation × {world} ranks, {fpi / 1e9:.1f} GFLOP per "
              f"image-step, steps {run.step} -> {end}", flush=True)
    decay_start, codebook = max(args.warmup_steps, end - args.decay_steps), None
    while run.step < end:
        run(next(data), get_lr(run.step, args.lr, args.warmup_steps, decay_start, end))
        if run.step % args.log_every == 0 or run.step == end:
            if world > 1:
                dist.all_reduce(used, op=dist.ReduceOp.MAX)
            codebook = round(100 * used.mean().item(), 1)  # percent
            run.log(end, B, "img", fpi if device.type == "cuda" else None, f" | codebook used {codebook:.1f}%")
            used.zero_()
        if rank == 0 and (run.step % args.show_every == 0 or run.step == end):
            save_reconstructions(ema, show, show_noise, path.parent / f"recon_{run.step:07d}.png")
        run.checkpoint(end)
    run.finish(codebook_used=codebook)


def main(argv=None):
    exit_on_error("train_tokenizer.py", train_main, get_args(argv))


def get_args(argv=None):
    p = ArgumentParser(prog="train_tokenizer.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tokenizer_v1", help="tokenizer size: tokenizer_v1, fmnist or tiny")
    add_data_args(p)
    p.add_argument("--image-size", type=positive_int, default=None, help="training resolution (default: the preset's)")
    p.add_argument("--time-shift", type=positive_float, default=None,
                   help="s of shift(t) = t / (t + s(1 - t)) (default: the preset's, 2; paper Table 6: 1, 2, 4)")
    p.add_argument("--groups", type=positive_int, default=None,
                   help="token groups K, dividing the preset's N tokens; decoded in max(K, 8) steps (paper Figure 7)")
    p.add_argument("--max-steps", type=positive_int, default=210000, help="optimizer steps (paper: 210k)")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="learning rate after warm-up (paper §5: constant)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=500, help="linear warm-up from 0 (official: 500)")
    p.add_argument("--decay-steps", type=nonnegative_int, default=0, help="final steps of linear decay to 0 (paper: 0)")
    p.add_argument("--lpips-weight", type=nonnegative_float, default=0.5, help="λ1 of LPIPS; 0 switches it off")
    p.add_argument("--repa-weight", type=nonnegative_float, default=0.5, help="λ2 of REPA; 0 switches it off")
    p.add_argument("--vgg-weights", default=None, help=f"torchvision VGG16 file for LPIPS (else {VGG16_URL})")
    p.add_argument("--repa-weights", default=None, help=f"DINOv2 ViT-B/14 file for REPA (else {DINOV2_URL})")
    p.add_argument("--show-every", type=positive_int, default=5000, help="write a reconstruction PNG this often")
    p.add_argument("--num-show", type=positive_int, default=8, help="images in the reconstruction PNG")
    add_common_args(p, out_dir="out/tokenizer", weight_decay=0.0, ema_decay=0.999)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
