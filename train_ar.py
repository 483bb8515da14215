"""Stage 2 of D-AR: tokenize a dataset once, then train the Llama AR model on the codes (paper §3.2, §4 and §5).

    python train_ar.py extract --tokenizer-ckpt tok.pt --data /data/imagenet/train --out codes/in1k
    python train_ar.py train --codes codes/in1k --gpt-model GPT-L --out-dir out/ar-l --compile
    torchrun --standalone --nproc_per_node=8 train_ar.py train --codes codes/in1k --gpt-model GPT-XL ...

`extract` writes codes.npy (views·n, N) int16/int32, labels.npy (views·n,) int64 and meta.json into --out; row
v·n + i holds view v of image i. The views stand in for the official AR trainer's augmentation, which tokenizes each
image on the fly from a random one of ten crops:
  * ten-crop (default for image folders): ADM's centre crop to int(1.1·S) px (281 for S = 256), then TenCrop(S) in
    torchvision's order (ImageNet at 256 px: 10 views × 256 tokens × 2 bytes × 1.28M images ≈ 6.6 GB).
  * flip: the centre crop (ADM's, to S) and its mirror image.
  * single (default for Fashion-MNIST): the centre crop only. Crops would cut its padded 28-px items, so ten-crop is
    refused there; and its shoes nearly all point left, so flip views teach mirrored shoes the data do not contain.
Extraction works in resumable chunks split across torchrun ranks; meta.json says "complete" once every chunk is.
Unreadable images are named, skipped (never trained on) and listed in meta.json.

`train` memory-maps the codes and minimises the cross-entropy of the N image tokens after the class token; an epoch
takes each image once, in a random one of its views. Class dropout is drawn per global-batch sample from (seed, step),
dropout from (seed, step, rank): --resume continues exactly and, with dropout off, torchrun equals one process.
"""
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import (ArgumentParser, FashionMNIST, Interrupted, atomic_save, center_crop_arr, check_writable,
                  exit_on_error, from_uint8, interrupted, lock_folder, make_dataset, nonnegative_float, open_image,
                  positive_float, positive_int, probability, setup_device, write_json)
from model import GPT, GPTConfig
from tokenizer import Tokenizer
from trainer import (DRAWS, DROPOUT, Order, Trainer, add_common_args, add_data_args, generator,
                     get_lr, seed_of, setup)

VIEWS = {"ten-crop": 10, "flip": 2, "single": 1}  # stored views per image


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
    """Creates the output files (rank 0) or checks a rerun's settings → the codes memmap (rows, N), filled in place."""
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
    if dist.is_initialized():
        dist.barrier()
    return np.lib.format.open_memmap(out / "codes.npy", "r+")


@torch.no_grad()
def encode_views(tok, loader, codes, n, chunk_size, done, log_every, device):
    """Encodes every view of the loader's images into codes[v·n + i]; a whole chunk's marker lists its bad images."""
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
        if interrupted():  # the chunks marked done are complete; the others are encoded again by a rerun
            raise Interrupted(f"stopped by {interrupted()}: {len(list(done.iterdir()))} chunks are complete; the same "
                              f"command finishes the others (the same codes)")


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
    if rank == 0:
        lock_folder(out, "--out")
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
    if dist.is_initialized():
        dist.barrier()
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
        array = np.load(path, mmap_mode=mmap_mode)  # pickled objects are refused (allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({str(e)[:200]})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under this name
        array.close()
        raise ValueError(f"{path}: an archive of arrays, not one .npy array")
    return array


def load_codes(folder):
    """The files `extract` wrote, checked → codes (rows, N) memmap, labels (rows,), meta, the readable images."""
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
    if not 0 <= labels.min() <= labels.max() < meta["num_classes"]:
        raise ValueError(f"{folder / 'labels.npy'} holds labels {labels.min()}..{labels.max()}, outside the "
                         f"{meta['num_classes']} classes of meta.json")
    if not 0 <= codes.min() <= codes.max() < meta["vocab_size"]:  # would crash on the GPU: refused here
        raise ValueError(f"{folder / 'codes.npy'} holds tokens outside the vocabulary [0, {meta['vocab_size']})")
    skipped = meta.get("skipped", [])
    if not isinstance(skipped, list) or not all(type(i) is int and 0 <= i < n for i in skipped):
        raise ValueError(f"{folder / 'meta.json'}: 'skipped' must list image indices in [0, {n})")
    return codes, labels, meta, np.setdiff1d(np.arange(n), skipped)


def batches(codes, labels, images, meta, args, step, world, rank, device):
    """This rank's micro-batches [(tokens (b, N), labels (b,), drop (b,)), ...] of every step from `step` on: its rows,
    from the memory map or the device; the class-dropout mask drawn for the whole global batch from (seed, step)."""
    B, A = args.global_batch_size, args.grad_accum
    if args.data_on_device:
        codes, labels = torch.from_numpy(np.array(codes)).to(device), torch.from_numpy(labels).to(device)
    where = device if args.data_on_device else torch.device("cpu")
    order = Order(images, B, args.seed, where, meta["views"], meta["num_images"])
    for s in itertools.count(step):
        rows = order(s).view(world, -1)[rank]  # (A·b,)
        rows = rows if args.data_on_device else rows.numpy()  # the memory map is read on the host
        drop = torch.rand(B, generator=generator(device, args.seed, DRAWS, s), device=device) < args.class_dropout
        x = torch.as_tensor(codes[rows]).to(device, non_blocking=True).long()  # (A·b, N)
        y = torch.as_tensor(labels[rows]).to(device, non_blocking=True)
        if args.reverse_order:  # fine-to-coarse ablation (paper A.5): the model sees the last token first
            x = x.flip(1)
        yield list(zip(x.chunk(A), y.chunk(A), drop.view(world, -1)[rank].chunk(A)))


