"""Class-conditional sampling with D-AR: tokens stream group by group into the pixel decoder (paper §3.3, §4).

    python sample.py                                # one sample per class (up to 10), each with its preview strip
    python sample.py --gpt-ckpt D-AR-L-360K.pt --gpt-model GPT-L --tokenizer-ckpt D-AR-tokenizer_v1.pt \
        --labels 207 360 388 --cfg-scale 4.0 --compile
    python sample.py ... --prefix-image ref.png --prefix-tokens 64 --labels 1 2 3   # zero-shot layout control
    torchrun --standalone --nproc_per_node=8 sample.py ... --cfg-scale 1.2,8.0 --num-samples 50000 --npz fid.npz

While the AR model produces tokens, every finished group of M tokens goes through the causal decoder transformer
(incrementally, with its own KV cache) and drives one step of the pixel ODE, so the image is done one solver step
after the last token, and the jump estimate after each step is a preview of the final image at no extra cost
(SPEC.md §6.5). On a GPU the pixel steps run on a second CUDA stream beside the token generation (the AR model
on a high-priority stream), so previews appear while tokens are still being generated; the AR decode step is
replayed from CUDA graphs (optionally of torch.compile'd blocks): no host synchronisation per token, and sampling
is reproducible from --seed through one explicit torch.Generator. bench.py times all of it.
"""
import argparse
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.attention import sdpa_kernel
from tqdm import tqdm

