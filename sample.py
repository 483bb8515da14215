"""Class-conditional sampling with D-AR: tokens stream group by group into the pixel decoder (paper §3.3).

    python sample.py                                # one sample per class (up to 10), each with its preview strip
    python sample.py --gpt-ckpt D-AR-L-360K.pt --gpt-model GPT-L --tokenizer-ckpt D-AR-tokenizer_v1.pt \
        --labels 207 360 388 --cfg-scale 4.0 --compile
    python sample.py ... --prefix-image ref.png --prefix-tokens 64 --labels 1 2 3   # zero-shot layout control
    python sample.py --speculative 16 --labels 3   # speculative decoding: the same distribution, fewer forwards
    torchrun --standalone --nproc_per_node=8 sample.py ... --cfg-scale 1.1,8.0 --num-samples 50000 --npz fid.npz

The loop (`stream`) reads like gpt-fast's generate: prefill the class token (`start`), then one `DecodeStep.advance`
per token (a CUDA-graph replay on CUDA, the same step called eagerly elsewhere), or with --speculative a
`SpeculativeStep.advance` that adds several tokens per forward. As soon as the codes a pixel solver step is
conditioned on are complete, that step runs: the causal decoder transformer turns the new codes into condition
tokens, the ODE takes one step, and its jump estimate x̂1 = x_t + (1 - t)·v previews the final image (paper §3.3,
§5.1, Figure 4). On CUDA the pixel steps (`PixelSteps`, one CUDA graph each) run on a second stream beside the AR
model's.
"""
import argparse
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import (CHECKPOINTS, IMAGE_FORMATS, ArgumentParser, Interrupted, atomic_save, check_writable, exit_on_error,
                  interrupted, nonnegative_int, open_image, positive_float, positive_int, previews_gif, reference_image,
                  save_each, save_grid, save_npz, seed_int, setup_device, to_uint8)
from kernels import cuda_graph, fuse_feed_forward
from model import GPT, GPTConfig, cfg_labels, cfg_schedule, decode_one_token, draw, guide, prefill, sampling_probs
from tokenizer import Tokenizer, precision

PROG = "sample.py"
MAX_CFG = 100  # the largest guidance scale taken


# ---------------------------------------------------------------------------------------------------------------
# the sampling loop

class DecodeStep:
    """The AR side of one batch: KV caches, guidance schedule (cfg_scale: a number or "a,b"), sampling settings and
    model.decode_one_token on static inputs. On CUDA it is replayed from one CUDA graph that computes kv_len =
    input_pos + 1 on the device, where the decode-attention kernel reads it: one graph for every position, no host
    synchronisation, and (the generator registered with the graph) the tokens of the eager step for the same seed."""

    @torch.no_grad()
    def __init__(self, gpt, batch, cfg_scale=1.0, *, temperature=1.0, top_k=0, top_p=1.0, generator=None, graph=None):
        device = gpt.tok_embeddings.weight.device
        self.gpt, self.device = gpt, device
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        self.scales = cfg_schedule(cfg_scale, gpt.config.block_size)  # (N,) or None: no guidance
        guided = self.scales is not None
        if guided:
            self.scales = self.scales.to(device)
        gpt.setup_caches(2 * batch if guided else batch, device=device)
        self.caches = [layer.attention.kv_cache for layer in gpt.layers]
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.input_pos = torch.ones(1, dtype=torch.long, device=device)
        self.kv_len = torch.ones(1, dtype=torch.long, device=device)
        self.scale = torch.ones((), device=device) if guided else None
        self.pixel_steps, self.graph = {}, None  # stream's PixelSteps per decoding setting
        if device.type == "cuda" if graph is None else graph:
            self.graph, self.out = cuda_graph(self.step, generator=generator)

    def start(self, labels, tokens, fixed):
        """The class token's prefill → 1, the positions run. Its first token goes to tokens[:, 0] unless a prefix
        fills tokens[:, :fixed]: the prefix is teacher-forced, its draws discarded (as model.generate)."""
        for layer, cache in zip(self.gpt.layers, self.caches):
            layer.attention.kv_cache = cache  # the graph reads these: another step may have swapped its own in
        self.fixed = fixed
        scale = None if self.scales is None else self.scales[0]
        token = prefill(self.gpt, cfg_labels(self.gpt, labels, scale is not None), scale, **self.settings)
        if fixed == 0:
            tokens[:, 0] = token
        return 1

    def advance(self, tokens, i):
        """Runs position i (0 < i < N) → i + 1; its token goes to tokens[:, i] unless the prefix holds it."""
        self.token.copy_(tokens[:, i - 1])
        self.input_pos.fill_(i)
        if self.scale is not None:
            self.scale.copy_(self.scales[i])
        if self.graph is None:
            token = self.step(None if self.device.type == "cuda" else i + 1)
        else:
            self.graph.replay()
            token = self.out
        if i >= self.fixed:
            tokens[:, i] = token
        return i + 1

    def step(self, kv_len=None):
        """kv_len None: input_pos + 1 computed on the device (the graph's way); a host int slices the cache."""
        if kv_len is None:
            kv_len = torch.add(self.input_pos, 1, out=self.kv_len)
        return decode_one_token(self.gpt, self.token, self.input_pos, self.scale, kv_len=kv_len, **self.settings)


