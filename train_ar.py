"""Stage 2 of D-AR: tokenize a dataset once, then train the Llama AR model on the codes (paper §3.2, §4 and §5).

    python train_ar.py extract --tokenizer-ckpt tok.pt --data /data/imagenet/train --out codes/in1k
    python train_ar.py train --codes codes/in1k --gpt-model GPT-L --out-dir out/ar-l --compile
    torchrun --standalone --nproc_per_node=8 train_ar.py train --codes codes/in1k --gpt-model GPT-XL ...

`extract` writes codes.npy (views·n, N) int16/int32, labels.npy (views·n,) int64 and meta.json into --out; row
v·n + i holds view v of image i. The views stand in for the official AR trainer's augmentation, which tokenizes each
image on the fly from a random one of ten crops:
  * --views ten-crop (default for image folders): ADM's centre crop to int(1.1·S) px (281 for S = 256), then the
    ten views of TenCrop(S) in torchvision's order: top-left, top-right, bottom-left, bottom-right and centre crops,
    then the same five of the mirror image. ImageNet at 256 px: 10 views × 256 tokens × 2 bytes × 1.28M images
    ≈ 6.6 GB.
  * --views flip: the centre crop (ADM's, to S) and its mirror image.
  * --views single (default for Fashion-MNIST): the centre crop only. Fashion-MNIST's images are 28-px items padded
    to 32 px, so crops would cut the items and ten-crop is refused there; and its shoes nearly all point left, so an
    AR model trained on flip views draws mirrored shoes that the dataset does not contain.
Extraction works in chunks split across torchrun ranks; a rerun skips the chunks already done, and meta.json says
"complete" only once every chunk is. Unreadable images are named as they are met, skipped (their rows are never
trained on), counted at the end and listed in meta.json.

`train` memory-maps these files (no tokenizer in memory) and minimises the cross-entropy of the N image tokens after
the class token: gpt(codes[:, :-1], labels, codes). An epoch takes each image once, in a random one of its views.
Every random choice is a function of the seed and the step: the data order, the class-dropout mask of each sample
of the global batch and the dropout masks (per step and rank). So --resume continues exactly without saving RNG
states, and with dropout off a torchrun group matches one process on the same global batch.

A step whose loss or gradient norm is not finite is skipped on the device, without waiting for the GPU: weights,
AdamW moments and EMA stay as they were. The next log line counts the skips, 5 skips in a row stop the run, and a
checkpoint whose weights are not all finite is never written (the previous one is kept).

--cuda-graph (with --data-on-device) captures the whole optimizer step in one CUDA graph and replays it (see
data.StepGraph): the first steps after a start or a resume run eagerly and are real steps. Dropout stays
exact: each replay draws from the default CUDA generator as seeded for its step, as an eager step does.
"""
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (ArgumentParser, FashionMNIST, Meter, StepGraph, all_finite, atomic_save, center_crop_arr,
                  check_writable, checkpoint_path, default_workers, ema_update, from_uint8,
                  make_dataset, nonnegative_float, nonnegative_int, open_image, positive_float, positive_int,
                  probability, set_capturable, set_lr, setup_device, skip_flag)
from model import GPT, GPTConfig
from tokenizer import Tokenizer, load_checkpoint

VIEWS = {"ten-crop": 10, "flip": 2, "single": 1}  # stored views per image


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- extraction ----
def ten_crop(arr, size):
    """TenCrop(size) of an (H, W, 3) array, in torchvision's order (its centre offsets rounded like torchvision's)."""
    H, W = arr.shape[:2]
    top, left = round((H - size) / 2), round((W - size) / 2)

    def five(a):
        return [a[:size, :size], a[:size, W - size:], a[H - size:, :size], a[H - size:, W - size:],
                a[top:top + size, left:left + size]]
    return five(arr) + five(arr[:, ::-1])


