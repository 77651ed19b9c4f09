"""The `ssah judge` reports: agreement of judges with human labels, and the learned judge's training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ssah.reports.common import markdown_table, proportion, save, subplots
from ssah.results import RunResult


def _pct(block: dict[str, Any] | None) -> str:
    return proportion(block, ci_digits=1)


def _judge_cells(b: dict[str, Any]) -> list[Any]:
    rates = [_pct(b[k]) for k in ("agreement", "refusal_precision", "refusal_recall")]
    kappa = "-" if b["cohen_kappa"] is None else f"{b['cohen_kappa']:.3f}"
    return [*rates, kappa, b["n"], f"{1000 * b['seconds_per_reply']:.2f}"]


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Redraw ``agreement.png`` into ``run_dir`` and return the Markdown report of a validation run."""
    plot_agreement(results, Path(run_dir) / "agreement.png")
    d = results["data"]
    lines = [
        "# Refusal judges against human labels",
        "",
        f"{d['rows_used']} labelled replies from {len(d['files'])} file(s); partial refusals: `{d['partial']}`.",
        "",
        "![agreement](agreement.png)",
        "",
        "## Overall",
        "",
    ]
    rows = [[f"`{spec}`", *_judge_cells(b)] for spec, b in results["judges"].items()]
    for name, value in results.get("anchors", {}).items():
        rows.append([name, f"{100 * value:.1f}%", "", "", "", d["rows_used"], ""])
    lines += [
        markdown_table(
            ["judge", "agreement [95% CI]", "refusal precision", "refusal recall", "Cohen's kappa", "n", "ms/reply"],
            rows,
        ),
        "",
        "## Confusion matrices (rows: human label, columns: judge)",
        "",
    ]
    for spec, b in results["judges"].items():
        c = b["confusion"]
        table = [[h, c[h]["refusal"], c[h]["compliance"]] for h in c]
        lines += [f"**`{spec}`**", "", markdown_table(["human \\ judge", "refusal", "compliance"], table), ""]
    in_sample = {s: b["in_sample_sources"] for s, b in results["judges"].items() if b.get("in_sample_sources")}
    for spec, sources in in_sample.items():
        lines += [
            f"Note: `{spec}` was trained on {', '.join(sources)}: its agreement there is in-sample, not a measure "
            "of how it does on replies it never saw (see its leave-one-source-out numbers in training.json).",
            "",
        ]
    lines += [
        "## Coherence check on each judge's compliant replies",
        "",
        "Real answers should pass the coherence check; a low share means the check rejects real answers.",
        "",
        markdown_table(
            ["judge", "compliant replies", "coherent [95% CI]", "incoherent by reason"],
            [
                [
                    f"`{s}`",
                    b["coherence"]["compliance"]["n"],
                    _pct(b["coherence"]["agreement"]),
                    ", ".join(f"{k} {v}" for k, v in b["coherence"]["compliance"].items() if k not in ("n", "coherent"))
                    or "-",
                ]
                for s, b in results["judges"].items()
            ],
        ),
        "",
        f"Human-labelled compliant replies the check calls coherent: "
        f"{_pct(next(iter(results['judges'].values()))['coherence']['human_compliance_coherent'])}.",
        "",
        "## Per source file (agreement [95% CI])",
        "",
    ]
    sources = list(next(iter(results["judges"].values()))["per_source"])
    lines += [
        markdown_table(
            ["judge", *sources],
            [
                [f"`{s}`", *(_pct(b["per_source"][src]["agreement"]) for src in sources)]
                for s, b in results["judges"].items()
            ],
        ),
        "",
        "Every reply a judge gets wrong is in `samples.jsonl`.",
    ]
    return "\n".join(lines) + "\n"


