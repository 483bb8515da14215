"""The sequential diffusion tokenizer of D-AR (paper §3): images ↔ 256 discrete tokens in 8 coarse-to-fine groups.

    image ─ ViT encoder with N learnable, causally masked queries ─ L2-normalised VQ ─► codes (B, N)
    codes ─ causal decoder transformer ─► condition tokens (B, N, D) ─ group k drives diffusion step k ─► pixels

The pixel decoder is a DiT/SiT-style transformer on raw pixel patches trained with flow matching. Its step k
attends (cross-attention) only to the k-th group of M = N/K condition tokens, so an image can be decoded while
its tokens are still being generated, and after every group the solver can jump to a preview of the final image.

Module names equal the official checkpoint keys (official state dicts load unchanged); where the paper leaves a
detail open (group rounding, solver coefficients, initialisation) the code follows the official implementation.

    python -c "import tokenizer; print(tokenizer.TokenizerConfig.from_name('tokenizer_v1'))"
"""
import contextlib
import functools
import math
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import attention

HEAD_DIM = 64  # every tokenizer attention uses 64-wide heads (12 heads at width 768)


# ---- checkpoints: they come from the internet, so unpickling may build tensors and plain data only ----

class _Attributes:
    """Stand-in for the `config_util.Config` and `argparse.Namespace` that official files pickle: attributes only.
    torch's weights_only unpickler creates it with __new__ and fills its __dict__; it never calls it."""


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) admitting the stand-in above; a file needing anything else (e.g. a pickle calling
    os.system) is refused without running it. Raises FileNotFoundError, or ValueError naming the file."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is empty")
    stand_ins = [(_Attributes, "config_util.Config"), (_Attributes, "argparse.Namespace")]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's refusal: the first line that names what was refused
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith(skip)]
        raise ValueError(f"checkpoint {path} was refused: it holds more than tensors and plain data "
                         f"({lines[0] if lines else 'unreadable pickle'})") from None
    except Exception as e:  # zip / pickle / storage errors of a damaged file
        first = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {first})") from None


class SkipInit(torch.overrides.TorchFunctionMode):
    """Modules built inside `with torch.device("meta"), SkipInit():` skip nn.init, for a load that assigns every weight:
    a normal_ on the meta device imports torch._dynamo, most of the loading time of `python sample.py` on a CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return None
        return func(*args, **(kwargs or {}))


def check_finite(state_dict, source):
    """Refuses weights with NaN or infinity (e.g. saved by a run whose loss diverged)."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ValueError(f"{source} has non-finite weights in {len(bad)} tensors, e.g. {bad[:3]}")


