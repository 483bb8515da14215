"""The paper's ablations at small scale: Tables 2, 4, 5, 6, 7 and Figure 7 re-run on Fashion-MNIST.

    python ablations.py table2                        # one study: trains what it needs, samples, measures
    python ablations.py all --recipe gpu              # every study, one after the other
    python ablations.py table7 --stage sample         # on a GPU machine: train and sample only
    python ablations.py table7 --stage metrics        # later, on a CPU: the metrics from the saved image sets
    python ablations.py all --recipe tiny --out-dir /tmp/abl    # the whole pipeline in seconds (numbers meaningless)

Each study writes out-dir/results_<table>.json and out-dir/<table>.md: our numbers beside the paper's (ImageNet
256 px, D-AR-L unless noted) and a one-line verdict computed from the numbers: does the paper's direction hold here?

out-dir keeps everything the studies share, made once and reused (a baseline tokenizer serves five studies):
  models/<name>/   tokenizers (train_tokenizer.py), codes (train_ar.py extract) and AR models (train_ar.py train);
                   a training cut short resumes from its last checkpoint when the command is repeated
  sets/            image sets as .npz (samples or reconstructions, uint8 NHWC) and the numbers measured with the
                   models (codebook use, AR training loss) as .json: all that --stage metrics reads
  features/        feature vectors of every set, keyed by the hash of its images
  run.json         the recipe and seed; another recipe or seed needs another --out-dir

Metrics are evaluate.py's: FID, precision and recall (k = 3) of Inception-v3 pool features against the first n
Fashion-MNIST test images, beside the real-vs-real floor (the first n training images against the same test
images: FID over a few thousand images is biased upwards); class accuracy of samples by the Fashion-MNIST
classifier; rFID, PSNR and class kept of the reconstructions of the first n test images; codebook use in training.
"""
import contextlib
import gzip
import hashlib
import io
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
import train_ar
import train_tokenizer
from data import (ArgumentParser, atomic_save, fmnist_dir, fmnist_rgb32, from_uint8, load_fashion_mnist,
                  nonnegative_int, setup_device, to_uint8)
from model import GPT, generate
from sample import sample_batch
from tokenizer import Tokenizer

PROG = "ablations.py"
ROOT = Path(__file__).resolve().parent
TABLES = ["table2", "table4", "table5", "table6", "table7", "figure7"]


# ---------------------------------------------------------------------------------------------------------------
# recipes: how big the studies are


@dataclass(frozen=True)
class Recipe:
    """The trainers' flags (presets, steps, batch, lr), passed unchanged, so another training path plugs in here,
    and the images per set."""
    tokenizer: tuple  # train_tokenizer.py flags, besides --data --out-dir --seed --time-shift --groups
    extract: tuple  # train_ar.py extract flags, besides --tokenizer-ckpt --data --out
    ar: tuple  # train_ar.py train flags, besides --codes --out-dir --seed --reverse-order
    fid_images: int  # samples per set, and real images in the FID reference and in the floor
    reconstruction_images: int  # test images reconstructed per set (rFID, PSNR, class kept)
    batch_size: int  # sampling and reconstruction batch
    features: str = "inception"  # "pixels": 2x2 mean gray levels, a stand-in that spares the tiny recipe Inception
    train_images: int = 0  # > 0: train on the first n training images only (a subset written into out-dir)


