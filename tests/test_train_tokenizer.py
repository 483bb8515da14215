"""Tests of train_tokenizer.py (tiny tokenizer, CPU): python -m pytest -q tests/test_train_tokenizer.py"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_tokenizer as tt
import trainer
from tokenizer import Tokenizer, TokenizerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def image_folder(tmp_path):
    """8 smooth random images of mixed sizes: 6 in two class folders, 2 at the top (both layouts at once)."""
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "images" / ("" if i < 2 else f"class{i % 2}")
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40 + 4 * i, 36), Image.BILINEAR).save(folder / f"{i}.png")
    return tmp_path / "images"


def train_args(data, out_dir, *extra):
    return ["--preset", "tiny", "--data", str(data), "--out-dir", str(out_dir), "--device", "cpu",
            "--global-batch-size", "4", "--lpips-weight", "0", "--repa-weight", "0", "--num-workers", "0",
            "--warmup-steps", "2", "--log-every", "1", "--num-show", "2", *map(str, extra)]


def states(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["model"], ckpt["ema"], ckpt["optimizer"]["state"], ckpt["step"]


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as e:
        tt.get_args(["--help"])
    assert e.value.code == 0 and "--lpips-weight" in capsys.readouterr().out


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    tok = Tokenizer(TokenizerConfig.from_name("tiny"))
    objective = tt.Objective(tok, None, 0.0, None, 0.0).train()
    images = torch.rand(4, 1, 4, 4).repeat(1, 3, 1, 1)
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear") * 2 - 1  # (4, 3, 32, 32)
    t, noise = torch.rand(4), torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(15):
        loss, terms, codes = objective(images, t, noise)
        assert set(terms) == {"fm", "vq", "commit"} and codes.shape == (4, 32)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_resume_continues_exactly(image_folder, tmp_path):
    tt.main(train_args(image_folder, tmp_path / "full", "--max-steps", "4"))
    tt.main(train_args(image_folder, tmp_path / "split", "--max-steps", "2"))
    tt.main(train_args(image_folder, tmp_path / "split", "--max-steps", "4", "--resume"))
    full, split = states(tmp_path / "full" / "ckpt.pt"), states(tmp_path / "split" / "ckpt.pt")
    assert full[3] == split[3] == 4
    for a, b in zip(full[:2], split[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(full[2][i]["exp_avg_sq"], split[2][i]["exp_avg_sq"]) for i in full[2])
    assert not torch.equal(full[0]["patchify.weight"], full[1]["patchify.weight"])  # EMA lags the weights
    tok = Tokenizer.from_checkpoint(tmp_path / "full" / "ckpt.pt")  # the EMA weights, config inside
    assert torch.equal(tok.state_dict()["patchify.weight"], full[1]["patchify.weight"])
    assert (tmp_path / "full" / "recon_0000004.png").exists()
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["step"] == 4 and summary["loss"] > 0 and 0 < summary["codebook_used"] <= 100


def train(*argv, **kwargs):
    """train_tokenizer.py in its own process (and process group), one thread: a Popen with text pipes."""
    return subprocess.Popen([sys.executable, "train_tokenizer.py", *argv], cwd=ROOT, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_stops_after_a_step_and_resume_is_exact(image_folder, tmp_path):
    common = ["--max-steps", 12, "--num-workers", 1, "--ckpt-every", 100, "--show-every", 100]
    assert train(*train_args(image_folder, tmp_path / "straight", *common)).wait(120) == 0
    proc = train(*train_args(image_folder, tmp_path / "split", *common))
    next(line for line in proc.stdout if line.startswith("step 2/"))
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group: the trainer and its loader worker
    _, err = proc.communicate(timeout=120)
    step = states(tmp_path / "split" / "ckpt.pt")[3]
    assert proc.returncode == 1 and err.splitlines() == [
        f"train_tokenizer.py: stopped by SIGINT after step {step}/12: {tmp_path / 'split' / 'ckpt.pt'} holds it; "
        f"the same command with --resume continues the run exactly"], err
    assert 2 <= step < 12 and sorted(os.listdir(tmp_path / "split")) == [".lock", "ckpt.pt"]
    assert train(*train_args(image_folder, tmp_path / "split", *common, "--resume")).wait(120) == 0
    straight, split = states(tmp_path / "straight" / "ckpt.pt"), states(tmp_path / "split" / "ckpt.pt")
    for a, b in zip(straight[:2], split[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight[2][i]["exp_avg_sq"], split[2][i]["exp_avg_sq"]) for i in straight[2])


def test_missing_data_and_weights_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="not a folder of images"):
        tt.main(train_args(tmp_path / "nowhere", tmp_path / "out"))
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        tt.main(train_args("fashion-mnist", tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*--lpips-weight 0"):
        tt.build_lpips(str(tmp_path / "vgg.pth"))
    with pytest.raises(FileNotFoundError, match=r"dinov2_vitb14_pretrain\.pth.*--repa-weight 0"):
        tt.build_dino(str(tmp_path / "dino.pth"))
    with pytest.raises(SystemExit, match="--repa-weight 0"):  # the tiny REPA head is not 768-wide
        tt.main(["--preset", "tiny", "--data", str(tmp_path), "--lpips-weight", "0"])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random weights in the layout of torchvision's vgg16-397923af.pth (a stand-in for the real file)."""
    torch.manual_seed(0)
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512), (512, 512),
             (512, 512), (512, 512), (512, 512), (512, 512)]
    index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # conv positions in torchvision's vgg16.features
    sd = {}
    for i, (cin, cout) in zip(index, convs):
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3) * (2 / (9 * cin)) ** 0.5
        sd[f"features.{i}.bias"] = torch.zeros(cout)
    sd["classifier.0.weight"] = torch.zeros(1)  # the full torchvision file also holds the classifier: ignored
    path = tmp_path_factory.mktemp("vgg") / "vgg.pth"
    torch.save(sd, path)
    return path


