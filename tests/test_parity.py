"""Parity with the official D-AR implementation: python -m pytest -s -q tests/test_parity.py (-s shows the errors)

tests/golden/official_small.pt holds outputs of the official code for a small configuration (32-px images, 32
tokens in 8 groups, widths 128) with random non-zero weights, so every path (gates, adaLN, output layers) counts:
the L2-normalised latent, the codes, the decoder-transformer output, one pixel-network velocity, full 8-step
decodes with both solvers, a 4-group preview and GPT logits. tests/golden/official_keys.json lists the official
state-dict keys and shapes of the full-size tokenizer_v1 and GPT-B/L/XL/XXL, and the tokenizer_v1 YAML.
Tolerances: 2e-5 absolute for one forward pass, 1e-4 absolute + relative for the 8-step samples (|x| reaches 12).
"""
import json
import math
import os

import pytest
import torch

from model import GPT, GPTConfig
from tokenizer import Tokenizer

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
TRAINING_ONLY = ("quantize.codebook_used", "diff_decoder.net.repa_out.")  # official files may hold these


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(HERE, "official_small.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official_keys():
    with open(os.path.join(HERE, "official_keys.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tok(golden):
    return Tokenizer.from_official(golden["tokenizer_config"], golden["tokenizer_state_dict"])


def assert_matches(name, got, want, atol, rtol=0.0):
    got = got.detach().float()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, official {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    print(f"{name:14s} max abs error {err:.2e} (atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, want.float(), atol=atol, rtol=rtol)


def test_encoder(tok, golden):
    assert_matches("latent", tok.encode_latent(golden["images"]), golden["latent"], 2e-5)
    codes = tok.encode(golden["images"])
    print(f"codes          {int((codes == golden['codes']).sum())}/{codes.numel()} equal")
    assert torch.equal(codes, golden["codes"])


def test_small_model_sizes(tok, golden):
    assert sum(p.numel() for p in tok.parameters()) == sum(v.numel() for v in golden["tokenizer_state_dict"].values())


def test_decoder_transformer_and_pixel_network(tok, golden):
    assert_matches("cond", tok.condition(golden["codes"]), golden["cond"], 2e-5)
    inp = golden["velocity_inputs"]
    M = tok.config.queries_per_step
    group = golden["cond"][:, inp["group"] * M:(inp["group"] + 1) * M]  # (B, M, D)
    assert_matches("velocity", tok.velocity(inp["xt"], inp["t"], group), golden["velocity"], 2e-5)


@pytest.mark.parametrize("method", ["adams2", "euler"])
def test_sampling(tok, golden, method):
    image = tok.decode(golden["codes"], noise=golden["x0"], method=method)
    assert_matches(f"sample_{method}", image, golden[f"sample_{method}"], 1e-4, 1e-4)


def test_preview(tok, golden):
    image = tok.decode(golden["codes"], noise=golden["x0"], groups=golden["preview_steps"])
    assert_matches("preview", image, golden["preview"], 1e-4, 1e-4)


def test_gpt_logits(golden):
    s = golden["sizes"]
    cfg = GPTConfig(n_layer=s["gpt"]["n_layer"], n_head=s["gpt"]["n_head"], dim=s["gpt"]["dim"],
                    vocab_size=s["codebook"], block_size=s["queries"], num_classes=s["classes"])
    gpt = GPT(cfg)
    gpt.load_state_dict(golden["gpt_state_dict"])  # the plain strict load
    logits, _ = gpt.eval()(golden["gpt_tokens"][:, :-1], golden["gpt_labels"])
    assert_matches("gpt_logits", logits, golden["gpt_logits"], 2e-5)


def compare_keys(name, module, official, may_lack=()):
    ours = {k: list(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in official if k not in ours and not k.startswith(may_lack)]
    unexpected = [k for k in ours if k not in official]
    wrong = [k for k in ours if k in official and ours[k] != official[k]]
    print(f"{name:14s} {len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape")
    assert (missing, unexpected, wrong) == ([], [], [])
    # every parameter has its official shape, so the counts agree (the usage buffer is not a parameter)
    want = sum(math.prod(shape) for k, shape in official.items() if k != TRAINING_ONLY[0])
    assert sum(p.numel() for p in module.parameters()) == want
    return want


def test_full_size_tokenizer_keys(official_keys):
    with torch.device("meta"):
        tok = Tokenizer.from_official(official_keys["tokenizer_v1_config"])
    assert compare_keys("tokenizer_v1", tok, official_keys["tokenizer_v1"], TRAINING_ONLY) == 307_444_672


@pytest.mark.parametrize("name", ["GPT-B", "GPT-L", "GPT-XL", "GPT-XXL"])
def test_full_size_gpt_keys(official_keys, name):
    with torch.device("meta"):
        gpt = GPT(GPTConfig.from_name(name, vocab_size=16384, block_size=256, num_classes=1000))
    compare_keys(name, gpt, official_keys[name])