class Views(torch.utils.data.Dataset):
    """Image i → its stored views (V, 3, S, S) in [-1, 1] in row order, i, and '' or why the file is unreadable."""

    def __init__(self, data, views, size):
        self.data, self.views, self.size = data, views, size

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if isinstance(self.data, FashionMNIST):
            arr = self.data.images[i].numpy()  # (32, 32, 3): the padded image the tokenizer trained on
        else:
            try:
                image = open_image(self.data.paths[i])
            except ValueError as e:
                return torch.zeros(VIEWS[self.views], 3, self.size, self.size), i, str(e)
            arr = center_crop_arr(image, int(1.1 * self.size) if self.views == "ten-crop" else self.size)
        crops = ten_crop(arr, self.size) if self.views == "ten-crop" else [arr, arr[:, ::-1]][:VIEWS[self.views]]
        return from_uint8(np.stack(crops)), i, ""


def open_codes(out, meta, labels, rank):
    """Creates the output files (rank 0, once), or checks that a previous run used the same settings; returns the
    codes memmap (rows, N). The arrays are filled in place; meta.json, written last, says when they are complete."""
    if (out / "meta.json").exists():  # a rerun: continue only with the same settings
        old = read_meta(out / "meta.json")
        if {k: v for k, v in old.items() if k not in ("complete", "skipped")} != meta:
            raise ValueError(f"{out} holds codes made with other settings ({old}): choose another --out")
    elif rank == 0:
        (out / "done").mkdir(parents=True, exist_ok=True)
        rows = meta["num_images"] * meta["views"]
        dtype = np.int16 if meta["vocab_size"] <= 2 ** 15 else np.int32
        np.lib.format.open_memmap(out / "codes.npy", "w+", dtype, (rows, meta["num_tokens"])).flush()
        atomic_save(out / "labels.npy", lambda f: np.save(f, np.tile(labels, meta["views"])))
        write_json(out / "meta.json", {**meta, "complete": False})
    barrier()
    return np.lib.format.open_memmap(out / "codes.npy", "r+")


def write_json(path, obj):
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