def test_lpips_takes_the_torchvision_vgg16_layout(vgg_file):
    sd = torch.load(vgg_file)
    net = tt.build_lpips(str(vgg_file)).eval()
    assert torch.equal(getattr(net.net.slice3, "10").weight, sd["features.10.weight"])
    assert torch.equal(getattr(net.net.slice5, "28").weight, sd["features.28.weight"])
    assert not any(p.requires_grad for p in net.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max() < 1e-6 < net(x, y).min()


def test_micro_batches_depend_only_on_the_step_and_their_place_in_it(image_folder):
    """Step 1's micro-batches (x, t, noise): one process with 2 micro-steps, 2 ranks with one each, the loader path and
    the resident one (--data-on-device) all draw the same."""
    dataset, cpu = tt.make_dataset(image_folder, 32), torch.device("cpu")
    args = tt.get_args(train_args(image_folder, "out", "--global-batch-size", 8, "--grad-accum", 2, "--seed", 3))
    one = next(tt.batches(dataset, args, 1, 1, 0, cpu))
    args.grad_accum = 1
    two = [next(tt.batches(dataset, args, 1, 2, rank, cpu))[0] for rank in (0, 1)]
    args.grad_accum, args.data_on_device = 2, True
    resident, again = (next(tt.batches(dataset, args, 1, 1, 0, cpu)) for _ in range(2))  # again: a resumed run
    for other in (two, resident, again):
        assert all(torch.equal(u, v) for a, b in zip(one, other) for u, v in zip(a, b))
    assert not torch.equal(one[0][2], one[1][2])  # each micro-batch its own noise
    assert not torch.equal(one[0][2], next(tt.batches(dataset, args, 2, 1, 0, cpu))[0][2])  # each step its own


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(image_folder, vgg_file, tmp_path):
    """torchrun with 2 gloo ranks x 1 micro-step vs. one process with 2 micro-steps of the same global batch, LPIPS
    (with its dropout) on. Not one micro-batch of 4: the masked VQ terms normalise per micro-batch."""
    common = ["--max-steps", "2", "--warmup-steps", "0", "--num-show", "1", "--lpips-weight", "0.5",
              "--vgg-weights", str(vgg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_tokenizer.py",
           "--preset", "tiny", "--data", str(image_folder), "--out-dir", str(tmp_path / "ddp"), "--device", "cpu",
           "--global-batch-size", "4", "--lpips-weight", "0", "--repa-weight", "0", "--num-workers", "0", *common]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "× 1 accumulation × 2 ranks" in proc.stdout
    tt.main(train_args(image_folder, tmp_path / "single", "--grad-accum", "2", *common))
    ddp, single = states(tmp_path / "ddp" / "ckpt.pt"), states(tmp_path / "single" / "ckpt.pt")
    for k in ddp[0]:
        torch.testing.assert_close(ddp[0][k], single[0][k], atol=1e-5, rtol=0)
    torch.manual_seed(0)  # main's initial weights: the comparison above is between trained weights
    assert not torch.equal(ddp[0]["patchify.weight"], Tokenizer(TokenizerConfig.from_name("tiny")).patchify.weight)


def test_refuses_to_start_over_a_checkpoint(image_folder, tmp_path, capsys):
    tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 1))
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"ckpt\.pt already exists: pass --resume to continue it or --overwrite"):
        tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 1, "--seed", 1))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 1, "--seed", 1, "--overwrite"))
    assert states(tmp_path / "run" / "ckpt.pt")[3] == 1 and (tmp_path / "run" / "ckpt.pt").read_bytes() != before
    with pytest.raises(SystemExit):
        tt.main(train_args(image_folder, tmp_path / "run", "--resume", "--overwrite"))
    assert "not allowed with argument" in capsys.readouterr().err