RECIPES = {
    # One GPU with the fast path (measured on an H200 with --cuda-graph: the tokenizer ~16,600 img/s at a batch of
    # 512, the GPT ~4.8M tokens/s): per tokenizer 4,000 steps of 512 ≈ 2 min + 40 s of compilation, per AR model
    # 40 epochs ≈ 1 min, per set of 2,000 samples seconds. The metrics run afterwards on a CPU (Inception-v3 on
    # 2,000 images a set).
    "gpu": Recipe(
        tokenizer=("--preset", "fmnist", "--global-batch-size", "512", "--max-steps", "4000", "--lr", "8e-4",
                   "--lpips-weight", "0", "--repa-weight", "0", "--compile", "--data-on-device", "--cuda-graph",
                   "--ckpt-every", "1000", "--show-every", "4000", "--log-every", "250"),
        extract=("--views", "flip", "--batch-size", "1000"),
        ar=("--gpt-model", "GPT-fmnist", "--global-batch-size", "512", "--epochs", "40", "--decay-epochs", "10",
            "--lr", "6e-4", "--ema", "--ema-decay", "0.999", "--compile", "--data-on-device", "--cuda-graph",
            "--log-every", "100", "--ckpt-every", "2000"),
        fid_images=2000, reconstruction_images=2000, batch_size=500),
    # A CPU-only run: the README's laptop recipe (the fmnist-cpu presets, 16 tokens in 8 groups of 2) on all of
    # Fashion-MNIST, 500 images a set. On 2 cores (~190 img/s for the tokenizer) ≈ 21 min per tokenizer, ~4 min per
    # AR model, ~35 s of Inception per set: ≈ 3.5 h for all six studies (6 tokenizers, 5 AR models, ~28 sets).
    # The EMA decay is 0.99: with 0.999 the EMA of 3,600 steps is still near the initial weights (a 1,500-step run
    # with it kept the class of 10% of reconstructions, chance level).
    "cpu": Recipe(
        tokenizer=("--preset", "fmnist-cpu", "--global-batch-size", "64", "--max-steps", "3600", "--lr", "1e-3",
                   "--warmup-steps", "100", "--ema-decay", "0.99", "--lpips-weight", "0", "--repa-weight", "0",
                   "--data-on-device", "--ckpt-every", "900", "--show-every", "1800", "--log-every", "300"),
        extract=("--views", "single", "--batch-size", "500"),
        ar=("--gpt-model", "GPT-fmnist-cpu", "--global-batch-size", "128", "--epochs", "6", "--decay-epochs", "2",
            "--lr", "1e-3", "--data-on-device", "--log-every", "200", "--ckpt-every", "1000"),
        fid_images=500, reconstruction_images=500, batch_size=100),
    # Seconds on a CPU (tests): a few steps of the tiny presets on 64 images, sets of 8 images, pixel features.
    "tiny": Recipe(
        tokenizer=("--preset", "tiny", "--global-batch-size", "8", "--max-steps", "2", "--lr", "1e-3",
                   "--warmup-steps", "0", "--lpips-weight", "0", "--repa-weight", "0", "--data-on-device",
                   "--ckpt-every", "2", "--show-every", "2", "--num-show", "1", "--log-every", "1"),
        extract=("--views", "flip", "--batch-size", "64", "--num-workers", "0"),
        ar=("--gpt-model", "GPT-tiny", "--global-batch-size", "16", "--epochs", "1", "--decay-epochs", "0",
            "--lr", "1e-3", "--data-on-device", "--log-every", "1", "--ckpt-every", "100"),
        fid_images=8, reconstruction_images=8, batch_size=8, features="pixels", train_images=64),
}


# ---------------------------------------------------------------------------------------------------------------
# the models: trained once into out-dir/models, through the trainers' own main(argv)


