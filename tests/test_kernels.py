"""Tests of kernels.py (fast sampler paths and their PyTorch references): python -m pytest -q tests/test_kernels.py

CPU: the references' semantics and the fused SwiGLU's state dict. CUDA (skipped without a GPU): the Triton kernels
against fp32 attention at many lengths and batch sizes, with poisoned outputs, in every launch configuration, inside
a CUDA graph replayed at several lengths, and under torch.compile. The fp8 KV cache: the quantiser's error bound, the
exact class token, and (CUDA) the fp8 kernel against its dequantise-then-attend definition, the same ways."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import (_decode_attention, decode_attention, decode_attention_fp8, decode_attention_fp8_reference,
                     decode_attention_reference, fuse_feed_forward, quantise_fp8, silu_mul, triton)
from model import GPT, GPTConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs a CUDA GPU and Triton")


def naive_attention(q, k, v, n):
    """Softmax attention written out in float64: q (B, H, 1, hd) against the first n slots of k, v."""
    q, k, v = q.double(), k[:, :, :n].double(), v[:, :, :n].double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)  # (B, H, 1, n)
    return w @ v


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def inputs(B, H, Hkv, S, hd=64, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, 1, H, hd, dtype=dtype, device=device).transpose(1, 2)  # (B, H, 1, hd) as the model makes it
    k = torch.randn(B, Hkv, S, hd, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, S, hd, dtype=dtype, device=device)
    return q, k, v


# ---- CPU: references and semantics ----
@pytest.mark.parametrize("kv_len", [1, 7, 40, torch.tensor(33), torch.tensor([40], dtype=torch.int32)])
def test_reference_attends_over_the_filled_slots_only(kv_len):
    torch.manual_seed(0)
    q, k, v = inputs(2, 4, 2, 40)
    n = int(kv_len)
    out = decode_attention(q, k, v, kv_len)
    assert out.shape == (2, 4, 1, 64)
    assert rel_err(out, naive_attention(q, k, v, n)) < 1e-5
    k[:, :, n:], v[:, :, n:] = float("nan"), 1e4  # slots past kv_len must not matter
    assert torch.equal(decode_attention(q, k, v, kv_len), out)


def test_bad_shapes_raise():
    q, k, v = inputs(2, 4, 3, 16)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q, k, v, 4)  # 4 heads cannot share 3 cached heads
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q, k[:1], v[:1], 4)


def test_silu_mul_reference():
    h = torch.randn(3, 5, 2 * 48)
    assert torch.allclose(silu_mul(h), F.silu(h[..., :48]) * h[..., 48:])
    with pytest.raises(ValueError, match="two halves"):
        silu_mul(h[..., 1:])


def tiny_gpt(seed):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig.from_name("GPT-tiny"))
    with torch.no_grad():
        gpt.output.weight.normal_(std=0.5)  # the official init zeroes the head: give logits something to show
    return gpt.eval()


def test_fuse_feed_forward_keeps_function_and_state_dict():
    gpt, other = tiny_gpt(0), tiny_gpt(1)
    tokens, labels = torch.randint(64, (2, 9)), torch.tensor([1, 3])
    before = gpt(tokens, labels)[0]
    sd = {k: v.clone() for k, v in gpt.state_dict().items()}
    fuse_feed_forward(gpt)
    after = gpt(tokens, labels)[0]
    assert torch.allclose(after, before, atol=1e-5)
    assert list(gpt.state_dict()) == list(sd)  # official keys, no w13
    assert all(torch.equal(gpt.state_dict()[k], v) for k, v in sd.items())
    ff = gpt.layers[0].feed_forward
    assert ff.w1.weight.data_ptr() == ff.w13.data_ptr()  # views, not copies
    gpt.load_state_dict(other.state_dict())  # a later load writes through to the fused weight
    assert torch.allclose(gpt(tokens, labels)[0], other(tokens, labels)[0], atol=1e-5)


# ---- CUDA: the compiled kernels ----
def poison_allocator(shape, dtype):
    """Free a NaN-filled block of this size so that the next allocation of it likely reuses the NaNs."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@cuda