def nan_on_calls(monkeypatch, calls):
    """Tokenizer.loss gives a NaN flow-matching term on the given (0-based) calls."""
    loss, count = Tokenizer.loss, iter(range(10 ** 6))

    def patched(self, *args, **kwargs):
        out = loss(self, *args, **kwargs)
        return {**out, "fm": out["fm"] * float("nan")} if next(count) in calls else out
    monkeypatch.setattr(Tokenizer, "loss", patched)


def test_a_non_finite_step_is_skipped_whole(image_folder, tmp_path, monkeypatch, capsys):
    tt.main(train_args(image_folder, tmp_path / "one", "--max-steps", 1, "--warmup-steps", 0))
    nan_on_calls(monkeypatch, {2})  # the flops probe is call 0: this is the second training step
    tt.main(train_args(image_folder, tmp_path / "two", "--max-steps", 2, "--warmup-steps", 0))
    assert "skipped 1 |" in capsys.readouterr().out
    one, two = states(tmp_path / "one" / "ckpt.pt"), states(tmp_path / "two" / "ckpt.pt")
    assert one[3] == 1 and two[3] == 2
    for a, b in zip(one[:2], two[:2]):  # neither the weights nor the EMA moved
        assert all(torch.equal(a[k], b[k]) for k in a)
    for i in one[2]:  # nor AdamW's moments and step count
        assert all(torch.equal(v, two[2][i][k]) for k, v in one[2][i].items())


def test_non_finite_steps_stop_the_run_and_keep_the_checkpoint(image_folder, tmp_path, monkeypatch):
    tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 1))
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"stopped at step 7: 5 steps in a row had a non-finite loss"):
        tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 7, "--resume", "--lr", 1e30,
                           "--log-every", 100))  # diverges after one step
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good
    nan_on_calls(monkeypatch, {1, 2, 3, 4, 5})  # steps 2-6, the first five of this run (call 0: the flops probe)
    with pytest.raises(SystemExit, match=r"stopped at step 6: 5 steps in a row"):
        tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 6, "--resume"))
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good


