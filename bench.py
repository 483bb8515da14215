"""Speed of D-AR sampling on one GPU, random weights at full size: AR tokens, pixel decoder, end to end, latency.

    python bench.py --compile                       # D-AR-L and D-AR-XL (GPT-L / GPT-XL + tokenizer_v1), bf16
    python bench.py --models GPT-L --profile prof.txt
    python bench.py --compile --models GPT-L --ar-only        # AR rows only
    python bench.py --kernels                       # micro-benchmarks of kernels.py against the PyTorch paths

Each figure is printed next to its hardware bound and the fraction bound / measured (1.0 = at the bound). The AR
step is bounded by memory traffic: the bf16 weights plus the filled KV-cache slots it attends over, per token,
over --hbm-tbps. The pixel decoder is bounded by its FLOPs (counted with FlopCounterMode) over --peak-tflops. End to
end, AR and decoder overlap, so its bound is the larger of the two. Warm-up is excluded; medians of --repeats.
First it checks that the CUDA-graph sampler reproduces the eager tokens and how far a bf16 decode is from fp32.
fp32 means fp32 here too (TF32 off). The AR model runs as sample.py runs it on CUDA: the decode-attention kernel
in one CUDA graph, w1/w3 fused (kernels.py); the bf16 pixel decoder holds bf16 weights (sample.load_models).
"""
import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from data import ArgumentParser, atomic_save, check_writable, positive_float, positive_int
from kernels import _decode_attention, cuda_graph, decode_attention, fuse_feed_forward, silu_mul
from model import GPT, GPTConfig
from sample import DecodeStep, SpeculativeStep, sample_batch, stream
from tokenizer import Tokenizer, TokenizerConfig, precision

PROG = "bench.py"
CFG = 4.0  # guided: the batch is doubled (the paper samples without temperature, top-k or top-p)


@register_flop_formula(torch.ops.dar.attention)
def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    """kernels.attention's operator, counted as FlopCounterMode counts SDPA: QKᵀ and PV."""
    B, H, Lq, hd = q_shape
    return 4 * B * H * Lq * k_shape[2] * hd


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


def ar_bytes_per_token(gpt, rows):
    """Bytes one token reads, averaged over the sequence: weights (not the embedding tables: one row each) plus
    the filled KV-cache slots of every layer at each position (position p attends over p + 1 slots, the class
    token's prefill over 1)."""
    cfg = gpt.config
    size = gpt.tok_embeddings.weight.element_size()
    weights = sum(p.numel() for n, p in gpt.named_parameters() if "embed" not in n) * size
    per_slot = cfg.n_layer * 2 * rows * cfg.n_kv_head * cfg.head_dim * size  # k and v of one cache slot
    return weights + per_slot * (cfg.block_size + 1) / 2  # mean of 1..N slots


def ar_tokens(step, labels, N):
    """The AR half of sample.stream: the step's start, then advance to the last token (no pixel decoder)."""
    tokens = torch.empty(len(labels), N, dtype=torch.long, device=labels.device)
    i = step.start(labels, tokens, 0)
    while i < N:
        i = step.advance(tokens, i)
    return tokens


def append(path, text):
    """Appends to a text file by writing old content + text to a temporary file and renaming it (atomic)."""
    old = Path(path).read_bytes() if Path(path).exists() else b""
    atomic_save(path, lambda f: f.write(old + text.encode()))


class Row:
    """Prints one markdown table row per figure, and appends it to `out` if given."""

    def __init__(self, out):
        self.out = out
        self.emit("| measure | measured | bound | fraction |\n|---|---|---|---|")

    def emit(self, line):
        print(line, flush=True)
        if self.out:
            append(self.out, line + "\n")

    def __call__(self, what, value, unit, bound=None, better="lower"):
        frac = "" if bound is None else f"{(bound / value if better == 'lower' else value / bound):.2f}"
        self.emit(f"| {what} | {value:.4g} {unit} | {'' if bound is None else f'{bound:.4g} {unit}'} | {frac} |")


