"""Speed of D-AR sampling on one GPU, random weights at full size: AR tokens, pixel decoder, end to end, latency.

    python bench.py --compile                       # D-AR-L and D-AR-XL (GPT-L / GPT-XL + tokenizer_v1), bf16
    python bench.py --models GPT-L --profile prof.txt

Each figure is printed next to its hardware bound and the fraction bound / measured (1.0 = at the bound). The AR
step is bounded by memory traffic: the bf16 weights plus the KV-cache window it attends over, per token, over
--hbm-tbps. The pixel decoder is bounded by its FLOPs (counted with FlopCounterMode) over --peak-tflops. End to
end, AR and decoder overlap, so its bound is the larger of the two. Warm-up is excluded; medians of --repeats.
First it checks that the CUDA-graph sampler reproduces the eager tokens and how far a bf16 decode is from fp32.
"""
import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig, generate
from sample import GraphedDecoder, StreamingDecoder, parse_args as sample_args, sample_batch
from tokenizer import Tokenizer, TokenizerConfig


BACKENDS = dict(auto=None, cudnn=SDPBackend.CUDNN_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                math=SDPBackend.MATH)


def randomise(module):
    """Small random values everywhere: the official init has zero gates and heads, and zeros time unrealistically."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.02 * torch.randn_like(p))
    return module.eval()


def median_ms(fn, repeats):
    """(median time of fn() in ms on the GPU (CUDA events), time of the warm-up call in ms: compilation included)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), first


def ar_bytes_per_token(gpt, rows, windows):
    """Bytes one token reads, averaged over the sequence: weights (not the embedding tables: one row each) plus
    the KV-cache window of every layer at each position (prefill attends over the whole cache)."""
    cfg = gpt.config
    size = gpt.tok_embeddings.weight.element_size()
    weights = sum(p.numel() for n, p in gpt.named_parameters() if "embed" not in n) * size
    per_slot = cfg.n_layer * 2 * rows * cfg.n_kv_head * cfg.head_dim * size  # k and v of one cache slot
    seq = gpt.layers[0].attention.kv_cache.k_cache.shape[2]
    slots = [seq] + [next(w for w in windows if w > p) for p in range(1, cfg.block_size)]
    return weights + per_slot * sum(slots) / len(slots)


