"""Stage 2 of D-AR: tokenize a dataset once, then train the Llama AR model on the codes (paper §5, SPEC.md §8-9).

    python train_ar.py extract --tokenizer-ckpt tok.pt --data /data/imagenet/train --out codes/in1k --flip
    python train_ar.py train --codes codes/in1k --gpt-model GPT-L --out-dir out/ar-l --compile
    torchrun --standalone --nproc_per_node=8 train_ar.py train --codes codes/in1k --gpt-model GPT-XL ...

`extract` writes codes.npy (rows, N) int16/int32, labels.npy (rows,) int64 and meta.json into --out: rows [0, n)
are the n images, rows [n, 2n) their horizontal flips (--flip). It works in chunks, split across torchrun ranks,
and a rerun skips the chunks already done. `train` memory-maps these files (no tokenizer in memory) and minimises
the cross-entropy of the N image tokens after the class token: gpt(codes[:, :-1], labels, codes).

Every random choice is a function of the seed and the step: the data order (an epoch takes each image once, in a
random view), the class-dropout mask of each sample of the global batch, and the dropout masks (per step and rank).
So --resume continues exactly without saving RNG states, and with dropout off a torchrun group matches one process
on the same global batch.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from train_tokenizer import make_dataset, setup  # the same images and process set-up as stage 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def write_json(path, obj):
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=1))
    os.replace(f"{path}.tmp", path)


@torch.no_grad()
def extract(args):
    rank, world, device = setup(args.device)
    from tokenizer import Tokenizer
    if not Path(args.tokenizer_ckpt).is_file():
        raise SystemExit(f"--tokenizer-ckpt {args.tokenizer_ckpt}: no such file")
    tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt).to(device)
    tcfg = tok.config
    data = make_dataset(args.data, tcfg.image_size)
    n, views, N = len(data), 2 if args.flip else 1, tcfg.num_tokens
    out, done = Path(args.out), Path(args.out) / "done"
    meta = dict(num_images=n, views=views, num_tokens=N, vocab_size=tcfg.vq_codebook_size,
                num_classes=data.num_classes, data=str(args.data), tokenizer_ckpt=str(args.tokenizer_ckpt),
                chunk_size=args.chunk_size, complete=False)
    old = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else None
    if old is not None and {**old, "complete": False} != meta:
        raise SystemExit(f"{out} holds codes made with other settings:\n{old}\nchoose another --out")
    if old is None and rank == 0:  # the memmap files are made once; every rank then fills its own chunks
        done.mkdir(parents=True, exist_ok=True)
        dtype = np.int16 if tcfg.vq_codebook_size <= 2 ** 15 else np.int32
        np.lib.format.open_memmap(out / "codes.npy", "w+", dtype, (n * views, N)).flush()
        np.save(out / "labels.npy", np.tile(data.labels, views))
        write_json(out / "meta.json", meta)
    barrier()
    codes = np.lib.format.open_memmap(out / "codes.npy", "r+")
    cs = args.chunk_size
    todo = [c for c in range(rank, math.ceil(n / cs), world) if not (done / str(c)).exists()]
    subset = torch.utils.data.Subset(data, [i for c in todo for i in range(c * cs, min(c * cs + cs, n))])
    loader = torch.utils.data.DataLoader(subset, args.batch_size, num_workers=args.num_workers)
    t0 = time.time()
    for b, (x, i) in enumerate(loader):
        x, i = x.to(device), i.numpy()  # (B, 3, S, S), (B,)
        codes[i] = tok.encode(x).cpu().numpy()
        if args.flip:
            codes[n + i] = tok.encode(x.flip(-1)).cpu().numpy()
        finished = i[((i + 1) % cs == 0) | (i + 1 == n)]  # the loader is sequential: these chunks are complete
        if len(finished):
            codes.flush()
            for c in finished // cs:
                (done / str(c)).touch()
        if rank == 0 and b % args.log_every == 0:
            print(f"batch {b}/{len(loader)} | {(b + 1) * len(i) * world / (time.time() - t0):.0f} img/s (all ranks)")
    barrier()
    if rank == 0:
        missing = [c for c in range(math.ceil(n / cs)) if not (done / str(c)).exists()]
        if missing:
            raise SystemExit(f"chunks {missing[:10]}... were not written; rerun to finish them")
        write_json(out / "meta.json", {**meta, "complete": True})
        print(f"wrote {n * views} code rows ({n} images x {views} views) of {N} tokens to {out}")
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- training ----
def get_lr(step, args, warmup, decay_start, total):
    """Linear warmup, constant, then a linear decay to --min-lr over the last --decay-epochs (paper §5)."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if step < decay_start:
        return args.lr
    return args.lr + (args.min_lr - args.lr) * (step - decay_start + 1) / (total - decay_start)


