"""Plain pixel diffusion at equal compute, the baseline of D-AR's central claim: the tokenizer's own pixel network
(tokenizer.DiffusionNet) trained as a class-conditional flow-matching model on Fashion-MNIST, one learned token per
class as its condition instead of the tokens (the last token: no class, for guidance). The same data, optimizer and
loop (trainer.py), time shift, solver (Tokenizer.solver_step, Adams-2) and step count as the tokenizer's decoder;
classifier-free guidance on the velocity, v = v_u + λ(v_c − v_u).

    python experiments/diffusion_baseline.py train --preset fmnist --out-dir out/diffusion --data-on-device \
        --cuda-graph --compile --global-batch-size 512 --max-steps 29300 --lr 1.6e-3 --decay-steps 5860
    python experiments/diffusion_baseline.py sample --ckpt out/diffusion/ckpt.pt --cfg-scale 1.0 --npz s.npz
    python evaluate.py fmnist s.npz      # FID-10k, the protocol of docs/results.md
"""
import itertools
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import (ArgumentParser, FashionMNIST, _number, atomic_save, check_writable, exit_on_error,  # noqa: E402
                  from_uint8, nonnegative_int, positive_float, positive_int, probability, setup_device, to_uint8)
from model import guide  # noqa: E402
from tokenizer import (DiffusionNet, Tokenizer, TokenizerConfig, load_checkpoint, precision,  # noqa: E402
                       shift_time)
from train_tokenizer import augment  # noqa: E402
from trainer import DRAWS, Order, Trainer, add_common_args, generator, get_lr, setup  # noqa: E402


class ClassDiffusion(nn.Module):
    """v̂ = net(x_t, t, class token): the tokenizer's schedule and solver, its condition a class instead of tokens."""
    schedule, check_steps, solver_step = Tokenizer.schedule, Tokenizer.check_steps, Tokenizer.solver_step

    def __init__(self, cfg, num_classes=10):
        super().__init__()
        self.config, self.num_classes = cfg, num_classes
        self.net = DiffusionNet(cfg)
        self.class_embedding = nn.Embedding(num_classes + 1, cfg.decoder_dim)  # row num_classes: no class
        self.net.initialize_weights()
        nn.init.trunc_normal_(self.class_embedding.weight, std=0.02)

    def forward(self, images, labels, t, noise):
        """The flow-matching term of paper eq. 7 for images (B, 3, H, W), labels (B,), raw t (B,), noise x0."""
        cfg = self.config
        ts = shift_time(t, cfg.time_shift)[:, None, None, None]
        x1 = cfg.data_std * images
        x_t = ts * x1 + (1 - ts) * noise
        v, _ = self.net(x_t, ts.flatten(), self.class_embedding(labels)[:, None])  # cond (B, 1, Dd)
        return ((v.float() - (x1 - noise)) ** 2).mean() / cfg.data_std ** 2

    @torch.no_grad()
    def velocity(self, x_t, t, condition):
        """condition = (labels (B,), guidance scale λ or None): one evaluation, a doubled batch under guidance."""
        labels, scale = condition
        if scale is not None:
            x_t, t = x_t.repeat(2, 1, 1, 1), t.repeat(2)
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        return guide(self.net(x_t, t, self.class_embedding(labels)[:, None])[0], scale)

    @torch.no_grad()
    def sample(self, labels, cfg_scale=1.0, generator=None, steps=None):
        """labels (B,) → images (B, 3, R, R) in [-1, 1], not clamped; guidance λ > 1 on every step."""
        R, steps = self.config.sampling_resolution, self.check_steps(steps)
        x = torch.randn(len(labels), 3, R, R, generator=generator, device=labels.device)
        v, scale = None, cfg_scale if cfg_scale > 1 else None
        for k in range(steps):
            x, v, image = self.solver_step(x, v, k, (labels, scale), "adams2", steps)
        return image


