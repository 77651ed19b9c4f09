"""The `ssah eval` report: ASR, coherent compliance, over-refusal and utility with their intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah.judges import judge_line
from ssah.reports.common import markdown_table, pct, proportion
from ssah.reports.science import Row, judge_cell
from ssah.results import RunResult


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """The short table printed at the end of `ssah eval` and written into the report."""

    def row(what: str, p: dict[str, Any]) -> list[str]:
        return [what, pct(p["rate"]), f"[{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]", str(p["n"])]

    rows = []
    if "safety" in results:
        s = results["safety"]
        judge = f" (judge `{results['judge_spec']}`)" if results.get("judge_spec") else ""
        rows.append(row(f"attack success rate{judge}", s["asr"]))
        rows.append(row("coherent compliance", s["coherent_compliance"]))
        ag = s.get("agreement") or {}
        if ag.get("first_token_vs_judge") is not None:
            rows.append(["first-token score agrees with judge", pct(ag["first_token_vs_judge"]), "", str(s["n"])])
        cal = ag.get("first_token_calibrated") or {}
        if cal.get("agreement") is not None:
            rows.append(
                [
                    f"first-token score agrees with judge, threshold {cal['threshold']:.2f} fitted on "
                    f"{cal['n_calibration']} replies (0: {pct(cal['agreement_at_0'])})",
                    pct(cal["agreement"]),
                    "",
                    str(cal["n_test"]),
                ]
            )
    if "prefill" in results:
        p = results["prefill"]
        rows.append(row(f"prefill ASR ({p['prefill']!r})", p["asr"]))
    if "overrefusal" in results:
        rows.append(row("over-refusal", results["overrefusal"]))
    if "utility" in results:
        u = results["utility"]
        if u.get("perplexity") is not None:
            rows.append(["perplexity (reference answers)", f"{u['perplexity']:.2f}", "", str(u["n"]["perplexity"])])
        if u.get("accuracy") is not None:
            name = next(k for k in u["n"] if k not in ("perplexity", "gsm8k"))
            rows.append(row(f"{name} accuracy", u["accuracy"]))
        if u.get("exact_match") is not None:
            rows.append(row("GSM8K exact match", u["exact_match"]))
    return rows


def render(results: dict[str, Any], run_dir: Path | None = None) -> str:
    """The Markdown report of an eval run from its results alone (it has no plots to draw into ``run_dir``)."""
    m = results["model"]
    lines = [
        f"# Evaluation of {m['name']}",
        "",
        f"Judge `{results['judge_spec']}`; generation: {results['generation']}.",
        "",
        judge_line(results.get("judge_spec", ""), results.get("judge_agreement")),
        "",
        markdown_table(["measure", "value", "95% interval", "n"], summary_rows(results)),
        "",
    ]
    per = (results.get("safety") or {}).get("per_category") or {}
    if per:
        lines += [
            "## Attack success rate by category",
            "",
            markdown_table(["category", "ASR", "n"], [[c, pct(v["rate"]), v["n"]] for c, v in per.items()]),
            "",
        ]
    lines.append(f"Every prompt, output and verdict is in `samples.jsonl`. Took {results['seconds']['total']:.1f} s.")
    return "\n".join(lines) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{res['model']['name']} (judge {res['judge_spec']})")
    for col in ("measure", "value", "95% interval", "n"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in summary_rows(res):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_overrefusal(base: dict[str, Any], aligned: dict[str, Any]) -> Row:
    """Not a published effect but its price: over-refusal of borderline-safe prompts before and after alignment."""
    b, a = base["overrefusal"], aligned["overrefusal"]
    return {
        "effect": "the safety tax: refusing borderline-safe prompts (XSTest-style) after alignment",
        "published": "not reported in the paper (reviewers asked for over-refusal)",
        "ours": f"over-refusal {proportion(b, ci_digits=0)} -> {proportion(a, ci_digits=0)} on {a['n']} "
        "borderline prompts"
        + (" (the short SFT over-generalises: see the evaluations below)" if a["rate"] - b["rate"] > 0.25 else ""),
        "control": "the unaligned model (baseline)",
        "verdict": None,
        "judge": judge_cell(aligned.get("judge_spec"), aligned.get("judge_agreement")),
    }