class SpeculativeStep:
    """The AR side of one batch with speculative Jacobi decoding (Teng et al. 2024, "Accelerating Auto-regressive
    Text-to-Image Generation with Training-free Speculative Jacobi Decoding"): one forward scores a window of
    `window` draft tokens, each drawn from a distribution q kept beside it. Draft j is accepted with probability
    min(1, p_j/q_j) under the final sampling distribution p (guidance, temperature, top-k, top-p); a row's first
    rejected token is drawn from max(0, p - q) instead, so every token is distributed exactly as the sequential
    sampler's (speculative sampling, Leviathan et al. 2023). The batch advances by the fewest tokens any row
    verified; a row's further verified tokens stay in the window with q = p (accepted again), the others are drawn
    anew from this forward's distributions (slots past the window from its last one) with the exponential-race noise
    they were drawn with before, so a draft changes only where its distribution does. The cache needs no rewind:
    entries past the accepted tokens are overwritten by the next window. On CUDA the window is one CUDA graph and
    the accept rule runs on the device: one host synchronisation per forward (reading how far the batch got)."""

    @torch.no_grad()
    def __init__(self, gpt, batch, window, cfg_scale=1.0, *, temperature=1.0, top_k=0, top_p=1.0, generator=None,
                 graph=None):
        device, N, V = gpt.tok_embeddings.weight.device, gpt.config.block_size, gpt.config.vocab_size
        self.gpt, self.device, self.N = gpt, device, N
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)  # the final distribution's
        self.settings = dict(self.sampling, generator=generator)
        self.scales = cfg_schedule(cfg_scale, N)
        if self.scales is not None:  # slots past the last token reuse its scale (their tokens are never kept)
            self.scales = torch.cat([self.scales, self.scales[-1:].expand(window)]).to(device)
        gpt.setup_caches(batch * (1 + (self.scales is not None)), device=device, extra=window)
        self.caches = [layer.attention.kv_cache for layer in gpt.layers]
        self.pos = torch.zeros(window, dtype=torch.long, device=device)  # slot s predicts token pos[s]
        self.inputs = torch.zeros(batch, window, dtype=torch.long, device=device)  # [last token, drafts[:-1]]
        self.drafts = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.q = torch.full((batch, window, V), 1 / V, device=device)  # the drafts' distributions
        self.noise = torch.ones(batch, window, V, device=device)  # the drafts' exponential races (model.draw)
        self.verified = torch.zeros(batch, window, dtype=torch.long, device=device)
        self.n = torch.zeros((), dtype=torch.long, device=device)  # tokens the last window added
        self.pixel_steps, self.graph = {}, None  # stream's PixelSteps per decoding setting
        if device.type == "cuda" if graph is None else graph:
            self.graph, _ = cuda_graph(self.window, generator=generator)

    def probs(self, logits, pos):
        """logits (B', ..., V) at token indices pos → the final sampling distribution (B, ..., V)."""
        if self.scales is None:
            return sampling_probs(logits, **self.sampling)
        return sampling_probs(guide(logits, self.scales[pos].view(-1, *[1] * (logits.dim() - 2))), **self.sampling)

    def start(self, labels, tokens, fixed):
        """One forward over the class token and the prefix tokens[:, :fixed] → fixed + 1, the positions run; token
        `fixed` is drawn, the first window is drawn from its distribution."""
        for layer, cache in zip(self.gpt.layers, self.caches):
            layer.attention.kv_cache = cache
        guided, g = self.scales is not None, self.settings["generator"]
        prefix = tokens[:, :fixed].repeat(1 + guided, 1)  # (B', fixed)
        x = self.gpt._embed(prefix, cfg_labels(self.gpt, labels, guided))  # (B', 1 + fixed, C)
        p = self.probs(self.gpt.forward_cached(x, torch.arange(fixed + 1, device=self.device))[:, -1], fixed)
        tokens[:, fixed] = draw(p, g)
        W = self.pos.shape[0]
        self.pos.copy_(torch.arange(fixed + 1, fixed + 1 + W))
        self.q.copy_(p[:, None].expand(-1, W, -1))
        self.noise.exponential_(1, generator=g)
        self.drafts.copy_((self.q / self.noise).argmax(-1))
        self.inputs.copy_(torch.cat([tokens[:, fixed:fixed + 1], self.drafts[:, :-1]], 1))
        return fixed + 1

    def window(self):
        """One forward over the window, the accept rule, the next window: everything on the device."""
        (B, W), g = self.drafts.shape, self.settings["generator"]
        inputs = self.inputs.repeat(1 + (self.scales is not None), 1)
        p = self.probs(self.gpt.forward_cached(self.gpt.tok_embeddings(inputs), self.pos), self.pos)  # (B, W, V)
        slot = torch.arange(W, device=self.device)
        p_d, q_d = (t.gather(-1, self.drafts[..., None])[..., 0] for t in (p, self.q))  # (B, W)
        u = torch.rand(B, W, generator=g, device=self.device)
        first = (u * q_d < p_d).cumprod(-1).sum(-1)  # (B,): each row's first rejected slot (W: none)
        at = first.clamp(max=W - 1)[:, None, None].expand(-1, 1, p.shape[-1])
        residual = (p.gather(1, at) - self.q.gather(1, at)).clamp(min=0)[:, 0]  # (B, V) max(0, p - q)
        verified = torch.where(slot < first[:, None], self.drafts, draw(residual, g)[:, None])  # up to `first`
        reach = (first + 1).clamp(max=W)  # (B,) verified tokens per row
        n = torch.minimum(reach.min(), self.N - self.pos[0])  # the batch advances by the fewest
        src = slot + n  # the next window's slot s is this window's slot s + n, or past it
        past = src >= W
        src = src.clamp(max=W - 1)
        q = torch.where(past[:, None], p[:, W - 1:], p[:, src])  # (B, W, V): stale distributions
        keep = ~past & (src < reach[:, None])  # (B, W): a verified token, drawn from p exactly
        # a draft keeps its noise until it is verified (coupled: it changes only where its distribution does); a slot
        # whose noise took part in a verification, or that is new, gets fresh noise
        fresh = torch.empty_like(q).exponential_(1, generator=g)
        noise = torch.where((past | keep)[..., None], fresh, self.noise[:, src])  # (B, W, V)
        drafts = torch.where(keep, verified[:, src], (q / noise).argmax(-1))
        last = verified.gather(1, (n - 1).clamp(min=0).expand(B, 1))  # the last accepted token (B, 1)
        self.verified.copy_(verified)
        self.inputs.copy_(torch.cat([last, drafts[:, :-1]], 1))
        self.drafts.copy_(drafts)
        self.q.copy_(q)
        self.noise.copy_(noise)
        self.pos.add_(n)
        self.n.copy_(n)

    def advance(self, tokens, i):
        """Runs the window at positions i, i + 1, ... → the new count of tokens, written to tokens[:, i:]."""
        if self.graph is None:
            self.window()
        else:
            self.graph.replay()
        n = int(self.n)  # the one host synchronisation
        tokens[:, i:i + n] = self.verified[:, :n]
        return i + n


