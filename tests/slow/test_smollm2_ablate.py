"""`ssah ablate --quick` on the aligned SmolLM2 (mean ablation, layer-kind stratified controls, 3 seeds; one dose
point and no calibration comparison to stay short, about 3 min on 2 cores): the aligned model refuses, every
verdict is decided by the one rule from the stored counts, the random controls keep SCU's per-cell counts and the
weights come back bit-identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.cli import main
from ssah.measure import ControlDistribution, Proportion, compare_measured, verdict

pytestmark = pytest.mark.slow


def test_quick_ablation_on_aligned_smollm2(aligned_smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    # SCU (and its control) and RU (for the RU target) only; the direction has its own slow test
    args = ["--quick", "--dose", "1%", "--no-compare-calibration", "--categories", "SCU,RU", "--no-direction"]
    args += ["--out", str(out), "--no-progress"]
    assert main(["ablate", str(aligned_smollm2), *args]) == 0
    res = json.loads((out / "results.json").read_text())
    by = {t["condition"]: t["row"] for t in res["table"]}
    assert by["baseline"]["asr"]["rate"] <= 0.25  # the aligned model refuses
    assert res["settings"]["ablation"] == "mean" and res["weights"]["unchanged"]
    rnd = by["random (as SCU)"]
    assert sum(rnd["per_stratum"].values()) == by["SCU"]["units"] == rnd["units"]
    for key, got in res["verdicts"]["scu_vs_random"].items():
        control = ControlDistribution(tuple(Proportion.from_dict(d) for d in rnd[key]["draws"]))
        # paired on the prompts: the control is the prompts x seeds table of its draws
        assert got == verdict(compare_measured(Proportion.from_dict(by["SCU"][key]), control), "higher").to_dict()
        assert got["comparison"]["method"].startswith("paired") and got["comparison"]["n_control"] == rnd[key]["n"]
    assert "ru_target" in res["verdicts"] and "perplexity_relative" in res["verdicts"]["ru_target"]
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "Ablation: `mean`" in report and "maximum" not in report
    print(json.dumps(res["seconds"]), json.dumps(res["verdicts"]["scu_vs_random"]["asr"]["comparison"]))
