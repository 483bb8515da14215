"""Tests of model.py (the Llama AR model): python -m pytest -q tests/test_model.py"""
import pytest
import torch

from model import GPT, GPTConfig, cfg_schedule, draw, generate, sampling_probs


def tiny(**kw):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("GPT-tiny", **kw))
    with torch.no_grad():  # the official init zeroes the head; give it weights so logits differ per position
        gpt.output.weight.normal_(std=0.5)
    return gpt.eval()


def uncached_greedy(gpt, labels, cfg_scale):
    """Reference: re-run the full-sequence forward for every new token, guidance and argmax by hand."""
    N, nc = gpt.config.block_size, gpt.config.num_classes
    scales = cfg_schedule(cfg_scale, N)
    tokens = torch.zeros(labels.shape[0], 0, dtype=torch.long)
    for i in range(N):
        logits = gpt(tokens, labels)[0][:, -1]
        if scales is not None:
            uncond = gpt(tokens, torch.full_like(labels, nc))[0][:, -1]
            logits = uncond + scales[i] * (logits - uncond)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0, "1.5,6.0"])
def test_cached_generation_equals_uncached_forward(cfg_scale):
    gpt = tiny()
    labels = torch.tensor([0, 3, 9])
    B = len(labels)
    gpt.setup_caches(2 * B)
    with torch.no_grad():
        want = uncached_greedy(gpt, labels, cfg_scale)
        got = generate(gpt, labels, cfg_scale=cfg_scale, top_k=1)  # top-k 1 = greedy
    assert torch.equal(got, want)