def check_window(window, gpt):
    """--speculative W of sample.py and the demo: a window longer than the model's tokens is never filled."""
    if window > gpt.config.block_size:
        raise ValueError(f"--speculative {window}: this model makes {gpt.config.block_size} tokens, a longer window "
                         f"is never filled")


def decode_step(gpt, batch, cfg_scale=1.0, speculative=0, **settings):
    """The AR side of a batch: a DecodeStep, or with speculative = W a SpeculativeStep with a window of W."""
    if speculative:
        return SpeculativeStep(gpt, batch, speculative, cfg_scale, **settings)
    return DecodeStep(gpt, batch, cfg_scale, **settings)


def on(stream):  # a CUDA stream's context, or nothing on other devices
    return nullcontext() if stream is None else torch.cuda.stream(stream)


class PixelSteps:
    """The pixel side of one batch: solver step k of `steps` turns the codes of its group into condition tokens (the
    causal decoder transformer continues after the codes before them), takes one ODE step and jumps to a preview.
    On CUDA (graph) each step is replayed from its own CUDA graph, captured in step order in one memory pool: step k
    reads step k - 1's outputs, and the host launches one graph per step instead of each of its kernels."""

    @torch.no_grad()
    def __init__(self, tok, batch, steps, solver, decoder_precision, reverse, device, graph):
        self.tok, self.solver, self.decoder_precision, self.reverse = tok, solver, decoder_precision, reverse
        self.slices = tok.group_slices(steps)  # per solver step, the codes of its condition group
        R, N = tok.config.sampling_resolution, tok.config.num_all_queries
        self.tokens = torch.zeros(batch, N, dtype=torch.long, device=device)  # generation order
        self.x0 = torch.zeros(batch, 3, R, R, device=device)
        self.graphs = None
        if graph:
            self.graphs, self.previews, self.state = [], [], self.initial()
            for k in range(len(self.slices)):
                pool = self.graphs[0].pool() if self.graphs else None
                g, (self.state, preview) = cuda_graph(lambda: self.eager(k, self.state), warmup=1, pool=pool)
                self.graphs.append(g)
                self.previews.append(preview)

    def initial(self):  # (x, v, condition tokens so far (B, n, Dd), the decoder transformer's keys/values)
        B = self.x0.shape[0]
        return self.x0, None, self.x0.new_zeros(B, 0, self.tok.config.decoder_dim), self.tok.new_condition_cache()

    def eager(self, k, state):
        """The state after step k - 1 → (the state after step k, preview (B, 3, H, W) float, not clamped)."""
        x, v, cond, cache = state
        cache = [dict(layer) for layer in cache]  # new keys/values go into copies: the state before stays intact
        codes = self.tokens.flip(1) if self.reverse else self.tokens  # decoding order
        stop = self.slices[k].stop
        with precision(self.decoder_precision, self.x0.device.type):
            if cond.shape[1] < stop:
                cond = torch.cat([cond, self.tok.condition(codes[:, cond.shape[1]:stop], cache)], 1)
            x, v, preview = self.tok.solver_step(x, v, k, cond[:, self.slices[k]], self.solver, len(self.slices))
        return (x, v, cond, cache), self.tok.resize_output(preview.float())

    def start(self, noise):
        self.x0.copy_(noise)
        if self.graphs is None:
            self.state = self.initial()

    def run(self, k, tokens):
        """Solver step k with the codes in tokens (B, N) → its preview, overwritten by the next batch's step k."""
        self.tokens.copy_(tokens)
        if self.graphs is None:
            self.state, preview = self.eager(k, self.state)
            return preview
        self.graphs[k].replay()
        return self.previews[k]


