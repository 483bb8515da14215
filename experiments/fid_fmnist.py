"""FID-10k on Fashion-MNIST, the one protocol behind every FID-10k in docs/results.md: 10,000 images (1,000 per
class for samples) against the 10,000 test images, padded to 32×32 RGB as in training, through evaluate.py's
Inception (ADM's features and resize); the floor is the first 10,000 training images against the same test images.

    python experiments/fid_fmnist.py --floor --recon --cfg 1 1.25 1.5 2 3 1,3 --seeds 0 1 \
        --out experiments/results/fid_shipped.json

--recon: the tokenizer's reconstructions of the 10,000 test images (rFID-10k, PSNR, class kept); --cfg: samples at
each guidance setting (a scale, or a linear ramp `a,b` as in sample.py) for each --temperature, --seed, --solver and
--steps. Each row also gives sFID, precision / recall (k = 3) and the class accuracy of evaluate.py's classifier.
The gap between the samples' FID and the reconstructions' says which stage holds a model back: the AR model cannot
draw better tokens than the tokenizer decodes.
"""
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import sample  # noqa: E402
from data import (CHECKPOINTS, ArgumentParser, check_writable, exit_on_error, fmnist_rgb32,  # noqa: E402
                  from_uint8, load_fashion_mnist, positive_float, positive_int, seed_int, setup_device, write_json)
from tokenizer import Tokenizer  # noqa: E402

N = 10_000  # images a side


class Judge:
    """Inception features of the test images, computed once, and the metrics of any 10,000 images against them."""

    def __init__(self, device, fmnist_dir=None):
        self.net = evaluate.load_inception(evaluate.find_inception_weights()).to(device)
        self.classifier = evaluate.load_fmnist_classifier(root=fmnist_dir).to(device)
        self.fmnist_dir = fmnist_dir
        test = fmnist_rgb32(load_fashion_mnist("test", fmnist_dir)[0])  # (10000, 32, 32, 3) uint8
        feats = self.features(test)
        self.ref = dict(pool=feats["pool"], **self.moments(feats))

    def features(self, images, batch_size=500):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        return evaluate.extract_features(self.net, batches, len(images))

    @staticmethod
    def moments(feats):
        (mu, sigma), (mu_s, sigma_s) = evaluate.statistics(feats["pool"]), evaluate.statistics(feats["spatial"])
        return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

    def __call__(self, images, labels=None):
        """uint8 images (N, 32, 32, 3), their intended classes (N,) or None -> FID-10k, sFID, precision, recall,
        class accuracy."""
        if images.shape != (N, 32, 32, 3):
            raise ValueError(f"the protocol takes {N} images of 32 x 32 x 3, got {images.shape}")
        feats = self.features(images)
        m = self.moments(feats)
        device = next(self.net.buffers()).device
        precision, recall = evaluate.precision_recall(*(torch.from_numpy(p).to(device)
                                                        for p in (self.ref["pool"], feats["pool"])))
        out = {"FID": evaluate.frechet_distance(self.ref["mu"], self.ref["sigma"], m["mu"], m["sigma"]),
               "sFID": evaluate.frechet_distance(self.ref["mu_s"], self.ref["sigma_s"], m["mu_s"], m["sigma_s"]),
               "precision": precision, "recall": recall}
        if labels is not None:
            predicted = torch.cat([self.classifier.classify(from_uint8(b)) for b in np.split(images, 20)])
            out["class accuracy"] = (predicted.numpy() == np.asarray(labels)).mean().item()
        return out


def floor(judge):
    x, y = load_fashion_mnist("train", judge.fmnist_dir)
    return judge(fmnist_rgb32(x[:N]), y[:N])


def reconstruction(judge, tok, seed, solver, steps, batch_size=500):
    """rFID-10k, PSNR and class kept of the tokenizer's reconstructions of the test images."""
    x, y = load_fashion_mnist("test", judge.fmnist_dir)
    batches = torch.from_numpy(fmnist_rgb32(x)).split(batch_size)
    pairs = list(evaluate.reconstructions(tok, batches, seed=seed, mode="tf32", solver=solver,
                                                 steps=steps))
    recon = torch.cat([r for _, r in pairs]).cpu().numpy()
    psnr = evaluate.mean_pixel_metrics([evaluate.pixel_metrics(a, r) for a, r in pairs], "skimage")["PSNR"]
    return {**judge(recon, y), "PSNR": psnr}


