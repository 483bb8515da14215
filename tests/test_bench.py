"""Tests of bench.py's parts that run without a GPU: argument checks, the memory-traffic bound, the table file.

    python -m pytest -q tests/test_bench.py
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import sample  # noqa: E402
from model import GPT, GPTConfig, generate  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--models", "GPT-Q"], "--models unknown GPT preset 'GPT-Q'"),
    (["--batch-sizes", "64", "0"], "--batch-sizes"),
    (["--repeats", "-1"], "--repeats"),
    (["--hbm-tbps", "0"], "--hbm-tbps"),
    (["--peak-tflops", "inf"], "--peak-tflops"),
    (["--out", "/no/such/dir/t.md"], "--out /no/such/dir/t.md: the folder /no/such/dir does not exist"),
])
def test_bad_arguments_end_in_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("bench.py: error: ") and "\n" not in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_one_line():
    with pytest.raises(SystemExit, match=r"^bench.py: error: no CUDA GPU is available \(bench.py times GPU kernels\)$"):
        bench.main(bench.parse_args([]))


def test_ar_tokens_are_the_loops_tokens():
    """bench's AR-only loop draws exactly the tokens of sample.stream (the same steps, no pixel decoder)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("GPT-tiny"))
    with torch.no_grad():
        gpt.output.weight.normal_(std=0.5)
    labels = torch.arange(3)
    step = sample.DecodeStep(gpt.eval(), 3, bench.CFG, generator=torch.Generator().manual_seed(0))
    tokens = bench.ar_tokens(step, labels, 32)
    step.settings["generator"].manual_seed(0)
    want = generate(gpt, labels, cfg_scale=bench.CFG, generator=step.settings["generator"])
    assert torch.equal(tokens, want)


def test_ar_bound_counts_weights_and_the_filled_slots_read():
    gpt = GPT(GPTConfig.from_name("GPT-tiny"))  # 32 tokens, cache of 40 slots
    gpt.setup_caches(2)
    cfg = gpt.config
    weights = sum(p.numel() for n, p in gpt.named_parameters() if "embed" not in n) * 4
    slot = cfg.n_layer * 2 * 2 * cfg.n_kv_head * cfg.head_dim * 4
    # the prefill reads 1 slot, position p (1..31) reads p + 1: 1..32 slots, never the 8 unused ones
    assert bench.ar_bytes_per_token(gpt, 2) == pytest.approx(weights + slot * sum(range(1, 33)) / 32)


def test_rows_are_appended_to_the_table_file(tmp_path, capsys):
    out = tmp_path / "table.md"
    out.write_text("earlier run\n")
    row = bench.Row(out)
    row("AR, batch 1", 2.0, "ms/token", 1.0)
    row("decoder", 50.0, "img/s", 100.0, better="higher")
    lines = out.read_text().splitlines()
    assert lines[0] == "earlier run" and lines[1].startswith("| measure |")
    assert lines[3] == "| AR, batch 1 | 2 ms/token | 1 ms/token | 0.50 |"
    assert lines[4] == "| decoder | 50 img/s | 100 img/s | 0.50 |"
    assert capsys.readouterr().out.splitlines() == lines[1:]
    assert os.listdir(tmp_path) == ["table.md"]  # no temporary files left


def test_the_tf32_attention_operator_counts_as_sdpa_does():
    """The decoder's FLOPs per image (the bound of its rows) include kernels.attention's operator, counted as SDPA."""
    from torch.utils.flop_counter import FlopCounterMode
    q, k = torch.empty(2, 3, 10, 64, device="meta"), torch.empty(2, 3, 7, 64, device="meta")
    counts = []
    for attend in (torch.ops.dar.attention, torch.nn.functional.scaled_dot_product_attention):
        with FlopCounterMode(display=False) as fc:
            attend(q, k, k)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 4 * 2 * 3 * 10 * 7 * 64