@dataclass
class TokenizerConfig:
    encoder_patch_size: int = 16
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    encoder_dim: int = 768
    decoder_dim: int = 768
    query_low_rank: bool = True      # queries = Linear(8 → D) of a (max_tokens, 8) table
    vq_dim: int = 8                  # code dimension c
    vq_codebook_size: int = 16384    # V
    num_all_queries: int = 256       # N tokens per image
    num_query_groups: int = 8        # K groups; group k conditions diffusion step k
    queries_per_step: int = 32       # M = N / K tokens per group
    num_denoising_steps: int = 8     # ODE steps of the pixel decoder (default of decode's `steps`)
    max_tokens: int = 1024           # rows of the query and decoder-position tables (official: 1024)
    sampling_resolution: int = 256   # image size used for decoding
    output_resolution: int = 0       # if set, decoded images are resized to it (bicubic)
    rope_base_len: float = 10000.0   # θ of the encoder's 2-D RoPE
    # the pixel diffusion decoder (official YAML: model.diff_decoder.*)
    dd_dim: int = 768
    dd_patch_size: int = 8
    dd_depth: int = 12
    dd_rope_base_len: float = 10000.0  # θ of the pixel decoder's 2-D RoPE (its own key officially)
    data_std: float = 0.6            # σd: diffusion runs on σd · image
    time_shift: float = 2.0          # s in shift(t) = t / (t + s(1 - t))
    share_time_encoding: bool = False  # one time embedder for all blocks instead of one per block
    repa: bool = True                # REPA projector (paper §4): training aligns pixel-decoder features with DINOv2
    repa_layer: int = 8              # REPA features are read before this block
    repa_hidden: int = 2048          # REPA projector width
    repa_dim: int = 768              # feature width of the REPA target (DINOv2-B)

    def __post_init__(self):
        if self.num_all_queries != self.num_query_groups * self.queries_per_step:
            raise ValueError(f"num_all_queries {self.num_all_queries} must equal num_query_groups × queries_per_step")
        if self.num_all_queries > self.max_tokens:
            raise ValueError(f"num_all_queries {self.num_all_queries} exceeds max_tokens {self.max_tokens}")
        for d in (self.encoder_dim, self.decoder_dim, self.dd_dim):
            if d % HEAD_DIM:
                raise ValueError(f"widths must be multiples of {HEAD_DIM}, got {d}")
        if self.repa and not 0 <= self.repa_layer < self.dd_depth:
            raise ValueError(f"repa_layer {self.repa_layer} must lie in [0, dd_depth {self.dd_depth}) (or repa=False)")

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_official(cls, model_cfg):
        """Converts the official YAML `model` mapping (flat keys + a `diff_decoder` sub-mapping)."""
        out = dict(model_cfg)
        dd = dict(out.pop("diff_decoder", {}))
        for key, value in out.items():
            if key in ("query_low_rank", "vq_enable") and value is not True:
                raise ValueError(f"{key}: {value} is not supported (no official configuration uses it)")
            if key not in OFFICIAL_TOP_KEYS:
                raise ValueError(f"unknown tokenizer config key {key!r}")
        out.pop("vq_enable", None)  # True, checked above
        for key, value in dd.items():
            if key in ("in_dim", "out_dim") and value != 3 or key == "mlp_head" and value:
                raise ValueError(f"diff_decoder.{key}: {value} is not supported (no official configuration uses it)")
            if key == "cond_dim" and value != out.get("decoder_dim", 768):
                raise ValueError("diff_decoder.cond_dim must equal decoder_dim")
            if key in ("in_dim", "out_dim", "mlp_head", "cond_dim", "grad_checkpointing", "cfg"):
                continue  # checked above, or no numerical effect (checkpointing) / unused (cfg) officially
            if key not in OFFICIAL_DD_KEYS:
                raise ValueError(f"unknown diff_decoder config key {key!r}")
            out[OFFICIAL_DD_KEYS[key]] = value
        out.setdefault("queries_per_step", out.get("num_all_queries", 256) // out.get("num_query_groups", 8))
        # the official model always builds the REPA projector but reads features only when depth > repa_layer;
        # without features the projector is unused, so we leave it out (its keys are accepted and dropped on load)
        out["repa"] = out.get("dd_depth", cls.dd_depth) > out.get("repa_layer", cls.repa_layer)
        return cls(**out)


OFFICIAL_TOP_KEYS = {"encoder_patch_size", "num_encoder_layers", "num_decoder_layers", "encoder_dim", "decoder_dim",
                     "query_low_rank", "vq_dim", "vq_codebook_size", "num_all_queries", "num_query_groups",
                     "queries_per_step", "num_denoising_steps", "sampling_resolution", "output_resolution",
                     "rope_base_len", "vq_enable"}
OFFICIAL_DD_KEYS = {"dim": "dd_dim", "patch_size": "dd_patch_size", "depth": "dd_depth", "data_std": "data_std",
                    "time_shift": "time_shift", "share_time_encoding": "share_time_encoding",
                    "repa_layer": "repa_layer", "rope_base_len": "dd_rope_base_len"}

PRESETS = {
    "tokenizer_v1": {},  # the released 300M tokenizer (configs/tokenizer_v1.yaml)
    # a laptop-sized model for tests and smoke runs (the golden file's sizes)
    "tiny": dict(encoder_patch_size=8, num_encoder_layers=2, num_decoder_layers=2, encoder_dim=128, decoder_dim=128,
                 vq_codebook_size=64, num_all_queries=32, queries_per_step=4, sampling_resolution=32,
                 dd_dim=128, dd_patch_size=4, dd_depth=2, repa_layer=1, repa_hidden=256, repa_dim=64),
    # the default model of this repository, trained on 32×32 Fashion-MNIST: 64 tokens in 8 groups of 8,
    # 5.6M parameters so that it ships in the repository (no REPA: no offline DINOv2 weights)
    "fmnist": dict(encoder_patch_size=4, num_encoder_layers=4, num_decoder_layers=4, encoder_dim=128, decoder_dim=128,
                   vq_codebook_size=512, num_all_queries=64, queries_per_step=8, sampling_resolution=32,
                   dd_dim=192, dd_patch_size=2, dd_depth=4, repa=False),
    # the CPU recipe: Fashion-MNIST in minutes on 2 cores; 16 tokens in 8 groups of 2, 256 codes, 2.3M parameters
    "fmnist-cpu": dict(encoder_patch_size=4, num_encoder_layers=2, num_decoder_layers=2, encoder_dim=128,
                       decoder_dim=128, vq_codebook_size=256, num_all_queries=16, queries_per_step=2,
                       sampling_resolution=32, dd_dim=128, dd_patch_size=4, dd_depth=3, repa=False),
}

USAGE_BUFFER = "quantize.codebook_used"  # usage statistics of the official trainer: accepted and dropped
REPA_PREFIX = "diff_decoder.net.repa_out."  # REPA projector: training only, may be absent from a file


# ---- shared parts: 2-D RoPE, attention with QK-norm, MLP, gated block ----

@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)  # a cached table must stay usable by autograd even if first built in inference mode
def rope_2d(h, w, base, device=None):
    """(h·w, HEAD_DIM/2, 2) cos/sin for a row-major grid: first half of the pairs encode the row, second the column.
    Cached per grid and device: no host-to-device copy per call (which would also break CUDA-graph capture)."""
    quarter = HEAD_DIM // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # int64, exact in float64 below
    angles = torch.cat([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], dim=1)  # (hw, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float().to(device)


