"""`ssah ablate` on a tiny model: the run folder, every condition's row, same-size random controls, weights
bit-identical after the ablations, re-rendering from results alone, and bad input (nothing written, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssah.cli import main
from ssah.experiments.ablate import (
    Condition,
    evaluate_conditions,
    parse_dose,
    random_control,
    render,
    scu_ranking,
    weights_digest,
)
from ssah.experiments.eval import EvalConfig, load_eval_data
from ssah.experiments.units import UnitsConfig, categorize_model
from ssah.generate import GenerationConfig
from ssah.judges import get_judge
from ssah.models import load_model

FAST = ["--limit", "3", "--max-new-tokens", "4", "--calibration-limit", "6", "--no-progress"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ablate_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablate") / "run"
    code = main(["ablate", "tiny-random-llama", "--out", str(out), "--quick", "--dose", "1%,5%", *FAST])
    assert code == 0
    return out


def test_run_folder_and_table(ablate_run: Path) -> None:
    out = ablate_run
    for rel in ("config.yaml", "manifest.json", "results.json", "report.md", "units.safetensors"):
        assert (out / rel).is_file(), rel
    for rel in ("plots/dose_curve.png", "plots/ablation_bars.png"):
        assert (out / rel).stat().st_size > 1000, rel
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["quick"] and res["settings"]["seeds"] == 2 and res["settings"]["limit"] == 3
    assert res["settings"]["max_new_tokens"] == 4 and res["settings"]["dose"] == [0.01, 0.05]
    assert res["seconds"]["total"] > 0 and res["units"]["source"] == "computed"
    names = [t["condition"] for t in res["table"]]
    # quick: random controls for SCU only (a full run adds one per category)
    assert names == ["baseline", "SCU", "random (size of SCU)", "UCU", "CU", "RU", "SCU (calibration: prompt)"]
    cats = res["units"]["categories"]
    for row in res["conditions"]:
        assert {"asr", "coherent_compliance", "utility"} <= row.keys()
        assert ("overrefusal" in row) == (row["group"] not in ("dose", "dose-random"))
        assert row["asr"]["n"] == 3 and 0 <= row["asr"]["ci95"][0] <= row["asr"]["rate"] <= row["asr"]["ci95"][1]
        assert row["coherent_compliance"]["rate"] <= row["asr"]["rate"]
        if row["group"] == "random":  # a random control has exactly its category's size
            assert row["units"] == cats[row["target"]]["count"]
    random_scu = [r for r in res["conditions"] if r["group"] == "random" and r["target"] == "SCU"]
    assert [r["seed"] for r in random_scu] == [0, 1]
    assert all(r["units"] == cats["SCU"]["count"] > 0 for r in random_scu)
    for t in res["table"]:
        if t["group"] == "random":
            assert t["row"]["asr"]["min"] <= t["row"]["asr"]["mean"] <= t["row"]["asr"]["max"]
        elif t["group"] != "baseline":
            assert "asr" in t["delta"] and "utility" in t["delta"]
    total = res["model"]["units_total"]
    dose = res["dose"]
    assert [p["count"] for p in dose] == [max(1, round(s * total)) for s in (0.01, 0.05)]
    assert all(p["random"]["units"] == p["count"] and p["scu"]["units"] == p["count"] for p in dose)
    assert res["comparison"]["seeds"] == 2 and "scu_asr_exceeds_random_max" in res["comparison"]
    assert res["calibration"]["main"] == "prompt+response" and res["calibration"]["other"] == "prompt"
    assert res["weights"]["unchanged"] and res["weights"]["hooks_left"] == 0
    report = (out / "report.md").read_text()
    assert "Main table calibration: `prompt+response`" in report and "coherent compliance" in report
    assert "random control" in report and "plots/dose_curve.png" in report and "plots/ablation_bars.png" in report


def test_render_from_results_alone(ablate_run: Path, tmp_path: Path) -> None:
    res = json.loads((ablate_run / "results.json").read_text())
    text = render(res, tmp_path)
    assert (tmp_path / "plots" / "dose_curve.png").is_file() and (tmp_path / "plots" / "ablation_bars.png").is_file()
    assert text == (ablate_run / "report.md").read_text()


def test_unit_file_reused(ablate_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r2"
    units = ablate_run / "units.safetensors"
    code, stdout, err = run(
        [
            "ablate",
            "tiny-random-llama",
            "--units",
            str(units),
            "--out",
            str(out),
            "--categories",
            "scu,ru",
            "--seeds",
            "1",
            "--dose",
            "0.02",
            "--no-compare-calibration",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["units"]["source"] == str(units) and not (out / "units.safetensors").exists()
    # a full run (not --quick) gives every ablated category its random control
    assert [t["condition"] for t in res["table"]] == [
        "baseline",
        "SCU",
        "random (size of SCU)",
        "RU",
        "random (size of RU)",
    ]
    assert not res["settings"]["quick"] and res["settings"]["seed_list"] == [0]
    first = json.loads((ablate_run / "results.json").read_text())
    assert res["units"]["categories"] == first["units"]["categories"]
    assert "ASR" in stdout and "wrote" in stdout


def test_ablations_leave_weights_bit_identical() -> None:
    lm = load_model("tiny-random-llama", device="cpu")
    cfg = UnitsConfig(model="-", progress=False)
    from ssah.data import load_prompts

    outcome = categorize_model(
        lm, load_prompts("builtin:safety", limit=4), load_prompts("builtin:utility", limit=4), cfg
    )
    cats = outcome.categorization
    ranking = scu_ranking(cats, outcome.safety, outcome.utility)
    n_scu = len(cats["SCU"])
    assert set(ranking[:n_scu].tolist()) == set(cats["SCU"].indices().tolist())
    assert not (cats["RU"].mask[ranking]).any() and ranking.unique().numel() == ranking.numel()
    space = cats.space
    r0, r0b, r1 = random_control(space, 7, 0), random_control(space, 7, 0), random_control(space, 7, 1)
    assert len(r0) == 7 and r0 == r0b and r0 != r1
    assert set(random_control(space, 3, 0).indices().tolist()) <= set(r0.indices().tolist())  # nested by seed
    data = load_eval_data(EvalConfig(model="-", limit=2, utility=["perplexity"]))
    before = weights_digest(lm.model)
    conditions = [Condition("baseline", "baseline", None), Condition("CU", "category", cats["CU"])]
    rows = evaluate_conditions(
        lm, conditions, data, judge=get_judge("keyword:ssah"), config=GenerationConfig(max_new_tokens=3), progress=False
    )
    assert weights_digest(lm.model) == before
    assert sum(len(m._forward_pre_hooks) for m in lm.model.modules()) == 0
    # the ablation did act while it was on: utility moved
    assert rows[0]["utility"]["perplexity"] != rows[1]["utility"]["perplexity"]
    assert torch.isfinite(torch.tensor(rows[1]["utility"]["perplexity"]))


def test_parse_dose() -> None:
    assert parse_dose("0.25%,0.5%, 1%") == [0.0025, 0.005, 0.01]
    assert parse_dose("0.02,0.01") == [0.01, 0.02]
    for bad in ("abc", "0", "150%", "-1%", "1.5", ""):
        with pytest.raises(Exception, match="dose"):
            parse_dose(bad)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--categories", "SCU,XYZ"], "unknown category 'XYZ'"),
        (["--random-for", "ABC"], "unknown category 'ABC'"),
        (["--dose", "150%"], "dose share"),
        (["--dose", "many"], "bad dose share"),
        (["--seeds", "0"], "--seeds"),
        (["--units", "missing.safetensors"], "not found"),
        (["--judge", "keyword:nope"], "nope"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "bad"
    code, _, err = run(["ablate", "tiny-random-llama", "--out", str(out), *FAST, *extra], capsys)
    assert code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists() and not any(tmp_path.iterdir())


def test_units_of_another_model(tmp_path: Path, capsys) -> None:
    units = tmp_path / "qwen"
    code, _, err = run(["units", "tiny-random-qwen2", "--out", str(units), "--limit", "4", "--no-progress"], capsys)
    assert code == 0, err
    out = tmp_path / "bad"
    code, _, err = run(
        ["ablate", "tiny-random-llama", "--units", str(units / "units.safetensors"), "--out", str(out), *FAST], capsys
    )
    assert code == 2 and err.startswith("error: units from another model") and len(err.strip().splitlines()) == 1
    assert not out.exists()
