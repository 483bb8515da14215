"""Tests of kernels.py (fast sampler paths and their PyTorch references): python -m pytest -q tests/test_kernels.py

CPU: the references' semantics and the fused SwiGLU's state dict. CUDA (skipped without a GPU): the Triton kernels
against fp32 attention at many lengths and batch sizes, with poisoned outputs, in every launch configuration, inside
a CUDA graph replayed at several lengths, and under torch.compile; the TF32 attention against float64 attention
and SDPA; the CUDA-graph capture helper."""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import (_decode_attention, attention, cuda_graph, decode_attention, decode_attention_reference,
                     fuse_feed_forward, silu_mul, triton)
from model import GPT, GPTConfig
from tokenizer import precision

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


@cuda
def test_cuda_graph_replays_advance_the_generator_as_eager_calls():
    g = torch.Generator("cuda")
    out = torch.empty(4, device="cuda")

    def draw():
        return out.normal_(generator=g) * 2
    g.manual_seed(3)
    eager = [draw().clone() for _ in range(3)]
    g.manual_seed(3)
    graph, result = cuda_graph(draw, generator=g)  # the warm-up draws nothing
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(result.clone())
    assert all(torch.equal(a, b) for a, b in zip(eager, replays))


@cuda
@pytest.mark.parametrize("Lq, Lk", [(1024, 1024), (100, 32), (200, 77)])
def test_attention_follows_the_tf32_switch(Lq, Lk):
    """fp32 attention: strict fp32 is SDPA itself; with TF32 on, the flash kernel stays within TF32 rounding of
    float64 attention (a head-major view, as the tokenizer passes it, and cross-attention lengths)."""
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, Lq, 3, 64, device="cuda", generator=g).transpose(1, 2)  # (B, H, Lq, 64), strided
    k, v = (torch.randn(2, 3, Lk, 64, device="cuda", generator=g) for _ in range(2))
    with precision("fp32", "cuda"):
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with precision("tf32", "cuda"):
        out = attention(q, k, v)
    assert out.shape == (2, 3, Lq, 64)
    err = rel_err(out, naive_attention(q, k, v, Lk))
    assert 0 < err < 3e-3, err
    assert rel_err(F.scaled_dot_product_attention(q, k, v), naive_attention(q, k, v, Lk)) < 1e-5
    with precision("bf16", "cuda"):  # autocast: SDPA decides (the tokenizer's v comes in bf16 there)
        assert torch.equal(attention(q, k, v.bfloat16()), F.scaled_dot_product_attention(q, k, v.bfloat16()))
