"""The paper's ablations at small scale: Tables 2, 4, 5, 6, 7 and Figure 7 re-run on Fashion-MNIST, over seeds.

    python experiments/ablations.py table2                    # one study, seeds 0 1 2: trains, samples, measures
    python experiments/ablations.py all                       # every study, one after the other
    python experiments/ablations.py table7 --seeds 0 --stage sample     # on a GPU machine: train and sample only
    python experiments/ablations.py table7 --seeds 1 2 --stage sample   # ... the other seeds in another session
    python experiments/ablations.py table7 --stage metrics    # then the metrics of all three seeds
    python experiments/ablations.py table4 --recipe gpu       # quicker: 4,000-step tokenizers, sets of 2,000
    python experiments/ablations.py all --recipe tiny --seeds 0 1 --out-dir /tmp/abl  # the pipeline quickly

A seed retrains what the study varies: the tokenizer-side studies (table2, table6, figure7) retrain the tokenizers
(and figure7 the AR models on them) per seed; the AR-side studies (table4, table5, table7) retrain the AR models per
seed on one shared tokenizer, the seed-0 baseline. Each study writes out-dir/results_<table>.json and <table>.md
(ours: experiments/results/): our numbers, mean ± sd over the seeds, beside the paper's (ImageNet 256 px, D-AR-L
unless noted), and verdicts on the paper's claims, each a list of pairwise comparisons: "holds" when the paper's
direction shows in the mean per-seed difference by more than two standard errors, "reversed" when the opposite does,
"within noise" otherwise. out-dir/summary.md gathers the claims of every study measured so far. The models are
trained by train_tokenizer.py and train_ar.py, run as a user would, into out-dir/models/ (a training cut short
resumes when the command is repeated); out-dir/sets/ holds the image sets (.npz, uint8 NHWC) and the models' final
figures (.json), all that --stage metrics reads. Metrics are evaluate.py's (docs/results.md says which).
"""
import copy
import gzip
import hashlib
import json
import math
import subprocess
import sys
from collections import namedtuple
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the models, the sampler and the metrics live in the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402

import evaluate  # noqa: E402
import sample  # noqa: E402
from data import (ArgumentParser, atomic_save, fmnist_dir, fmnist_rgb32, from_uint8, load_fashion_mnist,  # noqa: E402
                  nonnegative_int, setup_device, write_json)
from tokenizer import Tokenizer  # noqa: E402

PROG = "ablations.py"


@dataclass(frozen=True)
class Recipe:
    """The trainers' flags (presets, steps, batch, lr), passed unchanged, and the images per set."""
    tokenizer: tuple  # train_tokenizer.py flags, besides --data --out-dir --seed --time-shift --groups
    extract: tuple  # train_ar.py extract flags, besides --tokenizer-ckpt --data --out
    ar: tuple  # train_ar.py train flags, besides --codes --out-dir --seed --reverse-order
    fid_images: int  # samples per set, and real images in the FID reference and in the floor
    reconstruction_images: int  # test images reconstructed per set (rFID, PSNR, class kept)
    batch_size: int  # sampling and reconstruction batch
    features: str = "inception"  # "pixels": 2x2 mean gray levels, a stand-in that spares the tiny recipe Inception
    train_images: int = 0  # > 0: train on the first n training images only (a subset written into out-dir)