def train_main(args):
    rank, world, device, path = setup(args)
    if args.fsdp and world == 1:
        raise ValueError("--fsdp shards across ranks: launch with torchrun")
    codes, labels, meta, images = load_codes(args.codes)
    if len(images) < args.global_batch_size:
        raise ValueError(f"{len(images)} images are fewer than one global batch of {args.global_batch_size}")
    names = ("token_dropout_p", "resid_dropout_p", "ffn_dropout_p")
    dropout = {} if args.dropout is None else dict.fromkeys(names, args.dropout)
    cfg = GPTConfig.from_name(args.gpt_model, vocab_size=meta["vocab_size"], block_size=meta["num_tokens"],
                              num_classes=meta["num_classes"], class_dropout_prob=args.class_dropout,
                              reverse_order=args.reverse_order, **dropout)  # the preset sized to the codes
    B, A, per_epoch = args.global_batch_size, args.grad_accum, len(images) / args.global_batch_size  # steps per epoch
    total = max(1, round(args.epochs * per_epoch))
    warmup = round(args.warmup_epochs * per_epoch)
    decay_start = max(warmup, total - round(args.decay_epochs * per_epoch))
    end = min(total, args.max_steps or total)
    bf16 = device.type == "cuda" and args.precision == "bf16"
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = GPT(cfg).to(device)
    if args.fsdp:  # FSDP2: each block's parameters, gradients and optimizer state sharded across the ranks
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for module in [*raw.layers, raw]:
            fully_shard(module, mp_policy=mp)

    def forward(m, x, y, drop):  # (b, N), (b,), (b,)
        return run.model(x[:, :-1], y, x, drop=drop)[1][None]
    # MFU: 6 FLOPs per matmul weight per token (2 forward, 4 backward), embeddings left out, plus 12·n_layer·dim·T
    # for attention's full T×T score and value products (PaLM appendix B, as nanoGPT)
    matmul = sum(p.numel() for name, p in raw.named_parameters() if "embedding" not in name)
    flops = 6 * matmul + 12 * cfg.n_layer * cfg.dim * cfg.block_size if bf16 else None
    ema = [p.detach().clone() for p in raw.parameters()] if args.ema else None
    model = torch.compile(raw) if args.compile else raw
    run = Trainer(raw, model, forward, ["loss"], ema, args, device, "gpt", cfg, path, bf16)
    data = batches(codes, labels, images, meta, args, run.step, world, rank, device)
    if rank == 0:
        print(f"{cfg}\n{sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M parameters, {len(images)} images × "
              f"{meta['views']} views, {per_epoch:.1f} steps/epoch, steps {run.step} -> {end} of {total}, "
              f"micro-batch {B // (world * A)} × {A} accumulation × {world} ranks", flush=True)
    while run.step < end:
        torch.manual_seed(seed_of(args.seed, DROPOUT, run.step, rank))  # dropout masks; a graph replay draws them too
        run(next(data), get_lr(run.step, args.lr, warmup, decay_start, total, args.min_lr))
        if run.step % args.log_every == 0 or run.step == end:
            run.log(total, B * cfg.block_size, "tok", flops)
        run.checkpoint(end)
    run.finish()


def main(argv=None):
    args = parse_args(argv)
    exit_on_error(f"train_ar.py {args.command}", extract_main if args.command == "extract" else train_main, args)


def parse_args(argv=None):
    parser = ArgumentParser(prog="train_ar.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("extract", help="encode a dataset into codes.npy / labels.npy with a trained tokenizer")
    p.add_argument("--tokenizer-ckpt", required=True, help="tokenizer checkpoint (ours or official)")
    add_data_args(p)
    p.add_argument("--out", required=True, help="output folder for codes.npy, labels.npy, meta.json")
    p.add_argument("--views", choices=list(VIEWS), default=None,
                   help="views per image (default: ten-crop, the official augmentation; single for Fashion-MNIST)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per encoder batch and rank")
    p.add_argument("--chunk-size", type=positive_int, default=10000, help="images per resumable unit of work")
    p.add_argument("--log-every", type=positive_int, default=100, help="print progress every this many batches")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p = sub.add_parser("train", help="train the AR model on extracted codes")
    p.add_argument("--codes", required=True, help="folder written by `train_ar.py extract`")
    p.add_argument("--gpt-model", default="GPT-L", help="model preset: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-tiny, ...")
    p.add_argument("--epochs", type=positive_float, default=300, help="length of training (paper: 300)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop here; the lr still follows --epochs")
    p.add_argument("--lr", type=positive_float, default=4e-4, help="peak learning rate (paper 4e-4; official 1e-4)")
    p.add_argument("--min-lr", type=nonnegative_float, default=1e-5, help="learning rate at the end of the decay")
    p.add_argument("--decay-epochs", type=nonnegative_float, default=50, help="final epochs of decay to --min-lr")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0, help="linear warmup (the paper uses none)")
    p.add_argument("--class-dropout", type=probability, default=0.1, help="probability of the null class (for CFG)")
    p.add_argument("--dropout", type=probability, default=None, help="token/residual/FFN dropout (default: preset's)")
    p.add_argument("--reverse-order", action="store_true", help="train on reversed sequences (fine-to-coarse)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="on CUDA: bf16 autocast or TF32")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (large presets)")
    add_common_args(p, out_dir="out/ar", weight_decay=0.05, ema_decay=0.9999)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
