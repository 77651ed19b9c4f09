"""`ssah align` on a tiny model: the run folder, the cache that spares retraining, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from ssah.cli import main

FAST = ["--steps", "2", "--eval-limit", "3", "--max-new-tokens", "3", "--no-progress"]


def test_align_writes_a_loadable_model_and_reuses_the_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    assert main(["align", "tiny-random-llama", "--out", str(tmp_path / "a"), *FAST]) == 0
    res = json.loads((tmp_path / "a/results.json").read_text())
    assert res["training"]["steps"] == 2 and res["training"]["from_cache"] is None
    assert res["model"]["aligned_fingerprint"] != res["model"]["base_fingerprint"]
    assert {"refusal", "overrefusal", "coherent_compliance", "asr"} <= res["after"].keys()
    for when in ("before", "after"):
        r, a = res[when]["refusal"], res[when]["asr"]
        assert r["k"] + a["k"] == r["n"] == a["n"] and r["ci95"][0] <= r["rate"] <= r["ci95"][1]
    assert res["verdicts"]["refusal_up"]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert res["data"]["eval_harmful"]["examples"] == 3
    # the report names its judge and that judge's measured agreement with people
    assert "`keyword:ssah` agrees with human labels on 87.5%" in (tmp_path / "a/report.md").read_text()
    # embeddings frozen by default: the trained share is below 100%
    assert 0 < res["training"]["trainable"]["share"] < 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a/model")
    assert model.config.model_type == "llama"
    assert main(["align", "tiny-random-llama", "--out", str(tmp_path / "b"), *FAST]) == 0
    again = json.loads((tmp_path / "b/results.json").read_text())
    assert (
        again["training"]["from_cache"] and again["model"]["aligned_fingerprint"] == res["model"]["aligned_fingerprint"]
    )
    assert main(["align", "tiny-random-llama", "--out", str(tmp_path / "c"), "--lr", "1e-4", *FAST]) == 0
    other = json.loads((tmp_path / "c/results.json").read_text())
    assert other["training"]["from_cache"] is None  # another setting is another cache entry


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "0"], "'lr': Input should be greater than 0"),
        (["--steps", "0"], "steps"),
        (["--eval-harmful", "builtin:safety"], "held-out"),
    ],
)
def test_align_bad_input(extra: list[str], needle: str, tmp_path: Path, monkeypatch, user_error) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    user_error(["align", "tiny-random-llama", "--out", str(tmp_path / "out"), *FAST, *extra], needle)


def test_aligned_model_trains_once_and_matches_the_align_command(tmp_path: Path, monkeypatch) -> None:
    from ssah.experiments.align import AlignConfig, aligned_model

    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    cfg = AlignConfig(model="tiny-random-llama", steps=2, progress=False)
    folder = aligned_model(cfg=cfg)
    assert (folder / "model.safetensors").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert aligned_model(cfg=cfg) == folder  # second call: from the cache, not retrained
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["align", "tiny-random-llama", "--out", str(tmp_path / "a"), *FAST]) == 0
    res = json.loads((tmp_path / "a/results.json").read_text())
    assert res["training"]["from_cache"] == str(folder.parent)
