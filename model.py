"""The D-AR autoregressive model: a plain Llama decoder over the tokenizer's 256 codes, class token first.

Nothing here is specific to D-AR (paper §4): RMSNorm, 1-D RoPE, fused wqkv, SwiGLU, the class label as a single
prefix token at position 0 (image token j sits at position j + 1), a class table whose last row is the null
class for classifier-free guidance, a static KV cache (gpt-fast style) and sampling. Module names equal the
official checkpoint keys, so official state dicts load with the plain strict `load_state_dict`.

    python -c "import model; print(model.GPTConfig.from_name('GPT-L'))"

References: the official D-AR AR model is LlamaGen's `gpt.py`; gpt-fast's `model.py`/`generate.py` (structure only).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import decode_attention
from tokenizer import SkipInit, apply_rope, check_finite, load_checkpoint


@dataclass
class GPTConfig:
    n_layer: int = 24
    n_head: int = 16
    dim: int = 1024
    vocab_size: int = 16384          # codebook size of the tokenizer
    block_size: int = 256            # number of image tokens
    num_classes: int = 1000
    n_kv_head: int | None = None     # grouped-query attention; None = n_head
    multiple_of: int = 256           # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    null_class: bool = True          # the class table has an extra last row: the null class of CFG
    class_dropout_prob: float = 0.1  # training replaces labels by the null class this often (needs null_class)
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    reverse_order: bool = False      # trained on fine-to-coarse (flipped) sequences; samplers flip back

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.dim % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"dim {self.dim} / n_head {self.n_head} / n_kv_head {self.n_kv_head} do not divide")
        if self.class_dropout_prob > 0 and not self.null_class:
            raise ValueError("class_dropout_prob > 0 needs the null class (null_class=True)")

    @property
    def head_dim(self):
        return self.dim // self.n_head

    @classmethod
    def from_name(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
    # small models of ours: a laptop smoke test, and the default model trained on Fashion-MNIST
    "GPT-tiny": dict(n_layer=2, n_head=2, dim=128, vocab_size=64, block_size=32, num_classes=10,
                     multiple_of=64, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0),
    "GPT-fmnist": dict(n_layer=8, n_head=3, dim=192, vocab_size=512, block_size=64, num_classes=10, multiple_of=64),
    # the AR model of the CPU recipe (tokenizer preset fmnist-cpu): few epochs, so no dropout
    "GPT-fmnist-cpu": dict(n_layer=4, n_head=2, dim=128, vocab_size=256, block_size=16, num_classes=10,
                           multiple_of=64, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0),
}


class RMSNorm(nn.Module):
    """x / rms(x) in float32, cast back, then scaled (the order matters for bf16 parity)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_table(seq_len, head_dim, base):
    """(seq_len, head_dim/2, 2) cos/sin of position·f_k; position 0 (the class token) is the identity. On the CPU,
    under a meta device too: a model built there for loading keeps a real table (and a meta arange imports dynamo)."""
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device="cpu"), freqs)  # (S, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