from model import GPT, cfg_schedule, decode_one_token, generate
from tokenizer import Tokenizer


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8, the conversion of the official FID script (SPEC.md §9.2)."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def grid(images, ncol):
    """(n, H, W, 3) uint8 array → one (rows·(H+2), ncol·(W+2), 3) array with 2-pixel black gaps."""
    n, H, W, _ = images.shape
    rows = math.ceil(n / ncol)
    out = np.zeros((rows * (H + 2), ncol * (W + 2), 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        out[r * (H + 2) + 1: r * (H + 2) + 1 + H, c * (W + 2) + 1: c * (W + 2) + 1 + W] = im
    return out


# ---------------------------------------------------------------------------------------------------------------
# streaming decoder

class StreamingDecoder:
    """The `on_token` callback of model.generate that decodes while tokens are generated.

    After token i completes a group, the group goes through the causal decoder transformer (continuing its KV
    cache) and the solver takes every step whose condition group is now known (with Ks = Kg: one step per group).
    Each step's jump estimate is the preview after that many groups, == tok.decode(codes, groups=k); the last
    one is the image. On CUDA the work runs on a side stream that waits only for the group's tokens, so the AR
    model keeps generating meanwhile; call `finish()` before reading the results."""

    def __init__(self, tok, noise, method="adams2", autocast=nullcontext, keep_previews=True):
        self.tok, self.autocast, self.keep_previews = tok, autocast, keep_previews
        self.M = tok.config.queries_per_step
        self.slices = tok.group_slices(tok.config.num_denoising_steps)
        self.cache = tok.new_condition_cache()
        self.conds, self.pending, self.previews = [], [], []  # condition per group; groups for the solver; uint8
        self.steps = tok.denoise(noise, self._next_group(), method)
        self.stream = torch.cuda.Stream(noise.device) if noise.device.type == "cuda" else None
        self.image, self.steps_done = None, 0

    def _next_group(self):  # the solver pulls its condition groups from here, one per step
        while True:
            yield self.pending.pop(0)

    def __call__(self, i, tokens):
        if (i + 1) % self.M:
            return
        ctx = nullcontext() if self.stream is None else torch.cuda.stream(self.stream)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))  # the group's tokens are ready
        with ctx, self.autocast():
            self.conds.append(self.tok.condition(tokens[:, i + 1 - self.M: i + 1], self.cache))  # (B, M, Dd)
            # every step whose group is known now (group slices are whole groups, SPEC.md §6.2)
            while self.steps_done < len(self.slices) and self.slices[self.steps_done].stop <= i + 1:
                self.pending.append(self.conds[self.slices[self.steps_done].start // self.M])
                _, preview = next(self.steps)
                self.image = self.tok.resize_output(preview.float())  # (B, 3, H, W)
                self.steps_done += 1
                if self.keep_previews:
                    self.previews.append(to_uint8(self.image))

    def finish(self):
        """Joins the side stream; returns the image (B, 3, H, W) and the previews (B, K, H, W, 3) uint8 or None."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        if self.steps_done < len(self.slices):
            raise RuntimeError(f"only {self.steps_done} of {len(self.slices)} solver steps ran: tokens are missing")
        return self.image, torch.stack(self.previews, 1) if self.keep_previews else None


# ---------------------------------------------------------------------------------------------------------------
# fast AR decoding

class GraphedDecoder:
    """`decode_fn` for model.generate: decode_one_token replayed from CUDA graphs.

    One graph per attention window: the token at position p attends over the first ceil((p+1)/window)·window
    cache slots instead of all of them (at batch 64 with CFG the cache, not the weights, is most of the bytes each
    step reads). Inputs are copied into static buffers, so a step is a few copies and one graph launch, with no host
    synchronisation. The sampling generator is registered with every graph: replays advance it exactly like the
    eager calls, so the tokens equal those of the same code run eagerly (`graphs=False`) for the same seed.
    generate() calls the step for positions 1..N-1 in order; the host counter `pos` follows it."""

    @torch.no_grad()
    def __init__(self, model, batch, guided, temperature, top_k, top_p, generator, window=32, graphs=True,
                 attention=None):
        cfg, device = model.config, model.tok_embeddings.weight.device
        self.model, self.N, self.graphs = model, cfg.block_size, graphs
        self.attention = attention  # an SDPA backend to insist on (torch.nn.attention.SDPBackend), or None
        self.kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        model.setup_caches(2 * batch if guided else batch, device=device)  # generate() keeps caches of this size
        seq = model.layers[0].attention.kv_cache.k_cache.shape[2]
        self.windows = [min(seq, w) for w in range(window, seq + window, window)]
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.input_pos = torch.ones(1, dtype=torch.long, device=device)
        self.scale = torch.ones((), device=device) if guided else None
        self.pos, self.out = 0, {}
        if not graphs:
            return
        self.cuda_graphs = {}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (and compilation, with --compile) outside the capture
            state = generator.get_state()
            for _ in range(2):
                for w in self.windows:
                    self._step(w)
            generator.set_state(state)
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        for w in self.windows:
            g = torch.cuda.CUDAGraph()
            g.register_generator_state(generator)
            with torch.cuda.graph(g, pool=pool):
                self.out[w] = self._step(w)
            pool, self.cuda_graphs[w] = g.pool(), g

    def _step(self, window):
        with nullcontext() if self.attention is None else sdpa_kernel([self.attention]):
            return decode_one_token(self.model, self.token, self.input_pos, self.scale, kv_len=window, **self.kwargs)

    def __call__(self, model, token, input_pos, scale, temperature, top_k, top_p, generator):
        self.pos = self.pos % (self.N - 1) + 1  # positions 1..N-1, then around again for the next generate()
        w = next(w for w in self.windows if w > self.pos)
        self.token.copy_(token)
        self.input_pos.copy_(input_pos)
        if scale is not None:
            self.scale.copy_(scale)
        if not self.graphs:
            return self._step(w)
        self.cuda_graphs[w].replay()
        return self.out[w]


# ---------------------------------------------------------------------------------------------------------------
# loading and set-up

def load_models(args, device):
    for what, path in (("tokenizer", args.tokenizer_ckpt), ("AR model", args.gpt_ckpt)):
        if not os.path.isfile(path):
            raise SystemExit(f"{what} checkpoint {path} does not exist: train one (train_tokenizer.py / train_ar.py) "
                             f"or pass --{'tokenizer' if what == 'tokenizer' else 'gpt'}-ckpt")
    try:
        tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt)
        gpt = GPT.from_checkpoint(args.gpt_ckpt, name=args.gpt_model)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    tc, gc = tok.config, gpt.config
    if (gc.vocab_size, gc.block_size) != (tc.vq_codebook_size, tc.num_tokens):
        raise SystemExit(f"{args.gpt_ckpt} predicts {gc.block_size} tokens from {gc.vocab_size} codes, but "
                         f"{args.tokenizer_ckpt} makes {tc.num_tokens} tokens from {tc.vq_codebook_size} codes")
    dtype = torch.bfloat16 if args.precision == "bf16" or args.precision == "auto" and device.type == "cuda" \
        else torch.float32
    return tok.to(device), gpt.to(device, dtype)


def pick_labels(args, num_classes):
    """The labels of all samples (every rank computes the same list, then takes its share)."""
    bad = [c for c in args.labels or [] if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"labels {bad} out of range: this model knows classes 0..{num_classes - 1}")
    if args.labels:
        n = args.num_samples or len(args.labels)
        return torch.tensor(args.labels * math.ceil(n / len(args.labels)))[:n]
    if args.num_samples:
        return torch.randint(num_classes, (args.num_samples,), generator=torch.Generator().manual_seed(args.seed))
    return torch.arange(min(10, num_classes))


def prefix_codes(tok, args, device):
    """First --prefix-tokens codes of --prefix-image (1, k), or None."""
    if args.prefix_image is None:
        return None
    N = tok.config.num_tokens
    k = N // 4 if args.prefix_tokens is None else args.prefix_tokens  # default: the two coarsest of eight groups
    if not 1 <= k < N:
        raise SystemExit(f"--prefix-tokens must lie in [1, {N - 1}], got {k}")
    try:
        im = Image.open(args.prefix_image).convert("RGB")
    except OSError as e:
        raise SystemExit(f"cannot read --prefix-image: {e}") from None
    s = min(im.size)  # centre crop to a square, then resize to the tokenizer's resolution
    im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
    R = tok.config.image_size
    x = torch.from_numpy(np.array(im.resize((R, R), Image.BICUBIC))).permute(2, 0, 1)[None].float()
    return tok.encode((x / 127.5 - 1).to(device))[:, :k]  # (1, k)


@torch.no_grad()
def sample_batch(gpt, tok, labels, args, generator, decode_fn=decode_one_token, prefix=None, keep_previews=True,
                 autocast=nullcontext):
    """labels (B,) → tokens (B, N) in decoding order, noise x0, image (B, 3, H, W), previews (B, K, H, W, 3) uint8
    or None. prefix (1, k): codes every sample starts with (layout control)."""
    R = tok.config.image_size
    noise = torch.randn(labels.shape[0], 3, R, R, generator=generator, device=labels.device)
    stream = StreamingDecoder(tok, noise, args.solver, autocast, keep_previews)
    kw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              generator=generator, decode_fn=decode_fn)
    if prefix is not None:
        kw["prefix"] = prefix.expand(labels.shape[0], -1)
    # on CUDA the AR model runs on a high-priority stream: it is the critical path, the pixel steps fill the gaps
    ar = torch.cuda.Stream(labels.device, priority=-1) if labels.device.type == "cuda" else None
    if ar is not None:
        ar.wait_stream(torch.cuda.current_stream(labels.device))
    with nullcontext() if ar is None else torch.cuda.stream(ar):
        if gpt.config.reverse_order:  # fine-to-coarse: the first group only comes last, so decode afterwards
            tokens = generate(gpt, labels, **kw).flip(1)
            for i in range(tokens.shape[1]):
                stream(i, tokens)
        else:
            tokens = generate(gpt, labels, on_token=stream, **kw)
    if ar is not None:
        torch.cuda.current_stream(labels.device).wait_stream(ar)
    image, previews = stream.finish()
    return tokens, noise, image, previews


def setup_device(name):
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        backend = "nccl" if torch.cuda.is_available() and name in (None, "cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            return rank, world, torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return rank, world, torch.device("cpu")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return 0, 1, torch.device(name)


def main(args):
    rank, world, device = setup_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tok, gpt = load_models(args, device)
    if args.compile:  # regional: one compiled block serves every layer, so start-up stays short
        for layer in gpt.layers:
            layer.compile()
        for block in tok.diff_decoder.net.blocks:
            block.compile()
    prefix = prefix_codes(tok, args, device)
    if prefix is not None and gpt.config.reverse_order:
        raise SystemExit("layout control fixes the first (coarse) codes, but this AR model generates fine-to-coarse "
                         "(reverse_order): it cannot take a prefix")
    labels = pick_labels(args, gpt.config.num_classes)
    mine = torch.arange(len(labels)).tensor_split(world)[rank]  # this rank's sample indices, contiguous
    keep_previews = args.previews and not args.npz
    autocast = nullcontext if args.decoder_precision == "fp32" else \
        lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    generator = torch.Generator(device)
    guided = cfg_schedule(args.cfg_scale, gpt.config.block_size)[0].item() > 1
    decoders = {}  # per batch size, the CUDA graphs of the AR decode step
    images, strips = [], []
    bar = tqdm(total=len(mine), disable=rank != 0 or len(labels) <= args.batch_size, unit="img")
    for start in range(0, len(mine), args.batch_size):
        idx = mine[start:start + args.batch_size]
        generator.manual_seed(args.seed + int(idx[0]))  # a batch's randomness depends on its first sample index only
        decode_fn = decode_one_token
        if device.type == "cuda" and args.cuda_graph:
            if len(idx) not in decoders:
                decoders[len(idx)] = GraphedDecoder(gpt, len(idx), guided, args.temperature, args.top_k, args.top_p,
                                                    generator)
            decode_fn = decoders[len(idx)]
        _, _, image, previews = sample_batch(gpt, tok, labels[idx].to(device), args, generator, decode_fn, prefix,
                                             keep_previews, autocast)
        images.append(to_uint8(image).cpu())
        if keep_previews:
            strips.append(previews.cpu())
        bar.update(len(idx))
    bar.close()
    images = torch.cat(images).numpy()  # (n, H, W, 3) uint8
    strips = torch.cat(strips).numpy() if keep_previews else None  # (n, K, H, W, 3) uint8
    if args.save_each:
        os.makedirs(args.save_each, exist_ok=True)
        for j, i in enumerate(mine.tolist()):
            name = os.path.join(args.save_each, f"{i:06d}_class{int(labels[i])}")
            Image.fromarray(images[j]).save(name + ".png")
            if keep_previews:
                Image.fromarray(grid(strips[j], strips.shape[1])).save(name + "_previews.png")
    if args.npz:
        part = f"{args.npz}.rank{rank}.npz" if world > 1 else args.npz
        np.savez(part, arr_0=images, arr_1=labels[mine].numpy().astype(np.int64))
        if world > 1:
            dist.barrier()
            if rank == 0:
                parts = [np.load(f"{args.npz}.rank{r}.npz") for r in range(world)]
                np.savez(args.npz, arr_0=np.concatenate([p["arr_0"] for p in parts]),
                         arr_1=np.concatenate([p["arr_1"] for p in parts]))
                for r in range(world):
                    os.remove(f"{args.npz}.rank{r}.npz")
        if rank == 0:
            print(f"wrote {len(labels)} samples to {args.npz}")
    if rank == 0 and args.out:
        if keep_previews:  # one row per sample: the preview after each group, the last one being the image
            picture = grid(strips.reshape(-1, *strips.shape[2:]), strips.shape[1])
        else:
            shown = images[:64]
            picture = grid(shown, math.ceil(math.sqrt(len(shown))))
        Image.fromarray(picture).save(args.out)
        print(f"wrote {args.out}")
    if world > 1:
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer-ckpt", default="checkpoints/tokenizer_fmnist.pt", help="our or official tokenizer file")
    p.add_argument("--gpt-ckpt", default="checkpoints/gpt_fmnist.pt", help="our or official AR model file")
    p.add_argument("--gpt-model", default=None, help="GPT preset (GPT-L, GPT-XL): needed for official GPT files")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class labels, repeated to --num-samples (default: one per class, up to 10, or random)")
    p.add_argument("--num-samples", type=int, default=None, help="number of images (default: one per label)")
    p.add_argument("--batch-size", type=int, default=64, help="images generated together (per GPU)")
    p.add_argument("--cfg-scale", default="4.0", help="guidance scale 'a', or a linear ramp 'a,b' over the tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=0, help="seeds the labels, the noise and the token draws")
    p.add_argument("--solver", choices=["adams2", "euler"], default="adams2", help="ODE solver of the pixel decoder")
    p.add_argument("--previews", action=argparse.BooleanOptionalAction, default=True,
                   help="show each sample as a strip of the previews after every group (the last is the image)")
    p.add_argument("--prefix-image", default=None, help="layout control: reference image whose first codes are kept")
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="how many leading codes of --prefix-image to keep (default: a quarter, 64 of 256)")
    p.add_argument("--out", default="samples.png", help="PNG grid of the samples (empty: none)")
    p.add_argument("--save-each", default=None, help="directory for one PNG per sample (and its preview strip)")
    p.add_argument("--npz", default=None,
                   help="write all samples as an ADM-style .npz (arr_0 uint8 NHWC, arr_1 int64 labels)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="AR model precision (auto: bf16 on CUDA, else fp32)")
    p.add_argument("--decoder-precision", choices=["fp32", "bf16"], default="fp32",
                   help="tokenizer decoder precision (bf16 autocast: 2.6x faster on an H100 with --compile, "
                        "~4e-3 mean difference)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="replay the AR decode step from CUDA graphs (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (a few seconds)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
