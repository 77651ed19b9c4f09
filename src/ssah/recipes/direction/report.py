"""The `ssah direction` report: every condition with ASR, refusals and KL, the verdicts, and ASR against KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssah.judges import judge_line
from ssah.reports.common import markdown_table, verdict_line
from ssah.results import RunResult

RATES = ("asr", "coherent_compliance", "overrefusal", "harmless_refusal")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _cell(entry: dict[str, Any], key: str) -> str:
    if key not in entry:
        return "-"
    v = entry[key]
    lo, hi = v["ci95"]
    seeds = f", {v['seeds']} seeds" if "draws" in v else ""
    return f"{_pct(v['rate'])} [{100 * lo:.0f}, {100 * hi:.0f}{seeds}]"


def _kl_cell(entry: dict[str, Any], part: str) -> str:
    k = entry["kl"][part]
    if "ci95" in k:
        return f"{k['mean']:.3g} [{k['ci95'][0]:.3g}, {k['ci95'][1]:.3g}]"
    return f"{k['mean']:.3g} (seeds {k['min']:.3g}..{k['max']:.3g})"


COLUMNS = "condition|ASR|coherent compliance|over-refusal|refusal of harmless|KL first token|KL reply"


def table_cells(t: dict[str, Any]) -> list[str]:
    e = t["row"]
    return [t["condition"], *(_cell(e, k) for k in RATES), _kl_cell(e, "first"), _kl_cell(e, "reply")]


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The verdicts in plain sentences (printed by the CLI, listed in the report)."""
    labels = {
        "ablation_vs_random_asr": ("direction ablation vs random-direction ablation, ASR", "random"),
        "ablation_vs_random_coherent": (
            "direction ablation vs random-direction ablation, coherent compliance",
            "random",
        ),
        "ablation_vs_baseline_asr": ("direction ablation vs baseline, ASR", "baseline"),
        "addition_vs_random_refusal": ("direction addition vs random addition, refusal of harmless prompts", "random"),
        "addition_vs_baseline_refusal": ("direction addition vs baseline, refusal of harmless prompts", "baseline"),
    }
    return [verdict_line(labels[k][0], v, labels[k][1]) for k, v in results["verdicts"].items()]


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Draw ``plots/asr_vs_kl.png`` from ``results`` and return report.md."""
    _plot(results, Path(run_dir) / "plots")
    m, st, sel = results["model"], results["settings"], results["selection"]
    ch = sel["chosen"]
    filt = (
        f"it passed the filters (induce > 0, KL < {st['kl_max']})"
        if sel["passed_filter"]
        else f"**no candidate passed the filters** (induce > 0, KL < {st['kl_max']}): the best bypass was taken"
    )
    d = st["data"]
    npos = len({c["position"] for c in sel["candidates"]})
    lines = [
        f"# The refusal direction of {m['name']} (Arditi et al. 2024)",
        "",
        f"Difference-in-means directions at every block input and the last {npos} "
        f"post-instruction positions from {d['harmful[train]']['examples']} harmful and "
        f"{d['harmless[train]']['examples']} harmless training prompts; {len(sel['candidates'])} candidates scored on "
        f"{d['harmful[val]']['examples']} + {d['harmless[val]']['examples']} validation prompts (first-token refusal "
        f"log-odds; layers below {100 * st['max_layer_share']:.0f}% of the depth, layer step {st['layer_step']}). "
        f"Chosen: **layer {sel['layer']}, position {sel['position']}** (norm {sel['norm']:.3g}; bypass "
        f"{ch['bypass']:+.2f} vs baseline {sel['baseline']['harmful_refusal_score']:+.2f}, induce {ch['induce']:+.2f}, "
        f"KL {ch['kl']:.3g}); {filt}.",
        "",
        f"Test split: {d['harmful[test]']['examples']} harmful prompts (ASR), "
        f"{d['harmless[test]']['examples']} harmless prompts (refusal under addition; KL), greedy replies of "
        f"{st['generation']['max_new_tokens']} tokens. KL(original || edited) of next-token distributions on the "
        f"harmless test prompts, at the first reply position and averaged over the original model's greedy reply "
        f"({st['kl_tokens']} tokens, teacher-forced); mean over prompts [95% bootstrap interval]. Random controls: "
        f"directions of the same norm, ablated at every layer or added at layer {sel['layer']}, seeds "
        f"{st['seed_list']}." + (" Small sets (under 32 prompts): numbers are indicative." if st["limit"] < 32 else ""),
        "",
        judge_line(st["judge"]),
        "",
        markdown_table(COLUMNS.split("|"), [table_cells(t) for t in results["table"]]),
        "",
        "![ASR against KL](plots/asr_vs_kl.png)",
        "",
        "## Verdicts",
        "",
        *verdict_lines(results),
        "",
        f"Orthogonalised weights against the hooks: largest difference of first-token log-probabilities "
        f"{results['orthogonalization']['max_abs_logprob_difference_vs_hooks']:.2g} (float rounding). Weights after "
        f"all conditions: {'bit-identical to before' if results['weights']['unchanged'] else 'CHANGED'}. "
        f"KL cost: {results['seconds']['kl']:.1f} s of {results['seconds']['evaluation']:.0f} s evaluation "
        f"(one teacher-forced forward per harmless prompt per condition); total {results['seconds']['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], folder: Path) -> None:
    """ASR against KL (reply) for every condition measured on harmful prompts (95% whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    first_seed = results["settings"]["seed_list"][0]
    colors = {"baseline": "#2ca02c", "ablation": "#d62728", "random": "#999999", "orthogonalized": "#ff7f0e"}
    for row in results["conditions"]:
        if "asr" not in row:
            continue
        a, k = row["asr"], row["kl"]["reply"]
        ax.errorbar(
            k["mean"], a["rate"],
            xerr=[[k["mean"] - k["ci95"][0]], [k["ci95"][1] - k["mean"]]],
            yerr=[[a["rate"] - a["ci95"][0]], [a["ci95"][1] - a["rate"]]],
            fmt="s" if row["group"] == "orthogonalized" else "o", color=colors.get(row["group"], "#1f77b4"),
            capsize=3, fillstyle="none" if row["group"] == "orthogonalized" else "full",
            markersize=6 if row["group"] == "ablation" else 9,
            label=None if row["group"] == "random" and row["seed"] != first_seed else
            "random directions" if row["group"] == "random" else row["name"],
        )  # fmt: skip
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(original || edited) on harmless prompts (reply mean)")
    ax.set_ylabel("ASR")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=7)
    name = Path(results["model"]["name"])
    ax.set_title(f"{name.parent.name + '/' if name.name == 'model' else ''}{name.name}: refusal direction")
    fig.tight_layout()
    fig.savefig(folder / "asr_vs_kl.png", dpi=110)
    plt.close(fig)


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results

    sel = res["selection"]
    typer.echo(f"direction: layer {sel['layer']}, position {sel['position']} (passed filter: {sel['passed_filter']})")
    for line in verdict_lines(res):
        typer.echo(line)
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")