@torch.no_grad()
def checks(gpt, tok, tok_bf16, device, row):
    """The CUDA-graph sampler against the same step run eagerly; the decoder precisions on the same tokens."""
    labels = torch.arange(4, device=device)
    results = []
    for graph in (False, True):
        step = DecodeStep(gpt, 4, CFG, generator=torch.Generator(device).manual_seed(0), graph=graph)
        results.append(sample_batch(gpt, tok, labels, step, keep_previews=False)[0])
        del step
    row("check: graph tokens == eager tokens (fraction equal)", (results[0] == results[1]).float().mean().item(), "")
    codes = torch.randint(tok.config.vq_codebook_size, (8, tok.config.num_all_queries), device=device)
    noise = torch.randn(8, 3, tok.config.sampling_resolution, tok.config.sampling_resolution, device=device)
    out = {}
    for name, t in (("fp32", tok), ("tf32", tok), ("bf16 autocast", tok), ("bf16", tok_bf16)):
        with precision(name.split()[0], "cuda"):
            out[name] = t.decode(codes, noise=noise).float()
    for a, b in (("tf32", "fp32"), ("bf16", "tf32"), ("bf16 autocast", "tf32")):
        diff = (out[a] - out[b]).abs()
        row(f"check: {a} vs {b} decode of the same tokens, max / mean abs diff ([-1,1] units)",
            diff.max().item(), f"/ {diff.mean().item():.2e}")
    row("check: fp32 decode std (scale of the values)", out["fp32"].std().item(), "")


@torch.no_grad()
def bench_decoder(decoders, codes, noise, flops, batches, repeats, peak, row):
    """Offline decoding (condition transformer + 8 solver steps) by each (name, tokenizer, precision) at each batch."""
    for name, tok, mode in decoders:
        for b in batches:
            def decode():
                with precision(mode, "cuda"):
                    tok.decode(codes[:b], noise=noise[:b])
            ms, first = median_ms(decode, repeats)
            row(f"pixel decoder {name}, batch {b} (img/s; {flops / 1e12:.2f} TFLOP/img)", b / ms * 1e3, "img/s",
                peak / flops, better="higher")
            if b == batches[0]:
                row(f"pixel decoder {name}, first call (compilation included)", first / 1e3, "s")


@torch.no_grad()
def latency_ms(gpt, tok, step, mode, repeats):
    """Batch 1, streamed with CFG: medians of the time to the first preview and to the image (first run: warm-up)."""
    labels = torch.zeros(1, dtype=torch.long, device=step.device)
    R = tok.config.sampling_resolution
    first, final = [], []
    for _ in range(repeats + 1):
        noise = torch.randn(1, 3, R, R, generator=step.settings["generator"], device=step.device)
        start, marks = torch.cuda.Event(enable_timing=True), []
        start.record()
        for kind, _, _ in stream(gpt, tok, labels, noise, step, decoder_precision=mode):
            if kind == "preview":  # recorded on the decoder's stream, right after the solver step
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
        torch.cuda.synchronize()
        first.append(start.elapsed_time(marks[0]))
        final.append(start.elapsed_time(marks[-1]))
    return statistics.median(first[1:]), statistics.median(final[1:])


@torch.no_grad()
def bench_model(name, gpt, decoders, *, batches, windows, repeats, flops, bw, peak, row, profile_path, ar_only=False):
    """AR start-up and ms/token at batch 1 and each of `batches`; at batch 1 and the first of `batches`, one
    speculative forward per window size; batch-1 latencies; end to end at each batch, for each decoder precision in
    `decoders` ({"tf32": tokenizer, "bf16": tokenizer with bf16 pixel weights}). ar_only: no latencies and no end to
    end (no pixel decoder)."""
    device, N = gpt.tok_embeddings.weight.device, gpt.config.block_size
    for b in (1, *batches):
        g = torch.Generator(device).manual_seed(0)
        labels = torch.arange(b, device=device) % gpt.config.num_classes
        start = time.perf_counter()
        step = DecodeStep(gpt, b, CFG, generator=g)
        row(f"{name} AR start-up, batch {b} (compilation + graph capture)", time.perf_counter() - start, "s")
        ms = median_ms(lambda: ar_tokens(step, labels, N), repeats)[0]
        bound = ar_bytes_per_token(gpt, 2 * b) / bw * 1e3
        row(f"{name} AR, batch {b} with CFG", ms / N, "ms/token", bound)
        for w in windows if b in (1, batches[0]) else ():
            spec = SpeculativeStep(gpt, b, w, CFG, generator=g)

            def window():  # mid-sequence: the window attends over the whole cache, masked, wherever it is
                spec.pos.fill_(N // 2)
                spec.graph.replay()
            window_ms = median_ms(window, repeats)[0]
            row(f"{name} speculative window {w}, batch {b} with CFG: one forward", window_ms,
                f"ms ({window_ms / (ms / N):.2f} sequential steps)")
            del spec
        for mode, tok in ({} if ar_only else decoders).items():
            if b == 1:
                first, final = latency_ms(gpt, tok, step, mode, repeats)
                step_bound = flops / tok.config.num_denoising_steps / peak * 1e3  # one solver step of one image
                row(f"{name} batch-1 latency to the first preview ({mode} decoder)", first, "ms",
                    bound * tok.config.queries_per_step + step_bound)
                row(f"{name} batch-1 latency to the image ({mode} decoder)", final, "ms", bound * N + step_bound)
                continue
            torch.cuda.reset_peak_memory_stats()
            ms = median_ms(lambda: sample_batch(gpt, tok, labels, step, keep_previews=False, decoder_precision=mode),
                           repeats)[0]
            row(f"{name} end to end, batch {b} ({mode} decoder, streamed)", b / ms * 1e3, "img/s",
                min(1 / (bound * N / 1e3 / b), peak / flops), better="higher")
            row(f"{name} end to end, batch {b} ({mode} decoder): peak GPU memory",
                torch.cuda.max_memory_allocated() / 2 ** 30, "GiB")
        if profile_path and b in (1, batches[0]):
            profile_ar(step, b, profile_path, name)
        del step


def profile_ar(step, batch, path, name):
    """Top kernels of 16 AR steps, run eagerly: the kernels the graph replays."""
    token = torch.zeros(batch, dtype=torch.long, device=step.device)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for p in range(129, 145):  # mid-sequence
            step.input_pos.fill_(p)
            step.token.copy_(token)
            step.step()
        torch.cuda.synchronize()
    append(path, f"## {name}: 16 AR decode steps at batch {batch} with CFG (positions 129-144)\n"
                 + prof.key_averages().table(sort_by="cuda_time_total", row_limit=20) + "\n")


def profile_decoder(name, tok, mode, codes, noise, path):
    """Top kernels of one evaluation of the pixel network."""
    t = torch.full((codes.shape[0],), 0.5, device=codes.device)
    with torch.no_grad(), precision(mode, "cuda"):
        cond = tok.condition(codes)[:, :tok.config.queries_per_step]
        tok.diff_decoder.net(noise, t, cond)  # compiles for these shapes outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            tok.diff_decoder.net(noise, t, cond)
            torch.cuda.synchronize()
    append(path, f"## pixel-decoder network, one step at batch {codes.shape[0]}, {name}\n"
                 + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25) + "\n")