def epoch_order(seed, epoch, n, views):
    """The rows of one epoch, the same on every rank: each image once, in a random one of its views (row v·n + i
    is view v of image i), like the random crop/flip of the paper's on-the-fly recipe."""
    rng = np.random.default_rng([seed, 0, epoch])
    return rng.permutation(n) + n * rng.integers(0, views, n)


def flops_per_token(model, cfg):
    """6 FLOPs per matmul weight per token (2 forward, 4 backward) plus attention: 12·n_layer·dim·T for the
    score and value products (PaLM appendix B, as nanoGPT; counts the full T×T map although causal attention
    needs half). Embedding tables are lookups, not matmuls, so they are left out."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    return 6 * n + 12 * cfg.n_layer * cfg.dim * cfg.block_size


def train(args):
    rank, world, device = setup(args.device)
    master = rank == 0
    from model import GPT, GPTConfig
    meta_path = Path(args.codes) / "meta.json"
    if not meta_path.exists() or not json.loads(meta_path.read_text())["complete"]:
        raise SystemExit(f"--codes {args.codes}: no complete extraction there (run `train_ar.py extract` first)")
    meta = json.loads(meta_path.read_text())
    codes = np.load(Path(args.codes) / "codes.npy", mmap_mode="r")  # (rows, N) int16/int32
    labels = np.load(Path(args.codes) / "labels.npy")  # (rows,) int64
    dropout = {} if args.dropout is None else dict(token_dropout_p=args.dropout, resid_dropout_p=args.dropout,
                                                   ffn_dropout_p=args.dropout)
    cfg = GPTConfig.from_name(args.gpt_model, vocab_size=meta["vocab_size"], block_size=meta["num_tokens"],
                              num_classes=meta["num_classes"], class_dropout_prob=args.class_dropout,
                              reverse_order=args.reverse_order, **dropout)

    B = args.global_batch_size
    if B % (world * args.grad_accum):
        raise SystemExit(f"--global-batch-size {B} is not divisible by {world} ranks x {args.grad_accum} micro-steps")
    micro = B // (world * args.grad_accum)
    n, views = meta["num_images"], meta["views"]  # an epoch sees every image once, in one of its views
    steps_per_epoch = n // B
    if steps_per_epoch == 0:
        raise SystemExit(f"{n} images are fewer than one global batch of {B}")
    total = max(1, round(args.epochs * steps_per_epoch))
    warmup = round(args.warmup_epochs * steps_per_epoch)
    decay_start = max(warmup, total - round(args.decay_epochs * steps_per_epoch))
    end = min(total, args.max_steps or total)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    fpt = flops_per_token(model, cfg)
    bf16 = device.type == "cuda" and args.precision == "bf16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.fsdp:  # FSDP2: each block's parameters, gradients and optimizer state sharded across ranks
        if world == 1:
            raise SystemExit("--fsdp shards across ranks: launch with torchrun")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    raw = model  # unwrapped and uncompiled: checkpoints carry plain official key names
    params = [p for p in raw.parameters()]
    decay = [p for p in params if p.dim() >= 2]  # weight decay on matrices and embeddings only (SPEC.md §9.3)
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(args.beta1, args.beta2), fused=device.type == "cuda")
    ema = [p.detach().clone() for p in params] if args.ema else None
    step, ckpt_path = 0, Path(args.out_dir) / "ckpt.pt"
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["config"] != asdict(cfg):
            raise SystemExit(f"{ckpt_path} holds {ckpt['config']},\nbut the flags give {asdict(cfg)}")
        full = StateDictOptions(full_state_dict=True)
        if ema is not None:  # load the EMA through the model so that it is sharded like the parameters
            set_model_state_dict(raw, ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"], options=full)
            ema = [p.detach().clone() for p in params]
        set_model_state_dict(raw, ckpt["model"], options=full)
        set_optimizer_state_dict(raw, opt, ckpt["optimizer"], options=full)
        step = ckpt["step"]
    if args.compile:
        model = torch.compile(model)
    if world > 1 and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def save():
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(raw, options=opts)  # a collective under FSDP: every rank calls it
        optim = get_optimizer_state_dict(raw, opt, options=opts)
        ema_state = None
        if ema is not None:
            full = [e.full_tensor() if hasattr(e, "full_tensor") else e for e in ema]
            ema_state = {**state, **{name: e.cpu() for (name, _), e in zip(raw.named_parameters(), full)}}
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
            torch.save(dict(kind="gpt", config=asdict(cfg), model=state, ema=ema_state, optimizer=optim, step=step,
                            args=vars(args)), f"{ckpt_path}.tmp")
            os.replace(f"{ckpt_path}.tmp", ckpt_path)
        barrier()

    if master:
        print(f"{cfg}\n{sum(p.numel() for p in params) / 1e6:.1f}M parameters, {n} images x {views} views, "
              f"{steps_per_epoch} steps/epoch, steps {step} -> {end} of {total}, micro-batch {micro} x "
              f"{args.grad_accum} accumulation x {world} ranks")
    perm_epoch, perm, loss_sum, t0, t_step = -1, None, 0.0, time.time(), step
    while step < end:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_order(args.seed, epoch, n, views), epoch
        rows = perm[i * B:(i + 1) * B].reshape(world, args.grad_accum, micro)[rank]  # this rank's share
        drop = np.random.default_rng([args.seed, 1, step]).random(B) < args.class_dropout  # per global sample
        drop = drop.reshape(world, args.grad_accum, micro)[rank]
        torch.manual_seed(int(np.random.SeedSequence([args.seed, 2, step, rank]).generate_state(1)[0]))  # dropout
        lr = get_lr(step, args, warmup, decay_start, total)
        for group in opt.param_groups:
            group["lr"] = lr
        for m in range(args.grad_accum):
            x = torch.from_numpy(codes[rows[m]].astype(np.int64))  # (b, N)
            if cfg.reverse_order:  # fine-to-coarse ablation: the model sees the last token first
                x = x.flip(1)
            y, d = torch.from_numpy(labels[rows[m]]), torch.from_numpy(drop[m])
            x, y, d = (t.to(device, non_blocking=True) for t in (x, y, d))
            last = m == args.grad_accum - 1
            if args.fsdp:  # gradients are reduced only on the last micro-step
                raw.set_requires_gradient_sync(last)
            elif world > 1:
                model.require_backward_grad_sync = last
            with ctx:
                _, loss = model(x[:, :-1], y, x, drop=d)
            (loss / args.grad_accum).backward()
            loss_sum += loss.detach() / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - args.ema_decay)
        step += 1
        if step % args.log_every == 0 or step == end:
            loss_avg = float(loss_sum) / (step - t_step)  # .item() waits for the GPU, so the timing is honest
            dt = time.time() - t0
            tok_s = (step - t_step) * B * cfg.block_size / dt
            mfu = f" | MFU {100 * fpt * tok_s / (world * args.peak_tflops * 1e12):.1f}%" if bf16 else ""
            if master:
                print(f"step {step}/{total} | loss {loss_avg:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | "
                      f"{tok_s:,.0f} tok/s{mfu} | {dt / (step - t_step):.3f} s/step")
            loss_sum, t0, t_step = 0.0, time.time(), step
        if step % args.ckpt_every == 0 or step == end:
            save()
    if dist.is_initialized():
        dist.destroy_process_group()


def main(args):
    extract(args) if args.command == "extract" else train(args)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="encode a dataset into codes.npy / labels.npy with a trained tokenizer")
    p.add_argument("--tokenizer-ckpt", required=True, help="tokenizer checkpoint (ours or official)")
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders or flat), 'fashion-mnist', or a folder of its idx .gz files")
    p.add_argument("--out", required=True, help="output folder for codes.npy, labels.npy, meta.json")
    p.add_argument("--flip", action="store_true", help="also store the codes of horizontally flipped images")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch and rank")
    p.add_argument("--chunk-size", type=int, default=10000, help="images per resumable unit of work")
    p.add_argument("--num-workers", type=int, default=8, help="data loader worker processes")
    p.add_argument("--log-every", type=int, default=100, help="print progress every this many batches")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p = sub.add_parser("train", help="train the AR model on extracted codes")
    p.add_argument("--codes", required=True, help="folder written by `train_ar.py extract`")
    p.add_argument("--gpt-model", default="GPT-L", help="model preset: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-tiny, ...")
    p.add_argument("--out-dir", default="out/ar", help="where ckpt.pt is written")
    p.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    p.add_argument("--global-batch-size", type=int, default=1024, help="sequences per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--epochs", type=float, default=300, help="length of training (paper: 300)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this step (smoke tests, benchmarks); the lr schedule still follows --epochs")
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (paper 4e-4; official script 1e-4)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the decay")
    p.add_argument("--decay-epochs", type=float, default=50, help="linear decay to --min-lr over the last epochs")
    p.add_argument("--warmup-epochs", type=float, default=0, help="linear warmup (the paper uses none)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on >= 2-dim tensors")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--class-dropout", type=float, default=0.1, help="probability of the null class (for CFG)")
    p.add_argument("--dropout", type=float, default=None,
                   help="token/residual/FFN dropout (default: the preset's, 0.1 for the official sizes)")
    p.add_argument("--reverse-order", action="store_true", help="train on reversed sequences (fine-to-coarse)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 autocast or fp32 (TF32 matmuls) on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (large presets)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--log-every", type=int, default=100, help="print a log line every this many steps")
    p.add_argument("--ckpt-every", type=int, default=5000, help="write the checkpoint every this many steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, data order and dropout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
