"""`ssah localize` end to end on a tiny model: every method at every budget with exactly the budget's units, its
stratified controls drawn per cell, paired verdicts consistent with their numbers, the overlap matrix, re-rendering
from results alone, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ssah.cli import main
from ssah.measure import compare_prompts, verdict
from ssah.recipes.localize.report import render
from ssah.verdicts import Proportion

FAST = ["--config", "quick", "--calibration-limit", "8", "--eval-limit", "4", "--eval-max-new-tokens", "4",
        "--kl-tokens", "3", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def localize_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("localize") / "run"
    assert main(["localize", "tiny-random-llama", "--out", str(out), *FAST]) == 0
    return out


def _outcomes(p: dict[str, Any]) -> list[bool]:
    return list(Proportion.from_dict(p).outcomes or ())


def test_every_method_at_every_budget(localize_run: Path) -> None:
    res = json.loads((localize_run / "results.json").read_text())
    assert res["settings"]["methods"] == ["ssah", "wei-wanda", "activation-contrast", "random"]
    total = res["model"]["units_total"]
    assert [b["share"] for b in res["budgets"]] == [0.005, 0.013]
    for b in res["budgets"]:
        assert b["units"] == max(1, round(b["share"] * total))
        for name, m in b["methods"].items():
            rows = m["conditions"] if m["seeded"] else [m["condition"], *m["controls"]]
            assert all(r["units"] == b["units"] for r in rows), name
            if m["seeded"]:
                assert len(m["conditions"]) == res["settings"]["seeds"]
                continue
            assert sum(m["by_group"].values()) == b["units"]
            assert len(m["controls"]) == res["settings"]["seeds"]
            # the verdict is the paired comparison with the controls' prompts x seeds table, recomputed here
            comp = compare_prompts(_outcomes(m["condition"]["asr"]), [_outcomes(c["asr"]) for c in m["controls"]])
            assert m["vs_random"]["asr"]["verdict"] == verdict(comp, "higher").verdict
            assert m["vs_random"]["asr"]["comparison"]["ci95"] == pytest.approx(list(comp.ci95))
        names = list(b["methods"])
        j = b["overlap"]["jaccard"]
        assert all(j[n][n] == 1.0 for n in names) and all(j[a][c] == j[c][a] for a in names for c in names)
        assert len(b["pairwise"]) == 3  # the three non-random methods, pairwise
    assert res["weights"]["unchanged"] is True
    assert res["prompts"]["overlap"] == []


def test_report_rerenders_from_results(localize_run: Path) -> None:
    res = json.loads((localize_run / "results.json").read_text())
    text = render(res, localize_run)
    assert text == (localize_run / "report.md").read_text()
    assert "## Budget 1.30% of units" in text and (localize_run / "plots" / "asr_vs_kl.png").is_file()
    assert (localize_run / "plots" / "overlap.png").is_file() and "plots/overlap.png" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--methods", "nope"], "localisation method"),
        (["--methods", "aligned-vs-base"], "--base"),
        (["--budgets", "150%"], "outside"),
        (["--budgets", "abc"], "bad budget"),
    ],
)
def test_bad_input(args: list[str], needle: str, user_error: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    user_error(["localize", "tiny-random-llama", "--out", str(out), *FAST, *args], needle, watch=out)
