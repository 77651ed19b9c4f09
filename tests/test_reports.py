"""The report layer on constructed inputs with exact expected values: the shared formatting (proportions,
differences, verdict sentences), the ablation's pure aggregations (controls over seeds, changes against the
baseline, Table 1 rows, verdicts, the RU target) and the report modules' tables; plus the import rules (reports
never import another recipe's experiment, experiments never import each other through reports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import measured
from ssah.measure import ControlDistribution, Proportion, compare, compare_measured, verdict
from ssah.recipes.ablate.report import condition_cells
from ssah.recipes.ablate.table import _aggregate, _changes, _ru_target, _table, _verdicts
from ssah.reports.common import difference, markdown_table, pct, proportion, verdict_line, verdict_word

SRC = Path(__file__).resolve().parents[1] / "src" / "ssah"


# -- shared formatting ------------------------------------------------------------------------------------------
def test_proportion_and_difference_cells() -> None:
    p = {"k": 1, "n": 4, "rate": 0.25, "ci95": [0.1, 0.5]}
    assert proportion(p) == "25.0% [10, 50]"
    assert proportion(p, digits=0, ci_digits=1, counts=True) == "25% [10.0, 50.0] (1/4)"
    assert proportion({"value": 0.5, "ci95": [0.25, 0.75]}) == "50.0% [25, 75]"  # a judge agreement
    assert proportion(None) == "-" and proportion({"value": None, "ci95": [0, 1]}) == "-"
    control = {"rate": 0.2, "ci95": [0.05, 0.4], "seeds": 3, "draws": []}
    assert proportion(control, seeds=True) == "20.0% [5, 40, 3 seeds]"
    assert proportion(Proportion(1, 2)).startswith("50.0% [")  # the core object itself
    c = {"difference": 0.125, "ci95": [-0.05, 0.3]}
    assert difference(c) == "+12.5 [-5.0, +30.0]"
    assert difference(c, ci_digits=0, unit=" points") == "+12.5 points [-5, +30]"
    assert difference(None) == "" and pct(None) == "-" and pct(0.5, 0) == "50%"
    assert verdict_word("reproduced") == "**reproduced**" and verdict_word(None) == "n/a"
    assert markdown_table(["a", "b"], [[1, 0.123456]]) == "| a | b |\n|---|---|\n| 1 | 0.1235 |"


def test_verdict_line_says_rates_interval_verdict_and_n_needed() -> None:
    v = verdict(compare(Proportion(40, 50), Proportion(10, 50)), "higher").to_dict()
    line = verdict_line("SCU vs random, ASR", v, "random")
    d = v["comparison"]
    assert line.startswith("- SCU vs random, ASR: 80.0% vs random 20.0%, difference +60.0 points [")
    assert f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" in line
    assert "-> **reproduced** (expected higher:" in line and "would decide" not in line
    small = verdict(compare(Proportion(2, 4), Proportion(1, 4)), "higher").to_dict()
    assert small["verdict"] == "inconclusive"
    assert f"about {small['n_needed']} units per side would decide it" in verdict_line("x", small, "", per_side="units")
    assert verdict_line("x", {"verdict": "inconclusive", "reason": "no control"}, "c") == (
        "- x: **inconclusive** (no control)."
    )


# -- ablation: the pure aggregations ---------------------------------------------------------------------------
def _row(name: str, group: str, asr: tuple[int, int], ppl: float, *, target: str = "", seed: int | None = None):
    return {
        "name": name,
        "group": group,
        "target": target,
        "seed": seed,
        "units": 0 if group == "baseline" else 10,
        "fraction": 0.0 if group == "baseline" else 0.01,
        "per_stratum": {"0/mlp": 10},
        "asr": measured(*asr, start=seed or 0).to_dict(),
        "coherent_compliance": measured(*asr, start=seed or 0).to_dict(),  # every reply judged coherent here
        "perplexity": ppl,
    }


ROWS = [
    _row("baseline", "baseline", (2, 20), 10.0),
    _row("SCU", "category", (18, 20), 12.0),
    *(
        _row(f"r{s}", "random", (k, 20), p, target="SCU", seed=s)
        for s, k, p in ((1, 2, 10.0), (2, 4, 11.0), (3, 3, 12.0))
    ),
    _row("RU", "category", (3, 20), 11.5),
]


def test_aggregate_and_changes_on_constructed_rows() -> None:
    agg = _aggregate(ROWS[2:5])
    assert agg["seeds"] == [1, 2, 3] and agg["units"] == 10
    draws = (measured(2, 20, start=1), measured(4, 20, start=2), measured(3, 20, start=3))
    assert agg["asr"] == ControlDistribution(draws).to_dict()
    assert agg["asr"]["rate"] == pytest.approx(0.15)
    assert agg["perplexity"] == {"mean": 11.0, "min": 10.0, "max": 12.0, "values": [10.0, 11.0, 12.0]}
    change = _changes(ROWS[1], ROWS[0])
    assert change["asr"] == compare_measured(measured(18, 20), measured(2, 20)).to_dict()
    assert change["asr"]["difference"] == pytest.approx(0.8)
    assert change["perplexity_relative"] == pytest.approx(0.2)
    assert _changes(agg, ROWS[0])["perplexity_relative"] == pytest.approx(0.1)  # mean over the seeds


def test_table_orders_each_category_with_its_random_control_and_verdicts_follow() -> None:
    table = _table(ROWS)
    assert [t["condition"] for t in table] == ["baseline", "SCU", "random (as SCU)", "RU"]
    assert table[2]["row"]["asr"]["rate"] == pytest.approx(0.15) and table[0]["change"] == {}
    v = _verdicts(table)
    scu = v["scu_vs_random"]["asr"]
    control = ControlDistribution((measured(2, 20, start=1), measured(4, 20, start=2), measured(3, 20, start=3)))
    assert scu == verdict(compare_measured(measured(18, 20), control), "higher").to_dict()
    assert scu["verdict"] == "reproduced"
    assert v["vs_baseline"]["SCU"]["asr"]["verdict"] == "reproduced"
    ru = v["ru_target"]
    assert ru["perplexity_relative"] == pytest.approx(0.15) and ru["perplexity"] == "met"
    lo, hi = ru["asr_difference"]["ci95"]
    assert ru["asr"] == (
        "met" if hi < 0.15 else "not met" if lo >= 0.15 else "undecided (the interval straddles the target)"
    )
    cells = condition_cells(table[1])
    assert cells[:3] == ["SCU", "10 (1.00%)", proportion(ROWS[1]["asr"], seeds=True)]
    assert cells[3] == difference(table[1]["change"]["asr"], ci_digits=0) and cells[-2:] == ["12.00 (+20.0%)", "-"]


def test_ru_target_from_the_interval() -> None:
    def ru(lo: float, hi: float, rel: float) -> dict:
        return {"change": {"asr": {"difference": (lo + hi) / 2, "ci95": [lo, hi]}, "perplexity_relative": rel}}

    assert _ru_target(ru(-0.05, 0.10, 0.3)) | {"asr_difference": None} == {
        "asr_points": 0.15,
        "perplexity_rise": 0.25,
        "asr_difference": None,
        "asr": "met",
        "perplexity_relative": 0.3,
        "perplexity": "not met",
    }
    assert _ru_target(ru(0.2, 0.4, 0.0))["asr"] == "not met"
    assert _ru_target(ru(0.1, 0.2, 0.0))["asr"].startswith("undecided")


# -- import rules ------------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return out | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


REPORTS = sorted([*(SRC / "reports").glob("*.py"), *(SRC / "recipes").glob("*/report.py")])


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_report_imports_no_recipe(path: Path) -> None:
    """A report renders ``results.json`` alone: what it needs of its recipe (labels, orders, control names) is
    written into the results, so a report never imports a recipe's run module (not even its own recipe's)."""
    assert {m for m in _imports(path) if m.startswith("ssah.recipes.") and m.endswith(".run")} == set()


def test_no_core_module_imports_a_recipe() -> None:
    """The core (everything outside ``ssah/recipes``: measure, runs, results, reports, commands, the CLI ...)
    reaches recipes only through the registry's ``"module:attribute"`` references, imported on first use."""
    core = [p for p in SRC.rglob("*.py") if "recipes" not in p.relative_to(SRC).parts]
    assert len(core) > 40  # the walk found the package
    found = {str(p.relative_to(SRC)): sorted(m for m in _imports(p) if m.startswith("ssah.recipes")) for p in core}
    assert {k: v for k, v in found.items() if v} == {}