RECIPES = {
    # the README's GPU recipe, the shipped model's (tokenizers at its reconstruction quality), and sets of 10,000: the
    # FID-10k protocol of docs/results.md (all the test images as the reference, 1,000 samples per class)
    "shipped": Recipe(
        tokenizer=("--preset", "fmnist", "--global-batch-size", "512", "--max-steps", "18000", "--lr", "1.6e-3",
                   "--decay-steps", "3600", "--lpips-weight", "0", "--repa-weight", "0", "--compile",
                   "--data-on-device", "--cuda-graph", "--ckpt-every", "1000", "--show-every", "18000",
                   "--log-every", "500"),
        extract=("--views", "single", "--batch-size", "1000"),
        ar=("--gpt-model", "GPT-fmnist", "--global-batch-size", "512", "--epochs", "100", "--decay-epochs", "25",
            "--lr", "6e-4", "--ema", "--ema-decay", "0.999", "--compile", "--data-on-device", "--cuda-graph",
            "--log-every", "500", "--ckpt-every", "2000"),
        fid_images=10000, reconstruction_images=10000, batch_size=1000),
    # one GPU, quick: tokenizers of 4,000 steps (reconstructions far from the shipped one's), sets of 2,000
    "gpu": Recipe(
        tokenizer=("--preset", "fmnist", "--global-batch-size", "512", "--max-steps", "4000", "--lr", "8e-4",
                   "--lpips-weight", "0", "--repa-weight", "0", "--compile", "--data-on-device", "--cuda-graph",
                   "--ckpt-every", "1000", "--show-every", "4000", "--log-every", "250"),
        extract=("--views", "flip", "--batch-size", "1000"),
        ar=("--gpt-model", "GPT-fmnist", "--global-batch-size", "512", "--epochs", "40", "--decay-epochs", "10",
            "--lr", "6e-4", "--ema", "--ema-decay", "0.999", "--compile", "--data-on-device", "--cuda-graph",
            "--log-every", "100", "--ckpt-every", "2000"),
        fid_images=2000, reconstruction_images=2000, batch_size=500),
    # the laptop recipe as first measured (16 tokens in 8 groups of 2); with EMA decay 0.999 the EMA of 3,600
    # steps would still be near the initial weights
    "cpu": Recipe(
        tokenizer=("--preset", "fmnist-cpu", "--global-batch-size", "64", "--max-steps", "3600", "--lr", "1e-3",
                   "--warmup-steps", "100", "--ema-decay", "0.99", "--lpips-weight", "0", "--repa-weight", "0",
                   "--data-on-device", "--ckpt-every", "900", "--show-every", "1800", "--log-every", "300"),
        extract=("--views", "single", "--batch-size", "500"),
        ar=("--gpt-model", "GPT-fmnist-cpu", "--global-batch-size", "128", "--epochs", "6", "--decay-epochs", "2",
            "--lr", "1e-3", "--data-on-device", "--log-every", "200", "--ckpt-every", "1000"),
        fid_images=500, reconstruction_images=500, batch_size=100),
    # the tests: a few steps of the tiny presets on 64 images, sets of 8 images, pixel features
    "tiny": Recipe(
        tokenizer=("--preset", "tiny", "--global-batch-size", "8", "--max-steps", "2", "--lr", "1e-3",
                   "--warmup-steps", "0", "--lpips-weight", "0", "--repa-weight", "0", "--data-on-device",
                   "--ckpt-every", "2", "--show-every", "2", "--num-show", "1", "--log-every", "1"),
        extract=("--views", "flip", "--batch-size", "64", "--num-workers", "0"),
        ar=("--gpt-model", "GPT-tiny", "--global-batch-size", "16", "--epochs", "1", "--decay-epochs", "0",
            "--lr", "1e-3", "--data-on-device", "--log-every", "1", "--ckpt-every", "100"),
        fid_images=8, reconstruction_images=8, batch_size=8, features="pixels", train_images=64),
}


def run_script(*argv):
    """python SCRIPT ARGS from the repository root, as a user would run it; its output goes to the console."""
    print(f"{PROG}: python {' '.join(argv)}", flush=True)
    if subprocess.run([sys.executable, *argv], cwd=ROOT).returncode:
        raise SystemExit(f"{PROG}: error: {' '.join(argv[:2])} ... failed (its messages are above)")


def train_once(folder, *argv):
    """Runs a trainer into folder unless its summary.json says that it finished; a checkpoint without a summary
    is a training cut short, continued with --resume. Returns the summary."""
    if not (folder / "summary.json").is_file():
        run_script(*argv, *(["--resume"] if (folder / "ckpt.pt").is_file() else []))
    return summary(folder)


def summary(folder):
    """The final figures a trainer writes at its end: step, loss and, for a tokenizer, codebook_used (percent)."""
    return json.loads((folder / "summary.json").read_text())


SHARED_TOKENIZER_SEED = 0  # the AR-side studies' tokenizer: the baseline the tokenizer-side studies train as seed 0


def tokenizer_name(shift=2, groups=8, seed=0):
    return f"tok-s{shift:g}-k{groups}-seed{seed}"


def ar_name(shift=2, groups=8, reverse=False, tok_seed=0, seed=0):
    """The AR model of `seed` on the codes of the tokenizer of `tok_seed`."""
    return f"ar-s{shift:g}-k{groups}" + ("-reversed" if reverse else "") + f"-tok{tok_seed}-seed{seed}"


