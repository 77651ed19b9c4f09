"""`ssah ablate` on tiny models: stratified random controls with their per-cell counts, the seeds rule, zero and
mean ablation (recorded, and mean = FLAP's bias compensation), verdicts consistent with their numbers, weights
bit-identical, the recipe importing no other recipe, re-rendering from results alone, and bad input (exit 2)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

import ssah.recipes.ablate.run as recipe
from ssah.arch import get_adapter
from ssah.categorize import load_categorization
from ssah.cli import main
from ssah.data import load_prompts
from ssah.evaluate import load_eval_sets
from ssah.generate import GenerationConfig
from ssah.interventions import channel_means
from ssah.judges import get_judge
from ssah.measure import ControlDistribution, Proportion, compare_measured, find_units, verdict, weights_digest
from ssah.models import load_model
from ssah.recipes.ablate.report import render
from ssah.recipes.ablate.run import (
    AblateConfig,
    Condition,
    ablated,
    measure_conditions,
    parse_dose,
)
from ssah.units import UnitSet, UnitSpace

FAST = ["--eval-limit", "3", "--eval-max-new-tokens", "4", "--calibration-limit", "6", "--no-progress"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def measured(v: dict) -> Proportion | ControlDistribution:
    if "draws" in v:
        return ControlDistribution(tuple(Proportion.from_dict(d) for d in v["draws"]))
    return Proportion.from_dict(v)


@pytest.fixture(scope="module")
def ablate_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablate") / "run"
    # the quick config leaves the prompt-only calibration comparison out; the flag puts it back (over the config)
    args = ["--quick", "--dose", "1%,5%", "--compare-calibration", *FAST]
    code = main(["ablate", "tiny-random-llama", "--out", str(out), *args])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-random-llama", device="cpu")
    found = find_units(
        lm,
        load_prompts("builtin:safety", limit=4),
        load_prompts("builtin:utility", limit=4),
        AblateConfig(model="-", progress=False),
    )
    return lm, found


def test_run_folder_and_table(ablate_run: Path) -> None:
    out = ablate_run
    for rel in ("config.yaml", "manifest.json", "results.json", "report.md", "units.safetensors"):
        assert (out / rel).is_file(), rel
    for rel in ("plots/dose_curve.png", "plots/ablation_bars.png"):
        assert (out / rel).stat().st_size > 1000, rel
    res = json.loads((out / "results.json").read_text())
    st = res["settings"]
    # config.yaml holds the resolved config: the shipped quick values under the flags given
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert (recorded["seeds"], recorded["random_for"], recorded["dose"], recorded["eval"]["limit"]) == (
        3,
        ["SCU"],
        [0.01, 0.05],
        3,
    )
    assert st["random_for"] == ["SCU"] and st["seeds"] == 3 and st["seed_list"] == [0, 1, 2] and st["limit"] == 3
    assert st["ablation"] == "mean" and st["control_strata"] == "layer-kind" and st["dose"] == [0.01, 0.05]
    assert res["units"]["source"] == "computed"
    # quick: random controls for SCU only (a full run adds one per category)
    names = [t["condition"] for t in res["table"]]
    assert names == ["baseline", "SCU", "random (as SCU)", "UCU", "CU", "RU", "refusal direction",
                     "random (as refusal direction)", "SCU (calibration: prompt)"]  # fmt: skip
    for row in res["conditions"]:  # every count in the one Proportion shape
        assert ("overrefusal" in row) == (row["group"] not in ("dose", "dose-random"))
        for key in ("asr", "coherent_compliance"):
            p = row[key]
            assert set(p) == {"k", "n", "rate", "ci95", "outcomes", "prompts"} and p["n"] == 3
            assert p["rate"] == p["k"] / p["n"] and p["outcomes"].count("1") == p["k"]  # one outcome per prompt
        assert row["coherent_compliance"]["k"] <= row["asr"]["k"] and row["perplexity"] > 0
    random_rows = [t for t in res["table"] if t["group"] == "random"]
    agg = random_rows[0]["row"]
    assert agg["asr"]["seeds"] == 3 and len(agg["asr"]["draws"]) == 3 and agg["seeds"] == [0, 1, 2]
    baseline = res["table"][0]
    assert baseline["change"] == {}
    scu = res["table"][1]
    want = compare_measured(measured(scu["row"]["asr"]), measured(baseline["row"]["asr"])).to_dict()
    assert scu["change"]["asr"] == want
    assert "perplexity_relative" in res["table"][1]["change"]
    total = res["model"]["units_total"]
    dose = res["dose"]
    assert [p["count"] for p in dose] == [max(1, round(s * total)) for s in (0.01, 0.05)]
    assert all(p["random"]["units"] == p["count"] == p["top"]["units"] for p in dose)
    assert all(p["asr_vs_random"]["verdict"] in ("reproduced", "not reproduced", "inconclusive") for p in dose)
    assert res["calibration"]["main"] == "prompt+response" and res["calibration"]["other"] == "prompt"
    assert res["weights"]["unchanged"] and res["weights"]["hooks_left"] == 0
    report = (out / "report.md").read_text()
    assert "Ablation: `mean`" in report and "coherent compliance" in report and "## Verdicts" in report
    assert "random max" not in report and "maximum" not in report
    assert "plots/dose_curve.png" in report and "plots/ablation_bars.png" in report


def test_random_controls_keep_the_count_in_every_cell(ablate_run: Path) -> None:
    res = json.loads((ablate_run / "results.json").read_text())
    lm = load_model("tiny-random-llama", device="cpu")
    space = UnitSpace.from_groups(get_adapter(lm.model).groups(), "neuron", lm.fingerprint, lm.name)
    cats = load_categorization(ablate_run / "units.safetensors", space)
    want = {
        f"{sh.layer}.{sh.kind}": n
        for sh, n in zip(space.shapes, cats["SCU"].counts_by_group().values(), strict=True)
        if n
    }
    rows = [r for r in res["conditions"] if r["group"] == "random"]
    assert len(rows) == 3 and all(r["per_stratum"] == want and r["units"] == len(cats["SCU"]) for r in rows)
    assert res["table"][2]["row"]["per_stratum"] == want
    for p in res["dose"]:  # dose controls: the per-cell counts of the top-k set, summing to its size
        ctrl = [r for r in res["conditions"] if r["group"] == "dose-random" and r["target"] == p["label"]]
        assert len(ctrl) == 3 and all(sum(r["per_stratum"].values()) == p["count"] for r in ctrl)


def test_verdicts_follow_from_the_numbers(ablate_run: Path) -> None:
    res = json.loads((ablate_run / "results.json").read_text())
    v = res["verdicts"]
    by = {t["condition"]: t["row"] for t in res["table"]}
    assert set(v["scu_vs_random"]) == {"asr", "coherent_compliance"}
    for key, got in v["scu_vs_random"].items():
        want = verdict(compare_measured(measured(by["SCU"][key]), measured(by["random (as SCU)"][key])), "higher")
        assert got == want.to_dict()
        lo, hi = got["comparison"]["ci95"]
        assert lo <= got["comparison"]["difference"] <= hi
        assert (got["verdict"] == "reproduced") == (lo > 0)
    assert set(v["vs_baseline"]) == {"SCU", "UCU"} and "asr" in v["vs_baseline"]["SCU"]
    for cat, items in v["vs_baseline"].items():
        for key, got in items.items():
            want = verdict(compare_measured(measured(by[cat][key]), measured(by["baseline"][key])), "higher")
            assert got == want.to_dict()
    ru = v["ru_target"]
    lo, hi = ru["asr_difference"]["ci95"]
    assert ru["asr"].startswith("met" if hi < 0.15 else "not met" if lo >= 0.15 else "undecided")
    assert ru["perplexity"] == (
        "met" if by["RU"]["perplexity"] / by["baseline"]["perplexity"] - 1 < 0.25 else "not met"
    )
    report = (ablate_run / "report.md").read_text()
    assert f"**{v['scu_vs_random']['asr']['verdict']}**" in report


def test_render_from_results_alone(ablate_run: Path, tmp_path: Path) -> None:
    res = json.loads((ablate_run / "results.json").read_text())
    text = render(res, tmp_path)
    assert (tmp_path / "plots" / "dose_curve.png").is_file() and (tmp_path / "plots" / "ablation_bars.png").is_file()
    assert text == (ablate_run / "report.md").read_text()


def test_unit_file_zero_ablation_full_seeds(ablate_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r2"
    units = ablate_run / "units.safetensors"
    args = [
        "ablate",
        "tiny-random-llama",
        "--units",
        str(units),
        "--out",
        str(out),
        "--categories",
        "scu,ru",
        "--seeds",
        "5",
        "--dose",
        "0.02",
        "--no-compare-calibration",
        "--no-direction",
        "--ablation",
        "zero",
        "--control-strata",
        "kind",
        *FAST,
    ]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["units"]["source"] == str(units) and not (out / "units.safetensors").exists()
    # a full run (not --quick) gives every ablated category its random control
    assert [t["condition"] for t in res["table"]] == ["baseline", "SCU", "random (as SCU)", "RU", "random (as RU)"]
    st = res["settings"]
    assert st["random_for"] == ["SCU", "RU"] and st["seed_list"] == [0, 1, 2, 3, 4] and st["ablation"] == "zero"
    ctrl = [r for r in res["conditions"] if r["group"] == "random"]
    assert len(ctrl) == 10 and all(set(r["per_stratum"]) <= {"attn", "mlp"} for r in ctrl)
    assert all(r["per_stratum"] is None for r in res["conditions"] if r["group"] in ("baseline", "category"))
    first = json.loads((ablate_run / "results.json").read_text())
    assert res["units"]["categories"] == first["units"]["categories"]
    assert "zero ablation" in stdout and "wrote" in stdout


def test_mean_ablation_is_flap_bias_compensation(tiny) -> None:
    """Mean ablation = zero ablation + W[:, j] * mean_j at the reader's output (FLAP's baseline bias)."""
    lm, found = tiny
    model, space = lm.model, found.categorization.space
    group = get_adapter(model).groups()[1]
    chosen = torch.tensor([0, 3, 5])
    units = UnitSet.from_indices(space, space.group_slice(group.layer, group.kind).start + chosen, "some")
    means = channel_means(found.statistics)
    reader = model.get_submodule(group.reader_module)
    outputs = {}

    def keep(name):
        return lambda _m, _a, out: outputs.__setitem__(name, out.detach().clone())

    ids = torch.tensor([[1, 5, 9, 12, 7]])
    for mode in ("zero", "mean"):
        handle = reader.register_forward_hook(keep(mode))
        with torch.no_grad(), ablated(model, units, mode, means):
            model(ids)
        handle.remove()
    w = reader.weight.detach().to(torch.float64)
    bias = w[:, chosen] @ means[group.key][chosen]
    torch.testing.assert_close((outputs["mean"] - outputs["zero"]).to(torch.float64)[0, 0], bias, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs["mean"], outputs["zero"])


def test_ablations_leave_weights_bit_identical(tiny) -> None:
    lm, found = tiny
    cats = found.categorization
    data = load_eval_sets("builtin:harmful", "none", ["perplexity"], limit=2)
    before = weights_digest(lm.model)
    conditions = [Condition("baseline", "baseline", None), Condition("CU", "category", cats["CU"])]
    for mode in ("zero", "mean"):
        rows = measure_conditions(
            lm,
            conditions,
            data,
            judge=get_judge("keyword:ssah"),
            config=GenerationConfig(max_new_tokens=3),
            mode=mode,
            means=channel_means(found.statistics),
            progress=False,
        )
        assert weights_digest(lm.model) == before
        assert sum(len(m._forward_pre_hooks) for m in lm.model.modules()) == 0
        assert rows[0]["perplexity"] != rows[1]["perplexity"]  # the ablation acted while it was on
        assert rows[1]["asr"]["n"] == 2 and rows[1]["units"] == len(cats["CU"])


def test_recipe_imports_no_other_recipe() -> None:
    tree = ast.parse(Path(recipe.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert "ssah.measure" in names and "ssah.fields.UtilityEvalSection" in names  # core loaders, not its own
    other = [
        m for m in names if m.startswith(("ssah.recipes.", "ssah.commands")) and not m.startswith("ssah.recipes.ablate")
    ]
    assert not other, names


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
        (["--seeds", "0"], "'seeds': Input should be greater than or equal to 3"),
        (["--seeds", "2"], "'seeds': Input should be greater than or equal to 3"),
        (["--ablation", "half"], "unknown ablation 'half'"),
        (["--control-strata", "head"], "unknown control strata 'head'"),
        (["--units", "missing.safetensors"], "not found"),
        (["--eval-judge", "keyword:nope"], "nope"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, user_error, extra: list[str], message: str) -> None:
    user_error(["ablate", "tiny-random-llama", "--out", str(tmp_path / "bad"), "--quick", *FAST, *extra], message)


def test_units_of_another_model(tmp_path: Path, capsys, user_error) -> None:
    units = tmp_path / "qwen"
    code, _, err = run(["units", "tiny-random-qwen2", "--out", str(units), "--limit", "4", "--no-progress"], capsys)
    assert code == 0, err
    bad = ["ablate", "tiny-random-llama", "--units", str(units / "units.safetensors"), "--out", str(tmp_path / "bad")]
    user_error([*bad, *FAST], "error: units from another model")
