"""The paper's ablations at small scale: Tables 2, 4, 5, 6, 7 and Figure 7 re-run on Fashion-MNIST.

    python experiments/ablations.py table2                  # one study: trains what it needs, samples, measures
    python experiments/ablations.py all --recipe gpu        # every study, one after the other
    python experiments/ablations.py table7 --stage sample   # on a GPU machine: train and sample only; then, on a CPU,
    python experiments/ablations.py table7 --stage metrics  # the metrics from the saved image sets
    python experiments/ablations.py all --recipe tiny --out-dir /tmp/abl  # the pipeline quickly (numbers meaningless)

Each study writes out-dir/results_<table>.json and <table>.md (ours: experiments/results/): our numbers beside the
paper's (ImageNet 256 px, D-AR-L unless noted) and a verdict: does the paper's direction hold here? The models are
trained by train_tokenizer.py and train_ar.py, run as a user would, into out-dir/models/ (a training cut short
resumes when the command is repeated); out-dir/sets/ holds the image sets (.npz, uint8 NHWC) and the models' final
figures (.json), all that --stage metrics reads. Metrics are evaluate.py's (docs/results.md says which).
"""
import gzip
import hashlib
import json
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
    # one GPU with the trainers' fast paths
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


def tokenizer_name(shift=2, groups=8):
    return f"tok-s{shift:g}-k{groups}"


def ar_name(shift=2, groups=8, reverse=False):
    return f"ar-s{shift:g}-k{groups}" + ("-reversed" if reverse else "")