def plot_agreement(results: dict[str, Any], path: Path) -> Path:
    """Agreement of each judge with its 95% interval (bars), per-source points, and the published anchors."""
    specs = list(results["judges"])
    fig, ax = subplots(figsize=(8, 0.55 * len(specs) + 1.6))
    for y, spec in enumerate(specs):
        b = results["judges"][spec]
        a = b["agreement"]
        lo, hi = a["ci95"]
        ax.barh(y, 100 * a["value"], color="#1f77b4", alpha=0.7)
        ax.errorbar(
            100 * a["value"],
            y,
            xerr=[[max(0.0, 100 * (a["value"] - lo))], [max(0.0, 100 * (hi - a["value"]))]],
            color="k",
        )
        for s in b["per_source"].values():
            if s["agreement"]["value"] is not None:
                ax.plot(100 * s["agreement"]["value"], y, "o", color="#ff7f0e", markersize=4)
    for i, (name, value) in enumerate(results.get("anchors", {}).items()):
        ax.axvline(100 * value, linestyle="--", color=["#2ca02c", "#d62728"][i % 2], label=name)
    names = [s + (" (in-sample)" if results["judges"][s].get("in_sample_sources") else "") for s in specs]
    ax.set_yticks(range(len(specs)), names)
    ax.set_xlabel("agreement with the human label (%), bar = all rows with 95% CI, dots = per source file")
    ax.set_xlim(50, 100)
    if results.get("anchors"):
        ax.legend(fontsize=7, loc="lower left")
    return save(fig, path)


def render_train(report: dict[str, Any], settings: Any) -> str:
    """The Markdown report of a training run: the chosen settings and the held-out agreements."""
    lines = [
        "# Learned refusal judge",
        "",
        f"Base model `{settings.base_model}` (fingerprint `{settings.base_fingerprint}`); layer {settings.layer}, "
        f"{settings.pooling} pooling over the first {settings.max_reply_tokens} reply tokens, C = {settings.c}, "
        f"trained on {report['rows']} replies.",
        "",
        f"Chosen by {report['folds']}-fold cross-validation (agreement {100 * report['cv_best']:.1f}%).",
        "",
    ]
    loso = report.get("leave_one_source_out") or {}
    if loso:
        lines += [
            "## Leave one source out (replies of a model the head never saw)",
            "",
            markdown_table(
                ["held-out source", "agreement [95% CI]", "n", "layer", "pooling", "C"],
                [
                    [s, _pct(b["agreement"]), b["agreement"]["n"], b["layer"], b["pooling"], b["c"]]
                    for s, b in loso.items()
                ],
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def summary_validate(result: RunResult[Any]) -> None:
    """The command's closing lines: `ssah judge validate`'s table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"judges vs human labels ({res['data']['rows_used']} replies, partial: {res['data']['partial']})"
    )
    for col in ("judge", "agreement [95% CI]", "precision", "recall", "kappa"):
        table.add_column(col)

    def pct(b: dict[str, Any]) -> str:
        if b.get("value") is None:
            return "-"
        lo, hi = b["ci95"]
        return f"{100 * b['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    for spec, b in res["judges"].items():
        kappa = "-" if b["cohen_kappa"] is None else f"{b['cohen_kappa']:.3f}"
        table.add_row(spec, pct(b["agreement"]), pct(b["refusal_precision"]), pct(b["refusal_recall"]), kappa)
    for name, value in res.get("anchors", {}).items():
        table.add_row(name, f"{100 * value:.1f}%", "", "", "")
    Console().print(table)
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


def summary_train(result: RunResult[Any]) -> None:
    """The command's closing lines: `ssah judge train`'s table or lines, and where the run folder is."""
    path, res = result.out, result.results
    settings = json.loads((path / "settings.json").read_text())
    typer.echo(f"layer {settings['layer']}, {settings['pooling']} pooling, C={settings['c']}")
    for source, b in (res.get("leave_one_source_out") or {}).items():
        typer.echo(f"held out {source}: {100 * b['agreement']['value']:.1f}% of {b['agreement']['n']}")
    typer.echo(f"wrote {path} in {res['seconds']:.1f} s")
