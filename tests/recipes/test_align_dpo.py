"""`ssah align --method dpo | sft+dpo` on a tiny model: the preference step, its pairs (kept only when asked), its
cache entry, and a bad method."""

from __future__ import annotations

import json
from pathlib import Path

FAST = ["--steps", "2", "--eval-limit", "3", "--eval-max-new-tokens", "3", "--no-progress"]
DPO = ["--dpo-steps", "2", "--dpo-max-new-tokens", "4", "--dpo-batch-size", "4"]


def test_align_dpo_keeps_pairs_only_when_asked_and_caches_by_method(tmp_path: Path, monkeypatch) -> None:
    from ssah.cli import main

    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dpo"
    assert main(["align", "tiny-random-llama", "--out", str(out), "--method", "dpo", "--keep-pairs", *FAST, *DPO]) == 0
    res = json.loads((out / "results.json").read_text())
    t = res["training"]
    assert t["method"] == "dpo" and t["steps"] == 2 and t["from_cache"] is None
    assert t["dpo"]["pairs"]["safe"] > 0 and t["dpo"]["pairs"]["pairs"] == t["examples"]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == t["dpo"]["pairs"]["pairs"] and {"prompt", "chosen", "rejected", "kind"} <= pairs[0].keys()
    assert "Preference step (DPO, beta 0.1)" in (out / "report.md").read_text()
    # the cache holds the model, never the pairs
    assert not list((tmp_path / "cache").rglob("pairs*"))
    # another method is another model; without --keep-pairs no pairs file
    both = tmp_path / "both"
    assert main(["align", "tiny-random-llama", "--out", str(both), "--method", "sft+dpo", *FAST, *DPO]) == 0
    res2 = json.loads((both / "results.json").read_text())
    assert res2["training"]["from_cache"] is None and res2["training"]["method"] == "sft+dpo"
    assert res2["training"]["dpo"]["steps"] == 2 and res2["training"]["steps"] == 2  # SFT's steps, then DPO's
    assert res2["model"]["aligned_fingerprint"] != res["model"]["aligned_fingerprint"]
    assert not (both / "pairs.jsonl").exists()
    assert "Safety SFT: 2 steps" in (both / "report.md").read_text()
    # the same dpo run again: from the cache, and --keep-pairs rebuilds the same pairs from the base model
    again = tmp_path / "again"
    assert (
        main(["align", "tiny-random-llama", "--out", str(again), "--method", "dpo", "--keep-pairs", *FAST, *DPO]) == 0
    )
    res3 = json.loads((again / "results.json").read_text())
    assert (
        res3["training"]["from_cache"] and res3["model"]["aligned_fingerprint"] == res["model"]["aligned_fingerprint"]
    )
    assert (again / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()


def test_align_bad_method_is_one_line(tmp_path: Path, monkeypatch, user_error) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    user_error(["align", "tiny-random-llama", "--out", str(tmp_path / "out"), *FAST, "--method", "ppo"], "method")
    user_error(["align", "tiny-random-llama", "--out", str(tmp_path / "out"), *FAST, "--dpo-beta", "0"], "beta")


def test_cache_key_follows_the_method_and_its_settings() -> None:
    from ssah.recipes.align.run import AlignConfig

    def key(**kw: object) -> str:
        return AlignConfig(model="tiny-random-llama", **kw).training_key("fp", "data")  # type: ignore[arg-type]

    sft, dpo, both = key(), key(method="dpo"), key(method="sft+dpo")
    assert len({sft, dpo, both}) == 3
    assert key(method="sft", dpo={"beta": 0.5}) == sft  # DPO settings do not touch an SFT model
    assert key(method="dpo", dpo={"beta": 0.5}) != dpo
    assert key(method="dpo", dpo={"steps": 7}) != dpo and key(method="dpo", dpo={"lr": 1e-4}) != dpo
    assert key(method="dpo", dpo={"max_new_tokens": 8}) != dpo  # the model's own replies are other pairs
    assert key(method="dpo", eval={"judge": "keyword:xstest"}) != dpo  # the judge decides which pairs are dropped
    assert key(method="dpo", keep_pairs=True) == dpo  # keeping the pairs does not change the weights