@pytest.mark.parametrize("B, H, Hkv, lengths", [
    (1, 16, 16, range(1, 258)),                    # batch 1 (the wide configuration), every length
    (2, 16, 16, [1, 2, 31, 32, 33, 64, 65, 144, 200, 256, 257]),
    (128, 16, 16, [1, 40, 63, 144, 257]),          # GPT-L at batch 64 with CFG
    (3, 8, 2, [1, 17, 130, 257]),                  # grouped-query attention
])
def test_decode_attention_equals_sdpa(B, H, Hkv, lengths):
    torch.manual_seed(0)
    S = 264  # 257 slots rounded up to a multiple of 8, as setup_caches does
    for n in lengths:
        q, k, v = inputs(B, H, Hkv, S, dtype=torch.bfloat16, device="cuda")  # fresh inputs at every length
        kv_len = torch.tensor([n], device="cuda")
        poison_allocator((B, 1, H, 64), torch.bfloat16)
        out = decode_attention(q, k, v, kv_len)
        ref = decode_attention_reference(q.float(), k.float(), v.float(), n)  # fp32 on upcast inputs
        assert not out.isnan().any(), n
        err = rel_err(out, ref)
        assert err < 4e-3, (n, err)  # bf16 rounding of the output (SDPA in bf16 lands at ~2e-3 too)


@cuda
@pytest.mark.parametrize("B, dtype", [(1, torch.int64), (8, torch.int32)])
def test_decode_attention_in_one_cuda_graph(B, dtype):
    """Captured once; the length is written into the device tensor before each replay."""
    torch.manual_seed(0)
    q, k, v = inputs(B, 16, 16, 264, dtype=torch.bfloat16, device="cuda")
    kv_len = torch.ones((), dtype=dtype, device="cuda")
    decode_attention(q, k, v, kv_len)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention(q, k, v, kv_len)
    for n in [1, 257, 40, 144, 2, 100]:
        kv_len.fill_(n)
        out.fill_(float("nan"))
        g.replay()
        assert rel_err(out, decode_attention_reference(q.float(), k.float(), v.float(), n)) < 4e-3, n


@cuda
def test_silu_mul_and_fused_feed_forward_on_cuda():
    torch.manual_seed(0)
    h = torch.randn(128, 2 * 2816, dtype=torch.bfloat16, device="cuda")
    ref = F.silu(h[:, :2816].float()) * h[:, 2816:].float()
    assert rel_err(silu_mul(h), ref) < 4e-3
    gpt = tiny_gpt(0).to("cuda", torch.bfloat16)
    tokens, labels = torch.randint(64, (2, 9), device="cuda"), torch.tensor([1, 3], device="cuda")
    before = gpt(tokens, labels)[0]
    after = fuse_feed_forward(gpt)(tokens, labels)[0]
    assert rel_err(after, before) < 2e-2  # bf16 activations through two layers, rounded in different places


@cuda
@pytest.mark.parametrize("block_n, num_warps", [(32, 2), (32, 4), (64, 4), (128, 8)])
def test_every_launch_configuration(block_n, num_warps):
    torch.manual_seed(0)
    for n in [1, 33, 144, 257]:
        q, k, v = inputs(4, 16, 16, 264, dtype=torch.bfloat16, device="cuda")
        kv_len = torch.tensor([n], device="cuda")
        poison_allocator((4, 1, 16, 64), torch.bfloat16)
        out = _decode_attention(q, k, v, kv_len, block_n, num_warps).transpose(1, 2)
        assert rel_err(out, decode_attention_reference(q.float(), k.float(), v.float(), n)) < 4e-3, n


@cuda
def test_decode_attention_under_torch_compile():
    """The kernel is an opaque operator to torch.compile: one graph, no break, same result."""
    torch.manual_seed(0)
    q, k, v = inputs(8, 16, 16, 264, dtype=torch.bfloat16, device="cuda")
    kv_len = torch.tensor([100], device="cuda")

    def attend(q, k, v, kv_len):
        return decode_attention(q * 2, k, v, kv_len).transpose(1, 2).reshape(8, 1, -1)
    out = torch.compile(attend, fullgraph=True)(q, k, v, kv_len)
    assert torch.equal(out, attend(q, k, v, kv_len))


