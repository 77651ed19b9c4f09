"""What every report shares: Markdown tables, proportions with their intervals, verdict sentences, and the
standard plots (bars with 95% whiskers, curves with bands, units per layer), so that each recipe's report module
only says what is particular to it.

Proportions arrive as the core's one JSON shape (``measure.Proportion.to_dict()`` / ``ControlDistribution``:
``rate`` and ``ci95``; a judge agreement uses ``value``), comparisons as ``measure.Comparison.to_dict()`` and
verdicts as ``measure.Verdict.to_dict()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CATEGORY_COLORS = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#9467bd", "RU": "#7f7f7f"}
MODEL_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")

Span = tuple[float, float, float]  # (value, low, high)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (floats with 4 significant digits)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float | None, digits: int = 1, none: str = "-") -> str:
    """``0.1234`` -> ``12.3%`` (``none`` for a missing value)."""
    return none if x is None else f"{100 * x:.{digits}f}%"


def _rate_and_interval(p: Any) -> tuple[float, tuple[float, float]]:
    if isinstance(p, Mapping):
        return p["rate"] if "rate" in p else p["value"], tuple(p["ci95"])  # type: ignore[return-value]
    return p.rate, tuple(p.ci95)  # a measure.Proportion or ControlDistribution


def proportion(p: Any, *, digits: int = 1, ci_digits: int = 0, counts: bool = False, seeds: bool = False) -> str:
    """A rate with its 95% interval in percent: ``12.5% [4, 30]``; ``counts`` adds ``(k/n)``, ``seeds`` the number
    of seeds of a control distribution. ``-`` when missing."""
    if p is None or (isinstance(p, Mapping) and p.get("rate", p.get("value")) is None):
        return "-"
    rate, (lo, hi) = _rate_and_interval(p)
    extra = f", {p['seeds']} seeds" if seeds and isinstance(p, Mapping) and "draws" in p else ""
    text = f"{100 * rate:.{digits}f}% [{100 * lo:.{ci_digits}f}, {100 * hi:.{ci_digits}f}{extra}]"
    return text + (f" ({p['k']}/{p['n']})" if counts and isinstance(p, Mapping) and "k" in p else "")


def difference(c: Mapping[str, Any] | None, *, digits: int = 1, ci_digits: int = 1, unit: str = "") -> str:
    """A comparison's difference in points with its 95% interval: ``+12.5 [+3.0, +22.0]`` (empty when missing)."""
    if not c:
        return ""
    lo, hi = c["ci95"]
    return f"{100 * c['difference']:+.{digits}f}{unit} [{100 * lo:+.{ci_digits}f}, {100 * hi:+.{ci_digits}f}]"


def verdict_line(name: str, v: Mapping[str, Any], control: str, *, per_side: str = "prompts") -> str:
    """One verdict as a list item: both rates, the difference with its interval, the verdict and why; a verdict
    that could not be computed (no ``comparison``) says its reason."""
    if "comparison" not in v:
        return f"- {name}: **{v['verdict']}** ({v.get('reason', 'not measured')})."
    c = v["comparison"]
    need = f"; about {v['n_needed']} {per_side} per side would decide it" if v.get("n_needed") else ""
    return (
        f"- {name}: {pct(c['effect'])} vs {control + ' ' if control else ''}{pct(c['control'])}, difference "
        f"{difference(c, unit=' points')}"
        f" -> **{v['verdict']}** (expected {v['expected']}: {v['reason']}{need})."
    )


def verdict_word(v: str | None) -> str:
    """A verdict for a table cell: bold when reproduced, ``n/a`` when there is none."""
    return "n/a" if v is None else f"**{v}**" if v == "reproduced" else v


def seconds_line(seconds: Mapping[str, float], parts: Mapping[str, str], *, quick: bool = False) -> str:
    """``Took 12.3 s (training 4.0 s, ...)`` from a results' ``seconds`` block and the parts worth naming."""
    inner = ", ".join(f"{label} {seconds[k]:.1f} s" for k, label in parts.items() if k in seconds)
    return (
        f"Took {seconds['total']:.1f} s" + (f" ({inner})" if inner else "") + (" in quick mode" if quick else "") + "."
    )


# --------------------------------------------------------------------------------------------------- plots


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots`` on the file-only Agg backend (reports are drawn without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)  # type: ignore[no-any-return]


def save(fig: Any, path: str | os.PathLike[str], *, tight: bool = True) -> Path:
    """Save a figure as PNG (folders created) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def span(p: Mapping[str, Any] | None) -> Span:
    """(rate, low, high) of a proportion in the core's JSON shape; zeros when missing."""
    if p is None:
        return 0.0, 0.0, 0.0
    rate, (lo, hi) = _rate_and_interval(p)
    return rate, lo, hi


def bars(ax: Any, xs: Sequence[float], spans: Sequence[Span], *, scale: float = 1.0, **kwargs: Any) -> None:
    """Bars at ``xs`` with 95% whiskers (never negative: float rounding at 0 or 1)."""
    ys = [scale * s[0] for s in spans]
    err = [[max(0.0, scale * (s[0] - s[1])) for s in spans], [max(0.0, scale * (s[2] - s[0])) for s in spans]]
    ax.bar(list(xs), ys, yerr=err, capsize=kwargs.pop("capsize", 3), **kwargs)


def band(ax: Any, xs: Sequence[float], spans: Sequence[Span], *, color: str, alpha: float = 0.2, **kwargs: Any) -> None:
    """A curve of values with its interval as a shaded band."""
    ax.plot(list(xs), [s[0] for s in spans], color=color, **kwargs)
    ax.fill_between(list(xs), [s[1] for s in spans], [s[2] for s in spans], color=color, alpha=alpha, lw=0)


def estimate_spans(est: Mapping[str, Sequence[float]]) -> list[Span]:
    """The spans of a bootstrap estimate ``{"mean": [...], "lo": [...], "hi": [...]}``."""
    return list(zip(est["mean"], est["lo"], est["hi"], strict=True))


def plot_by_layer(
    panels: Mapping[str, tuple[Sequence[Mapping[str, Any]], str]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """One panel per named set of per-layer rows (``{"layer", "attn", "mlp"}``, with a colour): its units in each
    layer, attention and MLP side by side."""
    fig, axes = subplots(len(panels), 1, figsize=(11, 2.0 * len(panels) + 0.6), sharex=True, squeeze=False)
    w = 0.4
    for ax, (name, (rows, color)) in zip(axes[:, 0], panels.items(), strict=True):
        layers = [r["layer"] for r in rows]
        ax.bar([x - w / 2 for x in layers], [r["attn"] for r in rows], width=w, color=color, alpha=0.55, label="attn")
        ax.bar([x + w / 2 for x in layers], [r["mlp"] for r in rows], width=w, color=color, label="MLP")
        ax.set_ylabel(f"{name}\n({sum(r['attn'] + r['mlp'] for r in rows)})")
        ax.legend(loc="upper left", fontsize=7, ncol=2, frameon=False)
    axes[-1, 0].set_xlabel("layer")
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_units_by_layer(summary: Mapping[str, Any], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """A categorisation summary's units per layer, one panel per category."""
    by_layer = summary["by_layer"]
    panels = {
        c: ([{"layer": r["layer"], **r[c]} for r in by_layer], CATEGORY_COLORS[c])
        for c in CATEGORY_COLORS
        if c in summary["categories"]
    }
    return plot_by_layer(panels, path, title=title)