class TimedStream(StreamingDecoder):
    """Records a CUDA event on the decoder stream after every solver step (when each preview is ready)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def __call__(self, i, tokens):
        done = self.steps_done
        super().__call__(i, tokens)
        if self.steps_done > done:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record(self.stream)


class Row:
    """Prints one markdown table row per figure, and appends it to `out` if given."""

    def __init__(self, out):
        self.out = out
        self.emit("| measure | measured | bound | fraction |\n|---|---|---|---|")

    def emit(self, line):
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")

    def __call__(self, what, value, unit, bound=None, better="lower"):
        frac = "" if bound is None else f"{(bound / value if better == 'lower' else value / bound):.2f}"
        self.emit(f"| {what} | {value:.4g} {unit} | {'' if bound is None else f'{bound:.4g} {unit}'} | {frac} |")


@torch.no_grad()
def checks(gpt, tok, device, row):
    """The CUDA-graph sampler against the same step run eagerly; bf16 against fp32 decoding of the same tokens."""
    labels = torch.arange(4, device=device)
    results = []
    for graphs in (False, True):
        g = torch.Generator(device)
        step = GraphedDecoder(gpt, 4, True, 1.0, 0, 1.0, g, graphs=graphs)
        g.manual_seed(0)
        results.append(generate(gpt, labels, cfg_scale=4.0, generator=g, decode_fn=step))
        del step
    row("check: graph tokens == eager tokens (fraction equal)", (results[0] == results[1]).float().mean().item(), "")
    codes = torch.randint(tok.config.vq_codebook_size, (8, tok.config.num_tokens), device=device)
    noise = torch.randn(8, 3, tok.config.image_size, tok.config.image_size, device=device)
    fp32 = tok.decode(codes, noise=noise)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = tok.decode(codes, noise=noise)
    diff = (bf16.float() - fp32).abs()
    row("check: bf16 vs fp32 decode, max abs diff ([-1,1] units)", diff.max().item(), "")
    row("check: bf16 vs fp32 decode, mean abs diff", diff.mean().item(), "")
    row("check: fp32 decode std (scale of the values)", fp32.std().item(), "")


def main(args):
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    bw, peak = args.hbm_tbps * 1e12, args.peak_tflops * 1e12
    row = Row(args.out)
    x = torch.empty(2 ** 28, device=device)  # 1 GiB copied: the achievable bandwidth, read + write
    row("device-to-device copy bandwidth", 2 * x.nbytes / median_ms(lambda: x.clone(), 5)[0] / 1e9, "TB/s",
        args.hbm_tbps, better="higher")
    del x
    with torch.device(device):
        tok = randomise(Tokenizer(TokenizerConfig.from_name("tokenizer_v1")))
    cfg = tok.config
    codes = torch.randint(cfg.vq_codebook_size, (args.batch_size, cfg.num_tokens), device=device)
    noise = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        tok.decode(codes[:1], noise=noise[:1])
    flops = fc.get_total_flops()  # per image: condition transformer + 8 network evaluations
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.device(device):
        gpts = {name: randomise(GPT(GPTConfig.from_name(name))).to(torch.bfloat16) for name in args.models}
    if args.checks:
        checks(gpts[args.models[0]], tok, device, row)
    if args.compile:  # regional: each distinct block is compiled once and shared by its layers
        torch._dynamo.config.recompile_limit = 64  # two model sizes and several batch sizes share the code
        for gpt in gpts.values():
            for layer in gpt.layers:
                layer.compile()
        for block in tok.diff_decoder.net.blocks:
            block.compile()

    with torch.no_grad():
        for name, ctx in (("fp32", nullcontext), ("bf16", bf16)):
            def decode():
                with ctx():
                    tok.decode(codes, noise=noise)
            ms, first = median_ms(decode, args.repeats)
            row(f"pixel decoder {name}, batch {args.batch_size} (img/s; {flops / 1e12:.2f} TFLOP/img)",
                args.batch_size / ms * 1e3, "img/s", peak / flops, better="higher")
            row(f"pixel decoder {name}, first call (compilation included)", first / 1e3, "s")
    if args.profile:
        profile_decoder(tok, codes, noise, bf16, args.profile)

    # AR model, end to end, latency
    for name, gpt in gpts.items():
        for batch in (1, args.batch_size):
            g = torch.Generator(device).manual_seed(0)
            labels = torch.arange(batch, device=device) % gpt.config.num_classes
            N = gpt.config.block_size
            start = time.perf_counter()
            step = GraphedDecoder(gpt, batch, True, 1.0, 0, 1.0, g, attention=BACKENDS[args.attention])
            row(f"{name} AR start-up, batch {batch} (compilation + {len(step.windows)} graph captures)",
                time.perf_counter() - start, "s")
            ms = median_ms(lambda: generate(gpt, labels, cfg_scale=4.0, generator=g, decode_fn=step), args.repeats)[0]
            bound = ar_bytes_per_token(gpt, 2 * batch, step.windows) / bw * 1e3
            row(f"{name} AR, batch {batch} with CFG", ms / N, "ms/token", bound)
            if batch == 1:
                first, final = [], []

                def one():
                    start = torch.cuda.Event(enable_timing=True)
                    start.record()
                    stream = TimedStream(tok, torch.randn(1, 3, cfg.image_size, cfg.image_size, device=device,
                                                          generator=g), "adams2", bf16)
                    generate(gpt, labels, cfg_scale=4.0, generator=g, decode_fn=step, on_token=stream)
                    stream.finish()
                    torch.cuda.synchronize()
                    first.append(start.elapsed_time(stream.events[0]))
                    final.append(start.elapsed_time(stream.events[-1]))
                with torch.no_grad():
                    for _ in range(args.repeats + 1):
                        one()
                step_bound = flops / cfg.num_denoising_steps / peak * 1e3  # one solver step of one image
                row(f"{name} batch-1 latency to the first preview", statistics.median(first[1:]), "ms",
                    bound * cfg.group_size + step_bound)
                row(f"{name} batch-1 latency to the image", statistics.median(final[1:]), "ms", bound * N + step_bound)
            else:
                with torch.no_grad():
                    ms = median_ms(lambda: sample_batch(gpt, tok, labels, sample_args([]), g, step,
                                                        keep_previews=False, autocast=bf16), args.repeats)[0]
                row(f"{name} end to end, batch {batch} (bf16 decoder, streamed)", batch / ms * 1e3, "img/s",
                    min(1 / (bound * N / 1e3 / batch), peak / flops), better="higher")
            if args.profile:
                profile_ar(gpt, labels, g, args.profile, name)
            del step


def profile_ar(gpt, labels, g, path, name):
    """Top kernels of 16 AR steps, run eagerly: the kernels the graphs replay.
    The eager decoder sets up fresh caches, so earlier CUDA graphs of `gpt` are stale afterwards."""
    eager = GraphedDecoder(gpt, labels.shape[0], True, 1.0, 0, 1.0, g, graphs=False)
    eager.pos = 128  # mid-sequence: a typical cache window
    scale = torch.tensor(4.0, device=labels.device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(129, 145):
            eager(gpt, labels, torch.tensor([i], device=labels.device), scale, 1.0, 0, 1.0, g)
        torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"## {name}: 16 AR decode steps at batch {labels.shape[0]} with CFG (positions 129-144)\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20) + "\n")


def profile_decoder(tok, codes, noise, bf16, path):
    """Top kernels of one evaluation of the pixel network."""
    t = torch.full((codes.shape[0],), 0.5, device=codes.device)
    with torch.no_grad(), bf16():
        cond = tok.condition(codes)[:, :tok.config.queries_per_step]
        tok.diff_decoder.net(noise, t, cond)  # compiles for these shapes outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tok.diff_decoder.net(noise, t, cond)
            torch.cuda.synchronize()
    with open(path, "a") as f:
        f.write(f"## pixel-decoder network, one step at batch {codes.shape[0]}, bf16\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["GPT-L", "GPT-XL"], help="GPT presets to time")
    p.add_argument("--batch-size", type=int, default=64, help="the large batch (AR, decoder, end to end)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (as sample.py)")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="graph vs eager tokens, bf16 vs fp32 decode")
    p.add_argument("--attention", choices=sorted(BACKENDS), default="auto",
                   help="SDPA backend of the AR decode step (with --compile fixed at the first trace)")
    p.add_argument("--profile", default=None, help="append torch.profiler tables to this file")
    p.add_argument("--hbm-tbps", type=float, default=3.35, help="memory bandwidth for the bounds (H100 SXM: 3.35)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the bounds (H100 SXM: 989)")
    p.add_argument("--out", default=None, help="also append the table rows to this file")
    main(p.parse_args())