def pixel_steps(step, tok, batch, steps, solver, decoder_precision, reverse, device):
    """The PixelSteps of this setting for step's batch, made once and kept by the step: CUDA-graphed when its AR
    side is, unless the pixel blocks are compiled (--compile): that pair stalled bench.py on an H200, cause unknown."""
    key = (tok, steps, solver, decoder_precision)
    if key not in step.pixel_steps:
        graph = step.graph is not None and not any(compiled(b) for b in tok.diff_decoder.net.blocks)
        step.pixel_steps[key] = PixelSteps(tok, batch, steps, solver, decoder_precision, reverse, device, graph)
    return step.pixel_steps[key]


@torch.no_grad()
def stream(gpt, tok, labels, noise, step, *, solver="adams2", steps=None, prefix=None, decoder_precision="tf32"):
    """The sampling loop, a generator. labels (B,), noise x0 (B, 3, R, R), step a DecodeStep for B rows.

    Yields ("token", i, tokens) after AR token i (tokens (B, N) in generation order) and ("preview", k, image) after
    solver step k of `steps` (default: the tokenizer's): image (B, 3, H, W), not clamped, equals tok.decode of the
    codes so far with the same noise; the last preview is the image. A step runs as soon as its group
    (tok.group_slices) is complete, so any step count streams (paper Table 2: 16 steps use each of 8 groups twice).
    prefix (B, k): fixed leading codes (layout control, paper §5.1). A fine-to-coarse model (reverse_order)
    completes its first group last: its steps all run after the last token. decoder_precision: tokenizer.precision's
    "tf32", "fp32" or "bf16" for the decoder transformer and the pixel network. On CUDA a preview is yielded on the
    decoder's stream, so what the caller does with it runs there too."""
    N, B, device = gpt.config.block_size, labels.shape[0], labels.device
    steps = tok.check_steps(steps)
    pixels = pixel_steps(step, tok, B, steps, solver, decoder_precision, gpt.config.reverse_order, device)
    tokens = torch.empty(B, N, dtype=torch.long, device=device)
    fixed = 0 if prefix is None else prefix.shape[1]
    if fixed:
        tokens[:, :fixed] = prefix
    done = 0  # solver steps taken
    ar = px = None
    if device.type == "cuda":  # the AR model is the critical path; the pixel steps fill the gaps beside it
        ar, px = torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device)
        ar.wait_stream(torch.cuda.current_stream(device))
        px.wait_stream(torch.cuda.current_stream(device))
        noise.record_stream(px)  # read there: its memory must not be reused before the copy
    try:
        with on(px):
            pixels.start(noise)
        with on(ar):
            i = 0
            while i < N:
                new = step.start(labels, tokens, fixed) if i == 0 else step.advance(tokens, i)
                for j in range(i, new):
                    yield "token", j, tokens
                i = new
                ready = N if i == N else 0 if gpt.config.reverse_order else max(fixed, i)
                while done < steps and pixels.slices[done].stop <= ready:
                    if px is not None:
                        px.wait_stream(ar)  # the group's codes are written
                    with on(px):
                        yield "preview", done, pixels.run(done, tokens)
                    done += 1
    finally:
        if ar is not None:
            torch.cuda.current_stream(device).wait_stream(ar)
            torch.cuda.current_stream(device).wait_stream(px)


