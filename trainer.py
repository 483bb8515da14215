"""The loop both trainers share: flags, set-up (the --out-dir lock), sample order, AdamW, schedule, EMA, the non-finite
skip, the CUDA-graph step, log line, checkpoint (also on SIGTERM or Ctrl-C, then the stop) and <out-dir>/summary.json.
Exact resume and "N ranks equal one process" rest on one rule: every random draw comes from a generator seeded by a key
such as (seed, ORDER, epoch), never from carried state."""
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

from data import (Interrupted, atomic_save, check_writable, interrupted, lock_folder, nonnegative_float,
                  nonnegative_int, positive_float, positive_int, probability, setup_device, write_json)
from kernels import cuda_graph
from tokenizer import load_checkpoint

MAX_SKIPS = 5  # this many non-finite steps in a row stop the run
ORDER, DRAWS, DROPOUT = 0, 1, 2  # what a seed key draws: an epoch's order, a step's augmentations, dropout masks


def add_common_args(p, out_dir, weight_decay, ema_decay):
    """The flags both trainers share; the defaults that differ between them are arguments."""
    p.add_argument("--out-dir", default=out_dir, help="where ckpt.pt, summary.json and any pictures go")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt")
    mode.add_argument("--overwrite", action="store_true", help="start afresh even if --out-dir holds a checkpoint")
    p.add_argument("--global-batch-size", type=positive_int, default=1024, help="samples per optimizer step, all ranks")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--beta1", type=probability, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=probability, default=0.95, help="AdamW beta2 (official: 0.95)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=weight_decay, help="AdamW's (2-D weights only)")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="max global gradient norm")
    p.add_argument("--ema-decay", type=probability, default=ema_decay, help="EMA decay per step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the tokenizer: block by block)")
    p.add_argument("--data-on-device", action="store_true",
                   help="one process, small data sets: the data on the device, no loader (the same samples and draws)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --data-on-device on CUDA: replay each optimizer step as a CUDA graph after 3 eager ones")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0, help="GPU peak for MFU (H100 bf16: 989)")
    p.add_argument("--log-every", type=positive_int, default=100, help="print a log line every this many steps")
    p.add_argument("--ckpt-every", type=positive_int, default=5000, help="write the checkpoint every this many steps")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the init, data order, draws and dropout")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")