def apply_rope(x, rope):
    """x (..., hd), pairs (a, b) = (2j, 2j+1) rotated by rope (..., hd/2, 2), broadcast against x, to (a·cos − b·sin,
    a·sin + b·cos) in float32, cast back. As x·C + swap(x)·S with C = (cos, cos), S = (−sin, sin) per pair: the same
    roundings, but purely element-wise, so the compiled backward is too (a stack of halves compiles to a gather)."""
    cos = rope[..., 0].repeat_interleave(2, dim=-1)  # (..., hd): c0 c0 c1 c1 ...
    sin = torch.stack([-rope[..., 1], rope[..., 1]], dim=-1).flatten(-2)  # −s0 s0 −s1 s1 ...
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # b0 a0 b1 a1 ...
    return (xf * cos + swapped * sin).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with biases and per-head QK LayerNorm; self- or cross-attention."""

    def __init__(self, dim):
        super().__init__()
        self.n_head = dim // HEAD_DIM
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.q_norm = nn.LayerNorm(HEAD_DIM, eps=1e-6)
        self.k_norm = nn.LayerNorm(HEAD_DIM, eps=1e-6)

    def heads(self, x):  # (B, S, D) → (B, nh, S, 64)
        return x.view(x.shape[0], x.shape[1], self.n_head, HEAD_DIM).transpose(1, 2)

    def forward(self, x, context=None, rope_q=None, rope_k=None, mask=None, is_causal=False, cache=None):
        """cache: a dict that collects this layer's keys/values across calls (incremental causal decoding)."""
        context = x if context is None else context
        q = self.q_norm(self.heads(self.q(x))).type_as(x)
        k = self.k_norm(self.heads(self.k(context))).type_as(x)
        v = self.heads(self.v(context))
        q = q if rope_q is None else apply_rope(q, rope_q)
        k = k if rope_k is None else apply_rope(k, rope_k)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = attention(q, k, v, attn_mask=mask, is_causal=is_causal)  # (B, nh, S, 64); SDPA off CUDA
        return self.proj(y.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class GatedBlock(nn.Module):
    """Pre-norm block with per-channel residual gates (zero at init, so blocks start as identity)."""

    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope=None, mask=None, is_causal=False, cache=None):
        h = self.attention(self.norm1(x), rope_q=rope, rope_k=rope, mask=mask, is_causal=is_causal, cache=cache)
        x = x + self.gate1 * h
        return x + self.gate2 * self.mlp(self.norm2(x))


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ---- vector quantizer (paper §4: ℓ2-normalised codebook of 16384 × 8) ----

class VectorQuantizer(nn.Module):
    """Nearest code by L2 distance between L2-normalised vectors; the codebook is normalised at use time."""

    def __init__(self, codebook_size, dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)  # (V, c)

    def forward(self, z):
        """z (B, N, c) unnormalised → (normalised z, codes (B, N), normalised chosen codes (B, N, c))."""
        z = F.normalize(z, dim=-1)
        e = self.codebook()
        zf = z.reshape(-1, z.shape[-1])
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * zf @ e.t()  # (B·N, V), exactly as official
        codes = d.argmin(1).view(z.shape[:-1])
        return z, codes, e[codes]


