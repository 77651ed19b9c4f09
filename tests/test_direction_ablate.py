"""`ssah ablate` with the refusal direction and KL: the direction condition and its random-direction control,
KL on harmless prompts for every condition, the verdict from the one rule; both switch off."""

from __future__ import annotations

import json

import pytest

from ssah.cli import main

FAST = ["--quick", "--eval-limit", "3", "--eval-max-new-tokens", "4", "--calibration-limit", "8", "--no-progress"]
SMALL = ["--categories", "SCU", "--no-compare-calibration", "--dose", "1%"]


def test_ablate_adds_direction_and_kl(tmp_path) -> None:
    out = tmp_path / "a"
    assert main(["ablate", "tiny-random-llama", "--out", str(out), *FAST, *SMALL]) == 0
    res = json.loads((out / "results.json").read_text())
    groups = [r["group"] for r in res["conditions"]]
    assert groups.count("direction") == 1 and groups.count("direction-random") == 3
    assert all("kl" in r and r["kl"]["reply"]["n"] == 3 for r in res["conditions"])
    base = next(r for r in res["conditions"] if r["group"] == "baseline")
    assert base["kl"]["reply"]["mean"] < 1e-5
    direction = next(r for r in res["conditions"] if r["group"] == "direction")
    assert direction["kl"]["reply"]["mean"] > 0
    names = [t["condition"] for t in res["table"]]
    assert "refusal direction" in names and "random (as refusal direction)" in names
    v = res["verdicts"]["direction_vs_random"]["asr"]
    lo, _hi = v["comparison"]["ci95"]
    assert (v["verdict"] == "reproduced") == (lo > 0)
    assert "layer" in res["units"]["direction"]
    shares = res["units"]["direction"]["write_share"]
    assert sum(x["share_of_channels"] for x in shares.values()) == pytest.approx(1.0)
    assert sum(x["share_of_direction_write"] for x in shares.values()) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "KL (harmless)" in report and "refusal direction vs random directions" in report
    assert "plots/asr_vs_kl.png" in report and (out / "plots" / "asr_vs_kl.png").is_file()
    assert res["weights"]["unchanged"] and res["weights"]["hooks_left"] == 0


def test_ablate_direction_and_kl_switch_off(tmp_path) -> None:
    out = tmp_path / "a"
    assert main(["ablate", "tiny-random-llama", "--out", str(out), *FAST, *SMALL, "--no-direction", "--no-kl"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert not [r for r in res["conditions"] if r["group"].startswith("direction")]
    assert not [r for r in res["conditions"] if "kl" in r]
    assert "direction_vs_random" not in res["verdicts"]