def test_every_recipe_writes_through_write_run() -> None:
    """One writer for every run folder: no recipe writes results.json or its report by hand (the protocol's
    ``execute`` calls ``write_run``; the demo: see its module; it continues in place)."""
    for path in sorted((SRC / "recipes").glob("*/run.py")):
        text = path.read_text()
        if path.parent.name == "demo":
            continue
        assert "write_run(" in text or "execute(" in text, path.parent.name
        assert '"results.json"' not in text and '"report.md"' not in text, path.stem


def test_asr_against_kl_points_and_plot(tmp_path: Path) -> None:
    """Every condition with a KL measurement is a point (ASR, KL); dose points too; none without KL."""
    from ssah.recipes.ablate.report import _kl_points, _plot_kl

    def row(asr: float, kl: float | None) -> dict:
        r = {"asr": {"rate": asr}}
        return r | ({"kl": {"reply": {"mean": kl}}} if kl is not None else {})

    results = {
        "model": {"name": "m"},
        "table": [
            {"condition": "baseline", "group": "baseline", "row": row(0.0, 0.0)},
            {"condition": "SCU", "group": "category", "row": row(1.0, 0.7)},
            {"condition": "RU", "group": "category", "row": row(0.1, None)},
        ],
        "dose": [{"label": "1%", "top": row(0.5, 0.2)}],
    }
    assert _kl_points(results) == [("baseline", 0.0, 0.0, "baseline"), ("SCU", 0.7, 1.0, "category"),
                                   ("top 1%", 0.2, 0.5, "dose")]  # fmt: skip
    _plot_kl(results, tmp_path)
    assert (tmp_path / "asr_vs_kl.png").stat().st_size > 0
    _plot_kl({"model": {"name": "m"}, "table": [results["table"][2]], "dose": []}, tmp_path / "none")
    assert not (tmp_path / "none").exists()