def add_data_args(p):
    """--data and --num-workers, for train_tokenizer.py and `train_ar.py extract`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # this rank's share of the usable cores
    p.add_argument("--data", required=True,
                   help="image folder (class sub-folders or flat), 'fashion-mnist', or a folder of its idx .gz files")
    p.add_argument("--num-workers", type=nonnegative_int, default=workers, help="loader workers per rank (at most 8)")


def check_cuda_graph(args, device):
    if args.cuda_graph and not args.data_on_device:
        raise ValueError("--cuda-graph captures the --data-on-device step: pass --data-on-device too")
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, not {device.type}")


def setup(args):
    """Checks the shared flags → rank, world size, device (DDP only under torchrun) and the checkpoint path."""
    rank, world, device = setup_device(args.device)
    if args.global_batch_size % (world * args.grad_accum):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} ranks × "
                         f"{args.grad_accum} micro-steps")
    if args.data_on_device and world > 1:
        raise ValueError("--data-on-device is the one-process fast path: launch without torchrun")
    check_cuda_graph(args, device)
    path = Path(args.out_dir) / "ckpt.pt"
    if args.resume and not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {args.out_dir}: cannot create it ({e.strerror})") from None
    check_writable(path)
    if rank == 0:
        lock_folder(path.parent, "--out-dir")
    if path.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"{path} already exists: pass --resume to continue it or --overwrite to replace it")
    if not args.resume:  # summary.json, written at a run's end, marks a finished run: not this one yet
        (path.parent / "summary.json").unlink(missing_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, device, path


def seed_of(*key):
    """A seed from a key of whole numbers (numpy's SeedSequence: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def generator(device, *key):
    return torch.Generator(device).manual_seed(seed_of(*key))


class Order:
    """Step s takes items (image indices, code rows) [s·B, (s+1)·B) of a stream holding each once per epoch, in an order
    drawn from (seed, epoch), kept on `device`; with views > 1 each in a random view v, row item + n·v."""

    def __init__(self, items, B, seed, device, views=1, n=0):
        self.items, self.B, self.seed, self.device = torch.as_tensor(items), B, seed, device
        self.views, self.n, self.epochs = views, n, {}

    def epoch(self, e):
        if e not in self.epochs:  # keeps the previous epoch's too: a step may straddle two
            self.epochs = {k: v for k, v in self.epochs.items() if k >= e - 1}
            g = generator("cpu", self.seed, ORDER, e)
            rows = self.items[torch.randperm(len(self.items), generator=g)]
            if self.views > 1:
                rows = rows + self.n * torch.randint(self.views, rows.shape, generator=g)
            self.epochs[e] = rows.to(self.device, non_blocking=True)  # once per epoch: the host does not wait
        return self.epochs[e]

    def __call__(self, step):
        m, first = len(self.items), step * self.B
        return torch.cat([self.epoch(e)[max(first - e * m, 0):first + self.B - e * m]
                          for e in range(first // m, (first + self.B - 1) // m + 1)])  # (B,)


def get_lr(step, lr, warmup, decay_start, total, min_lr=0.0):
    """Linear warm-up from 0 at step 0 (as the official tokenizer trainer), constant, then a linear decay from
    decay_start that reaches min_lr as the last step ends (paper §5: the AR model's last 50 of 300 epochs)."""
    if step < warmup:
        return lr * step / warmup
    if step < decay_start:
        return lr
    return min_lr + (lr - min_lr) * (total - step) / (total - decay_start)


class StepGraph:
    """One optimizer step as a CUDA graph. The first `warmup` calls run `step(batches)` eagerly on a side stream (real
    steps, which also compile and create AdamW's state), the next captures it and later ones replay it, reading
    copies of their micro-batches and returning outputs the next call overwrites. `step` must not wait for the GPU
    nor reseed: a replay draws from the default CUDA generator as seeded at its time, as an eager step does."""

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph = self.inputs = self.outputs = self.side = None

    def __call__(self, batches):
        if self.inputs is None:
            self.inputs = [tuple(v.clone() for v in micro) for micro in batches]
        else:
            torch._foreach_copy_([v for micro in self.inputs for v in micro], [v for micro in batches for v in micro])
        if self.calls < self.warmup:
            self.side = self.side or torch.cuda.Stream()
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")
                self.outputs = self.step(self.inputs)
            torch.cuda.current_stream().wait_stream(self.side)
        else:
            self.graph = self.graph or self.capture()
            self.graph.replay()
        self.calls += 1
        return self.outputs

    def capture(self):
        graph, self.outputs = cuda_graph(lambda: self.step(self.inputs), warmup=0)  # the eager calls were its warm-up
        return graph


class Trainer:
    """A run: the raw model (saved), the model to call (compiled; put in DDP here unless sharded), fused AdamW, the EMA
    (tensors, or None), the step, device-side sums for the log. `forward(m, *micro_batch)`, autocast to bf16 if asked,
    gives micro-batch m's terms (K,) named by `names`, the loss first. Only log, save and restore wait for the GPU."""

    def __init__(self, raw, model, forward, names, ema, args, device, kind, config, path, bf16=False):
        if dist.is_initialized() and dist.get_world_size() > 1 and not hasattr(raw, "set_requires_gradient_sync"):
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # not under FSDP
        self.raw, self.model, self.forward, self.ema, self.args = raw, model, forward, ema, args
        self.kind, self.config, self.path = kind, config, path
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        self.master = not dist.is_initialized() or dist.get_rank() == 0
        params = list(raw.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # as the official AR trainer
        self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(args.beta1, args.beta2), fused=True)
        self.opt.found_inf = torch.zeros((), device=device)  # 1.0: the fused kernel skips the whole update
        self.step = self.restore() if args.resume else 0
        for group in self.opt.param_groups:  # a captured step reads the lr from a tensor (a number would be frozen)
            group["capturable"] = args.cuda_graph
            group["lr"] = torch.zeros((), device=device) if args.cuda_graph else float(group["lr"])
        self.run = StepGraph(self.train_step) if args.cuda_graph else self.train_step
        self.names, self.sums = names + ["grad"], torch.zeros(len(names) + 1, device=device)
        self.skips, self.skip_run, self.longest = (torch.zeros((), device=device) for _ in range(3))
        self.steps, self.t0, self.lr, self.last = 0, time.time(), 0.0, {}
        if dist.is_initialized():  # where the ranks agree on a stop: on the host, so that none waits for its GPU
            self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def train_step(self, batches):
        """One optimizer step over this rank's micro-batches, skipped whole (weights, AdamW, EMA) where the loss or the
        gradient norm is not finite on some rank: (terms and gradient norm, skip flag) as device tensors."""
        terms = 0.0
        for m, micro in enumerate(batches):
            last = m == len(batches) - 1  # DDP and FSDP reduce the gradients of the last micro-step only
            if isinstance(self.model, DDP):
                self.model.require_backward_grad_sync = last
            elif hasattr(self.raw, "set_requires_gradient_sync"):
                self.raw.set_requires_gradient_sync(last)
            with self.autocast:
                parts = self.forward(m, *micro)  # (K,)
            (parts[0] / len(batches)).backward()
            terms = terms + parts.detach().float() / len(batches)
        params = list(self.raw.parameters())
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP
        skip = (~(torch.isfinite(terms[0]) & torch.isfinite(norm))).float()
        if dist.is_initialized():  # the same decision on every rank (asynchronous on the GPU)
            dist.all_reduce(skip, op=dist.ReduceOp.MAX)
        self.opt.found_inf.copy_(skip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # so a captured backward allocates them in the graph's pool
        if self.ema is not None:  # ema += (1 − decay)(1 − skip)(param − ema), the weight kept on the device
            delta = torch._foreach_sub([p.detach() for p in params], self.ema)
            torch._foreach_mul_(delta, (1 - self.args.ema_decay) * (1 - skip))
            torch._foreach_add_(self.ema, delta)
        return torch.cat([terms, norm.float()[None]]), skip

    def __call__(self, batches, lr):
        """Makes step self.step at this learning rate (a kernel where it is a tensor: the host does not wait)."""
        for group in self.opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.lr = lr
        terms, skip = self.run(batches)
        self.sums += torch.where(skip > 0, 0.0, terms)
        self.skips += skip
        self.skip_run.add_(1).mul_(skip)  # consecutive skips up to this step
        torch.maximum(self.longest, self.skip_run, out=self.longest)
        self.step, self.steps = self.step + 1, self.steps + 1

    def check(self):
        if self.longest.item() >= MAX_SKIPS:
            raise ValueError(f"stopped at step {self.step}: {self.longest.item():.0f} steps in a row had a non-finite "
                             f"loss or gradient norm and were skipped (at most {MAX_SKIPS - 1} allowed); lower --lr "
                             f"or check the data")

    def log(self, total, per_step, unit, flops=None, extra=""):
        """Prints (rank 0) the means since the last line over applied steps and ranks, the skips, the rate and MFU."""
        self.check()
        sums, world = self.sums.clone(), dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(sums)
        applied, rate = self.steps - int(self.skips.item()), self.steps * per_step / (time.time() - self.t0)
        means = (sums / (world * applied)).tolist() if applied else [float("nan")] * len(sums)
        self.last = dict(zip(self.names, means))
        if self.master:
            text = " | ".join(f"{k} {v:.4f}" for k, v in self.last.items())
            mfu = f" | MFU {flops * rate / (world * self.args.peak_tflops * 1e12):.1%}" if flops else ""
            print(f"step {self.step}/{total} | {text} | skipped {self.steps - applied} | lr {self.lr:.2e} | "
                  f"{rate:,.0f} {unit}/s{mfu}{extra}", flush=True)
        self.sums.zero_(), self.skips.zero_(), self.longest.copy_(self.skip_run)
        self.steps, self.t0 = 0, time.time()

    def restore(self):
        """Weights, EMA and optimizer from this script's checkpoint, whose config must equal the flags'; the step."""
        ckpt = load_checkpoint(self.path)  # weights_only: loading never runs code
        if not isinstance(ckpt, dict) or ckpt.get("kind") != self.kind or "optimizer" not in ckpt:
            raise ValueError(f"{self.path} is not a {self.kind} training checkpoint of this script")
        if ckpt["config"] != asdict(self.config):
            raise ValueError(f"{self.path} holds {ckpt['config']}, but the flags give {asdict(self.config)}")
        full = StateDictOptions(full_state_dict=True)
        if self.ema is not None:  # loaded through the model, so that it is sharded like the parameters
            set_model_state_dict(self.raw, ckpt["ema"] if ckpt["ema"] is not None else ckpt["model"], options=full)
            torch._foreach_copy_(self.ema, [p.detach() for p in self.raw.parameters()])
        set_model_state_dict(self.raw, ckpt["model"], options=full)
        set_optimizer_state_dict(self.raw, self.opt, ckpt["optimizer"], options=full)
        return ckpt["step"]

    def save(self):
        """Every rank takes part (a collective under FSDP), rank 0 writes; non-finite weights are never written."""
        self.check()
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in [*self.raw.parameters(), *(self.ema or [])]]
        finite = torch.stack([t.isfinite().all() for t in tensors]).float().min()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise ValueError(f"step {self.step}: non-finite weights; {self.path} keeps its checkpoint (lower --lr)")
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.raw, options=opts)
        ckpt = dict(kind=self.kind, config=asdict(self.config), model=state, ema=None, step=self.step,
                    optimizer=get_optimizer_state_dict(self.raw, self.opt, options=opts), args=vars(self.args))
        if self.ema is not None:
            full = [e.full_tensor() if hasattr(e, "full_tensor") else e for e in self.ema]
            ckpt["ema"] = {**state, **{name: e.cpu() for (name, _), e in zip(self.raw.named_parameters(), full)}}
        if self.master:
            atomic_save(self.path, lambda f: torch.save(ckpt, f))
        if dist.is_initialized():
            dist.barrier()

    def stop_signal(self):
        """The signal that asked any rank to stop ('SIGTERM', 'SIGINT'), or None: the same answer on every rank."""
        name = interrupted()
        if not dist.is_initialized():
            return name
        names = [None, "SIGTERM", "SIGINT"]
        flag = torch.tensor(names.index(name))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.host_group)
        return names[flag]

    def checkpoint(self, end):
        """After a step: the checkpoint every --ckpt-every steps and at the end; after SIGTERM or Ctrl-C (inside
        data.interruptible) also now, and then the run stops, saying how it goes on."""
        stop = self.stop_signal() if self.step < end else None
        if self.step % self.args.ckpt_every == 0 or self.step == end or stop:
            self.save()
        if stop:
            raise Interrupted(f"stopped by {stop} after step {self.step}/{end}: {self.path} holds it; the same command "
                              f"with --resume continues the run exactly")

    def finish(self, **figures):
        """Writes <out-dir>/summary.json: the last step, the last logged mean loss and `figures`."""
        if self.master and self.last:
            write_json(self.path.parent / "summary.json", dict(step=self.step, loss=self.last["loss"], **figures))
        if dist.is_initialized():
            dist.destroy_process_group()
