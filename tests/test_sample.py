"""Tests of sample.py on tiny random models, CPU (the CUDA checks skip without a GPU).

    python -m pytest -q tests/test_sample.py

The torchrun test starts 2 gloo processes (a few seconds).
"""
import itertools
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import sample  # noqa: E402
from data import to_uint8  # noqa: E402
from model import GPT, GPTConfig, cfg_schedule, generate, guide, sampling_probs  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig, precision  # noqa: E402


def jitter(module, scale):
    """Random weights everywhere: at the official init the gates, adaLN and output head are zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny tokenizer (32 tokens in 8 groups of 4, codebook 64, 32 px) and a matching GPT-tiny, in our format."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tok = jitter(Tokenizer(TokenizerConfig.from_name("tiny")), 0.1)
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), d / "tok.pt")
    for name, overrides in (("gpt", {}), ("gpt_rev", dict(reverse_order=True)), ("gpt_big", dict(vocab_size=128)),
                            ("gpt_nonull", dict(null_class=False, class_dropout_prob=0.0))):
        gpt = jitter(GPT(GPTConfig.from_name("GPT-tiny", **overrides)), 0.5)
        torch.save(dict(kind="gpt", config=asdict(gpt.config), model=gpt.state_dict(), ema=None), d / f"{name}.pt")
    (d / "junk.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(d / "ref.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    Image.new("1", (8200, 8200)).save(d / "bomb.png")  # 67M pixels in 8 kB: a decompression bomb
    Image.new("L", (1, 3000)).save(d / "strip.png")  # would be resized to 32×96000 before its crop
    Image.new("RGB", (40, 40)).save(d / "tiff.png", format="TIFF")  # a format dar does not read, under a PNG name
    return d


def argv(ckpts, *extra, gpt="gpt.pt"):
    return ["--tokenizer-ckpt", str(ckpts / "tok.pt"), "--gpt-ckpt", str(ckpts / gpt), "--device", "cpu",
            *map(str, extra)]


def models(ckpts, gpt="gpt.pt"):
    return sample.load_models(ckpts / "tok.pt", ckpts / gpt, None, torch.float32, torch.device("cpu"))


def run(gpt, tok, labels, seed, cfg_scale="1.5,3.0", **kw):
    """sample_batch with a fresh eager DecodeStep whose generator is seeded with `seed`."""
    step = sample.DecodeStep(gpt, len(labels), cfg_scale, generator=torch.Generator().manual_seed(seed))
    return sample.sample_batch(gpt, tok, labels, step, **kw)


def events(gpt, tok, labels, seed, **kw):
    """The loop's events as (kind, index) pairs, with the noise it was given."""
    step = sample.DecodeStep(gpt, len(labels), 4.0, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return [(kind, i) for kind, i, _ in sample.stream(gpt, tok, labels, noise, step, **kw)]


@pytest.mark.parametrize("solver", ["adams2", "euler"])
def test_streamed_decoding_equals_offline(ckpts, solver):
    tok, gpt = models(ckpts)
    tokens, noise, image, previews = run(gpt, tok, torch.tensor([0, 3, 9]), 1, solver=solver)
    assert tokens.shape == (3, 32) and previews.shape == (3, 8, 32, 32, 3) and previews.dtype == torch.uint8
    offline = tok.decode(tokens, noise=noise, method=solver)
    assert offline.std() > 0.1  # a real image, not a constant
    torch.testing.assert_close(image, offline, atol=1e-5, rtol=1e-5)
    for k in (1, 4):  # previews are stored as uint8: equal up to the rounding of the conversion
        ref = to_uint8(tok.decode(tokens, noise=noise, method=solver, groups=k)).int()
        assert (previews[:, k - 1].int() - ref).abs().max() <= 1
    assert torch.equal(previews[:, -1], to_uint8(image))  # the last preview is the image
    assert not torch.equal(previews[:, 0], previews[:, -1])


@pytest.mark.parametrize("steps", [4, 8, 12, 16])
def test_any_step_count_streams_and_equals_offline(ckpts, steps):
    """8 groups drive 4, 8, 12 or 16 solver steps (paper Table 2): every preview equals the offline decode of the
    groups its steps need, and the image tok.decode with that many steps."""
    tok, gpt = models(ckpts)
    tokens, noise, image, previews = run(gpt, tok, torch.tensor([2, 7]), 5, steps=steps)
    assert previews.shape[1] == steps
    torch.testing.assert_close(image, tok.decode(tokens, noise=noise, steps=steps), atol=1e-5, rtol=1e-5)
    for groups in range(1, 9):
        n = tok.steps_for_groups(groups, steps)
        ref = to_uint8(tok.decode(tokens, noise=noise, groups=groups, steps=steps)).int()
        assert (previews[:, n - 1].int() - ref).abs().max() <= 1, (groups, n)


def test_a_steps_pixel_side_is_made_once_per_setting_and_starts_afresh_each_batch(ckpts):
    """The step keeps one PixelSteps per (steps, solver, precision); a batch after others (and after a batch cut
    short) samples what the same batch does on a fresh step."""
    tok, gpt = models(ckpts)
    labels = torch.tensor([3, 8])
    fresh = run(gpt, tok, labels, 9, steps=16)
    step = sample.DecodeStep(gpt, 2, "1.5,3.0", generator=torch.Generator())
    for steps in (8, 16, 8):
        step.settings["generator"].manual_seed(1)
        sample.sample_batch(gpt, tok, labels, step, steps=steps)
    noise = torch.zeros(2, 3, 32, 32)
    next(kind for kind, _, _ in sample.stream(gpt, tok, labels, noise, step, steps=16) if kind == "preview")
    assert len(step.pixel_steps) == 2
    step.settings["generator"].manual_seed(9)
    again = sample.sample_batch(gpt, tok, labels, step, steps=16)
    for a, b in zip(fresh, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [4, 8, 16])
def test_a_solver_step_runs_as_soon_as_its_group_is_complete(ckpts, steps):
    tok, gpt = models(ckpts)
    M, slices = tok.config.queries_per_step, tok.group_slices(steps)
    expected = []
    for i in range(32):
        expected += [("token", i)] + [("preview", k) for k, s in enumerate(slices) if s.stop == i + 1]
    assert events(gpt, tok, torch.tensor([1, 2]), 4, steps=steps) == expected
    assert M * 8 == 32


def test_layout_prefix_groups_are_decoded_before_the_first_token(ckpts):
    tok, gpt = models(ckpts)
    prefix = torch.randint(64, (1, 12), generator=torch.Generator().manual_seed(0))  # 3 groups of 4
    got = events(gpt, tok, torch.tensor([1, 2]), 4, prefix=prefix.expand(2, -1))
    assert got[:5] == [("token", 0), ("preview", 0), ("preview", 1), ("preview", 2), ("token", 1)]


def test_decode_step_equals_the_offline_sampler(ckpts):
    """On the CPU the step slices the cache at a host length, as model.generate does: the same tokens."""
    tok, gpt = models(ckpts)
    labels = torch.tensor([1, 2])
    tokens, noise, _, _ = run(gpt, tok, labels, 0, cfg_scale=4.0)
    g = torch.Generator().manual_seed(0)
    torch.randn(noise.shape, generator=g)  # the noise is drawn first
    assert torch.equal(tokens, generate(gpt, labels, cfg_scale=4.0, generator=g))


def test_stopping_early_leaves_the_model_usable(ckpts):
    tok, gpt = models(ckpts)
    assert events(gpt, tok, torch.tensor([1]), 0)[:3] == [("token", 0), ("token", 1), ("token", 2)]
    step = sample.DecodeStep(gpt, 1, 4.0, generator=torch.Generator().manual_seed(0))
    loop = sample.stream(gpt, tok, torch.tensor([1]), torch.zeros(1, 3, 32, 32), step)
    next(loop)
    loop.close()  # e.g. the demo's cancel: the generator exits cleanly
    assert run(gpt, tok, torch.tensor([1]), 0)[2].shape == (1, 3, 32, 32)


def test_reverse_order_flips_before_decoding(ckpts):
    tok, gpt = models(ckpts, gpt="gpt_rev.pt")
    labels = torch.tensor([1, 2])
    tokens, noise, image, _ = run(gpt, tok, labels, 2, cfg_scale=4.0)
    g = torch.Generator().manual_seed(2)
    torch.randn(noise.shape, generator=g)  # the noise is drawn first
    assert torch.equal(tokens, generate(gpt, labels, cfg_scale=4.0, generator=g).flip(1))
    torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-5, rtol=1e-5)
    seen = events(gpt, tok, labels, 2)  # the first group comes last: every step waits for the last token
    assert seen == [("token", i) for i in range(32)] + [("preview", k) for k in range(8)]