def graph_us(fn, calls):
    """Median µs per call of fn(0..calls-1), replayed from one CUDA graph (warm-up and compilation excluded)."""
    graph, _ = cuda_graph(lambda: [fn(i) for i in range(calls)], warmup=1)
    return median_ms(graph.replay, 20)[0] * 1e3 / calls


@torch.no_grad()
def bench_kernels(layers=24, H=16, hd=64, S=264, dim=1024, hidden=2816):
    """GPT-L sizes; each call reads another layer's cache or weights, so L2 holds none of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print("| what | variant | median time | bandwidth |\n|---|---|---|---|")
    for rows in (128, 2):
        kv = [torch.randn(2, rows, H, S, hd, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
        qs = [torch.randn(rows, 1, H, hd, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(layers)]
        for n in (40, 144, 257):
            kv_len, w = torch.tensor([n], device="cuda"), min(S, -(-n // 32) * 32)  # SDPA over a 32-slot window
            mask = torch.arange(w, device="cuda")[None, None, None] < n  # (1, 1, 1, w)
            gb = (2 * rows * H * n * hd + 2 * rows * H * hd) * 2 / 1e9  # K and V of the filled slots, q and out

            def sdpa(i):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qs[i], kv[i][0][:, :, :w], kv[i][1][:, :, :w], attn_mask=mask)
            variants = {"triton (auto config)": lambda i: decode_attention(qs[i], kv[i][0], kv[i][1], kv_len),
                        f"sdpa cudnn (window {w})": sdpa}
            for c in [(32, 2), (64, 4), (128, 8)]:  # slots per step, warps
                variants["triton N{} w{}".format(*c)] = lambda i, c=c: _decode_attention(qs[i], *kv[i], kv_len, *c)
            for label, fn in variants.items():
                us = graph_us(fn, layers)
                print(f"| attention rows {rows} len {n} | {label} | {us:.1f} µs | {gb / us * 1e3:.2f} TB/s |")
        x = torch.randn(rows, dim, dtype=torch.bfloat16, device="cuda")
        w13 = [torch.randn(2 * hidden, dim, dtype=torch.bfloat16, device="cuda") / 32 for _ in range(layers)]
        for label, fn in {"w1, w3: two GEMMs, torch silu*mul":
                          lambda i: F.silu(F.linear(x, w13[i][:hidden])) * F.linear(x, w13[i][hidden:]),
                          "w13: one GEMM, triton silu_mul": lambda i: silu_mul(F.linear(x, w13[i]))}.items():
            print(f"| swiglu rows {rows} | {label} | {graph_us(fn, layers):.1f} µs | |")


def main(args):
    if not torch.cuda.is_available():
        raise SystemExit(f"{PROG}: error: no CUDA GPU is available (bench.py times GPU kernels)")
    device = torch.device("cuda")
    torch.manual_seed(0)
    if args.kernels:
        return bench_kernels()
    bw, peak = args.hbm_tbps * 1e12, args.peak_tflops * 1e12
    row = Row(args.out)
    x = torch.empty(2 ** 28, device=device)  # 1 GiB copied: the achievable bandwidth, read + write
    row("device-to-device copy bandwidth", 2 * x.nbytes / median_ms(lambda: x.clone(), 5)[0] / 1e9, "TB/s",
        args.hbm_tbps, better="higher")
    del x
    with torch.device(device):
        tok = randomise(Tokenizer(TokenizerConfig.from_name("tokenizer_v1")))
        gpts = {name: fuse_feed_forward(randomise(GPT(GPTConfig.from_name(name))).to(torch.bfloat16))
                for name in args.models}
    tok_bf16 = copy.deepcopy(tok)
    tok_bf16.diff_decoder.to(torch.bfloat16)  # as sample.load_models does for --decoder-precision bf16
    cfg = tok.config
    B = max(args.batch_sizes)
    codes = torch.randint(cfg.vq_codebook_size, (B, cfg.num_all_queries), device=device)
    noise = torch.randn(B, 3, cfg.sampling_resolution, cfg.sampling_resolution, device=device)
    with FlopCounterMode(display=False) as fc:
        tok.decode(codes[:1], noise=noise[:1])
    flops = fc.get_total_flops()  # per image: condition transformer + 8 network evaluations
    if args.checks:
        checks(gpts[args.models[0]], tok, tok_bf16, device, row)
    if args.compile:  # regional: each distinct block is compiled once and shared by its layers
        torch._dynamo.config.recompile_limit = 64  # two model sizes and several batch sizes share the code
        for module in [*gpts.values(), tok.diff_decoder.net, tok_bf16.diff_decoder.net]:
            for block in (module.layers if isinstance(module, GPT) else module.blocks):
                block.compile()
    # the default path first: fp32 weights with TF32 matmuls (sample.py --decoder-precision tf32)
    decoders = [("tf32", tok, "tf32"), ("fp32 (TF32 off)", tok, "fp32"), ("bf16 autocast", tok, "bf16"),
                ("bf16 weights", tok_bf16, "bf16")]
    if not args.ar_only:
        bench_decoder(decoders, codes, noise, flops, args.batch_sizes, args.repeats, peak, row)
    if args.profile and not args.ar_only:
        for name, t, mode in decoders:
            profile_decoder(name, t, mode, codes[:args.batch_sizes[0]], noise[:args.batch_sizes[0]], args.profile)
    for name, gpt in gpts.items():
        bench_model(name, gpt, {"tf32": tok, "bf16": tok_bf16}, batches=args.batch_sizes, windows=args.windows,
                    repeats=args.repeats, flops=flops, bw=bw, peak=peak, row=row, profile_path=args.profile,
                    ar_only=args.ar_only)


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["GPT-L", "GPT-XL"], help="GPT presets to time")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[64, 256],
                   help="large batches for AR and end to end (the first also times the pixel decoder alone)")
    p.add_argument("--windows", type=positive_int, nargs="*", default=[8, 16, 32],
                   help="speculative window sizes whose forward is timed (none: skip)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per figure (median)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (as sample.py)")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=True,
                   help="graph vs eager tokens, bf16 vs fp32 decode")
    p.add_argument("--kernels", action="store_true", help="only the micro-benchmarks of kernels.py: decode "
                   "attention against cuDNN SDPA, the fused SwiGLU against two GEMMs")
    p.add_argument("--ar-only", action="store_true", help="time the AR model only: no pixel decoder, latency or "
                   "end-to-end rows (a quick run)")
    p.add_argument("--profile", default=None, help="append torch.profiler tables to this file")
    p.add_argument("--hbm-tbps", type=positive_float, default=3.35,
                   help="memory bandwidth for the bounds in TB/s (H100 SXM: 3.35)")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0,
                   help="dense bf16 peak for the bounds in TFLOP/s (H100 SXM: 989)")
    p.add_argument("--out", default=None, help="also append the table rows to this file")
    args = p.parse_args(argv)
    for name in args.models:
        try:
            GPTConfig.from_name(name)
        except ValueError as e:
            p.error(f"--models {e}")
    for flag, path in (("--out", args.out), ("--profile", args.profile)):
        try:
            if path:
                check_writable(path)
        except ValueError as e:
            p.error(f"{flag} {e}")
    return args


if __name__ == "__main__":
    main(parse_args())
