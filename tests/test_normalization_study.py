"""benchmarks/normalization_study.py on a tiny model: every (normalisation, ablation mode) row is measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import benchmark
from ssah.errors import UserError


def test_study_on_a_tiny_model_writes_json_and_markdown(tmp_path: Path, capsys) -> None:
    study = benchmark("normalization_study")
    limits = ["--calibration-limit", "4", "--harmful-limit", "2", "--ppl-limit", "2", "--max-new-tokens", "3"]
    out = study.main(["--model", "tiny-random-llama", *limits, "--max-length", "64", "--out", str(tmp_path / "s")])
    res = json.loads((out / "study.json").read_text())
    assert [(r["normalization"], r["ablation"]) for r in res["rows"]] == [
        (n, m) for n in ("mean", "zscore", "rank") for m in ("zero", "mean")
    ]
    base = res["baseline"]
    assert base["perplexity"] > 1 and base["asr"]["n"] == 2 and res["data"]["safety"]["n"] == 4
    for row in res["rows"]:
        for cat in ("RU", "SCU"):
            c = row[cat]
            assert c["units"] > 0 and c["asr"]["n"] == 2 and 0 <= c["asr"]["k"] <= 2
            assert c["perplexity_ratio"] == pytest.approx(c["perplexity"] / base["perplexity"])
        assert 0.0 <= row["stability"]["SCU"]["jaccard"] <= 1.0
        assert row["ru_near_harmless"] == (row["RU"]["perplexity_ratio"] < 1.25 and row["RU"]["asr_points"] < 15.0)
    # the ablation mode changes what RU ablation does to the model (same units, another replacement)
    by = {(r["normalization"], r["ablation"]): r for r in res["rows"]}
    assert by[("mean", "zero")]["RU"]["units"] == by[("mean", "mean")]["RU"]["units"]
    assert by[("mean", "zero")]["RU"]["perplexity"] != by[("mean", "mean")]["RU"]["perplexity"]
    assert all(len(r["SCU_random"]) == 1 for r in res["rows"])
    table = (out / "study.md").read_text()
    assert table.count("| zscore |") == 2 and "RU near harmless" in table
    assert "Normalisation study" in capsys.readouterr().out


def test_study_rejects_unknown_settings(tmp_path: Path) -> None:
    study = benchmark("normalization_study")
    with pytest.raises(UserError, match="unknown normalization"):
        study.main(["--model", "tiny-random-llama", "--normalizations", "median", "--out", str(tmp_path / "x")])
    with pytest.raises(UserError, match="unknown ablation mode"):
        study.main(["--model", "tiny-random-llama", "--modes", "half", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_stratified_random_keeps_the_count_of_every_module() -> None:
    import torch

    from ssah.units import GroupShape, UnitSet, UnitSpace

    study = benchmark("normalization_study")
    space = UnitSpace([GroupShape(layer, kind, 10) for layer in (0, 1) for kind in ("attn", "mlp")])
    units = UnitSet.from_indices(space, [0, 1, 2, 25, 39], "SCU")
    draws = [study.stratified_random(units, seed) for seed in (0, 1)]
    for d in draws:
        assert (
            d.counts_by_group()
            == units.counts_by_group()
            == {"layers.0.attn": 3, "layers.0.mlp": 0, "layers.1.attn": 1, "layers.1.mlp": 1}
        )
    assert draws[0] != draws[1] and study.stratified_random(units, 0) == draws[0]
    assert torch.equal(draws[0].mask, study.stratified_random(units, 0).mask)