@torch.no_grad()
def encode_views(tok, loader, codes, n, chunk_size, done, log_every, device):
    """Encodes every view of the loader's images into codes[v·n + i], and marks each chunk once it is complete: its
    marker file lists the chunk's unreadable images."""
    skipped, t0 = {}, time.time()
    for b, (x, i, errors) in enumerate(loader):  # (B, V, 3, S, S), (B,), B messages
        i = i.numpy()
        for v in range(x.shape[1]):
            codes[v * n + i] = tok.encode(x[:, v].to(device)).cpu().numpy()
        for k, error in zip(i, errors):
            if error:
                print(f"skipping {error}", flush=True)
                skipped.setdefault(k // chunk_size, []).append(int(k))
        finished = i[((i + 1) % chunk_size == 0) | (i + 1 == n)]  # the loader is sequential: these chunks are whole
        if len(finished):
            codes.flush()
            for c in finished // chunk_size:
                write_json(done / str(c), skipped.get(c, []))
        if b % log_every == 0:
            print(f"batch {b}/{len(loader)} | {(b + 1) * len(i) / (time.time() - t0):.0f} img/s", flush=True)


def finish_extraction(out, meta, num_chunks):
    """Rank 0, after every rank: meta.json marks the folder complete and lists the unreadable images."""
    markers = [out / "done" / str(c) for c in range(num_chunks)]
    missing = [c for c, m in enumerate(markers) if not m.exists()]
    if missing:
        raise ValueError(f"chunks {missing[:10]} of {out} were not written: rerun the same command to finish them")
    skipped = sorted(i for m in markers for i in json.loads(m.read_text()))
    write_json(out / "meta.json", {**meta, "complete": True, "skipped": skipped})
    n, views = meta["num_images"], meta["views"]
    print(f"wrote {n * views} code rows ({n} images × {views} views) of {meta['num_tokens']} tokens to {out}"
          + (f"; skipped {len(skipped)} unreadable images (listed in meta.json)" if skipped else ""))


def extract_main(args):
    rank, world, device = setup_device(args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create that folder ({e.strerror})") from None
    check_writable(out / "meta.json")
    tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt).to(device).eval()
    S = tok.config.sampling_resolution
    data = make_dataset(args.data, S)
    fmnist = isinstance(data, FashionMNIST)
    views = args.views or ("single" if fmnist else "ten-crop")
    if views == "ten-crop" and fmnist:
        raise ValueError("--views ten-crop: Fashion-MNIST's items fill their padded 32-px images; use flip or single")
    meta = dict(num_images=len(data), views=VIEWS[views], augmentation=views, num_tokens=tok.config.num_all_queries,
                vocab_size=tok.config.vq_codebook_size, num_classes=data.num_classes, data=str(args.data),
                tokenizer_ckpt=str(args.tokenizer_ckpt), chunk_size=args.chunk_size)
    codes = open_codes(out, meta, data.labels, rank)
    n, cs = len(data), args.chunk_size
    todo = [c for c in range(rank, math.ceil(n / cs), world) if not (out / "done" / str(c)).exists()]
    indices = [i for c in todo for i in range(c * cs, min(c * cs + cs, n))]
    subset = torch.utils.data.Subset(Views(data, views, S), indices)
    loader = torch.utils.data.DataLoader(subset, args.batch_size, num_workers=args.num_workers)
    encode_views(tok, loader, codes, n, cs, out / "done", args.log_every, device)
    barrier()
    if rank == 0:
        finish_extraction(out, meta, math.ceil(n / cs))


# ---- the codes ----
def read_meta(path):
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    keys = ("num_images", "views", "num_tokens", "vocab_size", "num_classes")
    if not isinstance(meta, dict) or not all(type(meta.get(k)) is int and meta[k] > 0 for k in keys):
        raise ValueError(f"{path} must give {', '.join(keys)} as whole numbers ≥ 1")
    return meta


def read_array(path, mmap_mode=None):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (run `train_ar.py extract` first)")
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None


def load_codes(folder):
    """The files `extract` wrote, checked against meta.json → codes (rows, N) memmap, labels (rows,), meta and the
    readable images (their indices)."""
    folder = Path(folder)
    meta = read_meta(folder / "meta.json") if (folder / "meta.json").is_file() else None
    if meta is None or meta.get("complete") is not True:
        raise ValueError(f"--codes {folder}: no complete extraction there (run `train_ar.py extract`, or rerun it)")
    n, rows, N = meta["num_images"], meta["num_images"] * meta["views"], meta["num_tokens"]
    codes, labels = read_array(folder / "codes.npy", "r"), read_array(folder / "labels.npy")
    if codes.shape != (rows, N) or codes.dtype.kind not in "iu":
        raise ValueError(f"{folder / 'codes.npy'} holds {codes.dtype} {codes.shape}, but meta.json says ({rows}, {N}) "
                         f"integers ({n} images × {meta['views']} views)")
    if labels.shape != (rows,) or labels.dtype.kind not in "iu":
        raise ValueError(f"{folder / 'labels.npy'} holds {labels.dtype} {labels.shape}, but meta.json says ({rows},)")
    if rows and not 0 <= labels.min() <= labels.max() < meta["num_classes"]:
        raise ValueError(f"{folder / 'labels.npy'} holds labels {labels.min()}..{labels.max()}, outside the "
                         f"{meta['num_classes']} classes of meta.json")
    skipped = meta.get("skipped", [])
    if not isinstance(skipped, list) or not all(type(i) is int and 0 <= i < n for i in skipped):
        raise ValueError(f"{folder / 'meta.json'}: 'skipped' must list image indices in [0, {n})")
    return codes, labels, meta, np.setdiff1d(np.arange(n), skipped)


def epoch_order(seed, epoch, images, n, views):
    """The rows of one epoch, the same on every rank: each of `images` once, in a random one of its views (row
    v·n + i is view v of image i), like the random crop of the official on-the-fly recipe."""
    rng = np.random.default_rng([seed, 0, epoch])
    return images[rng.permutation(len(images))] + n * rng.integers(0, views, len(images))


class StepBatches:
    """This rank's micro-batches of each step, read from the memory-mapped codes: step s takes B rows of its epoch's
    order, rank r the r-th of `world` equal slices of them, cut into `accum` micro-batches. The class-dropout mask
    is drawn per sample of the global batch, so it does not depend on the split either."""

    def __init__(self, codes, labels, images, views, B, world, accum, rank, seed, class_dropout, cfg, device):
        self.codes, self.labels, self.images, self.views, self.B = codes, labels, images, views, B
        self.shape, self.rank = (world, accum, B // (world * accum)), rank  # (ranks, micro-steps, micro-batch)
        self.seed, self.class_dropout, self.cfg, self.device = seed, class_dropout, cfg, device
        self.steps_per_epoch, self.order_epoch, self.order = len(images) // B, None, None

    def __call__(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.order_epoch:
            n = len(self.codes) // self.views
            self.order, self.order_epoch = epoch_order(self.seed, epoch, self.images, n, self.views), epoch
        rows = self.order[i * self.B:(i + 1) * self.B].reshape(self.shape)[self.rank]  # (A, b)
        drop = np.random.default_rng([self.seed, 1, step]).random(self.B) < self.class_dropout
        return [self.micro_batch(r, d) for r, d in zip(rows, drop.reshape(self.shape)[self.rank])]

    def micro_batch(self, rows, drop):
        """rows, drop (b,) → tokens (b, N), labels (b,), drop (b,) on the device."""
        V, x = self.cfg.vocab_size, self.codes[rows]
        if x.min() < 0 or x.max() >= V:  # checked on the host: an out-of-range index would crash on the GPU
            raise ValueError(f"codes.npy rows {rows.min()}..{rows.max()} hold tokens outside the vocabulary [0, {V})")
        x = torch.from_numpy(x.astype(np.int64))
        if self.cfg.reverse_order:  # fine-to-coarse ablation (paper A.5): the model sees the last token first
            x = x.flip(1)
        y, drop = torch.from_numpy(self.labels[rows]), torch.from_numpy(drop)
        return tuple(t.to(self.device, non_blocking=True) for t in (x, y, drop))


class DeviceBatches:
    """The fast path (--data-on-device, one process): codes and labels resident on the device (Fashion-MNIST's: 15 MB)
    and each step's rows drawn there without the host waiting: epoch e's order (each readable image once, in a
    random one of its views) from a generator seeded by (seed, e), step s's class-dropout mask from one seeded by
    (seed, s). Resume stays exact; the draws differ from StepBatches' (another generator)."""

    def __init__(self, codes, labels, images, views, B, accum, seed, class_dropout, cfg, device):
        V = cfg.vocab_size
        if len(codes) and not 0 <= codes.min() <= codes.max() < V:  # checked once on the host
            raise ValueError(f"codes.npy holds tokens outside the vocabulary [0, {V})")
        self.codes = torch.from_numpy(np.array(codes)).to(device)  # (rows, N), read once from the memmap
        self.labels = torch.from_numpy(labels).to(device)  # (rows,)
        self.images, self.n = torch.from_numpy(images).to(device), len(codes) // views
        self.views, self.B, self.accum, self.seed, self.class_dropout = views, B, accum, seed, class_dropout
        self.reverse, self.device, self.gen = cfg.reverse_order, device, torch.Generator(device)
        self.steps_per_epoch, self.order_epoch, self.order = len(images) // B, None, None

    def seeded(self, *key):
        return self.gen.manual_seed(int(np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]))

    def __call__(self, step):
        """Step `step`'s micro-batches [(tokens (b, N), labels (b,), drop (b,)), ...] on the device."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self.order_epoch:
            g, m = self.seeded(3, epoch), len(self.images)
            perm = torch.randperm(m, generator=g, device=self.device)
            view = torch.randint(0, self.views, (m,), generator=g, device=self.device)
            self.order, self.order_epoch = self.images[perm] + self.n * view, epoch
        rows = self.order[i * self.B:(i + 1) * self.B]  # (B,)
        drop = torch.rand(self.B, generator=self.seeded(4, step), device=self.device) < self.class_dropout
        x = self.codes[rows].long()  # (B, N)
        if self.reverse:  # fine-to-coarse ablation (paper A.5)
            x = x.flip(1)
        return list(zip(x.chunk(self.accum), self.labels[rows].chunk(self.accum), drop.chunk(self.accum)))


# ---- the model, its checkpoint and one step ----
def get_lr(step, lr, min_lr, warmup, decay_start, total):
    """Linear warm-up over `warmup` steps, constant, then linear decay to min_lr from decay_start to total (paper §5:
    4e-4, decayed to 1e-5 over the last 50 of 300 epochs)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start:
        return lr
    return lr + (min_lr - lr) * (step - decay_start + 1) / (total - decay_start)


def flops_per_token(model, cfg):
    """6 FLOPs per matmul weight per token (2 forward, 4 backward) plus attention: 12·n_layer·dim·T for the
    score and value products (PaLM appendix B, as nanoGPT; counts the full T×T map although causal attention
    needs half). Embedding tables are lookups, not matmuls, so they are left out."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embedding" not in name)
    return 6 * n + 12 * cfg.n_layer * cfg.dim * cfg.block_size


def build(cfg, device, fsdp, bf16, lr, betas, weight_decay, ema):
    """GPT (sharded with FSDP2 if asked), fused AdamW and the EMA weights (a list, or None)."""
    model = GPT(cfg).to(device)
    if fsdp:  # each block's parameters, gradients and optimizer state sharded across ranks
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    params = list(model.parameters())
    # weight decay on matrices and embeddings only, as the official trainer
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    # the fused kernel skips the whole update (weights, moments, step count) where found_inf is 1: set per step
    opt.found_inf = torch.zeros((), device=device)
    return model, opt, [p.detach().clone() for p in params] if ema else None


def restore(path, model, opt, ema, cfg):
    """Restores weights, optimizer and EMA (in place) from one of our checkpoints; returns the step."""
    ckpt = load_checkpoint(path)  # weights_only: loading never runs code
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "gpt" or "optimizer" not in ckpt:
        raise ValueError(f"{path} is not an AR training checkpoint of this script")
    stored = dict(ckpt["config"])
    stored.setdefault("null_class", stored.get("class_dropout_prob", 0.1) > 0)  # before null_class was a field
    stored.pop("cls_token_num", None)  # always 1: no longer a field
    if {**asdict(cfg), **stored} != asdict(cfg):  # fields added since the file was written keep their defaults
        raise ValueError(f"{path} holds {stored}, but the flags give {asdict(cfg)}")
    full = StateDictOptions(full_state_dict=True)
    if ema is not None:  # load the EMA through the model so that it is sharded like the parameters
        set_model_state_dict(model, ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"], options=full)
        torch._foreach_copy_(ema, [p.detach() for p in model.parameters()])
    set_model_state_dict(model, ckpt["model"], options=full)
    set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=full)
    return ckpt["step"]


def save_checkpoint(path, model, opt, ema, cfg, step, args):
    """Every rank takes part (a collective under FSDP); rank 0 writes. Non-finite weights are never written."""
    params = list(model.parameters())
    if not all_finite(params + (ema or [])):
        raise ValueError(f"step {step}: the weights are not finite; {path} keeps the checkpoint it had (lower --lr)")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state, optim = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)
    ema_state = None
    if ema is not None:
        full = [e.full_tensor() if hasattr(e, "full_tensor") else e for e in ema]
        ema_state = {**state, **{name: e.cpu() for (name, _), e in zip(model.named_parameters(), full)}}
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt = dict(kind="gpt", config=asdict(cfg), model=state, ema=ema_state, optimizer=optim, step=step, args=args)
        atomic_save(path, lambda f: torch.save(ckpt, f))
    barrier()


def set_grad_sync(model, raw, on):
    """DDP and FSDP reduce the gradients on the last micro-step only."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = on
    elif hasattr(raw, "set_requires_gradient_sync"):
        raw.set_requires_gradient_sync(on)


def train_step(model, raw, opt, ema, ema_decay, grad_clip, batches, ctx):
    """One optimizer step over this rank's micro-batches, all on the device: forward, backward, gradient clipping,
    AdamW and EMA, skipped as a whole when the loss or gradient norm is not finite. Returns the mean loss, the
    gradient norm and the skip flag (device tensors; nothing waits for the GPU)."""
    loss_sum = 0.0
    for m, (x, y, drop) in enumerate(batches):  # (b, N), (b,), (b,)
        set_grad_sync(model, raw, m == len(batches) - 1)
        with ctx:
            _, loss = model(x[:, :-1], y, x, drop=drop)
        (loss / len(batches)).backward()
        loss_sum = loss_sum + loss.detach().float() / len(batches)
    params = list(raw.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    skip = skip_flag(loss_sum, grad_norm)
    opt.found_inf.copy_(skip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:  # a skipped step leaves the EMA as it was: weight 0
        ema_update(ema, params, ema_decay, skip)
    return loss_sum, grad_norm, skip


# ---- training ----
def gpt_config(name, meta, class_dropout, dropout, reverse_order):
    """The --gpt-model preset sized to the codes (vocabulary, sequence length, classes)."""
    dropout = {} if dropout is None else dict(token_dropout_p=dropout, resid_dropout_p=dropout, ffn_dropout_p=dropout)
    return GPTConfig.from_name(name, vocab_size=meta["vocab_size"], block_size=meta["num_tokens"],
                               num_classes=meta["num_classes"], class_dropout_prob=class_dropout,
                               reverse_order=reverse_order, **dropout)


def check_cuda_graph(args, device):
    """One-line errors for the flags --cuda-graph cannot run with (torchrun is refused with --data-on-device)."""
    if not args.data_on_device:
        raise ValueError("--cuda-graph captures the --data-on-device step: pass --data-on-device too")
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, not {device.type}")


def train_main(args):
    rank, world, device = setup_device(args.device)
    codes, labels, meta, images = load_codes(args.codes)
    cfg = gpt_config(args.gpt_model, meta, args.class_dropout, args.dropout, args.reverse_order)
    B, A = args.global_batch_size, args.grad_accum
    if B % (world * A):
        raise ValueError(f"--global-batch-size {B} is not divisible by {world} ranks × {A} micro-steps")
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards across ranks: launch with torchrun")
    if len(images) < B:
        raise ValueError(f"{len(images)} images are fewer than one global batch of {B}")
    if args.data_on_device and world > 1:
        raise ValueError("--data-on-device is the one-process fast path: launch without torchrun")
    if args.cuda_graph:
        check_cuda_graph(args, device)
    if args.data_on_device:
        data = DeviceBatches(codes, labels, images, meta["views"], B, A, args.seed, args.class_dropout, cfg, device)
    else:
        data = StepBatches(codes, labels, images, meta["views"], B, world, A, rank, args.seed, args.class_dropout,
                           cfg, device)
    total = max(1, round(args.epochs * data.steps_per_epoch))  # epochs → steps
    warmup = round(args.warmup_epochs * data.steps_per_epoch)
    decay_start = max(warmup, total - round(args.decay_epochs * data.steps_per_epoch))
    end = min(total, args.max_steps or total)
    ckpt_path = checkpoint_path(args.out_dir, args.resume, args.overwrite)

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    bf16 = device.type == "cuda" and args.precision == "bf16"
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw, opt, ema = build(cfg, device, args.fsdp, bf16, args.lr, (args.beta1, args.beta2), args.weight_decay, args.ema)
    step = restore(ckpt_path, raw, opt, ema, cfg) if args.resume else 0
    set_capturable(opt, args.cuda_graph, device)
    model = torch.compile(raw) if args.compile else raw
    if world > 1 and not args.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    peak = world * args.peak_tflops * 1e12 / flops_per_token(raw, cfg) if bf16 else None  # tokens/s at 100% MFU
    if rank == 0:
        print(f"{cfg}\n{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {len(images)} images × "
              f"{meta['views']} views, {data.steps_per_epoch} steps/epoch, steps {step} -> {end} of {total}, "
              f"micro-batch {B // (world * A)} × {A} accumulation × {world} ranks")
    meter = Meter(["loss"], device)
    step_fn = partial(train_step, model, raw, opt, ema, args.ema_decay, args.grad_clip, ctx=ctx)
    step_fn = StepGraph(step_fn) if args.cuda_graph else step_fn
    while step < end:
        lr = get_lr(step, args.lr, args.min_lr, warmup, decay_start, total)
        set_lr(opt, lr)
        batches = data(step)
        torch.manual_seed(int(np.random.SeedSequence([args.seed, 2, step, rank]).generate_state(1)[0]))  # dropout
        loss, grad_norm, skip = step_fn(batches)
        meter.add(loss, skip)
        step += 1
        if step % args.log_every == 0 or step == end:
            log(meter, step, total, lr, grad_norm, B * cfg.block_size, peak, rank)
        if step % args.ckpt_every == 0 or step == end:
            meter.check(step)
            save_checkpoint(ckpt_path, raw, opt, ema, cfg, step, vars(args))
    if dist.is_initialized():
        dist.destroy_process_group()


def log(meter, step, total, lr, grad_norm, tokens_per_step, peak, rank):
    means, skips, steps, dt = meter.read(step)  # waits for the GPU, so the timing is honest
    loss = means["loss"]
    tok_s = steps * tokens_per_step / dt
    mfu = f" | MFU {100 * tok_s / peak:.1f}%" if peak else ""
    if rank == 0:
        print(f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | skipped {skips} | "
              f"{tok_s:,.0f} tok/s{mfu} | {dt / steps:.3f} s/step", flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        extract_main(args) if args.command == "extract" else train_main(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train_ar.py {args.command}: error: {e}") from None


def parse_args(argv=None):
    parser = ArgumentParser(prog="train_ar.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="encode a dataset into codes.npy / labels.npy with a trained tokenizer")
    p.add_argument("--tokenizer-ckpt", required=True, help="tokenizer checkpoint (ours or official)")
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders or flat), 'fashion-mnist', or a folder of its idx .gz files")
    p.add_argument("--out", required=True, help="output folder for codes.npy, labels.npy, meta.json")
    p.add_argument("--views", choices=list(VIEWS), default=None,
                   help="views stored per image: ten-crop (10, the official AR augmentation; ~6.6 GB for ImageNet at "
                        "256 px), flip (2) or single (1). Default: ten-crop for image folders, single for "
                        "Fashion-MNIST")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch and rank")
    p.add_argument("--chunk-size", type=positive_int, default=10000, help="images per resumable unit of work")
    p.add_argument("--num-workers", type=nonnegative_int, default=default_workers(),
                   help="data loader worker processes per rank (default: the usable cores, at most 8)")
    p.add_argument("--log-every", type=positive_int, default=100, help="print progress every this many batches")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p = sub.add_parser("train", help="train the AR model on extracted codes")
    p.add_argument("--codes", required=True, help="folder written by `train_ar.py extract`")
    p.add_argument("--gpt-model", default="GPT-L", help="model preset: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-tiny, ...")
    p.add_argument("--out-dir", default="out/ar", help="where ckpt.pt is written")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    mode.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint")
    p.add_argument("--global-batch-size", type=positive_int, default=1024,
                   help="sequences per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--epochs", type=positive_float, default=300, help="length of training (paper: 300)")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this step (smoke tests, benchmarks); the lr schedule still follows --epochs")
    p.add_argument("--lr", type=positive_float, default=4e-4,
                   help="peak learning rate (paper 4e-4; official script 1e-4)")
    p.add_argument("--min-lr", type=nonnegative_float, default=1e-5, help="learning rate at the end of the decay")
    p.add_argument("--decay-epochs", type=nonnegative_float, default=50,
                   help="linear decay to --min-lr over the last epochs")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0, help="linear warmup (the paper uses none)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.05,
                   help="AdamW weight decay on >= 2-dim tensors")
    p.add_argument("--beta1", type=probability, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=probability, default=0.95, help="AdamW beta2")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    p.add_argument("--class-dropout", type=probability, default=0.1, help="probability of the null class (for CFG)")
    p.add_argument("--dropout", type=probability, default=None,
                   help="token/residual/FFN dropout (default: the preset's, 0.1 for the official sizes)")
    p.add_argument("--reverse-order", action="store_true", help="train on reversed sequences (fine-to-coarse)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--ema-decay", type=probability, default=0.9999, help="EMA decay per step")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16 autocast or fp32 (TF32 matmuls) on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (large presets)")
    p.add_argument("--data-on-device", action="store_true",
                   help="fast path for small code sets, one process (GPU or CPU): codes and labels resident on the "
                        "device, the data order and class-dropout masks drawn there per step. Another random stream "
                        "than the default's, equally exact on --resume")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --data-on-device on CUDA: replay the whole optimizer step as one CUDA graph (the first "
                        "3 steps of a run run eagerly), for small models whose eager step is bound by the host "
                        "launching kernels")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0,
                   help="per-GPU peak for MFU (H100 SXM bf16 dense: 989)")
    p.add_argument("--log-every", type=positive_int, default=100, help="print a log line every this many steps")
    p.add_argument("--ckpt-every", type=positive_int, default=5000, help="write the checkpoint every this many steps")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the init, data order and dropout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
