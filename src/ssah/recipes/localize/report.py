"""The report of `ssah localize`: per budget, each method's ablation against its stratified random controls,
the methods against each other, their overlap, and ASR against KL with one curve per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssah.reports.common import difference, markdown_table, pct, proportion, save, subplots, verdict_word
from ssah.results import RunResult


def _kl(row: dict[str, Any]) -> float | None:
    kl = row.get("kl")
    return None if kl is None else float(kl["reply"]["mean"])


def _ppl(row: dict[str, Any]) -> str:
    return "-" if row.get("perplexity") is None else f"{row['perplexity']:.2f}"


def _mean_rate(rows: list[dict[str, Any]], rate: str) -> float:
    return sum(r[rate]["rate"] for r in rows) / len(rows)


def _method_cells(name: str, m: dict[str, Any]) -> list[str]:
    if m["seeded"]:
        rows = m["conditions"]
        kls = [k for r in rows if (k := _kl(r)) is not None]
        return [
            f"{name} ({len(rows)} seeds)",
            f"{pct(_mean_rate(rows, 'asr'))} (mean)",
            "(chance row)",
            "",
            f"{pct(_mean_rate(rows, 'coherent_compliance'))} (mean)",
            pct(_mean_rate(rows, "overrefusal")) if all("overrefusal" in r for r in rows) else "-",
            f"{sum(r['perplexity'] for r in rows) / len(rows):.2f}" if all("perplexity" in r for r in rows) else "-",
            f"{sum(kls) / len(kls):.3f}" if kls else "-",
        ]
    row, v = m["condition"], m["vs_random"]
    return [
        name,
        proportion(row["asr"]),
        difference(v["asr"]["comparison"], unit=""),
        verdict_word(v["asr"]["verdict"]),
        f"{proportion(row['coherent_compliance'])} ({verdict_word(v['coherent_compliance']['verdict'])})",
        proportion(row.get("overrefusal")),
        _ppl(row),
        "-" if (k := _kl(row)) is None else f"{k:.3f}",
    ]


HEADER = ["method", "ASR [95%]", "vs random, points [95%]", "verdict", "coherent compliance (verdict)",
          "over-refusal", "perplexity", "KL (harmless)"]  # fmt: skip


def _overlap_table(b: dict[str, Any]) -> str:
    j = b["overlap"]["jaccard"]
    names = list(j)
    return markdown_table(["Jaccard", *names], [[a, *(f"{j[a][c]:.2f}" for c in names)] for a in names])


def _plot(results: dict[str, Any], folder: Path) -> None:
    """ASR against KL (reply mean), one curve per method through its budgets."""
    fig, ax = subplots(figsize=(5.8, 4.2))
    for name in results["settings"]["methods"]:
        xs, ys = [], []
        for b in results["budgets"]:
            m = b["methods"][name]
            rows = m["conditions"] if m["seeded"] else [m["condition"]]
            kls = [k for r in rows if (k := _kl(r)) is not None]
            if kls:
                xs.append(sum(kls) / len(kls))
                ys.append(_mean_rate(rows, "asr"))
        if xs:
            ax.plot(xs, ys, marker="o", label=name, linestyle=":" if name == "random" else "-")
    base = results["baseline"]
    if _kl(base) is not None:
        ax.scatter([0.0], [base["asr"]["rate"]], color="black", marker="x", label="no ablation", zorder=3)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(original || ablated) on harmless prompts (reply mean)")
    ax.set_ylabel("ASR")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Localisation methods at equal budgets", fontsize=9)
    save(fig, folder / "asr_vs_kl.png")


def _plot_overlap(results: dict[str, Any], folder: Path) -> None:
    """The Jaccard overlap of the methods' sets, one panel per budget (chance level in each title)."""
    budgets = results["budgets"]
    fig, axes = subplots(1, len(budgets), figsize=(3.6 * len(budgets), 3.4), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        j = b["overlap"]["jaccard"]
        names = list(j)
        ax.imshow([[j[a][c] for c in names] for a in names], vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for r, a in enumerate(names):
            for c, other in enumerate(names):
                ax.text(c, r, f"{j[a][other]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if j[a][other] > 0.5 else "white")  # fmt: skip
        ax.set_title(f"{100 * b['share']:.2f}% (chance {b['overlap']['chance']:.4f})", fontsize=8)
    save(fig, folder / "overlap.png")


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Draw ``plots/asr_vs_kl.png`` and ``plots/overlap.png`` from ``results`` and return report.md."""
    _plot(results, Path(run_dir) / "plots")
    _plot_overlap(results, Path(run_dir) / "plots")
    m, st, base = results["model"], results["settings"], results["baseline"]
    lines = [
        f"# ssah localize: {m['name']}",
        "",
        f"Methods {', '.join(st['methods'])} each chose a set of units at every budget from the calibration data "
        f"only; each set was ablated ({st['ablation']} ablation) and measured on the same held-out prompts "
        f"(judge `{st['judge']}`, {st['max_new_tokens']} new tokens). Each method's set is compared, prompt by "
        f"prompt, with {st['seeds']} stratified random sets of its own count in every ({st['control_strata']}) cell "
        f"(a prompts x seeds table, each prompt counted once); *reproduced* means the 95% interval of the "
        f"difference excludes zero upwards. Without ablation: ASR {proportion(base['asr'])}"
        + (f", perplexity {base['perplexity']:.2f}" if base.get("perplexity") is not None else "")
        + ".",
        "",
        *(f"- `{n}`: {a}" for n, a in st["abouts"].items()),
        "",
        "![ASR against KL](plots/asr_vs_kl.png)",
    ]
    for b in results["budgets"]:
        lines += ["", f"## Budget {100 * b['share']:.2f}% of units ({b['units']:,} units)", ""]
        none = ["no ablation", proportion(base["asr"]), "", "", proportion(base["coherent_compliance"]),
                proportion(base.get("overrefusal")), _ppl(base), "0"]  # fmt: skip
        lines.append(markdown_table(HEADER, [none, *(_method_cells(n, mm) for n, mm in b["methods"].items())]))
        if b["pairwise"]:
            lines += ["", "Methods against each other (paired on the prompts; ASR, then coherent compliance):", ""]
            lines += [
                f"- {pair}: ASR {difference(c['asr'], unit=' points')}, coherent compliance "
                f"{difference(c['coherent_compliance'], unit=' points')}"
                for pair, c in b["pairwise"].items()
            ]
        lines += ["", f"Overlap of the sets (chance Jaccard {b['overlap']['chance']:.4f}):", "", _overlap_table(b)]
    lines += ["", "![Overlap of the sets](plots/overlap.png)", "", f"Took {results['seconds']['total']:.1f} s."]
    return "\n".join(lines) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: each method's verdict against random at each budget, and the run folder."""
    res = result.results
    for b in res["budgets"]:
        cells = [
            f"{n} {verdict_word(m['vs_random']['asr']['verdict']).strip('*')}"
            for n, m in b["methods"].items()
            if not m["seeded"]
        ]
        typer.echo(f"budget {100 * b['share']:.2f}% ({b['units']} units), ASR vs random: " + "; ".join(cells))
    typer.echo(f"wrote {result.out} in {res['seconds']['total']:.1f} s")
