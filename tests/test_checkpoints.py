"""Tests of the shipped default model (checkpoints/): python -m pytest -q tests/test_checkpoints.py

The tokenizer and AR model trained on Fashion-MNIST with this repository's scripts must produce images that the
small classifier of evaluate.py recognises as their class."""
import os

import pytest
import torch

import sample
from data import fmnist_dir
from evaluate import fmnist_reconstruction, load_fmnist_classifier
from model import GPT, generate
from tokenizer import Tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "checkpoints")
FILES = {name: os.path.join(ROOT, name) for name in ("tokenizer_fmnist.pt", "gpt_fmnist.pt", "fmnist_classifier.pt")}


@pytest.fixture(scope="module")
def shipped():
    missing = [p for p in FILES.values() if not os.path.isfile(p)]
    if missing:
        pytest.fail(f"shipped checkpoints missing: {missing}")
    return Tokenizer.from_checkpoint(FILES["tokenizer_fmnist.pt"]), GPT.from_checkpoint(FILES["gpt_fmnist.pt"])


def test_shipped_checkpoints_are_small():
    assert sum(os.path.getsize(p) for p in FILES.values()) < 20e6
    assert os.path.getsize(FILES["fmnist_classifier.pt"]) < 1e6


@pytest.fixture(scope="module")
def accuracy(shipped):
    """The classifier's accuracy on 100 samples (10 per class) at sample.py's default guidance, 4.0, drawn
    sequentially (model.generate) or speculatively (a window of 16, as sample.py --speculative 16), in batches of 50."""
    tok, gpt = shipped
    classifier = load_fmnist_classifier(FILES["fmnist_classifier.pt"])
    labels = torch.arange(10).repeat_interleave(10)
    g = torch.Generator().manual_seed(0)

    def of(images):
        assert images.shape == (100, 3, 32, 32)
        return (classifier.classify(images) == labels).float().mean().item()

    with torch.no_grad():
        sequential = of(torch.cat([tok.decode(generate(gpt, y, cfg_scale=4.0, generator=g), generator=g)
                                   for y in labels.split(50)]))
        step = sample.SpeculativeStep(gpt, 50, 16, 4.0, generator=g)
        speculative = of(torch.cat([sample.sample_batch(gpt, tok, y, step, keep_previews=False)[2]
                                    for y in labels.split(50)]))
    return dict(sequential=sequential, speculative=speculative)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sequential", "speculative"])
def test_generated_samples_are_recognised(accuracy, sampler):
    """These 100 samples (CPU, fp32): 100% either way; 1,000 of `python sample.py` on a GPU: 100%, 5,000: 99.6% (the
    classifier recognises 91.2% of the real test images)."""
    assert accuracy[sampler] >= 0.95, f"only {accuracy[sampler]:.0%} of the samples are classified as their label"


@pytest.mark.slow
def test_speculative_samples_are_recognised_as_often(accuracy):
    """Speculative decoding changes only the number of forwards: the accuracies agree within binomial noise."""
    p = (accuracy["sequential"] + accuracy["speculative"]) / 2
    assert abs(accuracy["sequential"] - accuracy["speculative"]) <= 3 * (2 * max(p * (1 - p), 0.01) / 100) ** 0.5


@pytest.mark.slow
def test_reconstruction_keeps_the_class(shipped):
    tok, _ = shipped
    if not (fmnist_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    m = fmnist_reconstruction(tok, load_fmnist_classifier(FILES["fmnist_classifier.pt"]), num_images=100)
    # these 100 images: 23.6 dB and 85% kept; the first 1,000: 23.1 dB and 88.5% (originals: 92.3%)
    assert m["PSNR"] > 22.5, f"reconstruction PSNR {m['PSNR']:.1f} dB"
    accuracy = m["Class accuracy of reconstructions"]
    assert accuracy >= 0.82, f"only {accuracy:.0%} of the reconstructions keep their class"