@torch.no_grad()
def sample_batch(gpt, tok, labels, step, *, solver="adams2", steps=None, prefix=None, keep_previews=True,
                 decoder_precision="tf32"):
    """Runs the loop for labels (B,) → tokens (B, N) in decoding order, noise x0 (B, 3, R, R) drawn first from the
    step's generator, image (B, 3, H, W) in [-1, 1] (not clamped), previews (B, S, H, W, 3) uint8 or None."""
    R = tok.config.sampling_resolution
    noise = torch.randn(len(labels), 3, R, R, generator=step.settings["generator"], device=labels.device)  # x0
    previews, image = [], None
    for kind, _, out in stream(gpt, tok, labels, noise, step, solver=solver, steps=steps, prefix=prefix,
                               decoder_precision=decoder_precision):
        if kind == "token":
            tokens = out
        else:
            image = out
            if keep_previews:
                previews.append(to_uint8(image))
    tokens = tokens.flip(1) if gpt.config.reverse_order else tokens
    return tokens, noise, image.clone(), torch.stack(previews, 1) if keep_previews else None


def sample_indices(gpt, tok, labels, indices, *, seed, batch_size, graph, progress, cfg_scale, temperature,
                   top_k, top_p, solver, prefix, keep_previews, decoder_precision, speculative=0, steps=None):
    """Samples labels[indices] in batches → images (n, H, W, 3) uint8 and preview strips (n, S, H, W, 3) uint8, or
    None without keep_previews. A batch draws from a generator seeded with seed + the index of its first sample, so
    a sample does not depend on how many processes share the work (as long as batches start at the same indices)."""
    device = tok.quantize.embedding.weight.device
    generator = torch.Generator(device)
    decode_steps = {}  # per batch size: its caches and CUDA graph
    images, strips = [], []
    bar = tqdm(total=len(indices), disable=not progress, unit="img")
    for start in range(0, len(indices), batch_size):
        if interrupted():  # inside data.interruptible: stop between batches
            raise Interrupted(f"stopped by {interrupted()} after {start} of {len(indices)} samples; nothing was "
                              f"written: the same command makes the same samples")
        idx = indices[start:start + batch_size]
        generator.manual_seed(seed + int(idx[0]))
        if len(idx) not in decode_steps:
            decode_steps[len(idx)] = decode_step(gpt, len(idx), cfg_scale, speculative, temperature=temperature,
                                                 top_k=top_k, top_p=top_p, generator=generator, graph=graph)
        prefix_b = None if prefix is None else prefix.expand(len(idx), -1)
        _, _, image, previews = sample_batch(gpt, tok, labels[idx].to(device), decode_steps[len(idx)], solver=solver,
                                             steps=steps, prefix=prefix_b, keep_previews=keep_previews,
                                             decoder_precision=decoder_precision)
        images.append(to_uint8(image).cpu())
        if keep_previews:
            strips.append(previews.cpu())
        bar.update(len(idx))
    bar.close()
    return torch.cat(images).numpy(), torch.cat(strips).numpy() if keep_previews else None


