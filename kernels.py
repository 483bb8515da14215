"""Exact fast paths of the sampler on CUDA, written in Triton, each next to the plain PyTorch code it replaces.

- `decode_attention`: one query per row against the first `kv_len` slots of a static KV cache. `kv_len` may be a
  device tensor, so one CUDA graph serves every position, and no slot past the filled ones is read (SDPA over a window
  rounded up to a multiple of 32 slots reads up to 31 empty ones and a mask per step).
- `attention`: the tokenizer's unmasked fp32 attention, with TF32 dots when TF32 is on, as its matmuls.
- `fuse_feed_forward`: w1 and w3 of every SwiGLU become views of one weight, so one GEMM computes both, and
  `silu_mul` forms silu(a)·b in one pass. State-dict keys and values stay the official ones.

The fallbacks (`decode_attention_reference`, the PyTorch branch of `silu_mul`) define the functions: the kernels
compute the same thing with fp32 softmax/accumulation and differ by bf16 (or TF32) rounding only. Timings: `python
bench.py --kernels` (decode_attention, silu_mul), bench.py's decoder rows and `--profile` (attention).
"""
import types

import torch
import torch.nn.functional as F

triton = None
if torch.cuda.is_available():  # the kernels run on CUDA only: a CPU run starts without importing Triton
    try:
        import triton
        import triton.language as tl
    except ImportError:  # the PyTorch paths below still work
        pass


def _use_triton(t):
    return triton is not None and t.is_cuda


