"""`ssah budget` on a tiny model: the run folder, stratified controls over several seeds, fresh weights per run,
verdicts from the one rule and consistent with the stored counts, bad input."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from helpers import measured
from ssah.cli import main
from ssah.measure import ControlDistribution, Proportion, compare_measured, verdict

FAST = [
    "--quick",
    "--steps",
    "2",
    "--eval-limit",
    "3",
    "--eval-max-new-tokens",
    "3",
    "--calibration-limit",
    "8",
    "--no-progress",
]


def recipe_imports(path: str) -> set[str]:
    """Every ssah module a source file imports."""
    tree = ast.parse(Path(path).read_text())
    out = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    out |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m for m in out if m.startswith("ssah")}


@pytest.mark.parametrize("recipe", ["budget", "transfer"])
def test_no_recipe_imports_another(recipe: str) -> None:
    import ssah.recipes

    path = Path(ssah.recipes.__file__).parent / recipe / "run.py"
    mine = f"ssah.recipes.{recipe}"
    others = {m for m in recipe_imports(str(path)) if m.startswith("ssah.recipes.") and not m.startswith(mine)}
    assert not others, others


def test_budget_runs_every_condition_with_stratified_controls(tmp_path: Path, capsys) -> None:
    from ssah.interventions import space_of
    from ssah.models import load_model
    from ssah.units import load_unit_sets

    out = tmp_path / "b"
    assert main(["budget", "tiny-random-llama", "--out", str(out), *FAST]) == 0
    for f in ("config.yaml", "manifest.json", "results.json", "report.md", "plots/budget.png", "units.safetensors"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    rows = res["conditions"]
    assert [r["name"] for r in rows] == ["base", "full", "ru", "random", "random", "random"]
    assert [r.get("seed") for r in rows[3:]] == [0, 1, 2] and res["settings"]["seeds"] == 3
    assert rows[0]["training"] is None
    for r in rows:
        e = r["eval"]
        for key in ("refusal", "asr", "overrefusal", "coherent_compliance", "task_accuracy"):
            p = e[key]
            assert set(p) == {"k", "n", "rate", "ci95", "outcomes", "prompts"} and p["rate"] == p["k"] / p["n"]
            eps = 1e-12  # the core's Wilson bound at k = 0 is 5.6e-17, not 0 (float rounding)
            assert 0 <= p["ci95"][0] <= p["rate"] + eps and p["rate"] <= p["ci95"][1] + eps <= 1 + eps
        assert e["refusal"]["k"] + e["asr"]["k"] == e["refusal"]["n"] == 3 and e["perplexity"] > 0
    for r in rows[1:]:
        assert r["training"]["steps"] == 2
    full, ru = rows[1]["training"]["trainable"]["params"], rows[2]["training"]["trainable"]["params"]
    assert ru < 0.2 * full
    # the controls: RU's count in every (layer, kind) cell, different draws per seed, recorded
    u = res["units"]
    assert u["found_on_base"] and u["count"] == round(0.148 * u["units_total"])
    sets = load_unit_sets(out / "units.safetensors", space_of(load_model("tiny-random-llama").model))
    assert set(sets) == {"RU", "random-0", "random-1", "random-2"}
    ru_cells = {f"{i}.{k}": n for i, row in enumerate(sets["RU"].counts_by_layer()) for k, n in row.items() if n}
    for c in u["controls"]:
        assert c["strata"] == "layer-kind" and c["count"] == u["count"] and c["per_stratum"] == ru_cells
        drawn = sets[f"random-{c['seed']}"].counts_by_layer()
        assert {f"{i}.{k}": n for i, row in enumerate(drawn) for k, n in row.items() if n} == ru_cells
    assert sets["random-0"] != sets["random-1"]
    # every verdict is the one rule applied to the stored counts
    for key, _, expected in (("refusal", 0, "higher"), ("overrefusal", 0, "lower"), ("task_accuracy", 0, "higher")):
        mine = Proportion.from_dict(rows[2]["eval"][key])
        dist = ControlDistribution(tuple(Proportion.from_dict(r["eval"][key]) for r in rows[3:]))
        v = res["verdicts"]["ru_vs_random"][key]
        assert v["verdict"] == verdict(compare_measured(mine, dist), expected).verdict and v["expected"] == expected
        assert v["comparison"]["control"] == pytest.approx(dist.rate)
        v = res["verdicts"]["ru_vs_full"][key]
        full = Proportion.from_dict(rows[1]["eval"][key])
        assert v["verdict"] == verdict(compare_measured(mine, full), expected).verdict
    assert res["paper"]["verdict"] == res["verdicts"]["ru_vs_full"]["task_accuracy"]["verdict"]
    report = (out / "report.md").read_text()
    assert "RU-only" in report and "plots/budget.png" in report and "random units" in report
    assert "reached" not in report
    assert "alignment budget" in capsys.readouterr().out


def test_decide_gives_each_verdict_from_constructed_counts() -> None:
    from ssah.recipes.budget.run import decide

    def row(name: str, refused: int, overrefused: int, correct: int, n: int = 100, start: int = 0) -> dict:
        """Every arm answers the same 100 prompts; ``start``: where its true outcomes begin (wrapping)."""
        e = {"refusal": measured(refused, n, start=start), "overrefusal": measured(overrefused, n, start=start)}
        e["task_accuracy"] = measured(correct, n, start=start)
        return {"name": name, "eval": {k: v.to_dict() for k, v in e.items()}}

    rows = [row("base", 5, 5, 50), row("full", 20, 40, 20), row("ru", 80, 5, 50)]
    rows += [row("random", 50 + i, 50, 50, start=50 + i) for i in range(3)]  # other prompts than ru's 50
    v = decide(rows)
    assert v["ru_vs_full"]["refusal"]["verdict"] == "reproduced"  # 80% vs 20%: higher, interval clear of zero
    assert v["ru_vs_full"]["overrefusal"]["verdict"] == "reproduced"  # 5% vs 40%: lower
    assert v["ru_vs_random"]["refusal"]["verdict"] == "reproduced"
    assert v["ru_vs_random"]["task_accuracy"]["verdict"] == "inconclusive"  # 50 vs 50 of 100: too wide to decide
    worse = decide([row("full", 90, 5, 80), row("ru", 10, 60, 10)])
    assert {x["verdict"] for x in worse["ru_vs_full"].values()} == {"not reproduced"}
    assert "ru_vs_random" not in worse and decide([row("full", 1, 1, 1)]) == {}


def test_budget_share_matches_the_trained_units_exactly(tmp_path: Path) -> None:
    """The units-only share equals the entries of the units' reader columns and writer rows."""
    from ssah.interventions import space_of, train_only_units
    from ssah.models import load_model
    from ssah.recipes.budget.run import BudgetConfig, run_budget
    from ssah.units import load_unit_sets

    cfg = BudgetConfig(
        model="tiny-random-llama",
        out=str(tmp_path / "b"),
        conditions=["ru"],
        steps=1,
        eval={"limit": 2, "max_new_tokens": 2},
        calibration={"limit": 6},
        progress=False,
    )
    res = run_budget(cfg).results
    assert [r["name"] for r in res["conditions"]] == ["base", "ru"] and res["verdicts"] == {}
    assert res["paper"]["verdict"] == "inconclusive"
    lm = load_model("tiny-random-llama")
    sets = load_unit_sets(tmp_path / "b/units.safetensors", space_of(lm.model), allow_other_weights=True)
    assert list(sets) == ["RU"]
    deltas = train_only_units(lm.model, sets["RU"])
    assert res["conditions"][1]["training"]["trainable"]["params"] == deltas.trainable_parameters
    deltas.merge()


