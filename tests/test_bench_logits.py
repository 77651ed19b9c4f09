"""benchmarks/bench_logits.py on a tiny model: both ways are timed and give the same values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_logits.py"


def test_bench_logits_on_a_tiny_model(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_logits", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "logits.json"
    res = bench.main(["--model", "tiny-random-llama", "--examples", "2", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    for name in ("perplexity", "kl", "training"):
        r = res[name]
        assert set(r["seconds"]) == {"kept", "full"} and all(v > 0 for v in r["seconds"].values())
        assert r["speedup"] == pytest.approx(r["seconds"]["full"] / r["seconds"]["kept"])
        assert r["values"]["kept"] == pytest.approx(r["values"]["full"], rel=1e-5, abs=1e-7)
    assert res["perplexity"]["values"]["kept"] > 1 and res["training"]["values"]["kept"] > 0