def train_main(args):
    cfg = TokenizerConfig.from_name(args.preset, repa=False)
    rank, world, device, path = setup(args)
    data = FashionMNIST("train", args.data)
    torch.manual_seed(args.seed)
    model = ClassDiffusion(cfg, data.num_classes).to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    if args.compile:
        for block in model.net.blocks:
            block.compile(dynamic=False)
    images, labels = data.images.to(device), torch.as_tensor(data.labels).to(device)
    order = Order(torch.arange(len(data)), args.global_batch_size, args.seed, device)
    null = torch.tensor(data.num_classes, device=device)

    def forward(m, x, y, t, noise):
        return model(x, y, t, noise)[None]
    run = Trainer(model, model, forward, ["loss"], list(ema.parameters()), args, device, "diffusion", cfg, path,
                  bf16=device.type == "cuda")
    end = args.max_steps
    decay_start = max(args.warmup_steps, end - args.decay_steps)
    print(f"{sum(p.numel() for p in ema.parameters()) / 1e6:.1f}M parameters, steps {run.step} -> {end}", flush=True)
    for s in itertools.count(run.step):
        if s >= end:
            break
        idx = order(s)
        g = generator(device, args.seed, DRAWS, s, 0)
        x, t, noise = augment(from_uint8(images[idx]).contiguous(), g)
        y = torch.where(torch.rand(len(idx), generator=g, device=device) < args.class_dropout, null, labels[idx])
        run([(x, y, t, noise)], get_lr(s, args.lr, args.warmup_steps, decay_start, end))
        if run.step % args.log_every == 0 or run.step == end:
            run.log(end, args.global_batch_size, "img")
        run.checkpoint(end)  # also on SIGTERM or Ctrl-C, then the run stops
    run.finish()


def load(path, device):
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "diffusion":
        raise ValueError(f"{path} is not a checkpoint of experiments/diffusion_baseline.py")
    model = ClassDiffusion(TokenizerConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["ema"] or ckpt["model"])
    return model.to(device).eval()


def sample_main(args):
    check_writable(args.npz, (".npz",))
    _, _, device = setup_device(args.device)
    model = load(args.ckpt, device)
    labels = torch.arange(model.num_classes).repeat(-(-args.num_samples // model.num_classes))[:args.num_samples]
    images = []
    for start in range(0, len(labels), args.batch_size):
        g = torch.Generator(device).manual_seed(args.seed + start)  # a batch's noise from its first index
        with precision("tf32", device.type):
            images.append(to_uint8(model.sample(labels[start:start + args.batch_size].to(device), args.cfg_scale,
                                                g, args.steps)).cpu())
    atomic_save(args.npz, lambda f: np.savez(f, arr_0=torch.cat(images).numpy(), arr_1=labels.numpy()))
    print(f"{len(labels)} samples at CFG {args.cfg_scale}, {model.check_steps(args.steps)} steps, written to {args.npz}")


def get_args(argv=None):
    parser = ArgumentParser(prog="diffusion_baseline.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the class-conditional pixel network")
    p.add_argument("--preset", default="fmnist", help="tokenizer preset whose pixel network is trained")
    p.add_argument("--data", default=None, help="folder of the Fashion-MNIST .gz files (default: the installed ones)")
    p.add_argument("--max-steps", type=positive_int, default=29300, help="default: the training FLOPs of the "
                   "shipped D-AR (docs/results.md)")
    p.add_argument("--lr", type=positive_float, default=1.6e-3)
    p.add_argument("--warmup-steps", type=nonnegative_int, default=500)
    p.add_argument("--decay-steps", type=nonnegative_int, default=5860, help="final steps of linear decay to 0")
    p.add_argument("--class-dropout", type=probability, default=0.1, help="probability of the null class (for CFG)")
    add_common_args(p, out_dir="out/diffusion", weight_decay=0.0, ema_decay=0.999)
    p = sub.add_parser("sample", help="samples, 1,000 per class for 10,000, into an ADM-style .npz")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--npz", required=True)
    p.add_argument("--num-samples", type=positive_int, default=10000)
    p.add_argument("--batch-size", type=positive_int, default=1000)
    p.add_argument("--cfg-scale", type=_number(float, lambda v: 1 <= v < float("inf"), "a finite number ≥ 1"),
                   default=1.0, help="guidance on the velocity (1: none)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--steps", type=positive_int, default=None, help="solver steps (default: the tokenizer's, 8)")
    p.add_argument("--device", default=None)
    return parser.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    exit_on_error("diffusion_baseline.py", train_main if args.command == "train" else sample_main, args)


if __name__ == "__main__":
    main()