class Workspace:
    """out-dir: trains, samples and measures on demand, reusing what an earlier run completed. With stage 'metrics'
    nothing is trained or sampled: the sets must be there. A set is (kind, name): Metrics.measure's arguments."""

    def __init__(self, out_dir, recipe_name, seed, device, stage):
        self.out, self.recipe_name, self.seed, self.stage = Path(out_dir).resolve(), recipe_name, seed, stage
        self.recipe = RECIPES[recipe_name]
        self.device_flag = [] if device is None else ["--device", device]
        self.device = setup_device(device)[2]
        self.sets = self.out / "sets"
        self.sets.mkdir(parents=True, exist_ok=True)
        run = {"recipe": recipe_name, "seed": seed, "settings": json.loads(json.dumps(asdict(self.recipe)))}
        old = json.loads((self.out / "run.json").read_text()) if (self.out / "run.json").is_file() else run
        if old != run:
            raise ValueError(f"--out-dir {out_dir} holds a run of recipe {old['recipe']}, seed {old['seed']} (or of "
                             f"other recipe settings): use another --out-dir")
        write_json(self.out / "run.json", run)
        self.data_root = self.prepare_data()

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
        folder = self.out / "models" / tokenizer_name(shift, groups)
        train_once(folder, "train_tokenizer.py", *self.recipe.tokenizer, "--data", str(self.data_root),
                   "--out-dir", str(folder), "--seed", str(self.seed), "--time-shift", f"{shift:g}",
                   "--groups", str(groups), *self.device_flag)
        return folder

    def ar(self, shift=2, groups=8, reverse=False):
        """The folder of the AR model on the codes of that tokenizer (fine-to-coarse with reverse, paper A.5)."""
        tok = self.tokenizer(shift, groups) / "ckpt.pt"
        codes = self.out / "models" / f"codes-{tokenizer_name(shift, groups)}"
        meta = codes / "meta.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
            run_script("train_ar.py", "extract", "--tokenizer-ckpt", str(tok), "--data", str(self.data_root),
                       "--out", str(codes), *self.recipe.extract, *self.device_flag)
        folder = self.out / "models" / ar_name(shift, groups, reverse)
        train_once(folder, "train_ar.py", "train", *self.recipe.ar, "--codes", str(codes), "--out-dir", str(folder),
                   "--seed", str(self.seed), *(["--reverse-order"] if reverse else []), *self.device_flag)
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
        "a,b"), drawn as sample.py draws them (a batch seeded with seed + the index of its first sample); with
        previews also the previews after 1/4, 1/2 and 3/4 of the solver steps (paper Table 5)."""
        name = f"gen-{ar_name(shift, groups, reverse)}-cfg{cfg_scale.replace(',', '-')}"
        name += "-previews.npz" if previews else ".npz"

        def make():
            tok_ckpt, gpt_ckpt = self.tokenizer(shift, groups) / "ckpt.pt", self.ar(shift, groups, reverse) / "ckpt.pt"
            tok, gpt = sample.load_models(tok_ckpt, gpt_ckpt, None, torch.float32, self.device)
            n = self.recipe.fid_images
            labels = torch.arange(n) % gpt.config.num_classes
            images, strips = sample.sample_indices(
                gpt, tok, labels, torch.arange(n), seed=self.seed, batch_size=self.recipe.batch_size, graph=None,
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
        `solver` in `steps` steps (evaluate.reconstruct_uint8, fp32, noise from the seed)."""
        def make():
            tok = Tokenizer.from_checkpoint(self.tokenizer(shift, groups) / "ckpt.pt").to(self.device).eval()
            images, labels = self.images("test", self.recipe.reconstruction_images)
            generator = torch.Generator(self.device).manual_seed(self.seed)
            B = self.recipe.batch_size
            out = [evaluate.reconstruct_uint8(tok, torch.from_numpy(images[i:i + B]).to(self.device), solver, steps,
                                              generator=generator).cpu() for i in range(0, len(images), B)]
            return dict(arr_0=torch.cat(out).numpy(), arr_1=labels)
        return self.made("reconstruction", f"recon-{tokenizer_name(shift, groups)}-{solver}-{steps}.npz", make)

    def codebook_use(self, shift=2, groups=8):
        """The share of the codebook in use at the end of that tokenizer's training (paper Table 6)."""
        return self.made("numbers", f"usage-{tokenizer_name(shift, groups)}.json",
                         lambda: {"Codebook use": summary(self.tokenizer(shift, groups))["codebook_used"] / 100})

    def ar_loss(self, shift=2, groups=8, reverse=False):
        """The AR model's final training loss (paper Figure 7)."""
        return self.made("numbers", f"loss-{ar_name(shift, groups, reverse)}.json",
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


# A study's row: its key for the verdict, its label, the paper's numbers (in the study's columns) and its sets.
Row = namedtuple("Row", "key setting paper sets")


def cfg_label(cfg):
    return f"CFG {cfg.replace(',', '→')}" + (f" (paper {CFG[cfg]})" if "," in cfg else "")


def table2(ws):
    solver = {"euler": "Euler", "adams2": "Adams-2"}
    return [Row(f"{s}-{n}", f"{solver[s]}, {n} steps", (rfid,), [ws.reconstructions(s, n)])
            for (s, n), rfid in PAPER_TABLE2.items()]


def table4(ws):
    return [Row(cfg, cfg_label(cfg), PAPER_TABLE4[CFG[cfg]], [ws.samples(cfg)])
            for cfg in ("1.0", "1.5", "1.75", RAMP)]


def table5(ws):
    kind, name = ws.samples(RAMP, previews=True)
    return [Row(q, f"{q}/4 of the tokens", PAPER_TABLE5[q - 1], [(kind, name, q - 1) if q < 4 else (kind, name)])
            for q in (1, 2, 3, 4)]


def table6(ws):
    return [Row(b, f"β = {b}", PAPER_TABLE6[b], [ws.reconstructions("adams2", 8, shift=b), ws.codebook_use(b)])
            for b in (1, 2, 4)]


def figure7(ws):
    return [Row(k, f"K = {k}", PAPER_FIGURE7[k], [ws.reconstructions("adams2", max(k, 8), groups=k),
                                                  ws.samples(RAMP, groups=k), ws.ar_loss(groups=k)])
            for k in (1, 4, 8, 16)]


def table7(ws):
    return [Row(f"{order} {cfg}", f"{order}, {cfg_label(cfg)}", paper.get(CFG[cfg]),
                [ws.samples(cfg, reverse=order == "reversed")])
            for order, paper in (("normal", PAPER_TABLE4), ("reversed", PAPER_TABLE7)) for cfg in CFG]


# ---- verdicts: does the paper's direction hold here? Each gets {metric: {row key: our value}}.

def holds(ok):
    return "holds" if ok else "does NOT hold"


def falls(values):
    return all(a > b for a, b in zip(values, values[1:]))


def series(values, fmt=".3g", sep=" / "):
    return sep.join(f"{v:{fmt}}" for v in values)


def verdict_table2(ours):
    r = ours["rFID"]
    best = min((4, 8, 12, 16), key=lambda n: r[f"euler-{n}"])
    return (f"Paper: Euler is best at 8 steps, and Adams-2 beats Euler at 8 steps. Here Euler is best at {best} "
            f"steps ({holds(best == 8)}); Adams-2 {r['adams2-8']:.3g} vs Euler {r['euler-8']:.3g} rFID "
            f"({holds(r['adams2-8'] < r['euler-8'])}).")


def verdict_table4(ours):
    fid = ours["FID"]
    best = min(fid, key=fid.get)
    return (f"Paper: the linear ramp gives the best FID. Here the best is {cfg_label(best)} with FID "
            f"{fid[best]:.3g} ({holds(best == RAMP)}).")


def verdict_table5(ours):
    fid = list(ours["FID"].values())
    return (f"Paper: FID falls as more of the tokens are generated (7.38 → 3.94 → 2.93 → 2.44). Here "
            f"{series(fid, sep=' → ')} ({holds(falls(fid))}).")


def verdict_table6(ours):
    r, c = ours["rFID"], ours["Codebook use"]
    return (f"Paper: β = 1 is clearly worse than β = 2 and 4 in rFID and codebook use. Here rFID "
            f"{series(r.values())} ({holds(r[1] > max(r[2], r[4]))}), codebook use "
            f"{series(c.values(), '.1%')} ({holds(c[1] < min(c[2], c[4]))}).")


def verdict_figure7(ours):
    r, g, loss = (list(ours[m].values()) for m in ("rFID", "FID", "AR loss"))
    return (f"Paper: rFID rises with K; gFID about flat up to K = 8 and worse at 16; larger K lowers the AR loss. "
            f"Here rFID {series(r)} ({holds(all(a <= b for a, b in zip(r, r[1:])))}); gFID {series(g)} (worst at "
            f"16: {holds(g[3] > max(g[:3]))}); AR loss {series(loss, '.4g')} ({holds(falls(loss))}).")


def verdict_table7(ours):
    fid = ours["FID"]
    normal, reversed_ = [fid[f"normal {c}"] for c in CFG], [fid[f"reversed {c}"] for c in CFG]
    worse = sum(rev > norm for norm, rev in zip(normal, reversed_))
    return (f"Paper: the reversed (fine-to-coarse) model is worse at every CFG setting, 4.17 vs 2.44 at best. Here "
            f"it is worse at {worse} of {len(CFG)} settings, {min(reversed_):.3g} vs {min(normal):.3g} at best "
            f"({holds(worse == len(CFG) and min(reversed_) > min(normal))}).")


# columns: the paper's; rows: workspace → the rows, making whatever sets are missing; verdict: our numbers → one line
Study = namedtuple("Study", "title columns rows verdict note")


STUDIES = {
    "table2": Study("Sampling steps and solver of the tokenizer (paper Table 2)", ("rFID",), table2, verdict_table2,
                    "One tokenizer (β = 2, K = 8), decoded with Euler in 4 / 8 / 12 / 16 steps and Adams-2 in 8; "
                    "the paper's numbers are ImageNet 256 with its 300M tokenizer."),
    "table4": Study("CFG schedules (paper Table 4)", GEN, table4, verdict_table4,
                    f"The ramp here is {RAMP.replace(',', '→')} instead of the paper's ImageNet 1.1→8.0: on "
                    f"Fashion-MNIST a constant 3.0 already gives 85% class accuracy at no gain in FID (the shipped "
                    f"model), so the ramp starts nearly unguided for the coarse tokens and ends a little above 3."),
    "table5": Study("Previews from partial token sequences (paper Table 5)", GEN, table5, verdict_table5,
                    f"One sampling run at CFG {RAMP.replace(',', '→')}: the jump estimate after 1/4, 1/2 and 3/4 "
                    f"of the solver steps, and the final image (paper: 64 / 128 / 192 / 256 tokens, D-AR-L)."),
    "table6": Study("Time shift β of tokenizer training (paper Table 6)", ("rFID", "Codebook use"), table6,
                    verdict_table6, "Tokenizers trained with β = 1, 2, 4 (train_tokenizer.py --time-shift), decoded "
                    "with Adams-2 in 8 steps; codebook use as train_tokenizer.py reports it at the end of training."),
    "table7": Study("Coarse-to-fine vs reversed token order (paper Table 7)", GEN, table7, verdict_table7,
                    "Two AR models trained with the same recipe, one on the reversed token order (train_ar.py "
                    "--reverse-order), its samples flipped back before decoding."),
    "figure7": Study("Number of token groups K (paper Figure 7)", ("rFID", "FID"), figure7, verdict_figure7,
                     f"Tokenizers with K = 1, 4, 8, 16 groups (train_tokenizer.py --groups; K < 8 decoded in 8 "
                     f"steps, K = 16 in 16) and an AR model on each; gFID at CFG {RAMP.replace(',', '→')}; AR loss = "
                     f"the final training loss. Paper: D-AR-B, 100k iterations."),
}


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(result):
    ours = list(dict.fromkeys(k for r in result["rows"] for k in r["ours"]))
    paper = list(dict.fromkeys(k for r in result["rows"] for k in r["paper"]))
    lines = [f"### {result['title']}", "", f"Recipe `{result['recipe']}`, seed {result['seed']}; "
             + ", ".join(f"{v} {k}" for k, v in result["images"].items()) + ".", "",
             "| setting | " + " | ".join(ours + [f"paper {k}" for k in paper]) + " |",
             "|---" * (1 + len(ours) + len(paper)) + "|"]
    for r in result["rows"]:
        cells = [fmt(r["ours"].get(k, "")) for k in ours] + [fmt(r["paper"].get(k, "–")) for k in paper]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    if "floor" in result:
        lines += ["", f"Real-vs-real floor ({result['images']['samples per set']} training vs test images): "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in result["floor"].items()) + "."]
    return "\n".join(lines + ["", f"**Verdict.** {result['verdict']}", "", result["note"], ""])


