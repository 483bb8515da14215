"""experiments/speculative.py on tiny random models (CPU, seconds): its tables are complete and plausible.

    python -m pytest -q tests/test_speculative.py
"""
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import speculative  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import Tokenizer, TokenizerConfig  # noqa: E402


def test_tables_of_tokens_per_forward_and_latency(tmp_path):
    torch.manual_seed(0)
    tok, gpt = Tokenizer(TokenizerConfig.from_name("tiny")).eval(), GPT(GPTConfig.from_name("GPT-tiny")).eval()
    with torch.no_grad():
        gpt.output.weight.normal_(std=0.5)  # the official init gives uniform logits
    torch.save(dict(kind="tokenizer", config=asdict(tok.config), model=tok.state_dict(), ema=None), tmp_path / "t.pt")
    torch.save(dict(kind="gpt", config=asdict(gpt.config), model=gpt.state_dict(), ema=None), tmp_path / "g.pt")
    out = tmp_path / "tables.md"
    speculative.main(speculative.parse_args([
        "--tokenizer-ckpt", str(tmp_path / "t.pt"), "--gpt-ckpt", str(tmp_path / "g.pt"), "--device", "cpu",
        "--samples", "2", "--tokens-per-forward", "--cfg-scales", "1.0", "1,4", "--windows", "2", "8",
        "--latency-windows", "8", "--out", str(out)]))
    text = out.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for cfg in ("1.0", "1,4"):  # windows 2 and 8: between 1 token per forward and the window
        per_forward = [float(v) for v in rows[cfg].split("|")[2:4]]
        assert 1 <= per_forward[0] <= 2 and 1 <= per_forward[1] <= 8, rows[cfg]
    assert all(1 <= float(rows[b].split("|")[2]) <= 16 for b in ("1", "8", "64"))
    for name in ("sequential", "speculative, window 8"):
        assert re.fullmatch(r"\| [\w ,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+× \|", rows[name]), rows[name]