# ---------------------------------------------------------------------------------------------------------------
# loading and set-up

def load_models(tokenizer_ckpt, gpt_ckpt, gpt_model, dtype, device, decoder_precision="tf32"):
    """The tokenizer (fp32) and the AR model (in `dtype`) on `device`; ValueError or FileNotFoundError name a bad
    file or a pair that does not fit. On CUDA the AR model's SwiGLU takes one GEMM (kernels.fuse_feed_forward), and
    decoder_precision "bf16" casts the pixel network's weights (it then runs wholly in bf16)."""
    tok = Tokenizer.from_checkpoint(tokenizer_ckpt)
    gpt = GPT.from_checkpoint(gpt_ckpt, name=gpt_model)
    tc, gc = tok.config, gpt.config
    if (gc.vocab_size, gc.block_size) != (tc.vq_codebook_size, tc.num_all_queries):
        raise ValueError(f"{gpt_ckpt} predicts {gc.block_size} tokens from {gc.vocab_size} codes, but "
                         f"{tokenizer_ckpt} makes {tc.num_all_queries} tokens from {tc.vq_codebook_size} codes")
    tok, gpt = tok.to(device), gpt.to(device, dtype)
    if device.type == "cuda":
        fuse_feed_forward(gpt)  # after the final .to: w1/w3 become views of the fused weight
        if decoder_precision == "bf16":
            tok.diff_decoder.to(torch.bfloat16)
    return tok, gpt


def pick_labels(labels, num_samples, seed, num_classes):
    """The labels of all samples (every rank computes the same list, then takes its share)."""
    bad = [c for c in labels or [] if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--labels {' '.join(map(str, bad))}: this model knows classes 0..{num_classes - 1}")
    if labels:
        n = num_samples or len(labels)
        return torch.tensor(labels * math.ceil(n / len(labels)))[:n]
    if num_samples:
        return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))
    return torch.arange(min(10, num_classes))


def prefix_codes(tok, image, k, device):
    """The first k codes (1, k) of a reference PIL image (zero-shot layout control, paper §5.1 and Figure 5);
    k None: a quarter of the tokens (the two coarsest of eight groups)."""
    N = tok.config.num_all_queries
    k = N // 4 if k is None else k
    if not 1 <= k < N:
        raise ValueError(f"--prefix-tokens {k}: must lie in [1, {N - 1}] for this tokenizer ({N} tokens)")
    return tok.encode(reference_image(image, tok.config.sampling_resolution).to(device))[:, :k]


def compiled(module):  # nn.Module.compile keeps its compiled call here
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_blocks(gpt, tok):
    """Regional compilation: one compiled block serves every layer, so start-up stays short."""
    for layer in gpt.layers:
        layer.compile()
    for block in tok.diff_decoder.net.blocks:
        block.compile()