def samples(judge, tok, gpt, cfg_scale, temperature, seed, solver, steps, batch_size=1000):
    """10,000 samples, 1,000 per class (class i at indices i, i + 10, ...), as sample.py --labels 0 1 ... 9."""
    labels = torch.arange(10).repeat(N // 10)
    images, _ = sample.sample_indices(gpt, tok, labels, torch.arange(N), seed=seed, batch_size=batch_size,
                                      graph=tok.quantize.embedding.weight.is_cuda, progress=False,
                                      cfg_scale=cfg_scale, temperature=temperature, top_k=0, top_p=1.0, solver=solver,
                                      steps=steps, prefix=None, keep_previews=False, decoder_precision="tf32")
    return judge(images, labels)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-ckpt", default=str(CHECKPOINTS / "tokenizer_fmnist.pt"))
    p.add_argument("--gpt-ckpt", default=str(CHECKPOINTS / "gpt_fmnist.pt"))
    p.add_argument("--gpt-model", default=None, help="GPT preset, if the checkpoint does not name its config")
    p.add_argument("--floor", action="store_true", help="10,000 training images against the test images")
    p.add_argument("--recon", action="store_true", help="the tokenizer's reconstructions of the test images")
    p.add_argument("--cfg", nargs="*", type=sample.cfg_scale_arg, default=[], help="guidance settings of samples")
    p.add_argument("--temperature", nargs="+", type=positive_float, default=[1.0],
                   help="softmax temperatures of the samples (labelled when not 1)")
    p.add_argument("--seeds", nargs="+", type=seed_int, default=[0], help="sampling seeds (and reconstruction noise)")
    p.add_argument("--solver", nargs="+", choices=["adams2", "euler"], default=["adams2"],
                   help="the pixel decoder's ODE solver; several: every set with each (labelled when not Adams-2)")
    p.add_argument("--steps", nargs="+", type=positive_int, default=[None],
                   help="solver steps (default: the tokenizer's); several: every set with each (labelled when given)")
    p.add_argument("--out", default=None, help="JSON file of the rows")
    p.add_argument("--device", default=None)
    exit_on_error("fid_fmnist.py", run, p.parse_args(argv))


def run(args):
    _, _, device = setup_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # sample.py's default
    if args.out:
        check_writable(args.out, (".json",))
    # a bad file ends the run before the Inception features of the test images; reconstructions need no GPT
    if args.cfg:
        tok, gpt = sample.load_models(args.tokenizer_ckpt, args.gpt_ckpt, args.gpt_model, dtype, device)
        tok.eval(), gpt.eval()
    elif args.recon:
        tok = Tokenizer.from_checkpoint(args.tokenizer_ckpt).to(device).eval()
    judge = Judge(device)
    rows = []

    def row(what, metrics, t0):
        rows.append(dict(what=what, **metrics, seconds=round(time.time() - t0, 1)))
        print(" | ".join([what] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in rows[-1].items() if k != "what"]), flush=True)
        if args.out:
            write_json(args.out, rows)

    if args.floor:
        t0 = time.time()
        row(f"floor: {N:,} training images", floor(judge), t0)
    for solver, steps in itertools.product(args.solver, args.steps):
        tag = ("" if solver == "adams2" else f", {solver}") + ("" if steps is None else f", {steps} steps")
        if args.recon:
            for seed in args.seeds:
                t0 = time.time()
                row(f"reconstructions{tag}, seed {seed}", reconstruction(judge, tok, seed, solver, steps), t0)
        for cfg, temperature, seed in itertools.product(args.cfg, args.temperature, args.seeds):
            t0 = time.time()
            what = f"samples{tag}, CFG {cfg}" + ("" if temperature == 1 else f", temperature {temperature:g}")
            row(f"{what}, seed {seed}", samples(judge, tok, gpt, cfg, temperature, seed, solver, steps), t0)


if __name__ == "__main__":
    main()
