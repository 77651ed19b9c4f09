"""benchmarks/bench_logits.py on a tiny model: both ways are timed and give the same values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import benchmark


def test_bench_logits_on_a_tiny_model(tmp_path: Path) -> None:
    bench = benchmark("bench_logits")
    out = tmp_path / "logits.json"
    res = bench.main(["--model", "tiny-random-llama", "--examples", "2", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    for name in ("perplexity", "kl", "training"):
        r = res[name]
        assert set(r["seconds"]) == {"kept", "full"} and all(v > 0 for v in r["seconds"].values())
        assert r["speedup"] == pytest.approx(r["seconds"]["full"] / r["seconds"]["kept"])
        assert r["values"]["kept"] == pytest.approx(r["values"]["full"], rel=1e-5, abs=1e-7)
    assert res["perplexity"]["values"]["kept"] > 1 and res["training"]["values"]["kept"] > 0