def sequence_probs(gpt, label, cfg_scale, top_k, prefix):
    """Every continuation of `prefix` (tuples) and its probability under the sequential sampler, by enumeration."""
    N, V = gpt.config.block_size, gpt.config.vocab_size
    seqs = [prefix + rest for rest in itertools.product(range(V), repeat=N - len(prefix))]
    t = torch.tensor(seqs)
    with torch.no_grad():
        cond, _ = gpt(t[:, :-1], torch.full((len(seqs),), label))
        null, _ = gpt(t[:, :-1], torch.full((len(seqs),), gpt.config.num_classes))
    logits = guide(torch.cat([cond, null]), cfg_schedule(cfg_scale, N)[None, :, None])
    p = sampling_probs(logits, top_k=top_k).gather(-1, t[..., None])[..., 0]  # (S, N)
    return seqs, p[:, len(prefix):].prod(-1)


@pytest.mark.parametrize("window, batch, runs, prefix", [(2, 4, 800, ()), (4, 400, 8, ()), (3, 4, 500, (1,))])
def test_speculative_sampling_is_exact_in_distribution(window, batch, runs, prefix):
    """3 tokens from 4 codes under a guidance ramp and top-k 3: the sequences of many speculative runs pass a χ² test
    against the enumerated distribution. Small batches accept whole windows; batch 400 advances by its slowest row,
    so rows carry verified tokens over; a window past the last token (4 > 3); a prefix. (A rule that accepts drafts
    twice as often, or resamples from p instead of max(0, p - q), fails with p < 1e-14.)"""
    torch.manual_seed(0)
    gpt = jitter(GPT(GPTConfig(n_layer=2, n_head=2, dim=32, vocab_size=4, block_size=3, num_classes=2,
                               multiple_of=32, token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0)), 0.15)
    seqs, probs = sequence_probs(gpt, 1, "1.5,3.0", 3, prefix)
    step = sample.SpeculativeStep(gpt, batch, window, "1.5,3.0", top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(len(seqs))
    index = {s: k for k, s in enumerate(seqs)}
    with torch.no_grad():
        for _ in range(runs):
            tokens = torch.tensor([prefix + (0,) * (3 - len(prefix))] * batch)
            i = step.start(torch.ones(batch, dtype=torch.long), tokens, len(prefix))
            while i < 3:
                i = step.advance(tokens, i)
            for row in tokens.tolist():
                counts[index[tuple(row)]] += 1
    expected = probs * counts.sum()
    big = expected > 5  # the rare sequences pooled into one bin
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    assert big.sum() >= 8 and observed[-1] <= expected[-1] + 5 * expected[-1].sqrt() + 5
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_speculative_streaming_equals_offline(ckpts):
    """Tokens arrive several per forward; each solver step still runs as soon as its group is in, and the image and
    previews equal the offline decode of the tokens (16 steps: each group twice), a layout prefix kept."""
    tok, gpt = models(ckpts)
    labels, prefix = torch.tensor([1, 4]), torch.randint(64, (2, 6), generator=torch.Generator().manual_seed(0))
    step = sample.SpeculativeStep(gpt, 2, 8, "1.5,3.0", generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen, tokens, slices, previews = [], None, tok.group_slices(16), []
    for kind, i, out in sample.stream(gpt, tok, labels, noise, step, steps=16, prefix=prefix):
        seen.append((kind, i))
        tokens = out if kind == "token" else tokens
        if kind == "preview":
            previews.append(to_uint8(out))
            assert max(j for k, j in seen if k == "token") + 1 >= max(6, slices[i].stop)
    assert [i for k, i in seen if k == "token"] == list(range(32))
    assert [i for k, i in seen if k == "preview"] == list(range(16))
    assert torch.equal(tokens[:, :6], prefix)
    for n in (3, 16):
        ref = to_uint8(tok.decode(tokens, noise=noise, groups=(n + 1) // 2, steps=16)).int()
        assert (previews[n - 1].int() - ref).abs().max() <= 1
    torch.testing.assert_close(out, tok.decode(tokens, noise=noise, steps=16), atol=1e-5, rtol=1e-5)


def test_layout_control_keeps_the_reference_prefix(ckpts):
    k = 12
    tok, gpt = models(ckpts)
    prefix = sample.prefix_codes(tok, Image.open(ckpts / "ref.png").convert("RGB"), k, torch.device("cpu"))
    assert prefix.shape == (1, k)
    tokens, noise, image, _ = run(gpt, tok, torch.tensor([0, 5, 7, 7]), 3, prefix=prefix.expand(4, -1))
    assert torch.equal(tokens[:, :k], prefix.expand(4, -1))  # the reference's codes exactly
    assert not torch.equal(tokens[2, k:], tokens[3, k:])  # the rest is sampled (same class, different draws)
    torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-5, rtol=1e-5)


def test_default_run_writes_preview_strips(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(argv(ckpts, "--out", out, "--save-each", tmp_path / "each")))
    assert Image.open(out).size == (8 * 34, 10 * 34)  # 10 classes × 8 previews of 32 px with 2 px gaps
    assert len(list((tmp_path / "each").glob("*_previews.png"))) == 10
    assert len(list((tmp_path / "each").glob("*_class?.png"))) == 10
    assert not list(tmp_path.rglob(".*.tmp"))


def test_steps_flag_gives_each_group_several_solver_steps(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(argv(ckpts, "--labels", 3, "--steps", 16, "--out", out)))
    assert Image.open(out).size == (16 * 34, 34)  # one sample's strip of 16 previews


def test_npz_holds_the_samples_at_the_exact_path(ckpts, tmp_path):
    path = tmp_path / "s.npz"
    sample.main(sample.parse_args(argv(ckpts, "--num-samples", 5, "--batch-size", 2, "--npz", path, "--out", "")))
    assert os.listdir(tmp_path) == ["s.npz"]
    with np.load(path) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 10
    assert labels.dtype == np.int64 and labels.shape == (5,) and labels.min() >= 0 and labels.max() < 10
    # the last batch (one sample) is seeded by its first index: rerun it alone through sample_batch
    tok, gpt = models(ckpts)
    _, _, image, _ = run(gpt, tok, torch.from_numpy(labels[4:]), 0 + 4, cfg_scale="4.0", keep_previews=False)
    assert np.array_equal(to_uint8(image).numpy(), images[4:])


def test_speculative_flag_samples_with_a_window(ckpts, tmp_path):
    path = tmp_path / "s.npz"
    sample.main(sample.parse_args(argv(ckpts, "--num-samples", 3, "--batch-size", 2, "--npz", path, "--out", "",
                                       "--speculative", 8, "--cfg-scale", "1.5,3")))
    with np.load(path) as f:
        images, labels = f["arr_0"], f["arr_1"]
    tok, gpt = models(ckpts)  # the last batch again, through a SpeculativeStep seeded by its first index
    step = sample.SpeculativeStep(gpt, 1, 8, "1.5,3", generator=torch.Generator().manual_seed(2))
    image = sample.sample_batch(gpt, tok, torch.from_numpy(labels[2:]), step, keep_previews=False)[2]
    assert images.shape == (3, 32, 32, 3) and np.array_equal(to_uint8(image).numpy(), images[2:])


def test_interrupted_write_keeps_the_old_file(ckpts, tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    path.write_bytes(b"the old archive")

    def broken_savez(f, **arrays):  # numpy dies half-way through the archive (disk full, Ctrl-C, ...)
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt
    monkeypatch.setattr(data.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        sample.main(sample.parse_args(argv(ckpts, "--num-samples", 2, "--npz", path, "--out", "")))
    assert path.read_bytes() == b"the old archive" and os.listdir(tmp_path) == ["s.npz"]


def test_a_signal_writes_no_npz_and_a_rerun_makes_the_same_arrays(ckpts, tmp_path, signal_on_calls, monkeypatch):
    common = argv(ckpts, "--num-samples", 5, "--batch-size", 2, "--out", "")
    sample.main(sample.parse_args([*common, "--npz", str(tmp_path / "straight.npz")]))
    signal_on_calls(sample, "sample_batch", {1})  # during the second batch
    path = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as e:
        data.exit_on_error("sample.py", sample.main, sample.parse_args([*common, "--npz", str(path)]))
    assert e.value.code == "sample.py: stopped by SIGTERM after 4 of 5 samples; nothing was written: the same " \
                          "command makes the same samples"
    assert os.listdir(tmp_path) == ["straight.npz"]
    monkeypatch.undo()
    data.exit_on_error("sample.py", sample.main, sample.parse_args([*common, "--npz", str(path)]))
    with np.load(tmp_path / "straight.npz") as a, np.load(path) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


@pytest.mark.slow
def test_two_runs_writing_one_npz_leave_one_complete_result(ckpts, tmp_path):
    runs = [argv(ckpts, "--num-samples", 6, "--batch-size", 3, "--out", "", "--seed", seed) for seed in (0, 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *a, "--npz", str(tmp_path / "s.npz")], env=env)
             for a in runs]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert os.listdir(tmp_path) == ["s.npz"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the two processes
    try:
        for seed, a in enumerate(runs):
            sample.main(sample.parse_args([*a, "--npz", str(tmp_path / f"{seed}.npz")]))
    finally:
        torch.set_num_threads(threads)
    with np.load(tmp_path / "s.npz") as f:
        got = f["arr_0"], f["arr_1"]
    expected = []
    for seed in (0, 1):
        with np.load(tmp_path / f"{seed}.npz") as f:
            expected.append(np.array_equal(got[0], f["arr_0"]) and np.array_equal(got[1], f["arr_1"]))
    assert sum(expected) == 1  # the whole of one run, nothing mixed


@pytest.mark.slow
def test_torchrun_npz_matches_one_process(ckpts, tmp_path):
    common = [*argv(ckpts), "--num-samples", "6", "--batch-size", "3", "--out", ""]
    sample.main(sample.parse_args([*common, "--npz", str(tmp_path / "one.npz")]))  # one thread, as each rank
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "sample.py"), *common, "--npz", str(tmp_path / "two.npz")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]  # the per-rank parts are merged and removed


@pytest.mark.slow
def test_torchrun_with_a_dead_rank_writes_no_npz_and_a_rerun_completes_it(ckpts, tmp_path, kill_rank):
    common = [str(ROOT / "sample.py"), *argv(ckpts), "--num-samples", 40, "--batch-size", 2, "--out", "", "--npz",
              tmp_path / "out" / "s.npz"]
    (tmp_path / "out").mkdir()

    def torchrun(logs):
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--log-dir", str(logs), "--redirects", "3", *map(str, common)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = torchrun(tmp_path / "logs")
    deadline = time.time() + 120
    while not any("img/s" in f.read_text() for f in (tmp_path / "logs").rglob("0/stderr.log")):  # rank 0's progress
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    kill_rank(proc, 1)
    assert proc.wait(60) != 0
    last = next((tmp_path / "logs").rglob("0/stderr.log")).read_text().splitlines()[-1].split("\r")[-1]
    assert last.startswith("sample.py: ") and ("nothing was written" in last or "another process" in last), last
    assert os.listdir(tmp_path / "out") == []  # neither the merged file nor a part
    assert torchrun(tmp_path / "logs2").wait(120) == 0
    with np.load(tmp_path / "out" / "s.npz") as f:
        assert f["arr_0"].shape == (40, 32, 32, 3) and f["arr_1"].shape == (40,)
    assert os.listdir(tmp_path / "out") == ["s.npz"]


BAD_INPUTS = [  # (extra arguments, what the one-line message must say)
    (["--num-samples", 0], "argument --num-samples: '0' must be a whole number ≥ 1"),
    (["--num-samples", -2], "--num-samples"),
    (["--batch-size", 0], "--batch-size"),
    (["--batch-size", -1], "--batch-size"),
    (["--cfg-scale", "abc"], "--cfg-scale"),
    (["--cfg-scale", "4,"], "--cfg-scale"),
    (["--cfg-scale", "1,2,3"], "--cfg-scale"),
    (["--cfg-scale", "-2"], "scales ≥ 1"),
    (["--cfg-scale", "0.5"], "scales ≥ 1"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--top-k", -5], "--top-k"),
    (["--top-p", 0], "--top-p"),
    (["--top-p", 1.5], "must lie in (0, 1]"),
    (["--temperature", -1], "--temperature"),
    (["--temperature", 0], "--temperature"),
    (["--seed", -1], "--seed"),
    (["--labels", -1], "--labels"),
    (["--labels", 3, 10], "--labels 10: this model knows classes 0..9"),
    (["--prefix-tokens", 4], "--prefix-tokens needs --prefix-image"),
    (["--prefix-image", "{d}/missing.png"], "--prefix-image"),
    (["--prefix-image", "{d}/corrupt.png"], "not a readable image"),
    (["--prefix-image", "{d}/bomb.png"], "pixels is more than"),
    (["--prefix-image", "{d}/strip.png"], "strip.png: not a readable image (1×3000 pixels: the aspect ratio is over"),
    (["--prefix-image", "{d}/tiff.png"], "tiff.png: not a readable image (cannot identify image file"),
    (["--cfg-scale", "1e300"], "with finite scales ≥ 1 and ≤ 100"),
    (["--seed", 2 ** 63], "--seed: '9223372036854775808' must be a whole number in [0, 2^63)"),
    (["--prefix-image", "{d}/ref.png", "--prefix-tokens", 32], "--prefix-tokens 32: must lie in [1, 31]"),
    (["--out", "{tmp}/no/such/dir/g.png"], "does not exist"),
    (["--out", "{tmp}/g.gif"], "--out"),
    (["--out", ""], "written nowhere"),
    (["--npz", "{tmp}/out"], "must end in .npz"),
    (["--npz", "{tmp}/no/x.npz"], "--npz"),
    (["--save-each", "{d}/tok.pt"], "--save-each"),
    (["--save-each", "{tmp}/no/each"], "--save-each"),
    (["--gpt-model", "GPT-Q"], "--gpt-model"),
    (["--device", "nonsense"], "--device"),
    (["--tokenizer-ckpt", "{tmp}/none.pt"], "--tokenizer-ckpt"),
    (["--gpt-ckpt", "{d}/junk.pt"], "junk.pt"),
    (["--gpt-ckpt", "{d}/tok.pt"], "not an AR model"),
    (["--gpt-ckpt", "{d}/gpt_big.pt"], "128 codes"),
    (["--gpt-ckpt", "{d}/gpt_nonull.pt"], "has no null class"),
    (["--gpt-ckpt", "{d}/gpt_rev.pt", "--prefix-image", "{d}/ref.png"], "reverse_order"),
    (["--speculative", -2], "--speculative"),
    (["--steps", 0], "--steps: '0' must be a whole number ≥ 1"),
    (["--speculative", 33], "--speculative 33: this model makes 32 tokens"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--device", "cuda"], "--device cuda: no CUDA GPU"))
BAD_INPUTS.append((["--fp8"], "unrecognized arguments: --fp8"))  # the float8 KV cache is gone


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[" ".join(map(str, a)) for a, _ in BAD_INPUTS])
def test_bad_inputs_end_in_one_line(ckpts, tmp_path, capsys, extra, message):
    extra = [str(a).format(d=ckpts, tmp=tmp_path) for a in extra]
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as e:
        sample.main(sample.parse_args([*argv(ckpts), "--out", str(out), *extra]))
    code = e.value.code
    text = (capsys.readouterr().err + (code if isinstance(code, str) else "")).strip()
    assert code not in (0, None) and text.startswith("sample.py: error: ") and "\n" not in text, text
    assert message in text, text
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_output_folder(ckpts, tmp_path, capsys):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(SystemExit):
            sample.parse_args([*argv(ckpts), "--out", str(tmp_path / "g.png")])
    finally:
        tmp_path.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


def test_bad_checkpoint_from_the_command_line_has_no_traceback(ckpts):
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), *argv(ckpts, gpt="junk.pt"),
                          "--out", str(ckpts / "x.png")], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("sample.py: error: ") and out.stderr.count("\n") == 1, out.stderr


def test_bf16_pixel_network_runs_in_bf16_and_stays_close_to_fp32(ckpts):
    """A pixel network with bf16 weights (sample.load_models on CUDA for --decoder-precision bf16) computes in bf16,
    autocast or not, and returns fp32 velocities for the fp32 solver state; on the CPU load_models keeps fp32."""
    tok, _ = sample.load_models(ckpts / "tok.pt", ckpts / "gpt.pt", None, torch.float32, torch.device("cpu"), "bf16")
    assert tok.diff_decoder.net.conv_in.weight.dtype == torch.float32
    codes = torch.randint(64, (2, 32), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp32 = tok.decode(codes, noise=noise)
    tok.diff_decoder.to(torch.bfloat16)
    seen = []
    hook = tok.diff_decoder.net.blocks[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    bf16 = tok.decode(codes, noise=noise)
    cond, t = tok.condition(codes)[:, :4], torch.full((2,), 0.5)
    plain = tok.velocity(noise, t, cond)
    with torch.autocast("cpu", torch.bfloat16):  # switched off inside the bf16 network: the same bf16 arithmetic
        assert torch.equal(tok.velocity(noise, t, cond), plain)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16} and bf16.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().mean() < 2e-2 * fp32.abs().mean()


def test_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--prefix-image" in out.stdout


def test_loading_imports_no_compiler(ckpts):
    """The models are built for loading without nn.init and with a CPU rope table: PyTorch's meta-device normal_ and
    arange import torch._dynamo and sympy, a second of `python sample.py`'s start on a CPU."""
    code = (f"import sys, torch, sample; sample.load_models({str(ckpts / 'tok.pt')!r}, {str(ckpts / 'gpt.pt')!r}, "
            f"None, torch.float32, torch.device('cpu')); print(sorted({{'torch._dynamo', 'sympy'}} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_tokens_equal_eager(ckpts):
    tok, gpt = sample.load_models(ckpts / "tok.pt", ckpts / "gpt.pt", None, torch.bfloat16, torch.device("cuda"))
    labels = torch.arange(4, device="cuda")
    results = []
    for graph in (False, True):
        g = torch.Generator("cuda")
        step = sample.DecodeStep(gpt, 4, 4.0, generator=g, graph=graph)
        g.manual_seed(0)
        results.append(sample.sample_batch(gpt, tok, labels, step))
    assert torch.equal(results[0][0], results[1][0])  # tokens
    # the pixel steps replayed from their graphs (captured in one memory pool) compute what they compute eagerly
    assert torch.equal(results[0][2], results[1][2]) and torch.equal(results[0][3], results[1][3])
    results = [r[0] for r in results]
    # the kernel's step against the SDPA step (host-int kv_len) on the caches just filled: bf16 rounding only (one
    # flipped argmax would change every later token, so the sequences themselves are not compared)
    x = gpt.tok_embeddings(torch.cat([results[0][:, 20]] * 2))[:, None]  # (8, 1, C): position 21 with CFG
    p = torch.tensor([21], device="cuda")
    with torch.no_grad():
        sdpa, kernel = gpt.forward_cached(x, p, 22).float(), gpt.forward_cached(x, p, torch.tensor([22], device="cuda"))
    assert ((kernel.float() - sdpa).norm() / sdpa.norm()).item() < 2e-2
    # the streamed decode on its side stream, fed by graph replays, still equals the offline decode, both in strict
    # fp32 (TF32, the default, would differ by ~1e-3)
    step = sample.DecodeStep(gpt, 4, 4.0, generator=torch.Generator("cuda").manual_seed(1))
    tokens, noise, image, previews = sample.sample_batch(gpt, tok, labels, step, decoder_precision="fp32")
    with precision("fp32", "cuda"):
        torch.testing.assert_close(image, tok.decode(tokens, noise=noise), atol=1e-4, rtol=1e-4)
        ref = to_uint8(tok.decode(tokens, noise=noise, groups=2)).int()
    assert (previews[:, 1].int() - ref).abs().max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_speculative_graph_equals_eager(ckpts):
    """The speculative window replayed from its CUDA graph draws the tokens of the eager window for the same seed."""
    tok, gpt = sample.load_models(ckpts / "tok.pt", ckpts / "gpt.pt", None, torch.bfloat16, torch.device("cuda"))
    labels, results = torch.arange(3, device="cuda"), []
    for graph in (False, True):
        g = torch.Generator("cuda")
        step = sample.SpeculativeStep(gpt, 3, 8, "1.5,4", top_k=20, generator=g, graph=graph)
        g.manual_seed(0)
        results.append(sample.sample_batch(gpt, tok, labels, step)[0])
    assert torch.equal(*results)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_main_runs(ckpts, tmp_path):
    sample.main(sample.parse_args(argv(ckpts, "--num-samples", 5, "--batch-size", 2, "--npz", tmp_path / "s.npz",
                                       "--out", tmp_path / "g.png", "--decoder-precision", "bf16", "--device", "cuda")))
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_0"].std() > 10


def test_main_leaves_the_tf32_switches_as_it_found_them(ckpts, tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for mode in ("fp32", "tf32"):
        sample.main(sample.parse_args(argv(ckpts, "--out", tmp_path / f"{mode}.png", "--decoder-precision", mode)))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    # on a CPU tf32 and fp32 are the same computation
    assert (tmp_path / "fp32.png").read_bytes() == (tmp_path / "tf32.png").read_bytes()
