"""`ssah probe` on SmolLM2: the aligned model (cached safety SFT) against the model as shipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.cli import main

pytestmark = pytest.mark.slow


def test_controlled_probe_separates_aligned_from_unaligned(aligned_smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    args = ["probe", str(aligned_smollm2), "--label", "aligned", "--compare", "smollm2-135m-instruct"]
    args += ["--compare-label", "unaligned", "--quick", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    later = set(res["later_layers"])
    assert res["layers"] == 30 and later == set(range(20, 31))

    # at least one confound-controlled method reproduces: the paired difference aligned - unaligned excludes zero
    # upwards (a simultaneous band over the later layers) over a run of consecutive later layers
    separated = {
        m: s["decision"]
        for m, s in res["separation"].items()
        if res["methods"][m]["controlled"] and s["verdict"] == "reproduced"
    }
    assert separated, {m: s["decision"]["reason"] for m, s in res["separation"].items()}
    for d in separated.values():
        assert d["above"] and set(d["above"]) <= later and not d["below"]
        assert d["longest_run"] >= d["min_run"] and "max-|t|" in d["multiplicity"]
        lo = dict(zip(d["layers_tested"], d["lo"], strict=True))
        assert all(lo[x] > 0 for x in d["above"])

    # the naive probe's confound: a gap already at the embedding layer, the same in both models (embeddings frozen)
    emb = [res["confound"][x]["embedding_gap"]["mean"] for x in ("aligned", "unaligned")]
    assert abs(emb[0]) > 0.05 and emb[0] == pytest.approx(emb[1], abs=1e-6)
    report = (out / "report.md").read_text()
    assert "At the embedding layer no token has seen any other" in report
    assert "Confound-controlled methods that separate the models" in report

    # token by token: the aligned model's own replies refuse, the shipped model's mostly do not
    replies = res["tokens"]["replies"]["greedy"]
    assert replies["aligned"]["refusal"]["rate"] > replies["unaligned"]["refusal"]["rate"]
    assert (out / "plots/gap_by_layer.png").is_file() and (out / "plots/gap_by_token.png").is_file()
    assert res["seconds"]["total"] < 300  # target 90 s (--quick, two 135M models); generous on a shared CPU