# ---------------------------------------------------------------------------------------------------------------
# command line

def main(args):
    try:  # everything that can fail on a bad input, before any sampling
        rank, world, device = setup_device(args.device)
        dtype = torch.bfloat16 if args.precision == "bf16" or args.precision == "auto" and device.type == "cuda" \
            else torch.float32
        tok, gpt = load_models(args.tokenizer_ckpt, args.gpt_ckpt, args.gpt_model, dtype, device,
                               args.decoder_precision)
        if cfg_schedule(args.cfg_scale, gpt.config.block_size) is not None and not gpt.config.null_class:
            raise ValueError(f"--cfg-scale {args.cfg_scale}: {args.gpt_ckpt} has no null class, so it cannot use "
                             f"guidance (use --cfg-scale 1)")
        check_window(args.speculative, gpt)
        labels = pick_labels(args.labels, args.num_samples, args.seed, gpt.config.num_classes)
        prefix = None
        if args.prefix_image is not None:
            if gpt.config.reverse_order:
                raise ValueError("--prefix-image: layout control fixes the first (coarse) codes, but this AR model "
                                 "generates fine-to-coarse (reverse_order), so it cannot take a prefix")
            prefix = prefix_codes(tok, open_image(args.prefix_image), args.prefix_tokens, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: error: {str(e).splitlines()[0]}") from None
    if args.compile:
        compile_blocks(gpt, tok)
    mine = torch.arange(len(labels)).tensor_split(world)[rank]  # this rank's sample indices, contiguous
    keep_previews = bool(args.gif) or args.previews and not args.npz
    images, strips = sample_indices(
        gpt, tok, labels, mine, seed=args.seed, batch_size=args.batch_size,
        graph=args.cuda_graph and device.type == "cuda", progress=rank == 0 and len(labels) > args.batch_size,
        cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        solver=args.solver, steps=args.steps, prefix=prefix, keep_previews=keep_previews,
        decoder_precision=args.decoder_precision, speculative=args.speculative)
    if args.save_each:
        save_each(args.save_each, images, strips, mine, labels)
    if args.npz:
        save_npz(args.npz, images, labels[mine].numpy(), rank, world)
        if rank == 0:
            print(f"wrote {len(labels)} samples to {args.npz}")
    if rank == 0 and args.out:
        save_grid(args.out, images, strips)
        print(f"wrote {args.out}")
    if rank == 0 and args.gif:  # under torchrun, of rank 0's samples
        atomic_save(args.gif, lambda f: previews_gif(strips[:64], f))
        print(f"wrote {args.gif}")
    if world > 1:
        dist.destroy_process_group()


def cfg_scale_arg(text):
    """--cfg-scale: 'a' or a linear ramp 'a,b' over the tokens, scales in [1, MAX_CFG]; 1 disables guidance (paper
    Table 4), below 1 would not be guidance at all, far above 10 every draw is the arg max."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'a' or 'a,b' with numbers") from None
    if len(values) > 2 or not all(1 <= v <= MAX_CFG for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'a' or 'a,b' with finite scales ≥ 1 and ≤ {MAX_CFG} (1: no "
                                         f"guidance)")
    return text


def top_p_arg(text):
    p = positive_float(text)
    if p > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in (0, 1] (1: off)")
    return p


def check_args(p, args):
    """Every check that needs no model, before any work: one-line errors naming the flag."""
    def check(flag, test, *values):
        try:
            test(*values)
        except ValueError as e:
            p.error(f"{flag} {e}")
    for flag, path in (("--tokenizer-ckpt", args.tokenizer_ckpt), ("--gpt-ckpt", args.gpt_ckpt)):
        if not os.path.isfile(path):
            p.error(f"{flag} {path}: no such file (train one with train_tokenizer.py / train_ar.py)")
    if args.gpt_model is not None:
        check("--gpt-model", GPTConfig.from_name, args.gpt_model)
    if args.prefix_tokens is not None and args.prefix_image is None:
        p.error("--prefix-tokens needs --prefix-image (the reference image whose first codes are kept)")
    if args.prefix_image is not None:
        check("--prefix-image", open_image, args.prefix_image)
    if not (args.out or args.npz or args.save_each or args.gif):
        p.error("--out '' without --npz, --save-each or --gif: the samples would be written nowhere")
    if args.out:
        check("--out", check_writable, args.out, IMAGE_FORMATS)
    if args.npz:  # written at exactly this path (numpy's savez would append .npz to other names)
        check("--npz", check_writable, args.npz, {".npz"})
    if args.gif:
        if not args.previews:
            p.error("--gif animates the previews: it cannot go with --no-previews")
        check("--gif", check_writable, args.gif, {".gif"})
    if args.save_each:
        folder = Path(args.save_each)
        if folder.exists() and not folder.is_dir():
            p.error(f"--save-each {folder}: exists and is not a folder")
        check("--save-each", check_writable, folder / "000000_class0.png" if folder.is_dir() else folder)


def parse_args(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-ckpt", default=str(CHECKPOINTS / "tokenizer_fmnist.pt"),
                   help="our or official tokenizer file")
    p.add_argument("--gpt-ckpt", default=str(CHECKPOINTS / "gpt_fmnist.pt"), help="our or official AR model file")
    p.add_argument("--gpt-model", default=None, help="GPT preset (GPT-L, GPT-XL): needed for official GPT files")
    p.add_argument("--labels", type=nonnegative_int, nargs="+", default=None,
                   help="class labels, repeated to --num-samples (default: one per class, up to 10, or random)")
    p.add_argument("--num-samples", type=positive_int, default=None, help="number of images (default: one per label)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images generated together (per GPU)")
    p.add_argument("--cfg-scale", type=cfg_scale_arg, default="4.0",
                   help="guidance scale 'a', or a linear ramp 'a,b' over the tokens; scales ≥ 1, 1 = no guidance")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature (> 0)")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="sample among the k most likely codes (0: all)")
    p.add_argument("--top-p", type=top_p_arg, default=1.0, help="nucleus sampling threshold in (0, 1] (1: off)")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds the labels, the noise and the token draws")
    p.add_argument("--solver", choices=["adams2", "euler"], default="adams2", help="ODE solver of the pixel decoder")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="solver steps of the pixel decoder (default: the tokenizer's, one per token group; 32 uses "
                        "each of 8 groups 4 times, at 4x the pixel network's work)")
    p.add_argument("--previews", action=argparse.BooleanOptionalAction, default=True,
                   help="show each sample as a strip of the previews after every solver step (the last is the image)")
    p.add_argument("--prefix-image", default=None, help="layout control: reference image whose first codes are kept")
    p.add_argument("--prefix-tokens", type=positive_int, default=None,
                   help="how many leading codes of --prefix-image to keep (default: a quarter, 64 of 256)")
    p.add_argument("--out", default="samples.png", help="PNG/JPEG grid of the samples (empty: none)")
    p.add_argument("--save-each", default=None, help="folder for one PNG per sample (and its preview strip)")
    p.add_argument("--gif", default=None, help="animated GIF of the first 64 samples: frame k shows the previews "
                   "after solver step k (group k with 8 steps), as demo.py's 'save GIF'")
    p.add_argument("--npz", default=None, help="write all samples to this .npz file, ADM-style "
                   "(arr_0 uint8 NHWC, arr_1 int64 labels)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="AR model precision (auto: bf16 on CUDA, else fp32)")
    p.add_argument("--decoder-precision", choices=["tf32", "fp32", "bf16"], default="tf32",
                   help="pixel decoder precision: tf32 (TF32 matmuls, as the official sampler), fp32 (strict), bf16 "
                        "(bf16 weights on CUDA, autocast elsewhere); on a CPU tf32 and fp32 are the same")
    p.add_argument("--speculative", type=nonnegative_int, default=0, metavar="W",
                   help="speculative Jacobi decoding with a window of W tokens (e.g. 16): the same distribution in "
                        "fewer AR forwards, for small batches (the batch advances by its slowest row); 0: off")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the AR decode step and the pixel solver steps from CUDA graphs (CUDA only; "
                        "compiled pixel blocks are not captured)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (a few seconds)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


if __name__ == "__main__":
    exit_on_error(PROG, main, parse_args())