# ---- the fp8 KV cache (not exact): quantiser, reference, kernel ----
def fp8_inputs(B, H, Hkv, S, hd=64, device="cpu"):
    """q (B, H, 1, hd) bf16 and an fp8 cache of random bf16 keys/values: (k8, v8, ks, vs, k_first, v_first)."""
    q, k, v = inputs(B, H, Hkv, S, hd, torch.bfloat16, device)
    (k8, ks), (v8, vs) = quantise_fp8(k), quantise_fp8(v)
    k_first, v_first = 3 * k[:, :, :2], 3 * v[:, :, :2]  # an exact slot 0 unlike the quantised one: it must win
    return q, (k8, v8, ks, vs, k_first, v_first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantise_fp8_error_bound(dtype):
    """Each vector's scale maps its largest |x| to 448: 3 mantissa bits, so ≤ 2⁻⁴ relative error per element, and
    the subnormals below 2⁻⁶·scale at most 2⁻¹⁰·scale off; all-zero vectors stay zero, tiny and huge ones scale."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 50, 64) * torch.logspace(-30, 30, 50)[:, None]  # magnitudes 1e-30 .. 1e30 across slots
    x[0, 0, 7] = 0
    x = x.to(dtype)
    values, scale = quantise_fp8(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (4, 3, 50) and scale.dtype == torch.float32
    back = values.float() * scale[..., None]
    err = (back - x.float()).abs()
    assert torch.isfinite(back).all() and (back[0, 0, 7] == 0).all()
    assert (err <= 2 ** -4 * x.float().abs() + 2 ** -10 * scale[..., None] * 1.0001).all()
    amax = x.float().abs().amax(-1)
    torch.testing.assert_close(back.abs().amax(-1), amax, rtol=1e-6, atol=0)  # the largest entry is exact
    rel = err.double().norm(dim=-1) / x.double().norm(dim=-1)  # (4, 3, 50) per vector
    assert 0.005 < rel[x.abs().amax(-1) > 0].median() < 0.04  # typically ~2%


def test_fp8_reference_is_dequantise_then_attend():
    """Slot 0 comes from the exact copy, slots 1..n-1 from the dequantised values, nothing past kv_len."""
    torch.manual_seed(0)
    q, (k8, v8, ks, vs, k0, v0) = fp8_inputs(2, 4, 2, 40)
    for n in [1, 2, 17, 40]:
        k = torch.cat([k0[:, :, :1].float(), k8[:, :, 1:].float() * ks[:, :, 1:, None]], 2)
        v = torch.cat([v0[:, :, :1].float(), v8[:, :, 1:].float() * vs[:, :, 1:, None]], 2)
        out = decode_attention_fp8(q, k8, v8, ks, vs, k0, v0, torch.tensor([n]))
        assert out.shape == (2, 4, 1, 64) and out.dtype == torch.bfloat16
        assert rel_err(out, naive_attention(q, k, v, n)) < 1e-2, n  # bf16 rounding of the dequantised values
        k8b, ksb = k8.clone(), ks.clone()
        k8b.view(torch.uint8)[:, :, n:] = 0x7F  # NaN in e4m3fn: slots past kv_len must not matter
        ksb[:, :, n:], ksb[:, :, 0] = float("nan"), float("nan")  # nor slot 0's quantised entry
        assert torch.equal(decode_attention_fp8(q, k8b, v8, ksb, vs, k0, v0, n), out), n


def test_fp8_bad_shapes_raise():
    q, (k8, v8, ks, vs, k0, v0) = fp8_inputs(2, 4, 2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention_fp8(q, k8, v8, ks[:, :, :8], vs, k0, v0, 4)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention_fp8(q, k8, v8, ks, vs, k0[:1], v0, 4)


def test_fp8_cache_keeps_the_class_token_exact_and_quantises_the_rest():
    """model.FP8KVCache: written slots dequantise within the bound, slot 0 (position 0) equals its input exactly,
    and positions written later never touch it, whatever order and grouping the writes come in."""
    from model import FP8KVCache
    torch.manual_seed(0)
    cache = FP8KVCache(2, 16, 3, 64, torch.bfloat16)
    k, v = torch.randn(2, 3, 12, 64, dtype=torch.bfloat16), torch.randn(2, 3, 12, 64, dtype=torch.bfloat16)
    cache.update(torch.arange(5), k[:, :, :5], v[:, :, :5])  # a prefill holding position 0
    for p in range(5, 12):
        cache.update(torch.tensor([p]), k[:, :, p:p + 1], v[:, :, p:p + 1])
    ck, cv = cache.window(12)
    assert ck.dtype == torch.bfloat16 and ck.shape == (2, 3, 12, 64)
    assert torch.equal(ck[:, :, 0], k[:, :, 0]) and torch.equal(cv[:, :, 0], v[:, :, 0])
    for got, want in ((ck, k), (cv, v)):
        bound = 2 ** -4 * want.float().abs() + 2 ** -10 * want.float().abs().amax(-1, keepdim=True) / 448
        assert ((got.float() - want.float()).abs() <= bound * 1.01 + 2 ** -8 * want.float().abs()).all()
        assert not torch.equal(got[:, :, 1:], want[:, :, 1:])  # quantised indeed
    assert torch.equal(cache.window(1)[0], k[:, :, :1])


def test_fp8_caches_leave_the_parameters_and_state_dict_alone():
    gpt = tiny_gpt(0)
    keys = list(gpt.state_dict())
    gpt.setup_caches(2, fp8=True)
    assert list(gpt.state_dict()) == keys
    # stored as e4m3 bytes: an update is a plain index_copy_ of the buffer, which torch.compile does in place
    assert gpt.layers[0].attention.kv_cache.k_cache.dtype == torch.uint8


def test_fp8_attention_reads_the_bytes_of_an_e4m3_cache_alike():
    q, (k8, v8, ks, vs, k0, v0) = fp8_inputs(2, 4, 2, 40)
    for n in (1, 17, 40):
        assert torch.equal(decode_attention_fp8(q, k8.view(torch.uint8), v8.view(torch.uint8), ks, vs, k0, v0, n),
                           decode_attention_fp8(q, k8, v8, ks, vs, k0, v0, n)), n


@cuda
@pytest.mark.parametrize("B, H, Hkv, lengths", [
    (1, 16, 16, range(1, 258)),                    # batch 1 (the wide configuration), every length
    (2, 16, 16, [1, 2, 31, 32, 33, 34, 64, 65, 144, 200, 256, 257]),
    (128, 16, 16, [1, 2, 40, 63, 144, 257]),       # GPT-L at batch 64 with CFG
    (3, 8, 2, [1, 2, 17, 130, 257]),               # grouped-query attention
])
def test_fp8_kernel_equals_the_reference(B, H, Hkv, lengths):
    """The kernel against its definition (dequantise, then attention) in fp32: bf16 rounding of the output only."""
    torch.manual_seed(0)
    for n in lengths:
        q, cache = fp8_inputs(B, H, Hkv, 264, device="cuda")
        poison_allocator((B, 1, H, 64), torch.bfloat16)
        out = decode_attention_fp8(q, *cache, torch.tensor([n], device="cuda"))
        ref = decode_attention_fp8_reference(q.float(), *cache, n)  # dequantised to fp32, fp32 SDPA
        assert not out.isnan().any(), n
        assert rel_err(out, ref) < 5e-3, (n, rel_err(out, ref))  # bf16 rounding of the output: ~3.3e-3


@cuda
@pytest.mark.parametrize("block_n, num_warps", [(32, 2), (32, 4), (64, 4), (128, 8)])
def test_fp8_kernel_in_every_launch_configuration(block_n, num_warps):
    torch.manual_seed(0)
    for n in [1, 2, 33, 144, 257]:
        q, cache = fp8_inputs(4, 16, 16, 264, device="cuda")
        k8, v8, ks, vs, k0, v0 = cache
        out = _decode_attention(q, k8, v8, torch.tensor([n], device="cuda"), block_n, num_warps,
                                fp8=(ks, vs, k0, v0)).transpose(1, 2)
        assert rel_err(out, decode_attention_fp8_reference(q.float(), *cache, n)) < 5e-3, n


@cuda
def test_fp8_kernel_in_one_cuda_graph_and_under_torch_compile():
    torch.manual_seed(0)
    q, cache = fp8_inputs(8, 16, 16, 264, device="cuda")
    kv_len = torch.ones(1, dtype=torch.long, device="cuda")
    decode_attention_fp8(q, *cache, kv_len)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode_attention_fp8(q, *cache, kv_len)
    for n in [1, 257, 40, 144, 2]:
        kv_len.fill_(n)
        out.fill_(float("nan"))
        g.replay()
        assert rel_err(out, decode_attention_fp8_reference(q.float(), *cache, n)) < 5e-3, n

    def attend(q, *cache):
        return decode_attention_fp8(q * 2, *cache).transpose(1, 2).reshape(8, 1, -1)
    compiled = torch.compile(attend, fullgraph=True)(q, *cache, kv_len)
    assert torch.equal(compiled, attend(q, *cache, kv_len))
