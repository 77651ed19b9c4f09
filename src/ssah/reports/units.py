"""The `ssah units` report: the categories, where they sit by layer, and their stability across data halves and
across safety calibration sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah.categorize import CATEGORIES
from ssah.reports.common import difference, markdown_table, plot_units_by_layer, proportion, verdict_word


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Redraw a units run's plots into ``run_dir/plots`` from its results alone and return its Markdown report."""
    summary = {"categories": results["categories"], "by_layer": results["by_layer"]}
    title = f"{results['model']['name']}: units by layer"
    plot_units_by_layer(summary, Path(run_dir) / "plots" / "units_by_layer.png", title=title)
    m = results["model"]
    rows = [
        [c, v["count"], f"{100 * v['fraction']:.2f}%", results["by_kind"][c]["attn"], results["by_kind"][c]["mlp"]]
        for c, v in results["categories"].items()
    ]
    lines = [
        f"# Units of {m['name']}",
        "",
        f"Model family `{m['family']}`, {m['layers']} layers, {m['units_total']} units ({results['granularity']} "
        f"granularity), fingerprint `{m['fingerprint']}`.",
        f"Metric `{results['metric']}`, rule `{results['rule']}` with shares {results['shares']}, "
        f"normalisation `{results['normalization']}`, ranking `{results['ranking']}`.",
        f"Tokens counted ({results['token_region']}): safety {results['tokens']['safety']}, "
        f"utility {results['tokens']['utility']}.",
        "",
        markdown_table(["category", "units", "share", "attention", "MLP"], rows),
        "",
        "![units by layer](plots/units_by_layer.png)",
        "",
    ]
    st = results.get("stability")
    if st:
        lines += [
            "## Stability across disjoint halves of the calibration data",
            "",
            markdown_table(
                ["category", "Jaccard", "chance level"], [[c, st[c]["jaccard"], st[c]["chance"]] for c in CATEGORIES]
            ),
            "",
        ]
    lines += calibration_section(results.get("calibration_sets"))
    lines.append(
        f"Took {results['seconds']['total']:.1f} s (model load {results['seconds']['load_model']:.1f} s, "
        f"scoring {results['seconds']['scoring']:.1f} s)."
    )
    return "\n".join(lines) + "\n"


def calibration_section(cal: dict[str, Any] | None) -> list[str]:
    """The SCU overlap between safety calibration sets (``--compare-safety``): one row per pair with the share
    found again, the stratified random control, the difference and the verdict."""
    if not cal:
        return []
    sets = markdown_table(
        ["safety set", "examples", "SCU"], [[s["spec"], s["examples"], s["scu"]] for s in cal["sets"]]
    )
    rows = [
        [
            f"{p['a']} -> {p['b']}",
            p.get("jaccard", "-"),
            proportion(p.get("found_again"), counts=True),
            proportion(p.get("stratified_control"), ci_digits=1, seeds=True),
            difference(p.get("comparison"), unit=" points") or "-",
            verdict_word(p["verdict"]["verdict"]),
        ]
        for p in cal["pairs"]
    ]
    return [
        "## Stability across safety calibration sets",
        "",
        f"{cal['method']}; control: {cal['control']}. Verdict: *reproduced* (stable beyond chance) when the 95% "
        "interval of the difference excludes zero upwards.",
        "",
        sets,
        "",
        markdown_table(
            ["SCU of a found again with b", "Jaccard", "found again", "random (stratified)", "difference", "verdict"],
            rows,
        ),
        "",
    ]