def test_budget_with_a_unit_file_and_uniform_controls(tmp_path: Path) -> None:
    assert main(["units", "tiny-random-llama", "--out", str(tmp_path / "u"), "--limit", "6", "--no-progress"]) == 0
    out = tmp_path / "b"
    spec = f"{tmp_path / 'u/units.safetensors'}:SCU"
    args = ["--units", spec, "--condition", "ru", "--condition", "random", "--control-strata", "none"]
    assert main(["budget", "tiny-random-llama", "--out", str(out), *args, *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["units"]["source"] == spec and not res["units"]["found_on_base"]
    assert res["units"]["count"] == round(0.013 * res["units"]["units_total"])
    assert [r["name"] for r in res["conditions"]] == ["base", "ru", "random", "random", "random"]
    assert all(c["per_stratum"] == {"all": res["units"]["count"]} for c in res["units"]["controls"])
    assert set(res["verdicts"]) == {"ru_vs_random"}


def test_every_run_starts_from_the_base_weights(tmp_path: Path, monkeypatch) -> None:
    import ssah.recipes.budget.run as budget
    from ssah.models import load_model, model_fingerprint

    seen: list[tuple[str, str]] = []
    real = budget.train_model

    def spy(model, tokenizer, data, cfg, **kw):  # type: ignore[no-untyped-def]
        seen.append((model_fingerprint(model), "only" if kw.get("only") is not None else "all"))
        return real(model, tokenizer, data, cfg, **kw)

    monkeypatch.setattr(budget, "train_model", spy)
    assert main(["budget", "tiny-random-llama", "--out", str(tmp_path / "b"), *FAST]) == 0
    base = load_model("tiny-random-llama").fingerprint
    assert seen == [(base, "all")] + [(base, "only")] * 4


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--condition", "lora"], "conditions"),
        (["--lr-units", "0"], "'lr_units'"),
        (["--steps", "0"], "steps"),
        (["--seeds", "0"], "seeds"),
        (["--seeds", "2"], "'seeds': Input should be greater than or equal to 3"),
        (["--control-strata", "head"], "unknown control strata 'head'"),
        (["--eval-benign", "builtin:utility"], "training prompts"),
        (["--units", "nofile"], "unit spec"),
        (["--units", "/nonexistent/units.safetensors:RU"], "units.safetensors"),
        (["--data", "builtin:harmful"], "response"),
        (["--eval-judge", "keyword:nope"], "nope"),
    ],
)
def test_budget_bad_input(extra: list[str], needle: str, tmp_path: Path, user_error) -> None:
    user_error(["budget", "tiny-random-llama", "--out", str(tmp_path / "out"), *FAST, *extra], needle)


@pytest.mark.parametrize("method", ["dpo", "sft+dpo"])
def test_budget_aligns_by_preference_under_the_unit_masks(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    dpo = ["--method", method, "--dpo-steps", "1", "--dpo-max-new-tokens", "4", "--dpo-batch-size", "4"]
    assert main(["budget", "tiny-random-llama", "--out", str(out), "--condition", "full", "--condition", "ru",
                 *dpo, *FAST]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["method"] == method and res["settings"]["pairs"]["pairs"] > 0
    rows = {r["name"]: r for r in res["conditions"]}
    full, ru = rows["full"]["training"], rows["ru"]["training"]
    assert full["method"] == ru["method"] == method
    assert full["dpo"]["steps"] == ru["dpo"]["steps"] == 1
    # the units-only condition's preference rate is scaled as its SFT rate is
    assert ru["dpo"]["lr"] == pytest.approx(
        full["dpo"]["lr"] * res["settings"]["lr_units"] / res["settings"]["lr_full"]
    )
    assert full["steps"] == (2 if method == "sft+dpo" else 1)  # the SFT step's 2 (--steps), or the DPO step's 1