def run_study(ws, table, metrics):
    """Makes the study's sets; unless the stage is 'sample', measures them and writes results_<table>.json and
    <table>.md. Returns the metrics object (created on first use: it loads the feature network)."""
    study, recipe = STUDIES[table], ws.recipe
    rows = study.rows(ws)
    if ws.stage == "sample":
        print(f"{PROG}: {table}: sets ready in {ws.sets}", flush=True)
        return metrics
    metrics = metrics or Metrics(ws)
    ours, table_rows = {}, []  # ours: metric → {row key: value}, what the verdict reads
    for r in rows:
        measured = {k: v for s in r.sets for k, v in metrics.measure(*s).items()}
        for metric, value in measured.items():
            ours.setdefault(metric, {})[r.key] = value
        table_rows.append({"setting": r.setting, "ours": measured, "paper": dict(zip(study.columns, r.paper or ()))})
    features = "Inception-v3 pool_3" if recipe.features == "inception" else "2x2 mean gray levels (a stand-in)"
    result = {"table": table, "title": study.title, "recipe": ws.recipe_name, "seed": ws.seed,
              "images": {"samples per set": recipe.fid_images, "reconstructions per set": recipe.reconstruction_images},
              "features": features, "rows": table_rows,
              "verdict": study.verdict(ours), "note": study.note}
    if "FID" in ours:  # beside samples, the real-vs-real floor: FID over a few thousand images is biased upwards
        result["floor"] = metrics.fid(ws.images("train", recipe.fid_images)[0])
    write_json(ws.out / f"results_{table}.json", result)
    atomic_save(ws.out / f"{table}.md", lambda f: f.write(markdown(result).encode()))
    print(f"{PROG}: {table}: {result['verdict']}\n  wrote {ws.out / f'results_{table}.json'} and "
          f"{ws.out / f'{table}.md'}", flush=True)
    return metrics


def main(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("table", choices=[*STUDIES, "all"], help="the study to run (all: every one, in turn)")
    p.add_argument("--out-dir", default="runs/ablations", help="models, image sets and results (shared by studies)")
    p.add_argument("--recipe", choices=list(RECIPES), default="gpu",
                   help="gpu (one H100), cpu (hours on a CPU) or tiny (seconds; exercises the pipeline only)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of training, sampling and reconstruction")
    p.add_argument("--stage", choices=["all", "sample", "metrics"], default="all",
                   help="sample: train and write the image sets only (the GPU part); metrics: measure the sets "
                        "already there (the CPU part); all: both")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    args = p.parse_args(argv)
    try:
        ws = Workspace(args.out_dir, args.recipe, args.seed, args.device, args.stage)
        metrics = None
        for table in STUDIES if args.table == "all" else [args.table]:
            metrics = run_study(ws, table, metrics)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: error: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
