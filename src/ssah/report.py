"""Readable output: Markdown tables and matplotlib plots for run folders."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CATEGORY_COLORS = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#9467bd", "RU": "#7f7f7f"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_units_by_layer(summary: Mapping[str, Any], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """One panel per category: its units in each layer, attention and MLP side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_layer = summary["by_layer"]
    layers = [row["layer"] for row in by_layer]
    cats = [c for c in CATEGORY_COLORS if c in summary["categories"]]
    fig, axes = plt.subplots(len(cats), 1, figsize=(11, 2.0 * len(cats) + 0.6), sharex=True, squeeze=False)
    w = 0.4
    for ax, c in zip(axes[:, 0], cats, strict=True):
        ax.bar(
            [x - w / 2 for x in layers],
            [row[c]["attn"] for row in by_layer],
            width=w,
            color=CATEGORY_COLORS[c],
            alpha=0.55,
            label="attention",
        )
        ax.bar(
            [x + w / 2 for x in layers],
            [row[c]["mlp"] for row in by_layer],
            width=w,
            color=CATEGORY_COLORS[c],
            label="MLP",
        )
        n = summary["categories"][c]["count"]
        ax.set_ylabel(f"{c}\n({n})")
        ax.legend(loc="upper left", fontsize=7, ncol=2, frameon=False)
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
