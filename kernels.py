"""Exact fast paths of the sampler on CUDA, written in Triton, each next to the plain PyTorch code it replaces.

- `decode_attention`: one query per row against the first `kv_len` slots of a static KV cache. `kv_len` may be
  a device tensor, so one CUDA graph serves every position, and no slot past the filled ones is read (SDPA over
  a window rounded up to a multiple of 32 slots reads up to 31 empty ones and a mask per step).
- `fuse_feed_forward`: w1 and w3 of every SwiGLU become views of one weight, so one GEMM computes both, and
  `silu_mul` forms silu(a)·b in one pass. State-dict keys and values stay the official ones.

The fallbacks (`decode_attention_reference`, the PyTorch branch of `silu_mul`) define the functions: the
kernels compute the same thing with fp32 softmax/accumulation and differ by bf16 rounding only.

    python kernels.py        # micro-benchmarks on a CUDA GPU: attention, SwiGLU, one GPT-L decode step
"""
import math
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
    S = k_cache.shape[2]
    block_n = 64 if B * H >= _sm_count(q.device) else 32
    return _decode_attention(q, k_cache, v_cache, kv_len, block_n, 4, _num_splits(B * H, S, block_n, q.device))


def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(programs, S, block_n, device):
    """Split the length over several programs only when (row, head) pairs alone leave the SMs idle (batch 1)."""
    want = math.ceil(2 * _sm_count(device) / programs)
    splits = 1
    while splits < want and splits * 2 * block_n <= S:
        splits *= 2
    return splits


def _decode_attention(q, k_cache, v_cache, kv_len, block_n, num_warps, num_splits):
    B, H, _, hd = q.shape
    S = k_cache.shape[2]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    out = torch.empty(B, 1, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, 1, hd)
    block_d = triton.next_power_of_2(hd)
    if num_splits == 1:
        part, lse = out, out  # the kernel writes the normalised output directly; lse is not touched
        s_part = (out.stride(0), out.stride(1), 0)
    else:
        part = torch.empty(B, H, num_splits, hd, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        s_part = part.stride()[:3]
    _decode_attention_kernel[(B * H, num_splits)](
        q, k_cache, v_cache, kv_len.reshape(-1), part, lse, q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], *s_part,
        H, S, H // k_cache.shape[1], hd ** -0.5 * 1.4426950408889634,
        HD=hd, BLOCK_D=block_d, BLOCK_N=block_n, SPLITS=num_splits, num_warps=num_warps)
    if num_splits > 1:
        _combine_kernel[(B * H,)](part, lse, out, out.stride(0), out.stride(1), H, hd,
                                  BLOCK_D=block_d, SPLITS=num_splits)
    return out


if triton is not None:
    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, len_ptr, part_ptr, lse_ptr, sq_b, sq_h,
                                 sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sp_b, sp_h, sp_split,
                                 H, S, rep, qk_scale,
                                 HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                                 SPLITS: tl.constexpr):
        """Program (row·H + head, split): online softmax (base 2, fp32) over this split's share of the slots."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        n = tl.minimum(tl.load(len_ptr).to(tl.int32), S)
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N  # whole blocks per split
        start = split * chunk
        end = tl.minimum(start + chunk, n)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale  # (D,)
        k_base = k_ptr + b * sk_b + (h // rep) * sk_h
        v_base = v_ptr + b * sv_b + (h // rep) * sv_h
        m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)  # running max (a 0-d fp32 tensor)
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)  # running sum of exp2
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(start, end, BLOCK_N):
            slots = s0 + tl.arange(0, BLOCK_N)
            ok = (slots < end)[:, None] & d_ok[None, :]
            # both loads issued before any use, so K and V stream from memory together
            k = tl.load(k_base + slots[:, None] * sk_s + d[None, :], mask=ok, other=0.0)  # (N, D)
            v = tl.load(v_base + slots[:, None] * sv_s + d[None, :], mask=ok, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], 1)  # (N,) logits · log2(e)
            s = tl.where(slots < end, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            m_i = m_new
        part = part_ptr + b * sp_b + h * sp_h + split * sp_split + d
        if SPLITS == 1:
            tl.store(part, (acc / l_i).to(part_ptr.dtype.element_ty), mask=d_ok)
        else:  # an empty split (early positions) stores weight 0: lse = -inf
            tl.store(part, tl.where(l_i > 0, acc / l_i, 0.0), mask=d_ok)
            tl.store(lse_ptr + bh * SPLITS + split, tl.where(l_i > 0, m_i + tl.log2(l_i), float("-inf")))

    @triton.jit
    def _combine_kernel(part_ptr, lse_ptr, out_ptr, so_b, so_h, H, HD, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
        """Program (row·H + head): the splits' outputs weighted by their share of the softmax mass."""
        bh = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        sp = tl.arange(0, SPLITS)
        lse = tl.load(lse_ptr + bh * SPLITS + sp)  # (SPLITS,); split 0 is never empty
        w = tl.exp2(lse - tl.max(lse, 0))
        part = tl.load(part_ptr + (bh * SPLITS + sp)[:, None] * HD + d[None, :], mask=(d < HD)[None, :], other=0.0)
        o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
        tl.store(out_ptr + (bh // H) * so_b + (bh % H) * so_h + d, o.to(out_ptr.dtype.element_ty), mask=d < HD)


# ---------------------------------------------------------------------------------------------------------------
# SwiGLU with one in-projection

def silu_mul(h):
    """h (..., 2·hidden) = [a, b] → silu(a)·b (..., hidden), in one pass over h on CUDA."""
    hidden = h.shape[-1] // 2
    if not _use_triton(h):
        a, b = h.split(hidden, dim=-1)
        return F.silu(a) * b
    rows = h.reshape(-1, 2 * hidden)  # (R, 2·hidden); a view for the GEMM outputs this is used on
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