# ---- pixel diffusion decoder (paper §4: a DiT on raw pixel patches, 12 blocks of width 768, patch 8) ----

class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of 1000·t with as many frequencies as the width (cos first), then an MLP."""

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # (B,) → (B, D)
        half = self.mlp[0].in_features // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        a = (1000 * t.float())[:, None] * freqs[None]
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=-1).to(self.mlp[0].weight.dtype))


class SiTBlock(nn.Module):
    """DiT block whose adaLN modulation is per patch token: SiLU(time embedding + cross-attention to the group)."""

    def __init__(self, dim, share_time_encoding):
        super().__init__()
        self.attention = Attention(dim)
        self.cross_attn = Attention(dim)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_embed = None if share_time_encoding else TimestepEmbedder(dim)
        self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, y, cond, t, rope, temb=None):
        """y (B, L, D) patch tokens, cond (B, M, D) one group, t (B,), rope (L, 32, 2)."""
        temb = (self.time_embed(t) if temb is None else temb)[:, None]  # (B, 1, D)
        yn = layer_norm(y)
        sc = self.cross_attn(yn, layer_norm(self.cond_embed(cond)), rope_q=rope)  # (B, L, D), keys unrotated
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(temb + sc).chunk(6, dim=-1)
        y = y + gate_a * self.attention(yn * (1 + scale_a) + shift_a, rope_q=rope, rope_k=rope)
        return y + gate_m * self.mlp(layer_norm(y) * (1 + scale_m) + shift_m)


def init_linear(*blocks):
    for m in (m for b in blocks for m in b.modules()):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class DiffusionNet(nn.Module):
    """v̂ = net(x_t, t, cond): transformer on p×p pixel patches (pixel_unshuffle), 1×1 convs in and out."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        D, p = cfg.dd_dim, cfg.dd_patch_size
        self.patch_size, self.rope_base, self.repa_layer = p, cfg.dd_rope_base_len, cfg.repa_layer
        self.cond_mlp = nn.Linear(cfg.decoder_dim, D)
        self.conv_in = nn.Conv2d(3 * p * p, D, 1)
        self.time_embed = TimestepEmbedder(D) if cfg.share_time_encoding else None
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.share_time_encoding) for _ in range(cfg.dd_depth))
        self.conv_out = nn.Conv2d(D, 3 * p * p, 1)
        # REPA projector (paper §4, eq. 7): block-`repa_layer` tokens → DINOv2-B features; used in training only
        hidden = cfg.repa_hidden
        self.repa_out = nn.Sequential(nn.Linear(D, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                      nn.Linear(hidden, cfg.repa_dim)) if cfg.repa else None

    def initialize_weights(self):
        """Official init: truncated normals, adaLN and conv_out zero, so every block starts as identity and v̂ = 0."""
        init_linear(self.blocks)
        for m in [block.adaLN_modulation[1] for block in self.blocks] + [self.conv_out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, cond, repa=False):
        """x (B, 3, H, W), t (B,) as given, cond (B, M, Dd) → velocity (B, 3, H, W) in x's dtype, REPA features or
        None. Runs in its parameters' dtype: bf16 after `.to(torch.bfloat16)`, normalisations and residual stream
        included (autocast is off inside, as it would run LayerNorm in fp32 again)."""
        dtype = self.conv_in.weight.dtype
        if dtype == torch.float32:
            return self.run(x, t, cond, repa)
        with torch.autocast(x.device.type, enabled=False):
            v, h_repa = self.run(x.to(dtype), t, cond.to(dtype), repa)
        return v.to(x.dtype), h_repa

    def run(self, x, t, cond, repa):
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        rope = rope_2d(h, w, self.rope_base, x.device)
        cond = layer_norm(self.cond_mlp(cond))
        y = self.conv_in(F.pixel_unshuffle(x, self.patch_size)).flatten(2).transpose(1, 2)  # (B, h·w, D)
        temb = self.time_embed(t) if self.time_embed is not None else None
        h_repa = None
        for i, block in enumerate(self.blocks):
            if repa and i == self.repa_layer and self.repa_out is not None:
                k = max(h // 16, 1)  # pool to 16×16 tokens, the DINOv2-B/14 grid at 224 px
                grid = F.avg_pool2d(y.transpose(1, 2).reshape(B, -1, h, w), k)
                h_repa = self.repa_out(grid.flatten(2).transpose(1, 2))  # (B, 256, repa_dim)
            y = block(y, cond, t, rope, temb)
        y = layer_norm(y).transpose(1, 2).reshape(B, -1, h, w)
        return F.pixel_shuffle(self.conv_out(y), self.patch_size), h_repa


# ---- the tokenizer ----

@contextlib.contextmanager
def precision(name, device_type):
    """The arithmetic of fp32 modules inside the block: "tf32" (fp32 tensors, TF32 matmuls and convolutions on CUDA,
    as the official sampling scripts set them), "fp32" (TF32 off) or "bf16" (autocast). TF32 exists only on CUDA,
    where its switches are process-wide: they are set on entry and restored on exit."""
    if name not in ("tf32", "fp32", "bf16"):
        raise ValueError(f"precision {name!r}: use 'tf32', 'fp32' or 'bf16'")
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        with torch.autocast(device_type, torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def shift_time(t, s):
    """shift(t) = t / (t + s(1 − t)): the time warp of paper eq. 8 (s = β = 2 spends more steps near the noise)."""
    return t / (t + s * (1 - t))


class Tokenizer(nn.Module):
    """Encoder + quantizer + causal decoder transformer + pixel diffusion decoder (module names = official keys)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        De, Dd = cfg.encoder_dim, cfg.decoder_dim
        # encoder: image patches + learnable queries (paper eq. 1)
        self.patchify = nn.Conv2d(3, De, cfg.encoder_patch_size, stride=cfg.encoder_patch_size)
        self.query_embedding = nn.Embedding(cfg.max_tokens, 8 if cfg.query_low_rank else De)
        self.query_linear = nn.Linear(8, De) if cfg.query_low_rank else None
        self.encoder_layers = nn.ModuleList(GatedBlock(De) for _ in range(cfg.num_encoder_layers))
        self.quant_in_conv = nn.Conv2d(De, cfg.vq_dim, 1, bias=False)
        self.quantize = VectorQuantizer(cfg.vq_codebook_size, cfg.vq_dim)
        # causal decoder transformer: codes → condition tokens
        self.quant_out_conv = nn.Conv2d(cfg.vq_dim, Dd, 1, bias=False)
        self.decoder_embedding = nn.Embedding(cfg.max_tokens, Dd)
        self.decoder_layers = nn.ModuleList(GatedBlock(Dd) for _ in range(cfg.num_decoder_layers))
        self.diff_decoder = nn.ModuleDict(dict(net=DiffusionNet(cfg)))  # the dict level mirrors the official keys
        if self.patchify.weight.device.type != "meta":
            self.initialize_weights()

    def initialize_weights(self):
        """Official init: truncated normals, adaLN and conv_out zero (the gates are zero when made) so every block
        starts as identity and the first velocity is 0; the codebook uniform then row-normalised; the rest defaults."""
        init_linear(self.encoder_layers, self.decoder_layers)
        self.diff_decoder.net.initialize_weights()
        nn.init.trunc_normal_(self.query_embedding.weight, std=1.0)
        nn.init.trunc_normal_(self.decoder_embedding.weight, std=0.02)
        V = self.config.vq_codebook_size
        with torch.no_grad():
            nn.init.uniform_(self.quantize.embedding.weight, -1 / V, 1 / V)
            self.quantize.embedding.weight.copy_(F.normalize(self.quantize.embedding.weight, dim=-1))

    # ---- encoder ----
    def encode_unquantized(self, images):
        """images (B, 3, H, W) in [-1, 1] → latent (B, N, c) before normalisation."""
        cfg = self.config
        N, P = cfg.num_all_queries, cfg.encoder_patch_size
        if images.shape[-1] % P or images.shape[-2] % P:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {P}")
        x = self.patchify(images)  # (B, De, h, w)
        B, _, h, w = x.shape
        x = layer_norm(x.flatten(2).transpose(1, 2))  # (B, h·w, De)
        queries = self.query_embedding.weight[:N]
        if self.query_linear is not None:
            queries = self.query_linear(queries)  # (N, De)
        x = torch.cat([x, queries[None].expand(B, -1, -1).to(x.dtype)], dim=1)  # (B, h·w + N, De)
        # image tokens get 2-D RoPE, queries the identity, angle 0 (their order lives in the query vectors and mask)
        identity = rope_2d(1, 1, cfg.rope_base_len, x.device).expand(N, -1, -1)  # (N, 32, 2)
        rope = torch.cat([rope_2d(h, w, cfg.rope_base_len, x.device), identity])  # (h·w + N, 32, 2)
        # image tokens see all image tokens and no query; query k sees all image tokens and queries 0..k
        L = h * w + N
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask[:, : h * w] = True
        for layer in self.encoder_layers:
            x = layer(x, rope=rope, mask=mask)
        z = layer_norm(x[:, h * w:])  # (B, N, De)
        return self.quant_in_conv(z.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)  # (B, N, c)

    @torch.no_grad()
    def encode_latent(self, images):
        """(B, N, c): the L2-normalised latent that the quantizer compares with the codebook."""
        return F.normalize(self.encode_unquantized(images), dim=-1)

    @torch.no_grad()
    def encode(self, images):
        """(B, N) int64 codes, ordered coarse to fine."""
        return self.quantize(self.encode_unquantized(images))[1]

    # ---- decoder transformer ----
    def new_condition_cache(self):
        return [dict() for _ in self.decoder_layers]

    @torch.no_grad()
    def condition(self, codes, cache=None):
        """codes (B, n) → condition tokens (B, n, Dd), causal: a prefix of codes gives the prefix of the result. With
        `cache` (new_condition_cache) a call continues after earlier calls' codes: groups go in as they are made."""
        return self.condition_from_latent(self.quantize.codebook()[codes], cache)

    def condition_from_latent(self, zq, cache=None):
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        n = zq.shape[1]
        x = self.quant_out_conv(zq.transpose(1, 2)[:, :, None]).squeeze(2).transpose(1, 2)  # (B, n, Dd)
        x = x + self.decoder_embedding.weight[past:past + n]
        # the first chunk is plain causal; a later chunk sees every earlier code and is causal within itself
        mask = None if past == 0 else torch.ones(n, past + n, dtype=torch.bool, device=x.device).tril(past)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, mask=mask, is_causal=mask is None, cache=None if cache is None else cache[i])
        return layer_norm(x)

    # ---- pixel decoder: the diffusion conventions, then the solver ----
    # Flow matching (paper eqs. 2-4): t = 0 is Gaussian noise x0, t = 1 is data x1 = σd · image (σd = 0.6);
    #   x_t = t·x1 + (1 − t)·x0, and the network predicts the velocity v = x1 − x0.
    # Time shift (paper eq. 8, shift_time): an S-step solve visits shift(i / S), i = 0..S−1, then exactly 1; for
    #   S = 8: 0, 1/15, 1/7, 3/13, 1/3, 5/11, 3/5, 7/9, 1.
    # Which group conditions which step (paper eq. 5, rounded as the official code does): step i uses the group
    #   nearest to its raw time, g_i = round_half_up(i·K/S) clamped to K − 1, i.e. tokens [g_i·M, (g_i + 1)·M).
    #   With S = K (8) step i uses group i: the first group fixes the coarse layout, later ones add detail.
    #   Training draws raw t ~ U[0, 1), picks the group by the same rounding and feeds shift(t) to the network.
    # Solvers: Euler, or 2nd-order Adams–Bashforth with the constant coefficients (1.5, −0.5) even on this
    #   non-uniform grid (as officially), its first step Euler. After step i the state can jump to t = 1 with the
    #   same blended velocity: that jump is the preview after i + 1 groups, and after the last step the image.
    @torch.no_grad()
    def velocity(self, x_t, t, cond_group):
        """One evaluation of the pixel network; t (B,) is used as given (already shifted)."""
        return self.diff_decoder.net(x_t, torch.as_tensor(t, device=x_t.device), cond_group)[0]

    def group_slices(self, steps):
        """Token range of the condition group used by each of `steps` solver steps (see the conventions above)."""
        cfg = self.config
        N, M, K = cfg.num_all_queries, cfg.queries_per_step, cfg.num_query_groups
        starts = [min(N - M, int(math.floor(i / steps * K + 0.5) / K * N)) for i in range(steps)]
        return [slice(s, s + M) for s in starts]

    def schedule(self, steps):
        """Shifted time grid (steps + 1,) float32 of a `steps`-step solve: shift(i / steps), then exactly 1."""
        raw = torch.tensor([i / steps for i in range(steps)] + [1.0], dtype=torch.float32)
        return shift_time(raw, self.config.time_shift)

    @torch.no_grad()
    def solver_step(self, x, v_prev, k, cond_group, method="adams2", steps=None):
        """ODE step k (0-based) of `steps` (default num_denoising_steps) from the state x (B, 3, R, R); v_prev: step
        k − 1's velocity, or None (Adams-2 then takes an Euler step). → (x_next, v, preview): the preview is the jump
        to t = 1 (see above) in image space, not resized; after the last step it equals x_next / σd."""
        if method not in ("adams2", "euler"):
            raise ValueError(f"unknown solver {method!r}: use 'adams2' or 'euler'")
        steps = self.check_steps(steps)
        if not 0 <= k < steps:
            raise ValueError(f"step {k} is outside the {steps} solver steps")
        t, t_next = self.schedule(steps)[k:k + 2].tolist()
        v = self.velocity(x, torch.full((x.shape[0],), t, device=x.device), cond_group)
        u = v if method == "euler" or v_prev is None else 1.5 * v - 0.5 * v_prev
        preview = (x + (1 - t) * u) / self.config.data_std
        return x + (t_next - t) * u, v, preview

    def check_steps(self, steps):
        if steps is None:
            return self.config.num_denoising_steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return steps

    def steps_for_groups(self, groups, steps):
        """How many of the `steps` solver steps need only the first `groups` token groups (a prefix of the steps)."""
        M = self.config.queries_per_step
        return sum(s.start < groups * M for s in self.group_slices(steps))

    @torch.no_grad()
    def decode(self, codes, noise=None, method="adams2", groups=None, generator=None, steps=None):
        """codes (B, N) → image (B, 3, H, W), roughly in [-1, 1], not clamped. steps: solver steps (default
        num_denoising_steps; 16 use each group twice, 4 every other one: paper Table 2). groups=k runs only the steps
        that the first k groups condition and jumps to t = 1 from the last (the preview of paper §5.1). noise: x0 in
        network space (its size sets H, W), else drawn with `generator` at sampling_resolution."""
        steps = self.check_steps(steps)
        K = self.config.num_query_groups
        if groups is not None and not 1 <= groups <= K:
            raise ValueError(f"groups must lie in [1, {K}], got {groups}")
        n = steps if groups is None else self.steps_for_groups(groups, steps)
        if noise is None:
            R = self.config.sampling_resolution
            noise = torch.randn(codes.shape[0], 3, R, R, generator=generator, device=codes.device)
        cond = self.condition(codes)
        x, v = noise, None
        for k, s in enumerate(self.group_slices(steps)[:n]):
            x, v, image = self.solver_step(x, v, k, cond[:, s], method, steps)
        return self.resize_output(image)

    def resize_output(self, images):
        R = self.config.output_resolution
        if R and max(images.shape[-2:]) > R:
            images = F.interpolate(images, size=(R, R), mode="bicubic", align_corners=False)
        return images

    @torch.no_grad()
    def reconstruct(self, images, method="adams2", groups=None, generator=None, steps=None):
        """Encode, then decode at the input's size when larger than sampling_resolution (the official eval forward)."""
        R = self.config.sampling_resolution
        B, _, H, W = images.shape
        noise = torch.randn(B, 3, max(R, H), max(R, W), generator=generator, device=images.device)
        return self.decode(self.encode(images), noise, method, groups, steps=steps)

    # ---- training (paper eq. 7) ----
    def loss(self, images, t=None, noise=None):
        """Training terms for images (B, 3, H, W) in [-1, 1]. t (B,) raw times in [0, 1) and noise (B, 3, H, W) may be
        given (the trainer draws them per sample), else they come from the global RNG. → a dict: scalar losses `fm`
        (flow matching), `vq`, `commit`; `x1_hat` (B, 3, H, W), the one-jump image estimate (input of the LPIPS term);
        `repa` (B, 256, repa_dim) student features for the REPA term, or None; `codes` (B, N) for usage statistics."""
        cfg = self.config
        B, N, M, K = images.shape[0], cfg.num_all_queries, cfg.queries_per_step, cfg.num_query_groups
        t = torch.rand(B, device=images.device) if t is None else t
        # group from the RAW time by rounding to the nearest grid point, last group clamped (as in sampling)
        start = ((torch.floor(t * K + 0.5) / K) * N).long().clamp(0, N - M)  # (B,)
        qids = start[:, None] + torch.arange(M, device=images.device)  # (B, M)
        z, codes, zq = self.quantize(self.encode_unquantized(images))
        # VQ and commitment terms only on tokens up to the selected group (later ones receive no gradient at all)
        mask = (torch.arange(N, device=images.device)[None] <= qids[:, -1:]).float()  # (B, N)
        vq = ((zq - z.detach()) ** 2).mean(-1)
        commit = 0.25 * ((zq.detach() - z) ** 2).mean(-1)
        zq = z + (zq - z).detach()  # straight-through estimator
        cond = self.condition_from_latent(zq)  # (B, N, Dd)
        cond = cond.gather(1, qids[..., None].expand(-1, -1, cond.shape[-1]))  # (B, M, Dd)
        ts = shift_time(t, cfg.time_shift)[:, None, None, None]
        x1 = cfg.data_std * images
        x0 = torch.randn_like(images) if noise is None else noise
        x_t = ts * x1 + (1 - ts) * x0
        v, h_repa = self.diff_decoder.net(x_t, ts.flatten(), cond, repa=True)
        return dict(fm=((v.float() - (x1 - x0)) ** 2).mean() / cfg.data_std ** 2,
                    vq=(vq * mask).sum() / mask.sum(), commit=(commit * mask).sum() / mask.sum(),
                    x1_hat=(x_t + (1 - ts) * v) / cfg.data_std, repa=h_repa, codes=codes)

    # ---- loading ----
    @classmethod
    def from_official(cls, config, state_dict=None):
        """Builds the tokenizer from the official YAML `model` mapping; loads official `state_dict` if given."""
        cfg = TokenizerConfig.from_official(config)
        return cls(cfg).eval() if state_dict is None else cls.from_state_dict(cfg, state_dict, "the state dict")

    @classmethod
    def from_state_dict(cls, cfg, state_dict, source):
        """Strict load; only the training-only keys (usage buffer, REPA projector) may be present or absent."""
        with torch.device("meta"), SkipInit():
            tok = cls(cfg)
        repa = tok.diff_decoder.net.repa_out
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # saved from a compiled model
        # official files always hold a REPA projector; a config with repa=False drops it
        sd = {k: v for k, v in state_dict.items()
              if k != USAGE_BUFFER and (repa is not None or not k.startswith(REPA_PREFIX))}
        if repa is not None and not any(k.startswith(REPA_PREFIX) for k in sd):
            # not in the file: a freshly initialised projector (only training uses it)
            repa.to_empty(device=next(iter(sd.values())).device)
            for m in repa:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
            sd.update({REPA_PREFIX + k: v for k, v in repa.state_dict().items()})
        try:
            tok.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:  # PyTorch names the missing, unexpected and mis-shaped keys
            raise ValueError(f"{source} does not fit the tokenizer config {cfg}:\n{e}") from None
        return tok.float().eval()

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu", use_ema=True, official_config=None):
        """Loads one of our checkpoints or an official tokenizer file (config inside, or `official_config` given)."""
        ckpt = load_checkpoint(path, map_location)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a tokenizer checkpoint")
        if ckpt.get("kind") not in (None, "tokenizer"):
            raise ValueError(f"{path} is a {ckpt['kind']} checkpoint, not a tokenizer checkpoint")
        if ckpt.get("kind") == "tokenizer":
            try:
                cfg = TokenizerConfig(**ckpt["config"])
            except TypeError as e:
                raise ValueError(f"{path} holds an unknown tokenizer config ({e})") from None
        elif official_config is not None or "config" in ckpt:
            cfg = TokenizerConfig.from_official(official_config or _official_model_config(ckpt["config"]))
        else:
            raise ValueError(f"{path} stores no config: pass the official YAML `model` mapping (official_config)")
        key = "ema" if use_ema and ckpt.get("ema") is not None else "model"
        if key not in ckpt:
            raise ValueError(f"{path} holds neither 'ema' nor 'model' weights (keys: {sorted(ckpt)})")
        check_finite(ckpt[key], f"{path} ['{key}']")
        return cls.from_state_dict(cfg, ckpt[key], f"{path} ['{key}']")


def _official_model_config(config):
    """The `model` mapping of an official file's config_util.Config (its dict in `_data`) or Namespace."""
    data = getattr(config, "_data", config)
    data = data if isinstance(data, dict) else vars(data)
    if "model" not in data:
        raise ValueError("the official config holds no `model` section")
    return getattr(data["model"], "_data", data["model"])