# ---- decode attention ----

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

    q (B, H, 1, hd); k_cache, v_cache (B, Hkv, S, hd) with H a multiple of Hkv; kv_len a host int or an int32/int64
    device tensor of one element (read on the device: graph-capturable, no synchronisation). Returns (B, H, 1, hd) in
    q's dtype; on CUDA a transposed view of a (B, 1, H, hd) tensor, so the caller's reshape costs no copy."""
    B, H, _, hd = q.shape
    if (q.shape[2] != 1 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != hd
            or H % k_cache.shape[1]):
        raise ValueError(f"decode_attention: q {tuple(q.shape)} / cache {tuple(k_cache.shape)} do not fit")
    if not _use_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, kv_len)
    if not torch.is_tensor(kv_len):
        kv_len = torch.full((1,), kv_len, dtype=torch.int32, device=q.device)
    return _decode_attention_op(q, k_cache, v_cache, kv_len).transpose(1, 2)


@torch.library.custom_op("dar::decode_attention", mutates_args=(), device_types="cuda")
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         kv_len: torch.Tensor) -> torch.Tensor:
    """The Triton launch as one opaque operator (B, 1, H, hd), so torch.compile keeps it whole. Launch configuration
    measured on an H200 (`python bench.py --kernels`): many (row, head) programs run best small, 32 slots a step with
    2 warps; a few (batch 1) best wide. Splitting the length over several programs was slower at 257 slots."""
    many = q.shape[0] * q.shape[1] >= torch.cuda.get_device_properties(q.device).multi_processor_count
    return _decode_attention(q, k_cache, v_cache, kv_len, *((32, 2) if many else (128, 8)))


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, kv_len):
    return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])


def _decode_attention(q, k_cache, v_cache, kv_len, block_n, num_warps):
    """Launches the kernel with an explicit configuration → (B, 1, H, hd)."""
    B, H, _, hd = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=q.device)
    _decode_attention_kernel[(B * H,)](
        q, k_cache, v_cache, kv_len.reshape(-1), out, q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], out.stride(0), out.stride(2), H, k_cache.shape[2], H // k_cache.shape[1],
        hd ** -0.5 * 1.4426950408889634, HD=hd, BLOCK_D=triton.next_power_of_2(hd), BLOCK_N=block_n,
        num_warps=num_warps)
    return out


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, sq_b, sq_h, sk_b, sk_h, sk_s,
                                 sv_b, sv_h, sv_s, so_b, so_h, H, S, rep, qk_scale,
                                 HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program row·H + head: online softmax (base 2, fp32) over the first kv_len slots, BLOCK_N at a time.
        Each of the BLOCK_N slot lanes keeps its own running max, sum and output row, so the loop has no reduction
        across warps (only the q·k dot product, within a warp); the lanes are merged once at the end (one merge per
        step measured slower)."""
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
        for s0 in range(0, n, BLOCK_N):
            slots = s0 + tl.arange(0, BLOCK_N)
            ok = (slots < n)[:, None] & d_ok[None, :]
            # all loads issued before any use, so K and V stream from memory together
            k = tl.load(k_base + slots[:, None] * sk_s + d[None, :], mask=ok, other=0.0)  # (N, D)
            v = tl.load(v_base + slots[:, None] * sv_s + d[None, :], mask=ok, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # (N,) logits · log2(e)
            s = tl.where(slots < n, s, float("-inf"))
            m_new = tl.maximum(m, s)
            alpha, p = tl.exp2(m - m_new), tl.exp2(s - m_new)
            l = l * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
            m = m_new
        w = tl.exp2(m - tl.max(m, 0))  # (N,) the lanes merged
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)  # (D,)
        tl.store(out_ptr + b * so_b + h * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


# ---- fp32 attention with TF32 dots ----

def attention(q, k, v, attn_mask=None, is_causal=False):
    """SDPA, except that unmasked fp32 attention without gradients on CUDA goes through `dar::attention`, which
    follows the TF32 switch as matmuls do: TF32 on, a flash-attention kernel with TF32 dots; off, SDPA. (SDPA's fp32
    kernel computes in plain fp32 whatever the switch says: it was half of a tf32 pixel-decoder step.)"""
    fp32 = q.dtype == k.dtype == v.dtype == torch.float32 and not torch.is_autocast_enabled(q.device.type)
    if (_use_triton(q) and fp32 and attn_mask is None and not is_causal and q.shape[-1] == 64
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return _attention_op(q, k, v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


@torch.library.custom_op("dar::attention", mutates_args=(), device_types="cuda")
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Lq, 64), k, v (B, H, Lk, 64) fp32 → (B, Lq, H, 64). The switch is read here, at run time (or at CUDA
    graph capture), so compiled callers follow it without recompiling."""
    if not torch.backends.cuda.matmul.allow_tf32:
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, Lq, hd = q.shape
    out = torch.empty(B, Lq, H, hd, dtype=q.dtype, device=q.device)
    block_m, block_n = 128, 64  # of those measured on an H200 the fastest at 1,024 keys, with 4 warps
    _attention_kernel[(triton.cdiv(Lq, block_m), B * H)](
        q, k, v, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], out.stride(0), out.stride(2),
        out.stride(1), H, Lq, k.shape[2], hd ** -0.5 * 1.4426950408889634, HD=hd, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=2)
    return out


@_attention_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


if triton is not None:
    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
                          so_b, so_h, so_s, H, Lq, Lk, qk_scale,
                          HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (query block, row·H + head): online softmax (base 2, fp32) over the keys, BLOCK_N at a time."""
        bh = tl.program_id(1)
        b, h = bh // H, bh % H
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_s + d[None, :], mask=rows[:, None] < Lq,
                    other=0.0)  # (M, D)
        k_base, v_base = k_ptr + b * sk_b + h * sk_h, v_ptr + b * sv_b + h * sv_h
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for n0 in range(0, Lk, BLOCK_N):  # every block holds at least one key, so m is finite after the first
            cols = n0 + tl.arange(0, BLOCK_N)
            ok = cols < Lk
            k = tl.load(k_base + cols[None, :] * sk_s + d[:, None], mask=ok[None, :], other=0.0)  # (D, N)
            s = tl.dot(q, k, input_precision="tf32") * qk_scale  # (M, N) logits · log2(e)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)  # (N, D)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32")
            m = m_new
        out = out_ptr + b * so_b + h * so_h + rows[:, None] * so_s + d[None, :]
        tl.store(out, acc / l[:, None], mask=rows[:, None] < Lq)


# ---- SwiGLU with one in-projection ----

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
    """Makes every SwiGLU of `gpt` compute w1·x and w3·x with one GEMM: w1.weight and w3.weight become views into a
    new (2·hidden, dim) buffer `w13` (non-persistent), so the state-dict keys and values are the official ones, no
    memory is duplicated, and a later `load_state_dict` writes through to the fused weight. The forward is swapped on
    the instance only. Call after the model's final `.to(device, dtype)`: a later dtype or device move gives w1/w3
    fresh storage, unlinked from w13."""
    for layer in gpt.layers:
        ff = layer.feed_forward
        w1, w3 = ff.w1.weight, ff.w3.weight  # (hidden, dim) each
        w13 = torch.cat([w1, w3], dim=0)  # (2·hidden, dim)
        ff.register_buffer("w13", w13, persistent=False)
        ff.w1.weight = torch.nn.Parameter(w13[: w1.shape[0]], requires_grad=w1.requires_grad)
        ff.w3.weight = torch.nn.Parameter(w13[w1.shape[0]:], requires_grad=w3.requires_grad)
        ff.forward = types.MethodType(_fused_feed_forward, ff)
    return gpt


# ---- CUDA graphs ----

def cuda_graph(fn, warmup=2, generator=None, pool=None):
    """Runs fn() `warmup` times on a side stream (compilation, cuBLAS workspaces, lazily made state), then records
    one call in a CUDA graph → (graph, the recorded call's outputs, which every replay overwrites). `generator` is
    registered with the graph, so each replay advances it as an eager call does; its state is restored after the
    warm-up, so the warm-up draws nothing. The default CUDA generator is registered by PyTorch itself. `pool`
    (another graph's .pool()): share its memory, safe when the graphs are always replayed in capture order."""
    state = None if generator is None else generator.get_state()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        generator.set_state(state)
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