class Workspace:
    """out-dir: trains, samples and measures on demand, reusing what an earlier run completed. With stage 'metrics'
    nothing is trained or sampled: the sets must be there. A set is (kind, name): Metrics.measure's arguments.
    Models and sets carry their seeds in their names: seeded() gives the workspace of one seed of a study."""

    def __init__(self, out_dir, recipe_name, device, stage):
        self.out, self.recipe_name, self.stage = Path(out_dir).resolve(), recipe_name, stage
        self.recipe = RECIPES[recipe_name]
        self.device_flag = [] if device is None else ["--device", device]
        self.device = setup_device(device)[2]
        self.sets = self.out / "sets"
        self.sets.mkdir(parents=True, exist_ok=True)
        run = {"recipe": recipe_name, "settings": json.loads(json.dumps(asdict(self.recipe)))}
        old = json.loads((self.out / "run.json").read_text()) if (self.out / "run.json").is_file() else run
        if old != run:  # an out-dir of one seed, as this script wrote before --seeds, has a "seed" key
            raise ValueError(f"--out-dir {out_dir} holds a run of recipe {old.get('recipe')} with other settings (or "
                             f"of one seed, without the seeds in the models' names): use another --out-dir")
        write_json(self.out / "run.json", run)
        self.data_root = self.prepare_data()

    def seeded(self, seed, side):
        """This workspace for one seed of a study of `side`: "tokenizer" retrains the tokenizers (and the AR models
        on them) per seed; "ar" retrains the AR models only, on the shared tokenizer, so that the seeds' spread is
        the AR model's own."""
        ws = copy.copy(self)
        ws.tok_seed, ws.ar_seed = (seed, seed) if side == "tokenizer" else (SHARED_TOKENIZER_SEED, seed)
        return ws

    def tok_name(self, shift, groups):
        return tokenizer_name(shift, groups, self.tok_seed)

    def ar_name(self, shift, groups, reverse):
        return ar_name(shift, groups, reverse, self.tok_seed, self.ar_seed)

    def prepare_data(self):
        """Fashion-MNIST's folder; with recipe.train_images, a folder of the same .gz files holding the first
        images of each split only (the trainers read it like the full set)."""
        n = self.recipe.train_images
        if not n:
            return fmnist_dir().resolve()  # the trainers run from the repository root
        root = self.out / "data"
        m = max(self.recipe.fid_images, self.recipe.reconstruction_images)
        for split, prefix, count in (("train", "train", n), ("test", "t10k", m)):
            if not (root / f"{prefix}-labels-idx1-ubyte.gz").is_file():
                images, labels = load_fashion_mnist(split)
                write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, images[:count])
                write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels[:count].astype(np.uint8))
        return root

    def tokenizer(self, shift=2, groups=8):
        """The folder of the tokenizer with time shift β = shift and K = groups token groups (paper §3.1)."""
        folder = self.out / "models" / self.tok_name(shift, groups)
        train_once(folder, "train_tokenizer.py", *self.recipe.tokenizer, "--data", str(self.data_root),
                   "--out-dir", str(folder), "--seed", str(self.tok_seed), "--time-shift", f"{shift:g}",
                   "--groups", str(groups), *self.device_flag)
        return folder

    def ar(self, shift=2, groups=8, reverse=False):
        """The folder of the AR model on the codes of that tokenizer (fine-to-coarse with reverse, paper A.5)."""
        tok = self.tokenizer(shift, groups) / "ckpt.pt"
        codes = self.out / "models" / f"codes-{self.tok_name(shift, groups)}"
        meta = codes / "meta.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
            run_script("train_ar.py", "extract", "--tokenizer-ckpt", str(tok), "--data", str(self.data_root),
                       "--out", str(codes), *self.recipe.extract, *self.device_flag)
        folder = self.out / "models" / self.ar_name(shift, groups, reverse)
        train_once(folder, "train_ar.py", "train", *self.recipe.ar, "--codes", str(codes), "--out-dir", str(folder),
                   "--seed", str(self.ar_seed), *(["--reverse-order"] if reverse else []), *self.device_flag)
        return folder

    def made(self, kind, name, make):
        path = self.sets / name
        if not path.is_file():
            if self.stage == "metrics":
                raise FileNotFoundError(f"{path}: no such set; run this table with --stage sample (or all) first")
            content = make()
            if path.suffix == ".json":
                write_json(path, content)
            else:
                atomic_save(path, lambda f: np.savez_compressed(f, **content))
        return kind, name

    def images(self, split, n):
        images, labels = load_fashion_mnist(split, self.data_root)
        return fmnist_rgb32(images[:n]), labels[:n]

    def samples(self, cfg_scale, shift=2, groups=8, reverse=False, previews=False):
        """recipe.fid_images samples (classes in turn) of that AR model at guidance `cfg_scale` ("a" or a ramp
        "a,b"), drawn as sample.py draws them (a batch seeded with the AR seed + the index of its first sample);
        with previews also the previews after 1/4, 1/2 and 3/4 of the solver steps (paper Table 5)."""
        name = f"gen-{self.ar_name(shift, groups, reverse)}-cfg{cfg_scale.replace(',', '-')}"
        name += "-previews.npz" if previews else ".npz"

        def make():
            tok_ckpt, gpt_ckpt = self.tokenizer(shift, groups) / "ckpt.pt", self.ar(shift, groups, reverse) / "ckpt.pt"
            tok, gpt = sample.load_models(tok_ckpt, gpt_ckpt, None, torch.float32, self.device)
            n = self.recipe.fid_images
            labels = torch.arange(n) % gpt.config.num_classes
            images, strips = sample.sample_indices(
                gpt, tok, labels, torch.arange(n), seed=self.ar_seed, batch_size=self.recipe.batch_size, graph=None,
                progress=False, cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=1.0, solver="adams2",
                prefix=None, keep_previews=previews, decoder_precision="fp32")  # strict fp32, as the published tables
            out = dict(arr_0=images, arr_1=labels.numpy())
            if previews:  # (n, 3, H, W, 3)
                S = strips.shape[1]
                out["previews"] = strips[:, [S // 4 - 1, S // 2 - 1, 3 * S // 4 - 1]]
            return out
        return self.made("generation", name, make)

    def reconstructions(self, solver, steps, shift=2, groups=8):
        """The first recipe.reconstruction_images test images reconstructed by that tokenizer, decoded with
        `solver` in `steps` steps (evaluate.reconstruct_uint8, fp32, noise from the tokenizer's seed)."""
        def make():
            tok = Tokenizer.from_checkpoint(self.tokenizer(shift, groups) / "ckpt.pt").to(self.device).eval()
            images, labels = self.images("test", self.recipe.reconstruction_images)
            generator = torch.Generator(self.device).manual_seed(self.tok_seed)
            B = self.recipe.batch_size
            out = [evaluate.reconstruct_uint8(tok, torch.from_numpy(images[i:i + B]).to(self.device), solver, steps,
                                              generator=generator).cpu() for i in range(0, len(images), B)]
            return dict(arr_0=torch.cat(out).numpy(), arr_1=labels)
        return self.made("reconstruction", f"recon-{self.tok_name(shift, groups)}-{solver}-{steps}.npz", make)

    def codebook_use(self, shift=2, groups=8):
        """The share of the codebook in use at the end of that tokenizer's training (paper Table 6)."""
        return self.made("numbers", f"usage-{self.tok_name(shift, groups)}.json",
                         lambda: {"Codebook use": summary(self.tokenizer(shift, groups))["codebook_used"] / 100})

    def ar_loss(self, shift=2, groups=8, reverse=False):
        """The AR model's final training loss (paper Figure 7)."""
        return self.made("numbers", f"loss-{self.ar_name(shift, groups, reverse)}.json",
                         lambda: {"AR loss": summary(self.ar(shift, groups, reverse))["loss"]})


def write_idx(path, magic, array):
    """An idx file as Fashion-MNIST ships them: big-endian magic, sizes, then the uint8 data, gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    atomic_save(path, lambda f: f.write(gzip.compress(header + array.tobytes())))


class Metrics:
    """FID / precision / recall against the first fid_images test images, class accuracy, rFID / PSNR / class
    kept, and the models' numbers, for the sets of one workspace. Features are cached by the images' hash."""

    def __init__(self, ws):
        self.ws, self.net = ws, None
        self.cache = ws.out / "features"
        self.cache.mkdir(exist_ok=True)
        self.classifier = evaluate.load_fmnist_classifier(root=ws.data_root)
        self.reference = self.features(ws.images("test", ws.recipe.fid_images)[0])

    def features(self, images):
        """uint8 (N, H, W, 3) → (N, D) float: Inception-v3 pool_3 (D = 2048), or the mean gray level in [0, 1] of
        each quarter of the image (D = 4)."""
        key = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:20]
        path = self.cache / f"{self.ws.recipe.features}-{key}.npy"
        if path.is_file():
            return np.load(path)
        if self.ws.recipe.features == "pixels":
            gray = torch.from_numpy(images).float().mean(-1)[:, None] / 255  # N, 1, H, W
            feats = torch.nn.functional.adaptive_avg_pool2d(gray, 2).flatten(1).numpy()
        else:
            if self.net is None:
                self.net = evaluate.load_inception(evaluate.find_inception_weights()).to(self.ws.device)
            batches = (images[i:i + 100] for i in range(0, len(images), 100))
            feats = evaluate.extract_features(self.net, batches, len(images))["pool"]
        atomic_save(path, lambda f: np.save(f, feats))
        return feats

    def fid(self, images):
        feats = self.features(images)
        precision, recall = evaluate.precision_recall(torch.from_numpy(self.reference), torch.from_numpy(feats))
        fid = evaluate.frechet_distance(*evaluate.statistics(self.reference), *evaluate.statistics(feats))
        return {"FID": fid, "Precision": precision, "Recall": recall}

    def accuracy(self, images, labels):
        predicted = torch.cat([self.classifier.classify(from_uint8(images[i:i + 500]))
                               for i in range(0, len(images), 500)])
        return (predicted.numpy() == labels).mean().item()

    def measure(self, kind, name, preview=None):
        """The numbers of one set (of its images, or of its previews[:, preview])."""
        path = self.ws.sets / name
        if kind == "numbers":
            return json.loads(path.read_text())
        with np.load(path, allow_pickle=False) as f:
            images, labels = (f["arr_0"] if preview is None else f["previews"][:, preview]), f["arr_1"]
        if kind == "generation":
            return {**self.fid(images), "Class accuracy": self.accuracy(images, labels)}
        originals = self.ws.images("test", len(images))[0]
        psnr, _ = evaluate.pixel_metrics(torch.from_numpy(originals), torch.from_numpy(images))
        rfid = evaluate.frechet_distance(*evaluate.statistics(self.features(originals)),
                                         *evaluate.statistics(self.features(images)))
        return {"rFID": rfid, "PSNR": psnr.mean().item(), "Class kept": self.accuracy(images, labels)}


RAMP, REVERSED_RAMP = "1.1,4.0", "4.0,1.1"  # the linear CFG ramps for Fashion-MNIST (see table4's note)
CFG = {"1.0": "1.0", "1.5": "1.5", "1.75": "1.75", RAMP: "1.1→8.0", REVERSED_RAMP: "8.0→1.1"}  # ours → the paper's

GEN = ("FID", "Precision", "Recall")  # the paper's columns of generation

# the paper's numbers (ImageNet 256): Table 2, rFID per solver and number of steps
PAPER_TABLE2 = {("euler", 4): 2.35, ("euler", 8): 1.58, ("adams2", 8): 1.52, ("euler", 12): 1.73,
                ("euler", 16): 1.93}
# Table 4, D-AR-L: FID, precision, recall per CFG schedule (IS is not measured: the Inception weights at hand
# have no classifier layer); the same rows open Table 7
PAPER_TABLE4 = {"1.0": (7.43, 0.71, 0.63), "1.5": (3.50, 0.83, 0.54), "1.75": (4.70, 0.86, 0.50),
                "1.1→8.0": (2.44, 0.78, 0.61)}
# Table 5, D-AR-L at 1.1→8.0: previews after 64, 128, 192 and 256 of the 256 tokens (2, 4, 6, 8 steps)
PAPER_TABLE5 = [(7.38, 0.74, 0.48), (3.94, 0.78, 0.54), (2.93, 0.80, 0.57), (2.44, 0.78, 0.61)]
# Table 6, the 113M ablation tokenizer (50k iterations): rFID and codebook use per time shift β
PAPER_TABLE6 = {1: (39.75, 0.978), 2: (28.65, 0.994), 4: (27.10, 0.998)}
# Figure 7: tokenizer rFID and D-AR-B gFID (100k iterations) per number of token groups K
PAPER_FIGURE7 = {1: (8.37, 34.85), 4: (9.66, 34.54), 8: (14.18, 35.69), 16: (22.58, 41.20)}
# Table 7, reversed D-AR-L (the normal rows are Table 4's)
PAPER_TABLE7 = {"1.0": (11.22, 0.68, 0.62), "1.5": (4.17, 0.84, 0.50), "1.75": (5.83, 0.88, 0.44),
                "1.1→8.0": (9.79, 0.90, 0.40), "8.0→1.1": (21.15, 0.85, 0.15)}


# A study's row: its label (in verdicts and the summary), its setting (in the table), the paper's numbers (in the
# study's columns) and its sets.
Row = namedtuple("Row", "label setting paper sets")


def cfg_label(cfg):
    return f"CFG {cfg.replace(',', '→')}"


def cfg_setting(cfg):
    return cfg_label(cfg) + (f" (paper {CFG[cfg]})" if "," in cfg else "")


def table2(ws):
    solver = {"euler": "Euler", "adams2": "Adams-2"}
    return [Row(f"{solver[s]} {n} steps", f"{solver[s]}, {n} steps", (rfid,), [ws.reconstructions(s, n)])
            for (s, n), rfid in PAPER_TABLE2.items()]


def table4(ws):
    return [Row(cfg_label(cfg), cfg_setting(cfg), PAPER_TABLE4[CFG[cfg]], [ws.samples(cfg)])
            for cfg in ("1.0", "1.5", "1.75", RAMP)]


def table5(ws):
    kind, name = ws.samples(RAMP, previews=True)
    return [Row(f"{q}/4 of the tokens", f"{q}/4 of the tokens", PAPER_TABLE5[q - 1],
                [(kind, name, q - 1) if q < 4 else (kind, name)]) for q in (1, 2, 3, 4)]


def table6(ws):
    return [Row(f"β = {b}", f"β = {b}", PAPER_TABLE6[b], [ws.reconstructions("adams2", 8, shift=b), ws.codebook_use(b)])
            for b in (1, 2, 4)]


def figure7(ws):
    return [Row(f"K = {k}", f"K = {k}", PAPER_FIGURE7[k], [ws.reconstructions("adams2", max(k, 8), groups=k),
                                                            ws.samples(RAMP, groups=k), ws.ar_loss(groups=k)])
            for k in (1, 4, 8, 16)]


def table7(ws):
    return [Row(f"{order} {cfg_label(cfg)}", f"{order}, {cfg_setting(cfg)}", paper.get(CFG[cfg]),
                [ws.samples(cfg, reverse=order == "reversed")])
            for order, paper in (("normal", PAPER_TABLE4), ("reversed", PAPER_TABLE7)) for cfg in CFG]


# ---- verdicts: does the paper's direction show here, beyond the noise of the seeds?

LOWER_IS_BETTER = {"rFID", "FID", "AR loss"}  # of the metrics that claims compare; codebook use: higher is better
UNTESTED = "untested (1 seed)"  # one seed gives no estimate of the noise, so no verdict

# A claim of the paper: in `metric`, row a is better than row b, for each pair (a, b) of row labels.
Claim = namedtuple("Claim", "text metric pairs")


def ordered(*labels):
    """The pairs saying that each row is better than the next."""
    return list(zip(labels, labels[1:]))


def beats(winner, *others):
    return [(winner, other) for other in others]


def compare(a_values, b_values, lower_is_better):
    """Is a better than b? From per-seed values, paired (a seed's two numbers come from that seed's models): the
    per-seed differences, signed so that the paper's direction is positive, give the mean difference and its
    standard error (sd / √n). Returns (verdict, difference, 2 SE): "holds" when the difference exceeds 2 SE,
    "reversed" when it is below -2 SE, "within noise" otherwise; UNTESTED (2 SE None) with one seed."""
    d = np.subtract(b_values, a_values) if lower_is_better else np.subtract(a_values, b_values)
    if len(d) < 2:
        return UNTESTED, float(d.mean()), None
    difference, two_se = float(d.mean()), float(2 * d.std(ddof=1) / math.sqrt(len(d)))
    verdict = "holds" if difference > two_se else "reversed" if difference < -two_se else "within noise"
    return verdict, difference, two_se


def overall(verdicts):
    """A claim's verdict from its comparisons' (or a study's from its claims'): holds if all hold, reversed if any
    is reversed, within noise otherwise."""
    for verdict in (UNTESTED, "reversed"):
        if verdict in verdicts:
            return verdict
    return "holds" if all(v == "holds" for v in verdicts) else "within noise"


def rounded(value, spread, sign=""):
    """`value` to the precision that `spread` (a noise) allows: its two significant digits; 4 digits without one."""
    if not spread or not math.isfinite(spread):
        return f"{value:{sign}.4g}".replace("-", "−")
    return f"{value:{sign}.{max(0, 1 - math.floor(math.log10(spread)))}f}".replace("-", "−")


def mean_sd(values):
    """'mean ± sd' over the seeds; the value alone for one seed."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return rounded(mean, None)
    sd = float(np.std(values, ddof=1))
    return f"{rounded(mean, sd)} ± {rounded(sd, sd)}"


def comparison(metric, a, b, values):
    """One pair of a claim, judged: its verdict and the line that says which numbers it compared."""
    verdict, difference, two_se = compare(values[a], values[b], metric in LOWER_IS_BETTER)
    line = f"{a} {metric} {mean_sd(values[a])} vs {b} {mean_sd(values[b])}: {verdict}"
    if two_se is not None:
        line += f" (difference {rounded(difference, two_se, '+')}, 2 SE {rounded(two_se, two_se)})"
    return {"a": a, "b": b, "difference": difference, "two se": two_se, "verdict": verdict, "line": line}


def judge(study, values):
    """The study's claims against our numbers, values = {metric: {row label: [value per seed]}}: a list of
    {claim, metric, rows (the labels it compares), verdict, comparisons}."""
    judged = []
    for claim in study.claims:
        comparisons = [comparison(claim.metric, a, b, values[claim.metric]) for a, b in claim.pairs]
        labels = {label for pair in claim.pairs for label in pair}
        judged.append({"claim": claim.text, "metric": claim.metric,
                       "rows": [label for label in values[claim.metric] if label in labels],
                       "verdict": overall([c["verdict"] for c in comparisons]), "comparisons": comparisons})
    return judged


K = ("K = 1", "K = 4", "K = 8", "K = 16")
TOKENS = tuple(f"{q}/4 of the tokens" for q in (1, 2, 3, 4))

# title; side: what a seed retrains ("tokenizer" or "ar"); columns: the paper's; rows: workspace → the rows,
# making whatever sets are missing; claims: the paper's, as pairwise comparisons
Study = namedtuple("Study", "title side columns rows claims note")

STUDIES = {
    "table2": Study(
        "Sampling steps and solver of the tokenizer (paper Table 2)", "tokenizer", ("rFID",), table2,
        [Claim("Euler is best at 8 steps", "rFID",
               beats("Euler 8 steps", "Euler 4 steps", "Euler 12 steps", "Euler 16 steps")),
         Claim("Adams-2 beats Euler at 8 steps", "rFID", beats("Adams-2 8 steps", "Euler 8 steps"))],
        "One tokenizer per seed (β = 2, K = 8), decoded with Euler in 4 / 8 / 12 / 16 steps and Adams-2 in 8; "
        "the paper's numbers are ImageNet 256 with its 300M tokenizer."),
    "table4": Study(
        "CFG schedules (paper Table 4)", "ar", GEN, table4,
        [Claim("the linear CFG ramp gives the best FID", "FID",
               beats(cfg_label(RAMP), *(cfg_label(c) for c in ("1.0", "1.5", "1.75"))))],
        f"The ramp here is {RAMP.replace(',', '→')} instead of the paper's ImageNet 1.1→8.0: on "
        f"Fashion-MNIST a constant 3.0 already gives 85% class accuracy at no gain in FID (the shipped "
        f"model), so the ramp starts nearly unguided for the coarse tokens and ends a little above 3."),
    "table5": Study(
        "Previews from partial token sequences (paper Table 5)", "ar", GEN, table5,
        [Claim("FID falls as more of the tokens are generated", "FID", ordered(*reversed(TOKENS)))],
        f"One sampling run per seed at CFG {RAMP.replace(',', '→')}: the jump estimate after 1/4, 1/2 and 3/4 "
        f"of the solver steps, and the final image (paper: 64 / 128 / 192 / 256 tokens, D-AR-L)."),
    "table6": Study(
        "Time shift β of tokenizer training (paper Table 6)", "tokenizer", ("rFID", "Codebook use"), table6,
        [Claim(f"β = 1 is worse than β = 2 and 4 in {name}", metric, [("β = 2", "β = 1"), ("β = 4", "β = 1")])
         for name, metric in (("rFID", "rFID"), ("codebook use", "Codebook use"))],
        "Tokenizers trained with β = 1, 2, 4 (train_tokenizer.py --time-shift), decoded with Adams-2 in 8 steps; "
        "codebook use as train_tokenizer.py reports it at the end of training."),
    "table7": Study(
        "Coarse-to-fine vs reversed token order (paper Table 7)", "ar", GEN, table7,
        [Claim("the reversed (fine-to-coarse) order is worse at every CFG setting", "FID",
               [(f"normal {cfg_label(c)}", f"reversed {cfg_label(c)}") for c in CFG if c != REVERSED_RAMP])],
        "Two AR models per seed trained with the same recipe, one on the reversed token order (train_ar.py "
        "--reverse-order), its samples flipped back before decoding; the paper has no normal 8.0→1.1 row to "
        "compare with."),
    "figure7": Study(
        "Number of token groups K (paper Figure 7)", "tokenizer", ("rFID", "FID"), figure7,
        [Claim("rFID rises with K", "rFID", ordered(*K)),
         Claim("gFID is worst at K = 16", "FID", [(k, "K = 16") for k in K[:3]]),
         Claim("a larger K lowers the AR loss", "AR loss", ordered(*reversed(K)))],
        f"Tokenizers with K = 1, 4, 8, 16 groups (train_tokenizer.py --groups; K < 8 decoded in 8 steps, K = 16 "
        f"in 16) and an AR model on each, all retrained per seed; gFID at CFG {RAMP.replace(',', '→')}; AR loss = "
        f"the final training loss. Paper: D-AR-B, 100k iterations."),
}

SIDES = {"tokenizer": "tokenizers retrained per seed, with any AR model on them",
         "ar": f"the AR models retrained per seed on the seed-{SHARED_TOKENIZER_SEED} tokenizer"}


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(result):
    ours = list(dict.fromkeys(k for r in result["rows"] for k in r["ours"]))
    paper = list(dict.fromkeys(k for r in result["rows"] for k in r["paper"]))
    lines = ["| setting | " + " | ".join(ours + [f"paper {k}" for k in paper]) + " |",
             "|---" * (1 + len(ours) + len(paper)) + "|"]
    for r in result["rows"]:
        cells = [mean_sd(r["per seed"][k]) if k in r["per seed"] else "" for k in ours]
        lines.append(f"| {r['setting']} | " + " | ".join(cells + [fmt(r["paper"].get(k, "–")) for k in paper]) + " |")
    return lines


def markdown(result):
    seeds = result["seeds"]
    lines = [f"### {result['title']}", "", f"Recipe `{result['recipe']}`, seeds {', '.join(map(str, seeds))} "
             f"(n = {len(seeds)}; {SIDES[result['side']]}); ours: mean ± sd over the seeds; "
             + ", ".join(f"{v} {k}" for k, v in result["images"].items()) + ".", "", *markdown_table(result)]
    if "floor" in result:
        lines += ["", f"Real-vs-real floor ({result['images']['samples per set']} training vs test images): "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in result["floor"].items()) + "."]
    lines += ["", f"**Verdict: {result['verdict']}.** A comparison holds when the paper's direction shows by more "
              f"than two standard errors of the per-seed difference, is reversed when the opposite does.", ""]
    for claim in result["claims"]:
        lines += [f"- Paper: {claim['claim']}: {claim['verdict']}."]
        lines += [f"  - {c['line']}" for c in claim["comparisons"]]
    return "\n".join(lines + ["", result["note"], ""])


def summary_markdown(results):
    """The paper's claims, one a line, from results_<table>.json contents: the paper's numbers, ours (mean ± sd)
    and the verdict."""
    lines = ["| study | the paper's claim | paper | ours (mean ± sd) | seeds | verdict |", "|---" * 6 + "|"]
    for result in results:
        rows = {r["label"]: r for r in result["rows"]}
        study = result["title"].split("(paper ")[-1].rstrip(")")
        for claim in result["claims"]:
            metric, labels = claim["metric"], claim["rows"]
            paper = "; ".join(f"{a} {fmt(rows[a]['paper'][metric])}" for a in labels if metric in rows[a]["paper"])
            ours = "; ".join(f"{a} {mean_sd(rows[a]['per seed'][metric])}" for a in labels)
            lines.append(f"| {study} | {claim['claim']} ({metric}) | {paper or '–'} | {ours} | "
                         f"{len(result['seeds'])} | {claim['verdict']} |")
    return "\n".join(lines) + "\n"


def write_summary(out):
    """out/summary.md from every study's results in out."""
    results = [json.loads((out / f"results_{t}.json").read_text()) for t in STUDIES
               if (out / f"results_{t}.json").is_file()]
    atomic_save(out / "summary.md", lambda f: f.write(summary_markdown(results).encode()))


def measure_rows(metrics, rows_per_seed):
    """{metric: {row label: [value per seed]}}, the seeds in the order of rows_per_seed."""
    values = {}
    for rows in rows_per_seed.values():
        for r in rows:
            for s in r.sets:
                for metric, value in metrics.measure(*s).items():
                    values.setdefault(metric, {}).setdefault(r.label, []).append(value)
    return values


def study_result(ws, table, seeds, rows, values):
    """What results_<table>.json holds: per row the mean, sd and per-seed values of each metric, and the claims."""
    study, recipe = STUDIES[table], ws.recipe
    table_rows = []
    for r in rows:
        per_seed = {metric: v[r.label] for metric, v in values.items() if r.label in v}
        table_rows.append({"label": r.label, "setting": r.setting,
                           "ours": {m: float(np.mean(v)) for m, v in per_seed.items()},
                           "sd": {m: float(np.std(v, ddof=1)) if len(v) > 1 else None for m, v in per_seed.items()},
                           "per seed": per_seed, "paper": dict(zip(study.columns, r.paper or ()))})
    claims = judge(study, values)
    features = "Inception-v3 pool_3" if recipe.features == "inception" else "2x2 mean gray levels (a stand-in)"
    return {"table": table, "title": study.title, "recipe": ws.recipe_name, "seeds": list(seeds), "side": study.side,
            "images": {"samples per set": recipe.fid_images, "reconstructions per set": recipe.reconstruction_images},
            "features": features, "rows": table_rows, "verdict": overall([c["verdict"] for c in claims]),
            "claims": claims, "note": study.note}


def run_study(ws, table, seeds, metrics):
    """Makes the study's sets for each seed; unless the stage is 'sample', measures them and writes
    results_<table>.json, <table>.md and summary.md. Returns the metrics object (created on first use: it loads
    the feature network)."""
    study = STUDIES[table]
    rows = {seed: study.rows(ws.seeded(seed, study.side)) for seed in seeds}
    if ws.stage == "sample":
        print(f"{PROG}: {table}: sets of seeds {' '.join(map(str, seeds))} ready in {ws.sets}", flush=True)
        return metrics
    metrics = metrics or Metrics(ws)
    values = measure_rows(metrics, rows)
    result = study_result(ws, table, seeds, rows[seeds[0]], values)
    if "FID" in values:  # beside samples, the real-vs-real floor: FID over a few thousand images is biased upwards
        result["floor"] = metrics.fid(ws.images("train", ws.recipe.fid_images)[0])
    write_json(ws.out / f"results_{table}.json", result)
    atomic_save(ws.out / f"{table}.md", lambda f: f.write(markdown(result).encode()))
    write_summary(ws.out)
    print(f"{PROG}: {table}: {result['verdict']}\n" + "".join(f"  {c['line']}\n" for claim in result["claims"]
                                                               for c in claim["comparisons"])
          + f"  wrote {ws.out / f'results_{table}.json'}, {ws.out / f'{table}.md'} and {ws.out / 'summary.md'}",
          flush=True)
    return metrics


def main(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("table", choices=[*STUDIES, "all"], help="the study to run (all: every one, in turn)")
    p.add_argument("--out-dir", default="runs/ablations", help="models, image sets and results (shared by studies)")
    p.add_argument("--recipe", choices=list(RECIPES), default="shipped",
                   help="shipped (the README's GPU recipe, FID-10k), gpu (quick: 4,000-step tokenizers, FID-2k), "
                        "cpu (hours on a CPU) or tiny (seconds; exercises the pipeline only)")
    p.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2],
                   help="the seeds of each study (default 0 1 2); a seed retrains what the study varies: the "
                        "tokenizers (table2, table6, figure7) or the AR models on the seed-0 tokenizer")
    p.add_argument("--stage", choices=["all", "sample", "metrics"], default="all",
                   help="sample: train and write the image sets only (the GPU part); metrics: measure the sets "
                        "already there (the CPU part); all: both")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds: {' '.join(map(str, args.seeds))} names a seed twice")
    try:
        ws = Workspace(args.out_dir, args.recipe, args.device, args.stage)
        metrics = None
        for table in STUDIES if args.table == "all" else [args.table]:
            metrics = run_study(ws, table, args.seeds, metrics)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: error: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
