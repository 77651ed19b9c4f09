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
    assert "reproduced" in (out / "report.md").read_text().lower()


def test_budget_quick_full_sft_raises_refusal(tmp_path: Path) -> None:
    out = tmp_path / "budget"
    assert main(["budget", "smollm2-135m-instruct", "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["conditions"]}
    assert rows["full"]["eval"]["refusal_rate"] > rows["base"]["eval"]["refusal_rate"]
    full, ru, rnd = (rows[n]["training"]["trainable"]["share"] for n in ("full", "ru", "random"))
    assert ru < 0.2 * full and rnd < 0.2 * full
    assert res["units"]["count"] == round(0.148 * 63360)
    assert all(rows[n]["training"]["steps"] == 10 for n in ("full", "ru", "random"))
    assert (out / "plots/budget.png").is_file() and "RU-only" in (out / "report.md").read_text()
