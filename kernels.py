"""Exact fast paths of the sampler on CUDA, written in Triton, each next to the plain PyTorch code it replaces.

- `decode_attention`: one query per row against the first `kv_len` slots of a static KV cache. `kv_len` may be
  a device tensor, so one CUDA graph serves every position, and no slot past the filled ones is read (SDPA over
  a window rounded up to a multiple of 32 slots reads up to 31 empty ones and a mask per step).
- `fuse_feed_forward`: w1 and w3 of every SwiGLU become views of one weight, so one GEMM computes both, and
  `silu_mul` forms silu(a)·b in one pass. State-dict keys and values stay the official ones.

The fallbacks (`decode_attention_reference`, the PyTorch branch of `silu_mul`) define the functions: the
kernels compute the same thing with fp32 softmax/accumulation and differ by bf16 rounding only.

One fast path is not exact, and only taken on request (sample.py --fp8): `decode_attention_fp8` reads a KV cache
stored as float8 e4m3 with one scale per (row, head, slot), dequantised in registers, which halves the cache
traffic that bounds large-batch decoding. Slot 0, the class token (the condition), comes from an exact copy.
Its definition is `decode_attention_fp8_reference`: dequantise (`dequantise_window`), then SDPA.

Measured on one H200 (`python kernels.py`, medians of CUDA-graph replays): decode attention at 128 rows × 16
heads × d64 takes 11 / 24 / 39 µs at 40 / 144 / 257 filled slots, against 33 / 46 / 58 µs for cuDNN SDPA over the
32-slot window; w1/w3 in one GEMM with silu_mul take 8.2 µs per GPT-L layer at 128 rows, against 14.4.

    python kernels.py        # micro-benchmarks on a CUDA GPU: attention, SwiGLU, one GPT-L decode step
"""
import types

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch paths below still work
    triton = None


def _use_triton(t):
    return triton is not None and t.is_cuda


# ---------------------------------------------------------------------------------------------------------------
# decode attention

def decode_attention_reference(q, k_cache, v_cache, kv_len):
    """q (B, H, 1, hd), caches (B, Hkv, S, hd), kv_len int or 1-element tensor → (B, H, 1, hd) via SDPA."""
    n = int(kv_len)  # a device tensor costs a host synchronisation here: this is the slow path
    k, v = k_cache[:, :, :n], v_cache[:, :, :n]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped-query attention: each cached head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v)


def decode_attention(q, k_cache, v_cache, kv_len):
    """Attention of one new query per row over the first kv_len cache slots (1 ≤ kv_len ≤ S), scale 1/√hd.

    q (B, H, 1, hd); k_cache, v_cache (B, Hkv, S, hd) with H a multiple of Hkv; kv_len a host int or an
    int32/int64 device tensor of one element (read on the device: graph-capturable, no synchronisation).
    Returns (B, H, 1, hd) in q's dtype; on CUDA it is a transposed view of a (B, 1, H, hd) tensor, so the
    caller's `y.transpose(1, 2).reshape(B, 1, H * hd)` costs no copy."""
    B, H, _, hd = q.shape
    if (q.shape[2] != 1 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != hd
            or H % k_cache.shape[1]):
        raise ValueError(f"decode_attention: q {tuple(q.shape)} / cache {tuple(k_cache.shape)} do not fit")
    if not _use_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, kv_len)
    if not torch.is_tensor(kv_len):
        kv_len = torch.full((1,), kv_len, dtype=torch.int32, device=q.device)
    return _decode_attention_op(q, k_cache, v_cache, kv_len).transpose(1, 2)


def _launch_config(q):
    """Measured on an H200 (`python kernels.py`): many (row, head) programs run best small, 32 slots a step with
    2 warps; a few (batch 1) best wide. Splitting the length over several programs was slower at 257 slots."""
    B, H = q.shape[:2]
    return (32, 2) if B * H >= torch.cuda.get_device_properties(q.device).multi_processor_count else (128, 8)