def test_unreadable_training_image_is_named(image_folder, tmp_path):
    (image_folder / "class1" / "3.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(SystemExit, match=r"error: \S*3\.png: not a readable image") as e:
        tt.main(train_args(image_folder, tmp_path / "run", "--max-steps", 2, "--num-workers", 1))
    assert "\n" not in str(e.value.code) and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", 0], "argument --global-batch-size: '0' must be a whole number ≥ 1"),
    (["--grad-accum", 0], "argument --grad-accum: '0' must be"),
    (["--ckpt-every", 0], "argument --ckpt-every: '0' must be"),
    (["--preset", "huge"], "unknown tokenizer preset 'huge'"),
    (["--image-size", 36], "--image-size 36 is not a multiple of preset tiny's patch sizes 8 and 4"),
    (["--groups", 3], "--groups 3 does not divide preset tiny's 32 tokens"),
    (["--groups", 0], "argument --groups: '0' must be a whole number ≥ 1"),
    (["--time-shift", 0], "argument --time-shift: '0' must be"),
    (["--lpips-weight", 0.5, "--vgg-weights", "BAD"], "--vgg-weights: checkpoint BAD is truncated or not a PyTorch checkpoint"),
])
def test_bad_flags_fail_in_one_line(image_folder, tmp_path, capsys, monkeypatch, flags, message):
    (tmp_path / "BAD").write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        tt.main(train_args(image_folder, tmp_path / "run", *flags))
    text = capsys.readouterr().err.strip() if isinstance(e.value.code, int) else e.value.code
    assert e.value.code != 0 and text.startswith("train_tokenizer.py: error: ") and "\n" not in text, text
    assert message in text and not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("groups, per_group, steps", [(1, 32, 8), (4, 8, 8), (8, 4, 8), (16, 2, 16)])
def test_groups_set_the_group_size_and_solver_steps(groups, per_group, steps):
    cfg = tt.tokenizer_config("tiny", None, False, 4.0, groups)
    assert (cfg.num_query_groups, cfg.queries_per_step, cfg.num_denoising_steps) == (groups, per_group, steps)
    assert cfg.time_shift == 4.0 and cfg.num_all_queries == 32


def test_groups_and_time_shift_reach_the_checkpoint(image_folder, tmp_path):
    tt.main(train_args(image_folder, tmp_path, "--max-steps", 1, "--groups", 4, "--time-shift", 1, "--num-show", 1))
    cfg = Tokenizer.from_checkpoint(tmp_path / "ckpt.pt").config
    assert (cfg.num_query_groups, cfg.queries_per_step, cfg.time_shift) == (4, 8, 1.0)
    assert (tmp_path / "recon_0000001.png").exists()  # previews of the first 1 .. K-1 groups decode


def test_preset_defaults_without_the_flags():
    cfg = tt.tokenizer_config("tiny", None, False)
    assert (cfg.time_shift, cfg.num_query_groups, cfg.num_denoising_steps) == (2.0, 8, 8)


def logged_losses(text):
    return [float(line.split("| loss ")[1].split()[0]) for line in text.splitlines() if "| loss " in line]


def test_data_on_device_trains(image_folder, tmp_path, capsys):
    tt.main(train_args(image_folder, tmp_path, "--max-steps", 30, "--data-on-device", "--lr", "3e-3",
                       "--log-every", 10, "--num-show", 1))
    losses = logged_losses(capsys.readouterr().out)
    assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses


def test_data_on_device_resumes_exactly_and_trains_as_the_loader(image_folder, tmp_path):
    # batch 3 of 8 images: steps straddle epoch boundaries, and the resumed run starts inside an epoch
    common = ["--global-batch-size", 3, "--grad-accum", 3, "--max-steps", 5]
    tt.main(train_args(image_folder, tmp_path / "full", *common, "--data-on-device"))
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--data-on-device", "--max-steps", 3))
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--data-on-device", "--resume"))
    tt.main(train_args(image_folder, tmp_path / "loader", *common))
    full, split, loader = (states(tmp_path / run / "ckpt.pt") for run in ("full", "split", "loader"))
    for other in (split, loader):
        for a, b in zip(full[:2], other[:2]):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_on_device_refuses_torchrun(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "setup_device", lambda name: (0, 2, torch.device("cpu")))
    with pytest.raises(SystemExit, match="--data-on-device is the one-process fast path: launch without torchrun"):
        tt.main(train_args(image_folder, tmp_path, "--data-on-device"))


@pytest.mark.parametrize("flags, message", [
    (["--cuda-graph"], "--cuda-graph captures the --data-on-device step: pass --data-on-device too"),
    (["--cuda-graph", "--data-on-device", "--lpips-weight", 0.5], "--cuda-graph needs --lpips-weight 0 and --repa"),
    (["--cuda-graph", "--data-on-device"], "--cuda-graph needs a CUDA device, not cpu"),
])
def test_cuda_graph_refuses_what_it_cannot_capture(image_folder, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        tt.main(train_args(image_folder, tmp_path, *flags))
    assert e.value.code.startswith("train_tokenizer.py: error: ") and "\n" not in e.value.code
    assert message in e.value.code and not (tmp_path / "ckpt.pt").exists()


def test_graphed_steps_match_eager_steps_and_resume_exactly(image_folder, tmp_path, cpu_graphs, capsys):
    # a power-of-two lr with a warm-up of 4 steps: every lr is exact in float32, the graphed AdamW's lr tensor
    common = ["--max-steps", 7, "--data-on-device", "--lr", 2 ** -9, "--warmup-steps", 4, "--num-show", 1]
    tt.main(train_args(image_folder, tmp_path / "eager", *common))
    eager_log = logged_losses(capsys.readouterr().out)
    replays = cpu_graphs(trainer)
    tt.main(train_args(image_folder, tmp_path / "graph", *common, "--cuda-graph"))
    assert logged_losses(capsys.readouterr().out) == eager_log and len(replays) == 4  # 3 eager steps, then replays
    assert len(set(replays)) == 4  # each replay read its own step's batch
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--cuda-graph", "--max-steps", 4))
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--cuda-graph", "--resume"))
    eager, graph, split = (states(tmp_path / run / "ckpt.pt") for run in ("eager", "graph", "split"))
    for other in (graph, split):
        for a, b in zip(eager[:2], other[:2]):  # weights and EMA
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(eager[2][i]["exp_avg_sq"], other[2][i]["exp_avg_sq"]) for i in eager[2])
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--resume", "--max-steps", 8))  # eagerly on
    group = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert type(group["lr"]) is float and not group["capturable"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_on_cuda_matches_eager_and_resumes(image_folder, tmp_path, monkeypatch):
    captures = []
    capture = trainer.StepGraph.capture
    monkeypatch.setattr(trainer.StepGraph, "capture", lambda self: captures.append(1) or capture(self))
    common = ["--max-steps", 8, "--data-on-device", "--device", "cuda", "--lr", 2 ** -9, "--warmup-steps", 4,
              "--num-show", 1, "--grad-accum", 2]
    tt.main(train_args(image_folder, tmp_path / "eager", *common))
    tt.main(train_args(image_folder, tmp_path / "graph", *common, "--cuda-graph"))
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--cuda-graph", "--max-steps", 5))
    tt.main(train_args(image_folder, tmp_path / "split", *common, "--cuda-graph", "--resume"))
    assert len(captures) == 2  # the first run and the first part of the split one (the resumed 3 steps are eager)
    eager, graph, split = (states(tmp_path / run / "ckpt.pt") for run in ("eager", "graph", "split"))
    for other in (graph, split):
        for a, b in zip(eager[:2], other[:2]):
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