def test_cached_logits_equal_full_forward():
    gpt = tiny()
    tokens, labels = torch.randint(0, 64, (2, 32)), torch.tensor([1, 2])
    gpt.setup_caches(2)
    with torch.no_grad():
        full = gpt(tokens[:, :-1], labels)[0]
        x = gpt._embed(tokens[:, :-1], labels)
        cached = torch.cat([gpt.forward_cached(x[:, :5], torch.arange(5))] +
                           [gpt.forward_cached(x[:, i:i + 1], torch.tensor([i])) for i in range(5, 32)], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_cfg_schedule():
    s = cfg_schedule("1.2,8.0", 256)
    assert s[0].item() == pytest.approx(1.2) and s[-1].item() == pytest.approx(8.0)
    assert s[1].item() == pytest.approx(1.2 + 6.8 / 255)
    assert cfg_schedule("1.0,4.0", 4)[0].item() == pytest.approx(1.001)  # exact 1 is bumped so CFG stays on
    assert torch.equal(cfg_schedule(4.0, 3), torch.full((3,), 4.0))
    assert torch.equal(cfg_schedule("2.5", 3), torch.full((3,), 2.5))
    assert cfg_schedule(1.0, 3) is None and cfg_schedule("1.0", 3) is None  # no guidance: nothing to schedule
    with pytest.raises(ValueError):
        cfg_schedule("1,2,3", 3)


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top2 = draw(sampling_probs(logits, top_k=2), g)
    assert set(top2.tolist()) == {0, 1}
    # top-p 0.7: cumulative (0.5, 0.8, ...) → tokens 0 and 1 survive (the one crossing the threshold is kept)
    topp = draw(sampling_probs(logits, top_p=0.7), g)
    assert set(topp.tolist()) == {0, 1}
    assert set(draw(sampling_probs(logits, top_p=0.4), g).tolist()) == {0}  # the top token is always kept
    counts = torch.bincount(draw(sampling_probs(logits), g), minlength=4).float() / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_sampling_is_reproducible_from_a_generator():
    gpt = tiny()
    gpt.setup_caches(4)
    labels = torch.tensor([1, 2])
    a = generate(gpt, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    b = generate(gpt, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(5))
    c = generate(gpt, labels, cfg_scale=3.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prefix_tokens_are_kept():
    gpt = tiny()
    gpt.setup_caches(4)
    prefix = torch.randint(0, 64, (2, 8))
    out = generate(gpt, torch.tensor([1, 2]), cfg_scale=2.0, prefix=prefix, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 32) and torch.equal(out[:, :8], prefix)


def test_bad_labels_are_rejected():
    gpt = tiny()
    gpt.setup_caches(2)
    with pytest.raises(ValueError, match="labels"):
        generate(gpt, torch.tensor([10]))


def test_loss_and_class_dropout():
    gpt = tiny(class_dropout_prob=0.1)
    gpt.train()
    tokens, labels = torch.randint(0, 64, (4, 32)), torch.tensor([0, 1, 2, 3])
    logits, loss = gpt(tokens[:, :-1], labels, tokens, drop=torch.tensor([True, False, False, False]))
    assert logits.shape == (4, 32, 64) and loss.ndim == 0 and torch.isfinite(loss)
    null = gpt(tokens[:1, :-1], torch.tensor([10]))[0]  # the null class row, index num_classes
    torch.testing.assert_close(logits[:1], null)


def test_presets_and_meta_construction():
    for name, params in [("GPT-B", 110_888_448), ("GPT-L", 342_910_976), ("GPT-XL", 774_699_520),
                         ("GPT-XXL", 1_410_972_672)]:
        with torch.device("meta"):
            gpt = GPT(GPTConfig.from_name(name))
        assert gpt.output.weight.is_meta
        assert sum(p.numel() for p in gpt.parameters()) == params
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.from_name("GPT-Q")


@pytest.mark.parametrize("wrap", ["raw", "model", "module", "state_dict", "compiled"])
def test_official_gpt_files_load(tmp_path, wrap):
    gpt = tiny()
    sd = gpt.state_dict()
    if wrap == "compiled":
        obj = {"_orig_mod." + k: v for k, v in sd.items()}
    else:
        obj = sd if wrap == "raw" else {wrap: sd, "steps": 10}
    torch.save(obj, tmp_path / "gpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "gpt.pt", name="GPT-tiny")
    tokens, labels = torch.randint(0, 64, (2, 31)), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(tokens, labels)[0], gpt(tokens, labels)[0])
    with pytest.raises(ValueError, match="name the preset"):
        GPT.from_checkpoint(tmp_path / "gpt.pt")


def test_strict_load_names_wrong_keys(tmp_path):
    sd = tiny().state_dict()
    sd["layers.0.attention.wqkv.weightx"] = sd.pop("layers.0.attention.wqkv.weight")
    sd["norm.weight"] = torch.ones(7)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        GPT.from_checkpoint(tmp_path / "bad.pt", name="GPT-tiny")
    msg = str(e.value)
    assert "layers.0.attention.wqkv.weightx" in msg and "layers.0.attention.wqkv.weight" in msg and "norm.weight" in msg


def test_our_checkpoint_format_and_mismatch(tmp_path):
    from dataclasses import asdict
    gpt = tiny()
    torch.save({"kind": "gpt", "config": asdict(gpt.config), "model": gpt.state_dict(), "ema": None},
               tmp_path / "ours.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ours.pt")
    assert loaded.config == gpt.config
    with pytest.raises(ValueError, match="not the requested"):
        GPT.from_checkpoint(tmp_path / "ours.pt", name="GPT-B")
    torch.save({"kind": "tokenizer", "config": {}}, tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="tokenizer checkpoint"):
        GPT.from_checkpoint(tmp_path / "tok.pt")


def test_device_length_decode_equals_host_length():
    """kv_len as a device tensor (one decode step: kernels.decode_attention, the SDPA reference on the CPU) gives
    the logits of the host-int path, and neither reads a slot past kv_len."""
    gpt = tiny()
    gpt.setup_caches(2)
    x = gpt._embed(torch.randint(64, (2, 12)), torch.tensor([1, 2]))  # (2, 13, C)
    with torch.no_grad():
        gpt.forward_cached(x[:, :12], torch.arange(12), kv_len=12)
        for cache in (layer.attention.kv_cache for layer in gpt.layers):
            cache.k_cache[:, :, 13:], cache.v_cache[:, :, 13:] = float("nan"), 1e4  # slots past kv_len
        p = torch.tensor([12])
        host = gpt.forward_cached(x[:, 12:], p, kv_len=13)
        device = gpt.forward_cached(x[:, 12:], p, kv_len=torch.tensor([13]))
    assert torch.isfinite(host).all() and torch.equal(device, host)


class Payload:
    """Pickles as a call to os.system that creates `marker`: what a malicious checkpoint would run on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("fmt", ["official", "ours", "legacy"])
def test_malicious_gpt_files_are_refused_without_running(tmp_path, fmt):
    import argparse
    from dataclasses import asdict
    gpt, marker, path = tiny(), tmp_path / "ran", tmp_path / "evil.pt"
    if fmt == "official":  # a state dict under `model` with training arguments, as the official trainer saves
        ckpt = {"model": gpt.state_dict(), "steps": 10, "args": argparse.Namespace(hook=Payload(marker))}
    else:
        ckpt = {"kind": "gpt", "config": asdict(gpt.config), "model": gpt.state_dict(), "ema": Payload(marker)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=fmt != "legacy")
    with pytest.raises(ValueError, match=f"{path}.*refused.*system"):
        GPT.from_checkpoint(path, name="GPT-tiny" if fmt == "official" else None)
    assert not marker.exists()


def test_official_gpt_file_with_training_arguments_loads(tmp_path):
    import argparse
    gpt = tiny()
    torch.save({"model": gpt.state_dict(), "steps": 10, "args": argparse.Namespace(lr=1e-4, gpt_model="GPT-tiny")},
               tmp_path / "gpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "gpt.pt", name="GPT-tiny")
    assert torch.equal(loaded.output.weight, gpt.output.weight)


def test_damaged_and_non_finite_gpt_files_are_named(tmp_path):
    sd = tiny().state_dict()
    torch.save(sd, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    for name, content in {"empty.pt": b"", "truncated.pt": data[:1000], "random.pt": bytes(range(256)) * 8}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            GPT.from_checkpoint(tmp_path / name, name="GPT-tiny")
    sd["norm.weight"][3] = float("inf")
    torch.save(sd, tmp_path / "inf.pt")
    with pytest.raises(ValueError, match="inf.pt.*non-finite.*norm.weight"):
        GPT.from_checkpoint(tmp_path / "inf.pt", name="GPT-tiny")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        GPT.from_checkpoint(tmp_path / "list.pt", name="GPT-tiny")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        GPT.from_checkpoint(tmp_path / "missing.pt", name="GPT-tiny")


def test_rope_table_stays_float32_under_dtype_casts():
    gpt = tiny()
    want = gpt.rope.clone()
    gpt.to(torch.bfloat16)
    assert gpt.output.weight.dtype == torch.bfloat16
    assert gpt.rope.dtype == torch.float32 and torch.equal(gpt.rope, want)
    gpt.setup_caches(2)
    gpt.half().float()
    assert gpt.rope.dtype == torch.float32 and torch.equal(gpt.rope[: len(want)], want)


def test_null_class_is_explicit():
    assert GPT(GPTConfig.from_name("GPT-tiny")).cls_embedding.embedding_table.weight.shape[0] == 11
    gpt = GPT(GPTConfig.from_name("GPT-tiny", null_class=False, class_dropout_prob=0.0)).eval()
    assert gpt.cls_embedding.embedding_table.weight.shape[0] == 10
    gpt.setup_caches(2)
    assert generate(gpt, torch.tensor([1]), cfg_scale=1.0).shape == (1, 32)
    with pytest.raises(ValueError, match="null class"):
        generate(gpt, torch.tensor([1]), cfg_scale=3.0)
    with pytest.raises(ValueError, match="null_class"):
        GPTConfig.from_name("GPT-tiny", null_class=False)  # dropout to a class that does not exist


def test_forward_admits_block_size_minus_one_tokens():
    gpt = tiny()
    assert gpt(torch.zeros(1, 31, dtype=torch.long), torch.tensor([0]))[0].shape == (1, 32, 64)
    with pytest.raises(ValueError, match="at most 31 input tokens, got 32"):
        gpt(torch.zeros(1, 32, dtype=torch.long), torch.tensor([0]))