class KVCache(nn.Module):
    """Static (B, H, S, hd) key/value buffers, written at `input_pos` (a tensor, so shapes never change)."""

    def __init__(self, batch_size, seq_len, n_head, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_head, seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # input_pos (S,), k/v (B, H, S, hd) → the caches (B, H, seq, hd)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache = None

    def forward(self, x, rope, input_pos=None, mask=None, kv_len=None):
        """x (B, S, C), rope (S, hd/2, 2). With the cache: a device kv_len (S == 1) is one decode step over that many
        slots (GPT.forward_cached); otherwise `mask` (1, 1, S, n) selects n slots and hides the empty ones."""
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim] + [self.n_kv_head * self.head_dim] * 2, dim=-1)
        rope = rope.unsqueeze(-3)  # (S, 1, hd/2, 2): the same rotation for every head
        q = apply_rope(q.view(B, S, self.n_head, self.head_dim), rope).transpose(1, 2)  # (B, H, S, hd)
        k = apply_rope(k.view(B, S, self.n_kv_head, self.head_dim), rope).transpose(1, 2)
        v = v.view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # the whole caches (B, H, seq, hd)
            if S == 1 and torch.is_tensor(kv_len):
                y = decode_attention(q, k, v, kv_len)  # (B, H, 1, hd); exact filled length, no mask
                return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        rep = self.n_head // self.n_kv_head
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * (4 * cfg.dim) / 3)  # 2/3 of 4·dim, optionally scaled, rounded up: 2816 for 1024, 3584 for 1280
        if cfg.ffn_dim_multiplier is not None:
            hidden = int(cfg.ffn_dim_multiplier * hidden)
        hidden = cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope, input_pos=None, mask=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class GPT(nn.Module):
    """Class-conditional Llama: [class token, image tokens] → next-token logits over the codebook."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        # the class table, its last row (index num_classes) CFG's null class; the dict mirrors the official key
        table = nn.Embedding(cfg.num_classes + cfg.null_class, cfg.dim)
        self.cls_embedding = nn.ModuleDict(dict(embedding_table=table))
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the rope table is derived, not state (the official key lists do not contain it), and float32 always
        self.register_buffer("rope", rope_table(cfg.block_size + 1, cfg.head_dim, cfg.rope_base), persistent=False)
        if self.tok_embeddings.weight.device.type != "meta":
            self.initialize_weights()

    def _apply(self, fn, recurse=True):
        """Module.to / .cuda / .bfloat16 land here: the rope table follows the device but is rebuilt in float32
        when a dtype cast reached it (the official table is a float32 attribute; bf16 angles lose precision)."""
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32:
            self.rope = rope_table(self.rope.shape[0], self.config.head_dim, self.config.rope_base).to(self.rope.device)
        return self

    def initialize_weights(self):
        """Official init: N(0, 0.02) everywhere, norms 1, output head 0 (uniform first logits)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def _embed(self, tokens, labels, drop=None):
        cfg = self.config
        if self.training and cfg.class_dropout_prob > 0:
            if drop is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < cfg.class_dropout_prob
            labels = torch.where(drop, cfg.num_classes, labels)
        x = self.cls_embedding.embedding_table(labels)[:, None]  # (B, 1, C)
        if tokens is not None:
            x = torch.cat([x, self.tok_embeddings(tokens)], dim=1)  # (B, 1 + T, C)
        return self.tok_dropout(x)

    def _trunk(self, x, rope, input_pos=None, mask=None, kv_len=None):
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask, kv_len)
        return self.output(self.norm(x)).float()

    def forward(self, tokens, labels, targets=None, drop=None):
        """tokens (B, T), labels (B,) → logits (B, T+1, V): position i predicts token i; mean CE if targets."""
        if tokens.shape[1] > self.config.block_size - 1:  # the last token is only ever a target
            raise ValueError(f"at most {self.config.block_size - 1} input tokens, got {tokens.shape[1]}")
        x = self._embed(tokens, labels, drop)  # (B, S, C)
        logits = self._trunk(x, self.rope[: x.shape[1]])
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # ---- cached inference ----
    def setup_caches(self, max_batch_size, device=None, extra=0):
        """Static caches for [class token + block_size tokens + `extra` slots (a speculative window reaching past the
        last token)], length rounded up to a multiple of 8."""
        cfg, weight = self.config, self.tok_embeddings.weight
        seq = (cfg.block_size + 1 + extra + 7) // 8 * 8
        device = device or weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, seq, cfg.n_kv_head, cfg.head_dim, weight.dtype, device)
        if self.rope.shape[0] < seq:  # positions past the sequence are never written, but index_select needs rows
            self.rope = rope_table(seq, cfg.head_dim, cfg.rope_base).to(device)

    def forward_cached(self, x, input_pos, kv_len=None):
        """x (B, S, C) embedded inputs at positions input_pos (S,) → logits (B, S, V), updating the caches. kv_len:
        attend over the first kv_len slots only (None: all; early tokens need a fraction): a host int slices the cache
        (SDPA); kernels.decode_attention reads a device tensor (S == 1), so one CUDA graph serves every position."""
        if x.shape[1] == 1 and torch.is_tensor(kv_len):
            return self._trunk(x, self.rope[input_pos], input_pos, None, kv_len)
        n = self.layers[0].attention.kv_cache.k_cache.shape[2] if kv_len is None else kv_len
        mask = input_pos[:, None] >= torch.arange(n, device=x.device)  # (S, n): only written slots are visible
        return self._trunk(x, self.rope[input_pos], input_pos, mask[None, None])

    @classmethod
    def from_checkpoint(cls, path, name=None, map_location="cpu", **overrides):
        """Loads one of our checkpoints (config inside) or an official GPT file (the preset must be named)."""
        ckpt = load_checkpoint(path, map_location)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not an AR model checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
        if ckpt.get("kind") == "gpt":
            try:
                cfg = GPTConfig(**{**ckpt["config"], **overrides})
            except TypeError as e:
                raise ValueError(f"{path} holds an unknown AR model config ({e})") from None
            if name is not None and GPTConfig.from_name(name, **overrides) != cfg:
                raise ValueError(f"{path} holds a {cfg} model, which is not the requested {name}")
            sd = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
        elif ckpt.get("kind") is not None:
            raise ValueError(f"{path} is a {ckpt['kind']} checkpoint, not an AR model checkpoint")
        else:
            if name is None:
                raise ValueError(f"{path} looks like an official GPT file, which does not store its size: "
                                 f"name the preset (--gpt-model GPT-L or GPT-XL)")
            sd = ckpt
            for wrapper in ("model", "module", "state_dict"):
                if isinstance(sd.get(wrapper), dict):
                    sd = sd[wrapper]
            sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}  # saved from a compiled model
            cfg = GPTConfig.from_name(name, **overrides)
        check_finite(sd, str(path))
        with torch.device("meta"), SkipInit():
            model = cls(cfg)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:  # PyTorch names the missing, unexpected and mis-shaped keys
            raise ValueError(f"{path} does not fit {cfg}: is it the right file and preset?\n{e}") from None
        return model.float().eval()


