"""`ssah transfer` and `ssah budget` on SmolLM2-135M-Instruct, in quick mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.categorize import CATEGORIES
from ssah.cli import main

pytestmark = pytest.mark.slow


def test_transfer_quick_on_the_aligned_model_gives_a_valid_matrix(aligned_smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "transfer"
    assert main(["transfer", str(aligned_smollm2), "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    tr = res["transition"]
    assert tr["units_total"] == 63360 == sum(map(sum, tr["counts"]))
    for i, c in enumerate(CATEGORIES):
        assert sum(tr["counts"][i]) == tr["before"][c] > 0
    # the fine-tune moved something, but most units keep their category; the control moved units too
    assert 0 < tr["moved"] < tr["units_total"] // 2
    assert res["control"]["moved"] > 0 and res["matched"]["moved"] > 0
    assert res["scu_overlap"]["jaccard"] > 10 * res["scu_overlap"]["chance"]
    assert res["finetuned"]["in_memory"] and res["finetuned"]["training"]["steps"] == 8
    assert (out / "plots/transition.png").is_file() and (out / "plots/moved_by_layer.png").is_file()
    # the verdict is the one rule on the move across the fine-tune against the data-noise control
    t = res["paper"]["tests"]["SCU->CU"]
    assert t["effect"]["n"] == t["control"]["n"] == res["control"]["before"]["SCU"] > 0
    assert res["paper"]["verdict"] == t["verdict"] in ("reproduced", "not reproduced", "inconclusive")
    assert f"**{t['verdict']}**" in (out / "report.md").read_text()


def test_budget_quick_full_sft_raises_refusal(tmp_path: Path) -> None:
    out = tmp_path / "budget"
    short = ["--eval-limit", "12", "--eval-max-new-tokens", "24"]
    assert main(["budget", "smollm2-135m-instruct", "--quick", *short, "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["conditions"]
    base, full, randoms = rows[0], rows[1], rows[3:]
    assert [r["name"] for r in rows] == ["base", "full", "ru"] + ["random"] * 3
    assert full["eval"]["refusal"]["k"] > base["eval"]["refusal"]["k"]
    assert all(r["training"]["trainable"]["share"] < 0.2 * full["training"]["trainable"]["share"] for r in rows[2:])
    assert res["units"]["count"] == round(0.148 * 63360)
    assert all(r["training"]["steps"] == 10 for r in rows[1:])
    # stratified controls: RU's count in every (layer, kind) cell for each of the 3 seeds
    cells = res["units"]["controls"][0]["per_stratum"]
    assert len(randoms) == len(res["units"]["controls"]) == 3 and sum(cells.values()) == res["units"]["count"]
    assert all(c["per_stratum"] == cells for c in res["units"]["controls"])
    assert set(res["verdicts"]) == {"ru_vs_random", "ru_vs_full"}
    assert (out / "plots/budget.png").is_file() and "RU-only" in (out / "report.md").read_text()
