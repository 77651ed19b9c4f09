"""The `ssah budget` report: full SFT vs RU-only vs random-units-only SFT, with the verdicts and one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah.judges import judge_line
from ssah.reports.common import bars, markdown_table, proportion, save, span, subplots, verdict_line
from ssah.reports.science import Row, ci_points, judge_cell, pct0, random_control_text
from ssah.results import RunResult

SHOWN = {"refusal": "refusal (harmful)", "overrefusal": "over-refusal (benign)"} | {
    "coherent_compliance": "coherent compliance",
    "task_accuracy": "benign answers correct",
}
COLORS = {"base": "#7f7f7f", "full": "#1f77b4", "ru": "#2ca02c", "random": "#ff7f0e"}
VERSUS = {"ru_vs_random": "the random-units distribution", "ru_vs_full": "full SFT"}


def plot_budget(results: dict[str, Any], path: Path) -> Path:
    """Bars per condition (random units: one bar per seed) with 95% intervals, and the perplexity."""
    rows, keys = results["conditions"], list(SHOWN.items())
    fig, axes = subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [3.2, 1.2]}, layout="constrained")
    w = 0.8 / len(rows)
    for i, r in enumerate(rows):
        shown = [(j, r["eval"][key]) for j, (key, _) in enumerate(keys) if r["eval"].get(key) is not None]
        label = r["label"] if r.get("seed") in (None, results["settings"]["seed"]) else None
        xs = [j - 0.4 + w * (i + 0.5) for j, _ in shown]
        bars(axes[0], xs, [span(p) for _, p in shown], scale=100, width=w, color=COLORS[r["name"]], label=label)
    axes[0].set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    axes[0].set(ylabel="%", ylim=(0, 105))
    axes[0].legend(fontsize=8, frameon=False, ncol=2, loc="upper right")
    axes[0].set_title("held-out measurements (95% Wilson intervals; random units: one bar per seed)", fontsize=10)
    axes[1].bar(range(len(rows)), [r["eval"]["perplexity"] for r in rows], color=[COLORS[r["name"]] for r in rows])
    axes[1].set_xticks(range(len(rows)), [_name(r) for r in rows], rotation=30, ha="right", fontsize=8)
    axes[1].set_title("perplexity of held-out answers", fontsize=10)
    fig.suptitle(f"{results['model']['name']}: alignment budget ({results['settings']['steps']} SFT steps each)")
    return save(fig, path, tight=False)


def _name(r: dict[str, Any]) -> str:
    return r["label"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """Every verdict of the run as a sentence (RU-only against the random units and against full SFT)."""
    lines = [
        verdict_line(f"RU-only vs {VERSUS[block]}, {v['label']}", v, "")
        for block, vs in results["verdicts"].items()
        for v in vs.values()
    ]
    return lines or ["No verdict: RU-only was not run beside full SFT or the random units."]


def _method_line(st: dict[str, Any]) -> str:
    """How every condition was aligned: safety SFT (runs before --method record none), then any preference step."""
    method = st.get("method", "sft")
    if method == "sft":
        return "Alignment: safety SFT"
    dpo, pairs = st["dpo"], st["pairs"]
    step = (
        f"a DPO step ({dpo['steps']} steps, beta {dpo['beta']}, {pairs['pairs']} pairs from the base model's replies)"
    )
    return f"Safety SFT, then {step}" if method == "sft+dpo" else f"Only {step}: no SFT step (its settings are unused)"


def render(results: dict[str, Any], run_dir: Path) -> str:
    """(Re)draw the plot into ``run_dir/plots`` from ``results`` alone and return the Markdown report."""
    plot_budget(results, Path(run_dir) / "plots" / "budget.png")
    m, st, u, d = results["model"], results["settings"], results.get("units"), results["data"]
    table = []
    for r in results["conditions"]:
        e, t = r["eval"], r["training"]
        trained = ["-"] * 3 if t is None else [f"{100 * t['trainable']['share']:.2f}%", f"{t['lr']:g}"]
        trained += [] if t is None else [f"{t['first_loss']:.3f} -> {t['final_loss']:.3f} ({t['seconds']:.0f} s)"]
        table.append([_name(r), *(proportion(e[k]) for k in SHOWN), f"{e['perplexity']:.2f}", *trained])
    lines = [
        f"# Alignment budget: {m['name']}",
        "",
        f"{_method_line(st)}. Data `{d['train']['source']}` ({d['train']['examples']} examples); SFT: {st['steps']} "
        "steps of batch "
        f"{st['batch_size']} ({st['schedule']} schedule) per run, each from the base weights (restored bit for bit). "
        f"Full SFT: lr {st['lr_full']:g}, embeddings {'frozen' if st['freeze_embeddings_full'] else 'trained'}; "
        f"units-only: lr {st['lr_units']:g} (`--lr-units`).",
    ]
    if u:
        lines.append(f"Units trained: {u['source']}, {u['count']} of {u['units_total']} ({100 * u['share']:.2f}%).")
        for c in u.get("controls", [])[:1]:
            lines[-1] += (
                f" Control: {len(u['controls'])} random-unit runs (seeds {st['seed']}, ...), each with RU's count in "
                f"every stratum (`{c['strata']}`, {len(c['per_stratum'])} strata; counts in results.json)."
            )
    lines += [
        f"Held-out sets: {d['harmful']['examples']} harmful (`{d['harmful']['source']}`), {d['benign']['examples']} "
        f"benign (`{d['benign']['source']}`), perplexity of {d['perplexity']['examples']} reference answers "
        f"(`{d['perplexity']['source']}`); judge `{st['judge']}`, {st['max_new_tokens']} new tokens, greedy. "
        + judge_line(st["judge"]),
        "",
        markdown_table(["condition", *SHOWN.values(), "perplexity", "parameters trained", "lr", "loss"], table),
        "",
        "![alignment budget](plots/budget.png)",
        "",
        "## Verdicts",
        "",
        "The one rule: `reproduced` when the 95% interval of the difference excludes zero in the expected direction; "
        "against random units the control is the seeds' distribution (its interval widened by their spread).",
        "",
        *verdict_lines(results),
        "",
        f"The paper's claim: {results['paper']['claim']}. Here (benign answers correct, RU-only vs full SFT): "
        f"**{results['paper']['verdict']}** ({results['paper']['reason']}). The paper gives no safety numbers for "
        "this; refusal and over-refusal are the reviewers' question.",
        "",
        f"Took {results['seconds']['total']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{res['model']['name']}: alignment budget ({res['settings']['steps']} steps)")
    for col in ("condition", "refusal", "over-refusal", "benign correct", "perplexity", "params trained"):
        table.add_column(col, justify="left" if col == "condition" else "right")

    def pct(p: dict | None) -> str:
        return "-" if p is None else f"{100 * p['rate']:.1f}% ({p['k']}/{p['n']})"

    for r in res["conditions"]:
        e, t = r["eval"], r["training"]
        name = r["label"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
        share = "-" if t is None else f"{100 * t['trainable']['share']:.2f}%"
        table.add_row(
            name, pct(e["refusal"]), pct(e["overrefusal"]), pct(e["task_accuracy"]), f"{e['perplexity']:.2f}", share
        )
    console = Console()
    console.print(table)
    for block, vs in res["verdicts"].items():
        console.print(f"{block.replace('_', ' ')}: " + ", ".join(f"{k} {v['verdict']}" for k, v in vs.items()))
    console.print(f"paper's claim (RU-only keeps more utility than full SFT): {res['paper']['verdict']}")
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_budget(r: dict[str, Any]) -> Row:
    first: dict[str, Any] = {}
    for x in r["conditions"]:
        first.setdefault(x["name"], x)
    ours = ", ".join(
        f"refusal {x['label']} {pct0(x['eval']['refusal']['rate'])}" for n, x in first.items() if n != "random"
    )
    v = r["verdicts"]
    if "ru_vs_random" in v:
        ours += "; RU-only vs random units: " + ", ".join(f"{k} {x['verdict']}" for k, x in v["ru_vs_random"].items())
    c = v.get("ru_vs_full", {}).get("task_accuracy", {}).get("comparison")
    if c:
        ours += (
            f"; benign answers correct RU-only {pct0(c['effect'])} vs full {pct0(c['control'])}, "
            f"difference {ci_points(c)}"
        )
    st = r.get("settings", {})
    return {
        "effect": "redundant units are an alignment budget: RU-only SFT keeps more utility than full SFT (Table 4)",
        "published": "RU-only SFT: GSM8K 13.4 vs 8.8 for full SFT (Llama-2-7B)",
        "ours": ours,
        "control": "full SFT (utility); " + random_control_text("random units of RU's count", st),
        "verdict": r["paper"]["verdict"],
        "judge": judge_cell(st.get("judge")),
    }
