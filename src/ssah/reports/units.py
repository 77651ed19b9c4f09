"""The `ssah units` report: the categories, where they sit by layer, and their stability across data halves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah.categorize import CATEGORIES
from ssah.reports.common import markdown_table, plot_units_by_layer


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
    lines.append(
        f"Took {results['seconds']['total']:.1f} s (model load {results['seconds']['load_model']:.1f} s, "
        f"scoring {results['seconds']['scoring']:.1f} s)."
    )
    return "\n".join(lines) + "\n"