# ---- generation ----
def cfg_schedule(cfg_scale, num_tokens):
    """Guidance scale per token (num_tokens,), or None without guidance (a start scale ≤ 1). cfg_scale: a number,
    "a" or "a,b" (a linear ramp a→b over the tokens, as the official sampler; its FID setting is "1.2,8.0")."""
    if isinstance(cfg_scale, str):
        parts = [float(p) for p in cfg_scale.split(",")]
        if len(parts) not in (1, 2):
            raise ValueError(f"cfg scale {cfg_scale!r}: expected 'a' or 'a,b'")
        start, end = parts[0], parts[-1]
        if max(start, end) > 1 and start == 1.0:
            start = 1.001  # the official code bumps an exact 1 so that the batch is still doubled
    else:
        start = end = float(cfg_scale)
    return torch.linspace(start, end, num_tokens) if start > 1 else None


def cfg_labels(model, labels, guided):
    """labels (B,) → the batch the model runs: [labels; null class] (2B,) with guidance, else labels."""
    cfg = model.config
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise ValueError(f"labels must lie in [0, {cfg.num_classes})")
    if not guided:
        return labels
    if not cfg.null_class:
        raise ValueError("this model has no null class, so it cannot use classifier-free guidance")
    return torch.cat([labels, torch.full_like(labels, cfg.num_classes)])


def sampling_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """logits (..., V) → the distribution tokens are drawn from (..., V): temperature, then top-k, then top-p."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = (cum > top_p).roll(1, dims=-1)  # shifted by one: keep the first entry that crosses the threshold
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits.softmax(-1)


def draw(probs, generator=None):
    """probs (..., V), not necessarily normalised → one token each (...,), without host synchronisation: the
    exponential race is a multinomial draw, but graph-capturable and driven by an explicit generator."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def guide(logits, scale):
    """Classifier-free guidance on a doubled batch [cond; uncond]: ℓ_u + λ(ℓ_c − ℓ_u); scale None: logits as given."""
    if scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def prefill(model, labels, cfg_scale, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Runs the class token at position 0 and samples the first image token. labels (B',) from cfg_labels."""
    x = model._embed(None, labels)  # (B', 1, C)
    logits = model.forward_cached(x, torch.zeros(1, dtype=torch.long, device=x.device), kv_len=1)[:, -1]
    return draw(sampling_probs(guide(logits, cfg_scale), temperature, top_k, top_p), generator)


def decode_one_token(model, token, input_pos, cfg_scale, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                     kv_len=None):
    """token (B,), input_pos (1,) tensor → next token (B,); CFG doubles the batch inside. kv_len: input_pos + 1, a
    host int or a device tensor (GPT.forward_cached)."""
    if cfg_scale is not None:
        token = torch.cat([token, token])
    logits = model.forward_cached(model.tok_embeddings(token)[:, None], input_pos, kv_len)[:, -1]
    return draw(sampling_probs(guide(logits, cfg_scale), temperature, top_k, top_p), generator)


@torch.no_grad()
def generate(model, labels, cfg_scale=1.0, temperature=1.0, top_k=0, top_p=1.0, generator=None, prefix=None):
    """Samples (B, N) int64 tokens for class labels (B,), in generation order (sample.py streams them instead).
    cfg_scale: a number or "a,b" (cfg_schedule); prefix (B, k): tokens kept fixed (zero-shot layout control),
    teacher-forced: their tokens are still drawn (the same random draws) but discarded."""
    N = model.config.block_size
    scales = cfg_schedule(cfg_scale, N)
    cond = cfg_labels(model, labels, scales is not None)
    scales = [None] * N if scales is None else scales.to(labels.device)
    model.setup_caches(cond.shape[0], device=labels.device)
    tokens = torch.empty(labels.shape[0], N, dtype=torch.long, device=labels.device)
    k = 0 if prefix is None else prefix.shape[1]
    if k:
        tokens[:, :k] = prefix
    positions = torch.arange(N + 1, device=labels.device)  # made once: a new device tensor per token would sync
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    token = prefill(model, cond, scales[0], **settings)
    for i in range(N):
        if i > 0:
            token = decode_one_token(model, tokens[:, i - 1], positions[i:i + 1], scales[i], kv_len=i + 1, **settings)
        if i >= k:
            tokens[:, i] = token
    return tokens
