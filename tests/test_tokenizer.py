"""Tests of tokenizer.py (the sequential diffusion tokenizer): python -m pytest -q tests/test_tokenizer.py

Parity with the official outputs is tested in tests/test_parity.py; these tests cover the rest."""
import argparse
import importlib
import json
import os
import sys
import types

import pytest
import torch

from tokenizer import Tokenizer, TokenizerConfig

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(GOLDEN, "official_small.pt"), weights_only=True)


def tiny_tokenizer(seed=0):
    torch.manual_seed(seed)
    tok = Tokenizer(TokenizerConfig.from_name("tiny"))
    with torch.no_grad():  # the official init zeroes gates and adaLN: randomise so every path is exercised
        for p in tok.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tok.eval()


def test_golden_training_loss_reaches_every_parameter(golden):
    torch.manual_seed(0)
    tok = Tokenizer.from_official(golden["tokenizer_config"], golden["tokenizer_state_dict"]).train()
    images = golden["images"]
    # one time in each of the first and last groups: together they touch every token position
    out = tok.loss(images[:2].repeat(2, 1, 1, 1), t=torch.tensor([0.01, 0.3, 0.6, 0.99]))
    total = out["fm"] + out["vq"] + out["commit"] + (out["x1_hat"] - images[:2].repeat(2, 1, 1, 1)).abs().mean()
    assert all(torch.isfinite(out[k]) for k in ("fm", "vq", "commit"))
    total.backward()
    dead = [n for n, p in tok.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_loss_masks_vq_terms_to_selected_groups():
    tok = tiny_tokenizer().train()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    early = tok.loss(images, t=torch.tensor([0.01]))  # group 0: tokens 0..3
    late = tok.loss(images, t=torch.tensor([0.99]))  # last group: all tokens
    z = tok.encode_latent(images)
    zq = tok.quantize.codebook()[tok.encode(images)]
    per_token = ((zq - z) ** 2).mean(-1)[0]  # (N,)
    torch.testing.assert_close(early["vq"], per_token[:4].mean())
    torch.testing.assert_close(late["vq"], per_token.mean())
    torch.testing.assert_close(late["commit"], 0.25 * per_token.mean())


def test_quantizer_straight_through_gradient():
    tok = tiny_tokenizer()
    z = torch.randn(2, 32, 8, requires_grad=True)
    zn, codes, zq = tok.quantize(z)
    st = zn + (zq - zn).detach()
    torch.testing.assert_close(st, zq)  # forward value: the chosen code
    w = torch.randn_like(st)
    (st * w).sum().backward()
    # backward: the gradient passes to the normalised latent unchanged, i.e. through the normalisation only
    zr = z.detach().clone().requires_grad_(True)
    (torch.nn.functional.normalize(zr, dim=-1) * w).sum().backward()
    torch.testing.assert_close(z.grad, zr.grad)
    assert codes.dtype == torch.int64 and codes.shape == (2, 32)


def test_preview_and_decode_consistency():
    tok = tiny_tokenizer()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    noise = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tok.decode(codes, noise=noise)
        assert torch.equal(tok.decode(codes, noise=noise, groups=8), full)
        # codes after the first k groups cannot influence the preview after k groups (causal decoder)
        other = codes.clone()
        other[:, 12:] = torch.randint(0, 64, (2, 20))
        torch.testing.assert_close(tok.decode(other, noise=noise, groups=3), tok.decode(codes, noise=noise, groups=3))
        x, v, cond = noise, None, tok.condition(codes)
        for k, s in enumerate(tok.group_slices(8), 1):
            x, v, p = tok.solver_step(x, v, k - 1, cond[:, s])
            torch.testing.assert_close(p, tok.decode(codes, noise=noise, groups=k))
    with pytest.raises(ValueError):
        tok.decode(codes, groups=0)
    with pytest.raises(ValueError):
        tok.decode(codes, noise=noise, method="heun")


def test_incremental_condition_equals_full():
    tok = tiny_tokenizer()
    codes = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        full = tok.condition(codes)
        cache = tok.new_condition_cache()
        parts = [tok.condition(codes[:, i:i + 4], cache) for i in range(0, 32, 4)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_decode_draws_noise_from_generator():
    tok = tiny_tokenizer()
    codes = torch.randint(0, 64, (1, 32))
    with torch.no_grad():
        a = tok.decode(codes, generator=torch.Generator().manual_seed(1))
        b = tok.decode(codes, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)


def test_reconstruct_shapes_and_bad_size():
    tok = tiny_tokenizer()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert tok.reconstruct(x, generator=torch.Generator().manual_seed(0)).shape == x.shape
    with pytest.raises(ValueError, match="patch size"):
        tok.encode(torch.zeros(1, 3, 30, 30))


def test_official_config_conversion():
    with open(os.path.join(GOLDEN, "official_keys.json")) as f:
        keys = json.load(f)
    assert TokenizerConfig.from_official(keys["tokenizer_v1_config"]) == TokenizerConfig.from_name("tokenizer_v1")
    with pytest.raises(ValueError, match="unknown"):
        TokenizerConfig.from_official({"encoder_dim": 768, "fancy": 1})
    with pytest.raises(ValueError, match="num_all_queries"):
        TokenizerConfig(num_all_queries=100)


def test_full_size_tokenizer_on_meta_device():
    with torch.device("meta"):
        tok = Tokenizer(TokenizerConfig.from_name("tokenizer_v1"))
    assert tok.patchify.weight.is_meta
    assert sum(p.numel() for p in tok.parameters()) == 307_444_672  # the official count, REPA projector included


class Payload:
    """Pickles as a call to os.system that creates `marker`: what a malicious checkpoint would run on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def official_config_class():
    """A class pickled as the official `config_util.Config` (its data in `_data`), without the official code."""
    class Config:
        def __init__(self, data):
            self._data = data
    Config.__module__, Config.__qualname__ = "config_util", "Config"
    return Config


TINY_OFFICIAL = {"encoder_patch_size": 8, "num_encoder_layers": 2, "num_decoder_layers": 2, "query_low_rank": True,
                 "encoder_dim": 128, "decoder_dim": 128, "vq_dim": 8, "vq_codebook_size": 64,
                 "num_denoising_steps": 8, "num_query_groups": 8, "num_all_queries": 32, "queries_per_step": 4,
                 "vq_enable": True, "sampling_resolution": 32,
                 "diff_decoder": {"in_dim": 3, "out_dim": 3, "dim": 128, "cond_dim": 128, "patch_size": 4,
                                  "depth": 2, "data_std": 0.6, "time_shift": 2.0, "mlp_head": False,
                                  "share_time_encoding": False}}


def save_official(path, tok, config, **extra):
    """Writes a file the way the official trainer does, config_util.Config object inside."""
    mod = types.ModuleType("config_util")
    mod.Config = type(config)
    sys.modules["config_util"] = mod
    try:
        torch.save({"model": official_style_state(tok), "ema": official_style_state(tok), "optimizer": {},
                    "steps": 5, "args": argparse.Namespace(lr=1e-4), "config": config, **extra}, path)
    finally:
        del sys.modules["config_util"]


def official_style_state(tok):
    sd = dict(tok.state_dict())
    sd["quantize.codebook_used"] = torch.zeros(65536)  # the official trainer's usage buffer
    return sd


def test_official_tokenizer_file_loads_without_config_util(tmp_path):
    tok = tiny_tokenizer()
    config = official_config_class()({"model": TINY_OFFICIAL, "train": {"lr": 1e-4}})
    save_official(tmp_path / "official.pt", tok, config)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("config_util")
    loaded = Tokenizer.from_checkpoint(tmp_path / "official.pt")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert not loaded.training


def test_strict_load_names_wrong_keys():
    tok = tiny_tokenizer()
    cfg = {"encoder_patch_size": 8, "num_encoder_layers": 2, "num_decoder_layers": 2, "encoder_dim": 128,
           "decoder_dim": 128, "vq_codebook_size": 64, "num_all_queries": 32, "queries_per_step": 4,
           "sampling_resolution": 32, "diff_decoder": {"dim": 128, "patch_size": 4, "depth": 2}}
    sd = tok.state_dict()
    sd["patchify.weigth"] = sd.pop("patchify.weight")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_official(cfg, sd)
    assert "patchify.weigth" in str(e.value) and "patchify.weight" in str(e.value)
    sd = tok.state_dict()
    sd["quant_in_conv.weight"] = torch.zeros(4, 128, 1, 1)
    with pytest.raises(ValueError, match="quant_in_conv.weight"):
        Tokenizer.from_official(cfg, sd)
    # the training-only keys may be present or absent
    assert Tokenizer.from_official(cfg, official_style_state(tok)) is not None


def test_our_checkpoint_and_wrong_kind(tmp_path):
    from dataclasses import asdict
    tok = tiny_tokenizer()
    torch.save({"kind": "tokenizer", "config": asdict(tok.config), "model": tok.state_dict(), "ema": None},
               tmp_path / "ours.pt")
    assert Tokenizer.from_checkpoint(tmp_path / "ours.pt").config == tok.config
    torch.save({"kind": "gpt", "config": {}}, tmp_path / "gpt.pt")
    with pytest.raises(ValueError, match="not a tokenizer"):
        Tokenizer.from_checkpoint(tmp_path / "gpt.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_checkpoint(tmp_path / "missing.pt")


def test_loaded_tokenizer_decodes_without_autograd(tmp_path):
    from dataclasses import asdict
    tok = tiny_tokenizer()
    torch.save({"kind": "tokenizer", "config": asdict(tok.config), "model": tok.state_dict(), "ema": None},
               tmp_path / "ours.pt")
    loaded = Tokenizer.from_checkpoint(tmp_path / "ours.pt")
    assert all(p.requires_grad for p in loaded.parameters())  # training still gets gradients
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    codes = loaded.encode(images)
    assert loaded.decode(codes).requires_grad is False
    assert loaded.encode_latent(images).requires_grad is False
    assert loaded.condition(codes).requires_grad is False
    assert loaded.reconstruct(images).requires_grad is False


def test_step_schedule_follows_the_official_rule():
    tok = tiny_tokenizer()  # 8 groups of 4 tokens, 8 steps by default
    starts = lambda steps: [s.start // 4 for s in tok.group_slices(steps)]  # noqa: E731
    # step i of S sits at raw time i/S and uses the group nearest to it (rounded half up, last group clamped)
    assert starts(8) == list(range(8))
    assert starts(4) == [0, 2, 4, 6]
    assert starts(16) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 7]
    # shift(t) = t / (t + 2(1 - t)) on i/S, then exactly 1
    torch.testing.assert_close(tok.schedule(4), torch.tensor([0, 1 / 7, 1 / 3, 0.6, 1.0]))
    torch.testing.assert_close(tok.schedule(8)[:4], torch.tensor([0, 1 / 15, 1 / 7, 3 / 13]))


@pytest.mark.parametrize("steps", [4, 12, 16])
def test_decode_with_other_step_counts_matches_a_plain_solver(steps):
    tok = tiny_tokenizer()
    codes = torch.randint(0, 64, (2, 32))
    noise = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cond = tok.condition(codes)
        t = tok.schedule(steps).tolist()
        x, v_prev = noise.clone(), None
        for i, s in enumerate(tok.group_slices(steps)):  # Adams-Bashforth 2 with constant coefficients
            v = tok.velocity(x, torch.full((2,), t[i]), cond[:, s])
            x = x + (t[i + 1] - t[i]) * (v if v_prev is None else 1.5 * v - 0.5 * v_prev)
            v_prev = v
    torch.testing.assert_close(tok.decode(codes, noise=noise, steps=steps), x / 0.6, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tok.decode(codes, noise=noise, steps=steps), tok.decode(codes, noise=noise))


def test_solver_steps_give_decode_and_previews():
    tok = tiny_tokenizer()
    codes = torch.randint(0, 64, (2, 32))
    noise = torch.randn(2, 3, 32, 32)
    cond = tok.condition(codes)
    x, v = noise, None
    for k, s in enumerate(tok.group_slices(8)):
        x, v, preview = tok.solver_step(x, v, k, cond[:, s], method="euler")
        assert torch.equal(preview, tok.decode(codes, noise=noise, method="euler", groups=k + 1))
    assert torch.equal(x / 0.6, preview)
    # 16 steps: groups=2 runs the three steps that groups 0 and 1 condition, then jumps to t = 1
    x, v = noise, None
    for k, s in enumerate(tok.group_slices(16)[:3]):
        x, v, preview = tok.solver_step(x, v, k, cond[:, s], steps=16)
    assert torch.equal(preview, tok.decode(codes, noise=noise, groups=2, steps=16))
    with pytest.raises(ValueError, match="outside"):
        tok.solver_step(noise, None, 8, cond[:, :4])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        tok.decode(codes, noise=noise, steps=0)


def test_reconstruct_decodes_at_the_input_size():
    tok = tiny_tokenizer()  # sampling_resolution 32
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert tok.reconstruct(x, generator=torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)
    assert tok.decode(tok.encode(x)).shape == (1, 3, 32, 32)  # codes alone decode at sampling_resolution


def test_payload_runs_when_unpickled_unsafely(tmp_path):
    import pickle
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))  # the refusal tests below are not vacuous
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("fmt", ["ours", "official", "legacy"])
def test_malicious_tokenizer_files_are_refused_without_running(tmp_path, fmt):
    from dataclasses import asdict
    tok, marker, path = tiny_tokenizer(), tmp_path / "ran", tmp_path / "evil.pt"
    if fmt == "official":  # the payload hides inside the pickled Config
        save_official(path, tok, official_config_class()({"model": TINY_OFFICIAL, "hook": Payload(marker)}))
    else:
        ckpt = {"kind": "tokenizer", "config": asdict(tok.config), "model": tok.state_dict(), "ema": Payload(marker)}
        torch.save(ckpt, path, _use_new_zipfile_serialization=fmt == "ours")  # legacy: torch's pre-1.6 format
    with pytest.raises(ValueError, match=f"{path}.*refused.*system"):
        Tokenizer.from_checkpoint(path)
    assert not marker.exists()


def test_damaged_tokenizer_files_are_named(tmp_path):
    from dataclasses import asdict
    tok = tiny_tokenizer()
    ckpt = {"kind": "tokenizer", "config": asdict(tok.config), "model": tok.state_dict(), "ema": None}
    torch.save(ckpt, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    files = {"empty.pt": b"", "truncated.pt": data[: len(data) // 2], "random.pt": os.urandom(4096)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            Tokenizer.from_checkpoint(tmp_path / name)
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # benign pre-1.6 files load
    assert Tokenizer.from_checkpoint(tmp_path / "legacy.pt").config == tok.config


def test_non_finite_tokenizer_weights_are_refused(tmp_path):
    from dataclasses import asdict
    tok = tiny_tokenizer()
    sd = tok.state_dict()
    sd["diff_decoder.net.conv_out.bias"][0] = float("nan")
    torch.save({"kind": "tokenizer", "config": asdict(tok.config), "model": sd, "ema": None}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt.*non-finite.*conv_out.bias"):
        Tokenizer.from_checkpoint(tmp_path / "nan.pt")


def test_compiled_model_keys_load(tmp_path):
    tok = tiny_tokenizer()
    compiled = {"_orig_mod." + k: v for k, v in official_style_state(tok).items()}  # official trainer: compiled
    save_official(tmp_path / "official.pt", tok, official_config_class()({"model": TINY_OFFICIAL}), model=compiled,
                  ema=None)
    loaded = Tokenizer.from_checkpoint(tmp_path / "official.pt", use_ema=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_latent(x), tok.encode_latent(x))


def test_encoder_and_pixel_decoder_have_their_own_rope_base():
    cfg = TokenizerConfig.from_official({**TINY_OFFICIAL, "rope_base_len": 100.0,
                                         "diff_decoder": {**TINY_OFFICIAL["diff_decoder"], "rope_base_len": 5000.0}})
    assert (cfg.rope_base_len, cfg.dd_rope_base_len) == (100.0, 5000.0)
    base = tiny_tokenizer()
    x, xt, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32), torch.tensor([0.2, 0.7])
    cond = torch.randn(2, 4, 128)

    def variant(**kw):
        tok = Tokenizer(TokenizerConfig.from_name("tiny", **kw))
        tok.load_state_dict(base.state_dict())
        return tok.eval()
    enc, dec = variant(rope_base_len=100.0), variant(dd_rope_base_len=100.0)
    assert torch.equal(dec.encode_latent(x), base.encode_latent(x))
    assert not torch.allclose(enc.encode_latent(x), base.encode_latent(x))
    assert torch.equal(enc.velocity(xt, t, cond), base.velocity(xt, t, cond))
    assert not torch.allclose(dec.velocity(xt, t, cond), base.velocity(xt, t, cond))


def test_repa_projector_and_table_sizes_are_explicit_fields():
    assert Tokenizer(TokenizerConfig.from_name("tiny")).diff_decoder.net.repa_out is not None
    with torch.device("meta"):
        fmnist = Tokenizer(TokenizerConfig.from_name("fmnist"))
    assert fmnist.diff_decoder.net.repa_out is None
    assert fmnist.query_embedding.weight.shape[0] == fmnist.decoder_embedding.weight.shape[0] == 1024
    # official configs: projector only where its features exist (depth > repa_layer, 8 by default)
    assert TokenizerConfig.from_official(TINY_OFFICIAL).repa is False
    with pytest.raises(ValueError, match="repa_layer"):
        TokenizerConfig.from_name("tiny", repa_layer=2)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenizerConfig.from_name("tiny", max_tokens=16)


def test_precision_sets_the_tf32_switches_inside_and_restores_them():
    from tokenizer import precision
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for name, inside in (("tf32", (True, True)), ("fp32", (False, False)), ("bf16", (False, False))):
        with precision(name, "cpu"):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == inside
            assert torch.is_autocast_enabled("cpu") == (name == "bf16")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError, match="precision 'fp16'"):
        with precision("fp16", "cpu"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_decoding_stays_close_to_fp32_on_cuda():
    """TF32 rounds matmul and convolution inputs to 10-bit mantissas: the same tokens decode within 1e-2 of strict
    fp32 (the full-size tokenizer: 1.6e-3 at most, docs/results.md), and strict fp32 really differs from it."""
    from tokenizer import precision
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny")).cuda().eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.1 * torch.randn_like(p))
    codes = torch.randint(64, (4, 32), device="cuda")
    noise = torch.randn(4, 3, 32, 32, device="cuda")
    out = {}
    for name in ("fp32", "tf32"):
        with precision(name, "cuda"):
            out[name] = tok.decode(codes, noise=noise)
    diff = (out["tf32"] - out["fp32"]).abs().max().item()
    assert 0 < diff < 1e-2, diff