class Tee(io.TextIOBase):
    """stdout that also goes to a log file (the AR training loss is read back from the log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def train_once(folder, main, argv):
    """Runs main(argv) unless folder/done.json says it finished; a checkpoint without done.json is a run cut short,
    continued with --resume. The console output is appended to folder/train.log."""
    done = folder / "done.json"
    if done.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if (folder / "ckpt.pt").is_file() else []
    torch.compiler.reset()  # a fresh compile per model, as in its own process (no recompile limit reached)
    print(f"{PROG}: {main.__module__}.py {' '.join(argv + resume)}", flush=True)
    with open(folder / "train.log", "a") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)):
        main(argv + resume)
    atomic_save(done, lambda f: f.write(json.dumps({"argv": argv}).encode()))


def tokenizer_name(shift=2, groups=8):
    return f"tok-s{shift:g}-k{groups}"


def ar_name(shift=2, groups=8, reverse=False):
    return f"ar-s{shift:g}-k{groups}" + ("-reversed" if reverse else "")


AR_LOSS = re.compile(r"^step (\d+)/\d+ \| loss (\S+)", re.M)  # train_ar.py's log line


class Workspace:
    """out-dir: trains, samples and measures on demand, reusing what an earlier run completed. With stage
    'metrics' nothing is trained or sampled: the sets must be there."""

    def __init__(self, out_dir, recipe_name, seed, device, stage):
        self.out, self.recipe, self.seed, self.stage = Path(out_dir), RECIPES[recipe_name], seed, stage
        self.recipe_name = recipe_name
        self.device_flag = [] if device is None else ["--device", device]
        self.device = setup_device(device)[2]
        self.sets = self.out / "sets"
        self.sets.mkdir(parents=True, exist_ok=True)
        run = {"recipe": recipe_name, "seed": seed, "settings": json.loads(json.dumps(asdict(self.recipe)))}
        if (self.out / "run.json").is_file():
            old = json.loads((self.out / "run.json").read_text())
            if old != run:
                raise ValueError(f"--out-dir {out_dir} holds a run of recipe {old['recipe']}, seed {old['seed']} "
                                 f"(or of other recipe settings): use another --out-dir")
        else:
            atomic_save(self.out / "run.json", lambda f: f.write(json.dumps(run, indent=1).encode()))
        self.data_root = self.prepare_data()

    def prepare_data(self):
        """Fashion-MNIST's folder; with recipe.train_images, a folder of the same .gz files holding the first
        images of each split only (the trainers read it like the full set)."""
        n = self.recipe.train_images
        if not n:
            return fmnist_dir()
        root = self.out / "data"
        m = max(self.recipe.fid_images, self.recipe.reconstruction_images)
        for split, prefix, count in (("train", "train", n), ("test", "t10k", m)):
            if not (root / f"{prefix}-labels-idx1-ubyte.gz").is_file():
                images, labels = load_fashion_mnist(split)
                write_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051, images[:count])
                write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels[:count].astype(np.uint8))
        return root

    def tokenizer(self, shift=2, groups=8):
        """Path of the tokenizer trained with time shift β = shift and K = groups token groups (paper §3.1)."""
        folder = self.out / "models" / tokenizer_name(shift, groups)
        argv = [*self.recipe.tokenizer, "--data", str(self.data_root), "--out-dir", str(folder), "--seed",
                str(self.seed), "--time-shift", f"{shift:g}", "--groups", str(groups), *self.device_flag]
        train_once(folder, train_tokenizer.main, argv)
        return folder / "ckpt.pt"

    def ar(self, shift=2, groups=8, reverse=False):
        """Path of the AR model on the codes of that tokenizer (fine-to-coarse with reverse, paper A.5)."""
        tok = self.tokenizer(shift, groups)
        codes = self.out / "models" / f"codes-{tokenizer_name(shift, groups)}"
        meta = codes / "meta.json"
        if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
            train_ar.main(["extract", "--tokenizer-ckpt", str(tok), "--data", str(self.data_root), "--out",
                           str(codes), *self.recipe.extract, *self.device_flag])
        name = ar_name(shift, groups, reverse)
        folder = self.out / "models" / name
        argv = ["train", *self.recipe.ar, "--codes", str(codes), "--out-dir", str(folder), "--seed", str(self.seed),
                *(["--reverse-order"] if reverse else []), *self.device_flag]
        train_once(folder, train_ar.main, argv)
        return folder / "ckpt.pt"

    def made(self, name, make):
        """sets/name, made by make() (which returns the file's contents) unless it exists."""
        path = self.sets / name
        if not path.is_file():
            if self.stage == "metrics":
                raise FileNotFoundError(f"{path}: no such set; run this table with --stage sample (or all) first")
            content = make()
            if path.suffix == ".json":
                write_json(path, content)
            else:
                atomic_save(path, lambda f: np.savez_compressed(f, **content))
        return name

    def test_images(self, n):
        images, labels = load_fashion_mnist("test", self.data_root)
        return fmnist_rgb32(images[:n]), labels[:n]


def write_idx(path, magic, array):
    """An idx file as Fashion-MNIST ships them: big-endian magic, sizes, then the uint8 data, gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    atomic_save(path, lambda f: f.write(gzip.compress(header + array.tobytes())))


def write_json(path, obj):
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# ---------------------------------------------------------------------------------------------------------------
# the image sets: samples and reconstructions, and the numbers only the models can give


def load_tokenizer(path, device):
    return Tokenizer.from_checkpoint(path).to(device).eval()


@torch.no_grad()
def sample_images(gpt, tok, labels, cfg_scale, generator):
    """labels (B,) → images (B, 3, H, W) in [-1, 1] and the previews (B, K, H, W, 3) uint8, or None where there is
    no stream: fewer groups than solver steps (K < 8 in paper Figure 7) are decoded after generation."""
    cfg = tok.config
    if cfg.num_denoising_steps == cfg.num_query_groups:
        _, _, image, previews = sample_batch(gpt, tok, labels, cfg_scale=cfg_scale, generator=generator)
        return image, previews
    R = cfg.sampling_resolution
    noise = torch.randn(len(labels), 3, R, R, generator=generator, device=labels.device)  # x0 first, as sample_batch
    tokens = generate(gpt, labels, cfg_scale=cfg_scale, generator=generator)  # (B, N)
    if gpt.config.reverse_order:  # generated fine-to-coarse: back to the tokenizer's order
        tokens = tokens.flip(1)
    return tok.decode(tokens, noise=noise), None


def fp32():
    """True fp32 for sampling and metrics (the trainers, run in this process, switch TF32 on)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def samples(ws, cfg_scale, shift=2, groups=8, reverse=False, previews=False):
    """The set of recipe.fid_images samples (classes in turn) of that AR model at guidance `cfg_scale` ("a" or a
    ramp "a,b"); with previews also the previews after 1/4, 1/2 and 3/4 of the groups (paper Table 5). A batch's
    randomness comes from seed + the index of its first sample, as in sample.py."""
    name = f"gen-{ar_name(shift, groups, reverse)}-cfg{cfg_scale.replace(',', '-')}"
    name += "-previews.npz" if previews else ".npz"

    def make():
        gpt_path, tok_path = ws.ar(shift, groups, reverse), ws.tokenizer(shift, groups)
        gpt, tok = GPT.from_checkpoint(gpt_path).to(ws.device).eval(), load_tokenizer(tok_path, ws.device)
        fp32()
        n, B, K = ws.recipe.fid_images, ws.recipe.batch_size, tok.config.num_query_groups
        labels = torch.arange(n) % 10
        generator = torch.Generator(ws.device)
        images, strips = [], []
        for start in range(0, n, B):
            generator.manual_seed(ws.seed + start)
            image, strip = sample_images(gpt, tok, labels[start:start + B].to(ws.device), cfg_scale, generator)
            images.append(to_uint8(image).cpu())
            if previews:
                strips.append(strip[:, [K // 4 - 1, K // 2 - 1, 3 * K // 4 - 1]].cpu())
        out = dict(arr_0=torch.cat(images).numpy(), arr_1=labels.numpy())
        return dict(out, previews=torch.cat(strips).numpy()) if previews else out
    return ws.made(name, make)


def reconstructions(ws, solver, steps, shift=2, groups=8):
    """The set of reconstructions of the first recipe.reconstruction_images test images by that tokenizer,
    decoded with `solver` in `steps` steps (evaluate.reconstruct_uint8, fp32, noise from the seed)."""
    name = f"recon-{tokenizer_name(shift, groups)}-{solver}-{steps}.npz"

    def make():
        tok = load_tokenizer(ws.tokenizer(shift, groups), ws.device)
        fp32()
        images, labels = ws.test_images(ws.recipe.reconstruction_images)
        generator = torch.Generator(ws.device).manual_seed(ws.seed)
        B = ws.recipe.batch_size
        out = [evaluate.reconstruct_uint8(tok, torch.from_numpy(images[i:i + B]).to(ws.device), solver, steps,
                                          generator=generator).cpu() for i in range(0, len(images), B)]
        return dict(arr_0=torch.cat(out).numpy(), arr_1=labels)
    return ws.made(name, make)


TOKENIZER_USAGE = re.compile(r"^step \d+ \|.*\| codebook used ([\d.]+)%", re.M)  # train_tokenizer.py's log line


def codebook_use(ws, shift=2, groups=8):
    """Fraction of the codebook in use at the end of that tokenizer's training (paper Table 6): the last value of
    its log, the share of codes drawn at least once in the last log interval (recipe gpu: 250 steps × 512 images ×
    64 tokens), like the official trainer's usage statistic (unique codes in a rolling buffer of recent ones)."""
    def make():
        log = ws.tokenizer(shift, groups).parent / "train.log"
        return {"Codebook use": float(TOKENIZER_USAGE.findall(log.read_text())[-1]) / 100}
    return ws.made(f"usage-{tokenizer_name(shift, groups)}.json", make)


def ar_loss(ws, shift=2, groups=8, reverse=False):
    """The AR model's training loss curve [(step, loss), ...], read from its training log (paper Figure 7)."""
    def make():
        log = ws.ar(shift, groups, reverse).parent / "train.log"
        return {"curve": [(int(s), float(v)) for s, v in AR_LOSS.findall(log.read_text())]}
    return ws.made(f"loss-{ar_name(shift, groups, reverse)}.json", make)


# ---------------------------------------------------------------------------------------------------------------
# metrics (evaluate.py), from the sets alone


class Metrics:
    """FID / precision / recall against the first fid_images test images, class accuracy, rFID / PSNR / class
    kept, and the models' numbers, for the sets of one workspace. Features are cached by the images' hash."""

    def __init__(self, ws):
        self.ws, self.net = ws, None
        self.cache = ws.out / "features"
        self.cache.mkdir(exist_ok=True)
        self.classifier = evaluate.load_fmnist_classifier(str(ROOT / evaluate.FMNIST_CLASSIFIER), ws.data_root)
        self.reference = self.features(ws.test_images(ws.recipe.fid_images)[0])

    def features(self, images):
        """uint8 (N, H, W, 3) → (N, D) float: Inception-v3 pool_3 (D = 2048), or the mean gray level in [0, 1] of
        each quarter of the image (D = 4)."""
        key = hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:20]
        path = self.cache / f"{self.ws.recipe.features}-{key}.npy"
        if path.is_file():
            return np.load(path)
        if self.ws.recipe.features == "pixels":
            gray = torch.from_numpy(images).float().mean(-1)[:, None] / 255  # N, 1, H, W
            feats = F.adaptive_avg_pool2d(gray, 2).flatten(1).numpy()
        else:
            if self.net is None:
                fp32()
                self.net = evaluate.load_inception(evaluate.find_inception_weights()).to(self.ws.device)
            batches = (images[i:i + 100] for i in range(0, len(images), 100))
            feats = evaluate.extract_features(self.net, batches, len(images))["pool"]
        atomic_save(path, lambda f: np.save(f, feats))
        return feats

    def fid(self, images):
        """FID, precision and recall of the images against the reference test images."""
        feats = self.features(images)
        precision, recall = evaluate.precision_recall(torch.from_numpy(self.reference), torch.from_numpy(feats))
        fid = evaluate.frechet_distance(*evaluate.statistics(self.reference), *evaluate.statistics(feats))
        return {"FID": fid, "Precision": precision, "Recall": recall}

    def floor(self):
        """The real-vs-real floor: the first fid_images training images against the reference."""
        images, _ = load_fashion_mnist("train", self.ws.data_root)
        return self.fid(fmnist_rgb32(images[:self.ws.recipe.fid_images]))

    def accuracy(self, images, labels):
        predicted = torch.cat([self.classifier.classify(from_uint8(images[i:i + 500]))
                               for i in range(0, len(images), 500)])
        return (predicted.numpy() == labels).mean().item()

    def measure(self, kind, name, preview=None):
        """The numbers of one set: kind 'generation' (of the images, or of previews[:, preview]),
        'reconstruction', 'numbers' (a json of the models' numbers) or 'loss' (an AR training loss curve)."""
        path = self.ws.sets / name
        if kind == "numbers":
            return json.loads(path.read_text())
        if kind == "loss":  # the last logged value (a mean over the last log interval) and the whole curve
            curve = json.loads(path.read_text())["curve"]
            return {"AR loss": curve[-1][1], "AR loss curve": curve}
        with np.load(path, allow_pickle=False) as f:
            images, labels = (f["arr_0"] if preview is None else f["previews"][:, preview]), f["arr_1"]
        if kind == "generation":
            return {**self.fid(images), "Class accuracy": self.accuracy(images, labels)}
        originals = self.ws.test_images(len(images))[0]
        psnr, _ = evaluate.pixel_metrics(torch.from_numpy(originals), torch.from_numpy(images))
        rfid = evaluate.frechet_distance(*evaluate.statistics(self.features(originals)),
                                         *evaluate.statistics(self.features(images)))
        return {"rFID": rfid, "PSNR": psnr.mean().item(), "Class kept": self.accuracy(images, labels)}


# ---------------------------------------------------------------------------------------------------------------
# the studies: each lists its rows (setting, the paper's numbers, the sets measured) and judges its numbers

RAMP = "1.1,4.0"  # the linear CFG ramp for Fashion-MNIST (the paper's ImageNet ramp, 1.1→8.0, is in the notes)
REVERSED_RAMP = "4.0,1.1"
# our CFG settings → the paper's (Tables 4 and 7)
CFG = {"1.0": "1.0", "1.5": "1.5", "1.75": "1.75", RAMP: "1.1→8.0", REVERSED_RAMP: "8.0→1.1"}

# paper Table 2 (ImageNet 256, the 300M tokenizer, 50k images): rFID per solver and number of steps
PAPER_TABLE2 = {("euler", 4): 2.35, ("euler", 8): 1.58, ("adams2", 8): 1.52, ("euler", 12): 1.73,
                ("euler", 16): 1.93}
# paper Table 4, D-AR-L (FID, precision, recall per CFG schedule; IS not measured here: the Inception weights at
# hand have no classifier layer); the same rows open paper Table 7
PAPER_TABLE4 = {"1.0": (7.43, 0.71, 0.63), "1.5": (3.50, 0.83, 0.54), "1.75": (4.70, 0.86, 0.50),
                "1.1→8.0": (2.44, 0.78, 0.61)}
# paper Table 5, D-AR-L at 1.1→8.0: previews after 64, 128, 192 and 256 of the 256 tokens (2, 4, 6, 8 steps)
PAPER_TABLE5 = [(7.38, 0.74, 0.48), (3.94, 0.78, 0.54), (2.93, 0.80, 0.57), (2.44, 0.78, 0.61)]
# paper Table 6, the 113M ablation tokenizer (50k iterations): rFID and codebook use per time shift β
PAPER_TABLE6 = {1: (39.75, 0.978), 2: (28.65, 0.994), 4: (27.10, 0.998)}
# paper Figure 7: tokenizer rFID and D-AR-B gFID (100k iterations) per number of token groups K
PAPER_FIGURE7 = {1: (8.37, 34.85), 4: (9.66, 34.54), 8: (14.18, 35.69), 16: (22.58, 41.20)}
# paper Table 7, reversed D-AR-L (the normal rows are Table 4's)
PAPER_TABLE7 = {"1.0": (11.22, 0.68, 0.62), "1.5": (4.17, 0.84, 0.50), "1.75": (5.83, 0.88, 0.44),
                "1.1→8.0": (9.79, 0.90, 0.40), "8.0→1.1": (21.15, 0.85, 0.15)}


def row(key, setting, paper, *measures):
    return {"key": key, "setting": setting, "paper": paper, "measures": list(measures)}


def gen_paper(numbers):
    return dict(zip(("FID", "Precision", "Recall"), numbers)) if numbers else {}


def cfg_label(cfg):
    return f"CFG {cfg.replace(',', '→')}" + (f" (paper {CFG[cfg]})" if "," in cfg else "")


def table2(ws):
    solver = {"euler": "Euler", "adams2": "Adams-2"}
    return [row(f"{s}-{n}", f"{solver[s]}, {n} steps", {"rFID": rfid}, ("reconstruction", reconstructions(ws, s, n)))
            for (s, n), rfid in PAPER_TABLE2.items()]


def table4(ws):
    return [row(cfg, cfg_label(cfg), gen_paper(PAPER_TABLE4[CFG[cfg]]), ("generation", samples(ws, cfg)))
            for cfg in ("1.0", "1.5", "1.75", RAMP)]


def table5(ws):
    name = samples(ws, RAMP, previews=True)
    return [row(q, f"{q}/4 of the tokens", gen_paper(PAPER_TABLE5[q - 1]),
                ("generation", name, q - 1) if q < 4 else ("generation", name)) for q in (1, 2, 3, 4)]


def table6(ws):
    return [row(b, f"β = {b}", dict(zip(("rFID", "Codebook use"), PAPER_TABLE6[b])),
                ("reconstruction", reconstructions(ws, "adams2", 8, shift=b)), ("numbers", codebook_use(ws, shift=b)))
            for b in (1, 2, 4)]


def figure7(ws):
    return [row(k, f"K = {k}", dict(zip(("rFID", "FID"), PAPER_FIGURE7[k])),
                ("reconstruction", reconstructions(ws, "adams2", max(k, 8), groups=k)),
                ("generation", samples(ws, RAMP, groups=k)), ("loss", ar_loss(ws, groups=k)))
            for k in (1, 4, 8, 16)]


def table7(ws):
    settings = ("1.0", "1.5", "1.75", RAMP, REVERSED_RAMP)
    return [row(f"{'reversed' if rev else 'normal'} {cfg}", f"{'reversed' if rev else 'normal'}, {cfg_label(cfg)}",
                gen_paper((PAPER_TABLE7 if rev else PAPER_TABLE4).get(CFG[cfg])),
                ("generation", samples(ws, cfg, reverse=rev))) for rev in (False, True) for cfg in settings]


# ---- verdicts: does the paper's direction hold here?

def holds(ok):
    return "holds" if ok else "does NOT hold"


def ours(rows, metric):
    return {r["key"]: r["ours"][metric] for r in rows}


def verdict_table2(rows):
    r = ours(rows, "rFID")
    euler = {n: r[f"euler-{n}"] for n in (4, 8, 12, 16)}
    best = min(euler, key=euler.get)
    return (f"Paper: Euler is best at 8 steps, and Adams-2 beats Euler at 8 steps. Here Euler is best at {best} "
            f"steps ({holds(best == 8)}); Adams-2 {r['adams2-8']:.3g} vs Euler {euler[8]:.3g} rFID "
            f"({holds(r['adams2-8'] < euler[8])}).")


def verdict_table4(rows):
    fid = ours(rows, "FID")
    best = min(fid, key=fid.get)
    return (f"Paper: the linear ramp gives the best FID. Here the best is {cfg_label(best)} with FID "
            f"{fid[best]:.3g} ({holds(best == RAMP)}).")


def verdict_table5(rows):
    fid = list(ours(rows, "FID").values())
    return (f"Paper: FID falls as more of the tokens are generated (7.38 → 3.94 → 2.93 → 2.44). Here "
            f"{' → '.join(f'{v:.3g}' for v in fid)} ({holds(all(a > b for a, b in zip(fid, fid[1:])))}).")


def verdict_table6(rows):
    r, c = ours(rows, "rFID"), ours(rows, "Codebook use")
    return (f"Paper: β = 1 is clearly worse than β = 2 and 4 in rFID and codebook use. Here rFID "
            f"{r[1]:.3g} / {r[2]:.3g} / {r[4]:.3g} ({holds(r[1] > max(r[2], r[4]))}), codebook use "
            f"{c[1]:.1%} / {c[2]:.1%} / {c[4]:.1%} ({holds(c[1] < min(c[2], c[4]))}).")


def verdict_figure7(rows):
    r, g, loss = (list(ours(rows, m).values()) for m in ("rFID", "FID", "AR loss"))
    return (f"Paper: rFID rises with K; gFID about flat up to K = 8 and worse at 16; larger K lowers the AR loss. "
            f"Here rFID {' / '.join(f'{v:.3g}' for v in r)} ({holds(all(a <= b for a, b in zip(r, r[1:])))}); "
            f"gFID {' / '.join(f'{v:.3g}' for v in g)} (worst at 16: {holds(g[3] > max(g[:3]))}); "
            f"AR loss {' / '.join(f'{v:.4g}' for v in loss)} ({holds(all(a > b for a, b in zip(loss, loss[1:])))}).")


def verdict_table7(rows):
    fid = ours(rows, "FID")
    pairs = [(fid[f"normal {c}"], fid[f"reversed {c}"]) for c in CFG]
    worse = sum(rev > normal for normal, rev in pairs)
    best_normal, best_rev = min(p[0] for p in pairs), min(p[1] for p in pairs)
    return (f"Paper: the reversed (fine-to-coarse) model is worse at every CFG setting, 4.17 vs 2.44 at best. Here "
            f"it is worse at {worse} of {len(pairs)} settings, {best_rev:.3g} vs {best_normal:.3g} at best "
            f"({holds(worse == len(pairs) and best_rev > best_normal)}).")


@dataclass(frozen=True)
class Study:
    title: str
    rows: object  # workspace → the rows, making whatever sets are missing
    verdict: object  # the measured rows → one line
    note: str
    generation: bool  # FID of samples: report the real-vs-real floor


STUDIES = {
    "table2": Study("Sampling steps and solver of the tokenizer (paper Table 2)", table2, verdict_table2,
                    "One tokenizer (β = 2, K = 8), decoded with Euler in 4 / 8 / 12 / 16 steps and Adams-2 in 8; "
                    "the paper's numbers are ImageNet 256 with its 300M tokenizer.", False),
    "table4": Study("CFG schedules (paper Table 4)", table4, verdict_table4,
                    f"The ramp here is {RAMP.replace(',', '→')} instead of the paper's ImageNet 1.1→8.0: on "
                    f"Fashion-MNIST a constant 3.0 already gives 85% class accuracy at no gain in FID (the shipped "
                    f"model), so the ramp starts nearly unguided for the coarse tokens and ends a little above 3.",
                    True),
    "table5": Study("Previews from partial token sequences (paper Table 5)", table5, verdict_table5,
                    f"One sampling run at CFG {RAMP.replace(',', '→')}: the jump estimate after 1/4, 1/2 and 3/4 "
                    f"of the token groups, and the final image (paper: 64 / 128 / 192 / 256 tokens, D-AR-L).", True),
    "table6": Study("Time shift β of tokenizer training (paper Table 6)", table6, verdict_table6,
                    "Tokenizers trained with β = 1, 2, 4 (train_tokenizer.py --time-shift), decoded with Adams-2 in "
                    "8 steps; codebook use = the share of codes drawn in the last log interval of training.", False),
    "figure7": Study("Number of token groups K (paper Figure 7)", figure7, verdict_figure7,
                     f"Tokenizers with K = 1, 4, 8, 16 groups (train_tokenizer.py --groups; K < 8 decoded in 8 "
                     f"steps, K = 16 in 16) and an AR model on each; gFID at CFG {RAMP.replace(',', '→')}; AR loss = "
                     f"the last logged training loss (its curve is in the JSON). Paper: D-AR-B, 100k iterations.",
                     True),
    "table7": Study("Coarse-to-fine vs reversed token order (paper Table 7)", table7, verdict_table7,
                    "Two AR models trained with the same recipe, one on the reversed token order (train_ar.py "
                    "--reverse-order), its samples flipped back before decoding.", True),
}


# ---------------------------------------------------------------------------------------------------------------
# outputs and command line


def fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(result):
    """The study as a Markdown section: our numbers beside the paper's, the floor, the verdict and the notes."""
    scalar = lambda d: [k for k, v in d.items() if isinstance(v, (int, float))]  # noqa: E731
    ours = list(dict.fromkeys(k for r in result["rows"] for k in scalar(r["ours"])))
    paper = list(dict.fromkeys(k for r in result["rows"] for k in r["paper"]))
    lines = [f"### {result['title']}", "",
             f"Recipe `{result['recipe']}`, seed {result['seed']}; " + ", ".join(
                 f"{v} {k}" for k, v in result["images"].items()) + ".", "",
             "| setting | " + " | ".join(ours + [f"paper {k}" for k in paper]) + " |",
             "|---" * (1 + len(ours) + len(paper)) + "|"]
    for r in result["rows"]:
        cells = [fmt(r["ours"].get(k, "")) for k in ours] + [fmt(r["paper"].get(k, "–")) for k in paper]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    if "floor" in result:
        floor = result["floor"]
        lines += ["", f"Real-vs-real floor ({result['images']['samples per set']} training vs test images): "
                      + ", ".join(f"{k} {fmt(v)}" for k, v in floor.items()) + "."]
    return "\n".join(lines + ["", f"**Verdict.** {result['verdict']}", "", result["note"], ""])


def run_study(ws, table, metrics):
    """Makes the study's sets; unless the stage is 'sample', measures them and writes results_<table>.json and
    <table>.md. Returns the metrics object (created on first use: it loads the feature network)."""
    study = STUDIES[table]
    rows = study.rows(ws)
    if ws.stage == "sample":
        print(f"{PROG}: {table}: sets ready in {ws.sets}", flush=True)
        return metrics
    metrics = metrics or Metrics(ws)
    for r in rows:
        measures = r.pop("measures")
        r["ours"] = {k: v for m in measures for k, v in metrics.measure(*m).items()}
    rows_out = [{k: r[k] for k in ("setting", "ours", "paper")} for r in rows]
    r = ws.recipe
    result = {"table": table, "title": study.title, "recipe": ws.recipe_name, "seed": ws.seed,
              "images": {"samples per set": r.fid_images, "reconstructions per set": r.reconstruction_images},
              "features": "Inception-v3 pool_3" if r.features == "inception" else "2x2 mean gray levels (a stand-in)",
              "rows": rows_out, "verdict": study.verdict(rows), "note": study.note}
    if study.generation:
        result["floor"] = metrics.floor()
    write_json(ws.out / f"results_{table}.json", result)
    atomic_save(ws.out / f"{table}.md", lambda f: f.write(markdown(result).encode()))
    print(f"{PROG}: {table}: {result['verdict']}\n  wrote {ws.out / f'results_{table}.json'} and "
          f"{ws.out / f'{table}.md'}", flush=True)
    return metrics


def main(argv=None):
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("table", choices=TABLES + ["all"], help="the study to run (all: every one, in turn)")
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
        for table in TABLES if args.table == "all" else [args.table]:
            metrics = run_study(ws, table, metrics)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: error: {str(e).strip().splitlines()[0]}") from None


if __name__ == "__main__":
    main()
