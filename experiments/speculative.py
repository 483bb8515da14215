"""Speculative Jacobi decoding (sample.py --speculative W) on the shipped Fashion-MNIST model: how many tokens one
forward yields, and what that does to the time a single image takes.

    python experiments/speculative.py                                   # CPU: latency only (a few minutes)
    python experiments/speculative.py --device cuda --tokens-per-forward --out speculative_cuda.md

Tokens per forward: at temperature 1 for each guidance scale and window, averaged over --samples samples (one class
after another), and at guidance 4 for larger batches (a batch advances by its slowest row). Latency: batch 1 at
sample.py's default guidance (4.0), sample.py's loop from the class label to the image (pixel decoder included),
the median of --samples runs after one warm-up. Sample quality is measured with sample.py --npz and evaluate.py
fmnist (docs/results.md gives the commands).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sample  # noqa: E402
from data import CHECKPOINTS, ArgumentParser, positive_int, setup_device  # noqa: E402


def forwards(step, labels, N):
    """AR forwards one batch takes (the class token's prefill counted)."""
    tokens = torch.zeros(len(labels), N, dtype=torch.long, device=labels.device)
    i, count = step.start(labels, tokens, 0), 1
    while i < N:
        i, count = step.advance(tokens, i), count + 1
    return count


def tokens_per_forward(gpt, cfg_scales, windows, samples, device, emit):
    N = gpt.config.block_size

    def per_forward(batches, window, cfg):  # one step draws the batches one after another
        generator = torch.Generator(device).manual_seed(0)
        step = sample.SpeculativeStep(gpt, len(batches[0]), window, cfg, generator=generator)
        return f"{len(batches) * N / sum(forwards(step, labels, N) for labels in batches):.2f}"
    emit("| guidance | " + " | ".join(f"window {w}" for w in windows) + " |\n|---|" + "---|" * len(windows))
    one_by_one = [torch.tensor([s % 10], device=device) for s in range(samples)]
    for cfg in cfg_scales:
        emit(f"| {cfg} | " + " | ".join(per_forward(one_by_one, w, cfg) for w in windows) + " |")
    emit("\n| batch (guidance 4, window 16) | tokens per forward |\n|---|---|")
    for batch in (1, 8, 64):
        batches = [torch.arange(batch, device=device) % 10] * max(1, samples // batch)
        emit(f"| {batch} | {per_forward(batches, 16, 4.0)} |")


def median_ms(fn, samples, device):
    times = []
    for s in range(samples + 1):
        start = time.perf_counter()
        fn(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def latency(gpt, tok, windows, samples, device, emit):
    emit("| batch 1, guidance 4 | ms to the last token | ms to the image | speed-up (image) |\n|---|---|---|---|")
    label = lambda s: torch.tensor([s % 10], device=device)  # noqa: E731
    base = None
    for w in (0, *windows):
        step = sample.decode_step(gpt, 1, 4.0, w, generator=torch.Generator(device).manual_seed(0))
        ar = median_ms(lambda s: forwards(step, label(s), gpt.config.block_size), samples, device)
        ms = median_ms(lambda s: sample.sample_batch(gpt, tok, label(s), step, keep_previews=False), samples, device)
        base = base or ms
        name = "sequential" if w == 0 else f"speculative, window {w}"
        emit(f"| {name} | {ar:.1f} | {ms:.1f} | {base / ms:.2f}× |")


def main(args):
    device = setup_device(args.device)[2]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as sample.py --precision auto
    tok, gpt = sample.load_models(args.tokenizer_ckpt, args.gpt_ckpt, None, dtype, device)
    lines = []

    def emit(line):
        print(line, flush=True)
        lines.append(line)
    with torch.no_grad():
        if args.tokens_per_forward:
            tokens_per_forward(gpt, args.cfg_scales, args.windows, args.samples, device, emit)
        latency(gpt, tok, args.latency_windows, args.samples, device, emit)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    p = ArgumentParser(prog="speculative.py", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-ckpt", default=str(CHECKPOINTS / "tokenizer_fmnist.pt"))
    p.add_argument("--gpt-ckpt", default=str(CHECKPOINTS / "gpt_fmnist.pt"))
    p.add_argument("--samples", type=positive_int, default=20, help="samples per figure")
    p.add_argument("--tokens-per-forward", action="store_true", help="also the tokens-per-forward tables")
    p.add_argument("--cfg-scales", nargs="+", default=["1.0", "3.0", "4.0", "1,4"])
    p.add_argument("--windows", type=positive_int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--latency-windows", type=positive_int, nargs="+", default=[8, 16, 32])
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