@torch.library.custom_op("dar::decode_attention", mutates_args=(), device_types="cuda")
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_len: torch.Tensor) -> torch.Tensor:
    """The Triton launch as one opaque operator (B, 1, H, hd), so torch.compile keeps it whole."""
    return _decode_attention(q, k_cache, v_cache, kv_len, *_launch_config(q))


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, kv_len):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


def _decode_attention(q, k_cache, v_cache, kv_len, block_n, num_warps, fp8=None):
    """Launches the kernel with an explicit configuration → (B, 1, H, hd). fp8: None, or (k_scale, v_scale,
    k_first, v_first) of an e4m3 cache (see decode_attention_fp8)."""
    B, H, _, hd = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=q.device)
    k_scale, v_scale, k_first, v_first = fp8 or (q, q, q, q)  # unread without fp8: any pointer will do
    if fp8 is not None and (k_scale.stride() != v_scale.stride() or k_first.stride() != v_first.stride()
                            or k_first.stride(-1) != 1 or k_scale.stride(-1) != 1):
        raise ValueError("decode_attention_fp8: the K and V scales / first slots must share one contiguous layout")
    _decode_attention_kernel[(B * H,)](
        q, k_cache, v_cache, kv_len.reshape(-1), out, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], out.stride(0), out.stride(2), H, k_cache.shape[2], H // k_cache.shape[1],
        hd ** -0.5 * 1.4426950408889634, k_scale, v_scale, k_scale.stride(0), k_scale.stride(1), k_first, v_first,
        k_first.stride(0), k_first.stride(1), HD=hd, BLOCK_D=triton.next_power_of_2(hd), BLOCK_N=block_n,
        FP8=fp8 is not None, num_warps=num_warps)
    return out


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, sq_b, sq_h, sk_b, sk_h, sk_s,
                                 sv_b, sv_h, sv_s, so_b, so_h, H, S, rep, qk_scale,
                                 ks_ptr, vs_ptr, ss_b, ss_h, k0_ptr, v0_ptr, s0_b, s0_h,
                                 HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """Program row·H + head: online softmax (base 2, fp32) over the first kv_len slots, BLOCK_N at a time.

        Each of the BLOCK_N slot lanes keeps its own running max, sum and output row, so the loop has no
        reduction across warps (only the q·k dot product, within a warp); the lanes are merged once at the end
        (3.0 against 2.6 TB/s for one merge per step, 128 rows × 16 heads × 257 slots on an H200).
        FP8: K and V are e4m3 with one fp32 scale per slot (k = k8·ks), applied to the logit and to the softmax
        weight instead of to every element; slot 0 is read from the exact copy (k0, v0) and seeds lane 0."""
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        n = tl.minimum(tl.load(len_ptr).to(tl.int32), S)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale  # (D,)
        k_base = k_ptr + b * sk_b + (h // rep) * sk_h
        v_base = v_ptr + b * sv_b + (h // rep) * sv_h
        m = tl.full([BLOCK_N], -1e30, tl.float32)  # finite: a lane that never sees a slot gets weight exp2(-inf) = 0
        l = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        start = 0
        if FP8:  # the class token's exact entry: lane 0 starts having seen slot 0 (weight exp2(s - s) = 1)
            k0 = tl.load(k0_ptr + b * s0_b + (h // rep) * s0_h + d, mask=d_ok, other=0.0).to(tl.float32)
            v0 = tl.load(v0_ptr + b * s0_b + (h // rep) * s0_h + d, mask=d_ok, other=0.0).to(tl.float32)
            lane0 = tl.arange(0, BLOCK_N) == 0
            m = tl.where(lane0, tl.sum(k0 * q, 0), m)
            l = tl.where(lane0, 1.0, l)
            acc = tl.where(lane0[:, None], v0[None, :], acc)
            start = 1
        for s0 in range(start, n, BLOCK_N):
            slots = s0 + tl.arange(0, BLOCK_N)
            ok = (slots < n)[:, None] & d_ok[None, :]
            # all loads issued before any use, so K and V stream from memory together
            k = tl.load(k_base + slots[:, None] * sk_s + d[None, :], mask=ok, other=0.0)  # (N, D)
            v = tl.load(v_base + slots[:, None] * sv_s + d[None, :], mask=ok, other=0.0)
            if FP8:
                ks = tl.load(ks_ptr + b * ss_b + (h // rep) * ss_h + slots, mask=slots < n, other=0.0)  # (N,)
                vs = tl.load(vs_ptr + b * ss_b + (h // rep) * ss_h + slots, mask=slots < n, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # (N,) logits · log2(e)
            if FP8:
                s = s * ks
            s = tl.where(slots < n, s, float("-inf"))
            m_new = tl.maximum(m, s)
            alpha, p = tl.exp2(m - m_new), tl.exp2(s - m_new)
            l = l * alpha + p
            if FP8:
                p = p * vs  # the weight of v8·vs
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
            m = m_new
        w = tl.exp2(m - tl.max(m, 0))  # (N,) the lanes merged
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)  # (D,)
        tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


# ---------------------------------------------------------------------------------------------------------------
# decode attention over an fp8 KV cache (not exact: sample.py --fp8)

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


def quantise_fp8(x):
    """x (..., hd) → e4m3 values (..., hd) and fp32 scales (...) with x ≈ values · scale: the scale maps each
    vector's largest |x| to 448, so 3 mantissa bits give every element a relative error ≤ 2⁻⁴ (plus 2⁻¹⁰·scale
    for the subnormals)."""
    scale = x.abs().amax(-1).float() / FP8_MAX  # (...)
    values = x.float() / scale.clamp(min=torch.finfo(torch.float32).tiny)[..., None]  # an all-zero vector stays 0
    return values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def as_e4m3(values):
    """An fp8 cache as float8_e4m3fn: stored as such, or as its bytes (uint8, how model.FP8KVCache keeps it)."""
    return values.view(torch.float8_e4m3fn) if values.dtype == torch.uint8 else values


def dequantise_window(values, scale, first, n, dtype):
    """The first n slots (B, Hkv, n, hd) in dtype of an fp8 cache: values (B, Hkv, S, hd) e4m3 (or its bytes), scale
    (B, Hkv, S), and slot 0 taken from its exact copy first[:, :, :1] (B, Hkv, ≥1, hd)."""
    rest = as_e4m3(values[:, :, 1:n]).float() * scale[:, :, 1:n, None]
    return torch.cat([first[:, :, :1].to(dtype), rest.to(dtype)], dim=2)


def decode_attention_fp8_reference(q, k_cache, v_cache, k_scale, v_scale, k_first, v_first, kv_len):
    """The definition of decode_attention_fp8: the window dequantised, then SDPA in q's dtype."""
    n = int(kv_len)  # a host synchronisation: the slow path
    k = dequantise_window(k_cache, k_scale, k_first, n, q.dtype)
    v = dequantise_window(v_cache, v_scale, v_first, n, q.dtype)
    return decode_attention_reference(q, k, v, n)


def decode_attention_fp8(q, k_cache, v_cache, k_scale, v_scale, k_first, v_first, kv_len):
    """decode_attention over an fp8 cache (1 ≤ kv_len ≤ S): k_cache, v_cache (B, Hkv, S, hd) float8_e4m3fn
    (or uint8: their bytes, read as e4m3 inside the kernel); k_scale, v_scale (B, Hkv, S) float32 (entry = value ·
    scale, see quantise_fp8); k_first, v_first (B, Hkv, ≥1, hd) whose slot 0 is the exact entry used for cache
    slot 0. Same kv_len, graph capture and output as decode_attention; on CUDA the values are dequantised in
    registers."""
    B, H, _, hd = q.shape
    Hkv, S = k_cache.shape[1:3]
    if (q.shape[2] != 1 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != hd
            or H % Hkv or k_scale.shape != (B, Hkv, S) or v_scale.shape != (B, Hkv, S)
            or k_first.shape[:2] != (B, Hkv) or k_first.shape[3] != hd or v_first.shape != k_first.shape):
        raise ValueError(f"decode_attention_fp8: q {tuple(q.shape)} / cache {tuple(k_cache.shape)} / scales "
                         f"{tuple(k_scale.shape)} / first {tuple(k_first.shape)} do not fit")
    if not _use_triton(q):
        return decode_attention_fp8_reference(q, k_cache, v_cache, k_scale, v_scale, k_first, v_first, kv_len)
    if not torch.is_tensor(kv_len):
        kv_len = torch.full((1,), kv_len, dtype=torch.int32, device=q.device)
    return _decode_attention_fp8_op(q, k_cache, v_cache, k_scale, v_scale, k_first, v_first, kv_len).transpose(1, 2)


@torch.library.custom_op("dar::decode_attention_fp8", mutates_args=(), device_types="cuda")
def _decode_attention_fp8_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                             v_scale: torch.Tensor, k_first: torch.Tensor, v_first: torch.Tensor,
                             kv_len: torch.Tensor) -> torch.Tensor:
    # uint8 bytes viewed as e4m3 here, inside the opaque operator: free, and no dtype view for inductor to copy
    return _decode_attention(q, as_e4m3(k_cache), as_e4m3(v_cache), kv_len, *_launch_config(q),
                             fp8=(k_scale, v_scale, k_first, v_first))


@_decode_attention_fp8_op.register_fake
def _(q, k_cache, v_cache, k_scale, v_scale, k_first, v_first, kv_len):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU with one in-projection

def silu_mul(h):
    """h (..., 2·hidden) = [a, b] → silu(a)·b (..., hidden), in one pass over h on CUDA."""
    if h.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dimension ({h.shape[-1]}) must hold two halves")
    hidden = h.shape[-1] // 2
    if not _use_triton(h) or torch.compiler.is_compiling():  # inductor fuses the PyTorch form itself
        a, b = h.split(hidden, dim=-1)
        return F.silu(a) * b
    rows = h.reshape(-1, 2 * hidden).contiguous()  # (R, 2·hidden); a view for a GEMM's output
    out = torch.empty(rows.shape[0], hidden, dtype=h.dtype, device=h.device)
    block = 1024
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(hidden, block))](rows, out, hidden, rows.stride(0), BLOCK=block)
    return out.view(*h.shape[:-1], hidden)


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(h_ptr, out_ptr, hidden, stride_h, BLOCK: tl.constexpr):
        row, col = tl.program_id(0), tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < hidden
        a = tl.load(h_ptr + row * stride_h + col, mask=ok).to(tl.float32)
        b = tl.load(h_ptr + row * stride_h + hidden + col, mask=ok).to(tl.float32)
        tl.store(out_ptr + row * hidden + col, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=ok)


def _fused_feed_forward(ff, x):
    """FeedForward.forward with w1 and w3 in one GEMM (w13 = [w1; w3], rows of the two weights)."""
    return ff.ffn_dropout(ff.w2(silu_mul(F.linear(x, ff.w13))))


@torch.no_grad()
def fuse_feed_forward(gpt):
    """Makes every SwiGLU of `gpt` compute w1·x and w3·x with one GEMM. Call after the model's final
    `.to(device, dtype)`: a later dtype or device move gives w1/w3 fresh storage, unlinked from w13.

    w1.weight and w3.weight become views into a new (2·hidden, dim) buffer `w13` (non-persistent), so the
    state-dict keys and values are the official ones, no memory is duplicated, and a later `load_state_dict`
    writes through to the fused weight. The module's forward is swapped on the instance only."""
    for layer in gpt.layers:
        ff = layer.feed_forward
        w1, w3 = ff.w1.weight, ff.w3.weight  # (hidden, dim) each
        w13 = torch.cat([w1, w3], dim=0)  # (2·hidden, dim)
        ff.register_buffer("w13", w13, persistent=False)
        ff.w1.weight = torch.nn.Parameter(w13[: w1.shape[0]], requires_grad=w1.requires_grad)
        ff.w3.weight = torch.nn.Parameter(w13[w1.shape[0]:], requires_grad=w3.requires_grad)
        ff.forward = types.MethodType(_fused_feed_forward, ff)
    return gpt


# ---------------------------------------------------------------------------------------------------------------
# micro-benchmarks: python kernels.py (CUDA)

def _graph_us(fn, calls):
    """Median µs per call of fn(0..calls-1), replayed from one CUDA graph (warm-up and compilation excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    return triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median") * 1e3 / calls


def bench_attention(rows, lengths, layers=24, H=16, hd=64, S=264):
    """One layer's decode attention; each call reads another layer's cache, so L2 holds none of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kv = [torch.randn(2, rows, H, S, hd, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    qs = [torch.randn(rows, 1, H, hd, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(layers)]
    for n in lengths:
        kv_len = torch.tensor([n], device="cuda")
        w = min(S, -(-n // 32) * 32)  # the window the CUDA-graph sampler attends over
        mask = torch.arange(w, device="cuda")[None, None, None] < n  # (1, 1, 1, w)
        gb = (2 * rows * H * n * hd + 2 * rows * H * hd) * 2 / 1e9  # K and V of the filled slots, q and out
        variants = {"triton (auto config)": lambda i: decode_attention(qs[i], kv[i][0], kv[i][1], kv_len)}
        for c in [(32, 2), (32, 4), (64, 4), (128, 8)]:  # slots per step, warps
            variants["triton N{} w{}".format(*c)] = lambda i, c=c: _decode_attention(qs[i], kv[i][0], kv[i][1], kv_len, *c)
        for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            def sdpa(i, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qs[i], kv[i][0][:, :, :w], kv[i][1][:, :, :w], attn_mask=mask)
            variants[f"sdpa {name} (window {w})"] = sdpa
        for name, fn in variants.items():
            try:
                us = _graph_us(fn, layers)
                print(f"| attention rows {rows} len {n} | {name} | {us:.1f} µs | {gb / us * 1e3:.2f} TB/s |")
            except Exception as e:  # a backend that refuses these shapes is reported, not fatal
                print(f"| attention rows {rows} len {n} | {name} | failed: {str(e).splitlines()[0][:80]} | |")


def bench_swiglu(rows, layers=24, dim=1024, hidden=2816):
    """SwiGLU in-projection + gate of one layer (GPT-L sizes); each call uses another layer's weights."""
    x = torch.randn(rows, dim, dtype=torch.bfloat16, device="cuda")
    w13 = [torch.randn(2 * hidden, dim, dtype=torch.bfloat16, device="cuda") / 32 for _ in range(layers)]
    variants = {
        "w1, w3: two GEMMs, torch silu*mul": lambda i: F.silu(F.linear(x, w13[i][:hidden])) * F.linear(x, w13[i][hidden:]),
        "w13: one GEMM, torch silu*mul": lambda i: F.silu((h := F.linear(x, w13[i]))[:, :hidden]) * h[:, hidden:],
        "w13: one GEMM, triton silu_mul": lambda i: silu_mul(F.linear(x, w13[i])),
        "w13: one GEMM alone": lambda i: F.linear(x, w13[i]),
    }
    for name, fn in variants.items():
        print(f"| swiglu rows {rows} | {name} | {_graph_us(fn, layers):.1f} µs | |")


def _capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def bench_ar_step(gpt, batch, variant, label, window=32, repeats=5):
    """ms/token of the decode steps for positions 1..N-1 at `batch` with CFG, each step one CUDA-graph replay.
    'sdpa': one graph per 32-slot window (a host-int kv_len: the cache sliced, SDPA, as sample.py did before);
    otherwise decode_attention with the length in a device buffer, one graph for all (as sample.GraphedDecoder)."""
    import model
    torch._dynamo.reset()  # each variant traces afresh when the blocks are compiled
    gpt.setup_caches(2 * batch)
    seq, N = gpt.layers[0].attention.kv_cache.k_cache.shape[2], gpt.config.block_size
    token = torch.randint(gpt.config.vocab_size, (batch,), device="cuda")
    input_pos = torch.ones(1, dtype=torch.long, device="cuda")
    kv_len = torch.ones(1, dtype=torch.long, device="cuda")
    scale = torch.tensor(4.0, device="cuda")
    windows = [min(seq, w) for w in range(window, seq + window, window)]
    if variant == "sdpa":
        by_window = {w: _capture(lambda w=w: model.decode_one_token(gpt, token, input_pos, scale, kv_len=w))
                     for w in windows}
        graph_for = lambda p: by_window[next(w for w in windows if w > p)]  # noqa: E731
    else:
        def kernel_step():
            torch.add(input_pos, 1, out=kv_len)  # the length lives on the device: one graph serves every position
            return model.decode_one_token(gpt, token, input_pos, scale, kv_len=kv_len)
        one = _capture(kernel_step)
        graph_for = lambda p: one  # noqa: E731
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for p in range(1, N):
            input_pos.fill_(p)
            graph_for(p).replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (N - 1))
    times.sort()
    print(f"| GPT-L decode step, batch {batch} with CFG{label} | {variant} | {times[len(times) // 2]:.3f} ms/token | |")


@torch.no_grad()
def check_ar_step(gpt, batch, pos=200):
    """Logits of one eager step at `pos` (caches as the last benchmark left them): kernel vs SDPA backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = gpt.tok_embeddings(torch.randint(gpt.config.vocab_size, (2 * batch,), device="cuda"))[:, None]
    p, w = torch.tensor([pos], device="cuda"), -(-(pos + 1) // 32) * 32
    out = {}
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)]:
        with sdpa_kernel([backend]):
            out[name] = gpt.forward_cached(x, p, w)
    out["kernel"] = gpt.forward_cached(x, p, torch.tensor([pos + 1], device="cuda"))  # decode_attention
    print(f"| GPT-L logits at position {pos}, batch {batch} with CFG, rel. diff to SDPA math | " +
          ", ".join(f"{k} {_relative(v, out['math']):.1e}" for k, v in out.items() if k != "math") + " | | |")


if __name__ == "__main__":
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("| what | variant | median time | bandwidth |\n|---|---|---|---|")
    for rows in (128, 2):
        bench_attention(rows, [40, 144, 257])
    for rows in (128, 2):
        bench_swiglu(rows)
    with torch.device("cuda"):
        gpt = GPT(GPTConfig.from_name("GPT-L", vocab_size=16384, block_size=256, num_classes=1000))
    gpt = gpt.to(torch.bfloat16).eval().requires_grad_(False)
    gpt.output.weight.normal_(std=0.02)  # not zeros: never time on zeros
    for batch in (64, 1):
        for variant in ("sdpa", "kernel"):
            bench_ar_step(gpt, batch, variant, "")
    check_ar_step(gpt, 1)
    torch._dynamo.config.recompile_limit = 64
    for layer in gpt.layers:  # regional compilation, as sample.py --compile
        layer.compile()
    for batch in (64, 1):
        for variant in ("sdpa", "kernel"):
            bench_ar_step(gpt, batch, variant, ", compiled blocks")
    fuse_feed_forward(gpt)
    for batch in (64, 1):
        bench_ar_step(gpt, batch, "kernel + fused SwiGLU", ", compiled blocks")
    print("dynamo:", dict(torch._dynamo.utils.counters["stats"]))
