"""The `ssah ablate` report: Table 1 with intervals, the verdicts, the calibration comparison and the dose curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ssah.judges import judge_line
from ssah.reports.common import (
    CATEGORY_COLORS,
    bars,
    difference,
    markdown_table,
    proportion,
    save,
    subplots,
    verdict_line,
)
from ssah.reports.science import Row, ci_points, judge_cell, pct0, random_control_text
from ssah.results import RunResult

NAMES = {"asr": "ASR", "coherent_compliance": "coherent compliance", "overrefusal": "over-refusal"}
NAMES |= {"perplexity": "perplexity", "accuracy": "accuracy", "exact_match": "exact match"}
TABLE_COLUMNS = "condition|units ablated|ASR|dASR|coherent compliance|dCC|over-refusal|perplexity|KL (harmless)"
DOSE_COLUMNS = "dose|units|SCU in top|ASR (top k)|ASR (random)|dASR|verdict|perplexity (top k)|perplexity (random)"


def _cell(entry: dict[str, Any], key: str) -> str:
    """A rate with its 95% interval (a random control: mean over seeds, interval widened by their spread)."""
    return proportion(entry.get(key), seeds=True)


def _diff(d: dict[str, Any] | None) -> str:
    return difference(d, ci_digits=0)


def _ppl(entry: dict[str, Any], change: dict[str, Any] | None = None) -> str:
    p = entry.get("perplexity")
    if p is None:
        return "-"
    text = f"{p['mean']:.2f} ({p['min']:.2f}..{p['max']:.2f})" if isinstance(p, dict) else f"{p:.2f}"
    rel = (change or {}).get("perplexity_relative")
    return text if rel is None else f"{text} ({100 * rel:+.1f}%)"


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The verdicts in plain sentences (printed by the CLI, listed in the report)."""
    v, st = results["verdicts"], results["settings"]
    control = f"random units ({st['control_strata']}-stratified, {len(st['seed_list'])} seeds)"
    lines = [verdict_line(f"SCU ablation vs {control}, {NAMES[k]}", x, "random") for k, x in v["scu_vs_random"].items()]
    for cat, ws in results["units"].get("direction", {}).get("write_share", {}).items():
        lines.append(
            f"- {cat}: {100 * ws['share_of_channels']:.2f}% of the channels carry "
            f"{100 * ws['share_of_direction_write']:.2f}% of what the units can write along the refusal direction"
        )
    if "direction_vs_random" in v:
        lines.append(
            verdict_line("refusal direction vs random directions, ASR", v["direction_vs_random"]["asr"], "random")
        )
    if not lines:
        lines.append("- No SCU-vs-random comparison was run (SCU or its random control was not among the conditions).")
    for cat, by in v["vs_baseline"].items():
        lines += [verdict_line(f"{cat} ablation vs baseline, {NAMES[k]}", x, "baseline") for k, x in by.items()]
    ru = v.get("ru_target")
    if ru:
        ppl = f"; perplexity {100 * ru.get('perplexity_relative', 0):+.0f}% (point estimate) -> {ru.get('perplexity')}"
        lines.append(
            f"- RU target (ASR up < {100 * ru['asr_points']:.0f} points, perplexity < +"
            f"{100 * ru['perplexity_rise']:.0f}%): ASR {_diff(ru['asr_difference'])} points -> {ru['asr']}"
            + (ppl if "perplexity" in ru else "")
        )
    return lines


def condition_cells(t: dict[str, Any]) -> list[str]:
    """One Table 1 row as text cells (``TABLE_COLUMNS``; the report and the CLI print the same)."""
    e, c = t["row"], t["change"]
    rates = [x for k in ("asr", "coherent_compliance") for x in (_cell(e, k), _diff(c.get(k)))]
    kl = e.get("kl", {}).get("reply")
    lo, hi = (kl or {}).get("ci95") or ((kl or {}).get("min"), (kl or {}).get("max"))
    klc = "-" if kl is None else f"{kl['mean']:.3g} [{lo:.3g}, {hi:.3g}]"
    units = f"{e['units']} ({100 * e['fraction']:.2f}%)"
    return [t["condition"], units, *rates, _cell(e, "overrefusal"), _ppl(e, c), klc]


def _dose_cells(p: dict[str, Any]) -> list[Any]:
    v, both = p["asr_vs_random"], (p["top"], p["random"])
    asr, ppl = [_cell(e, "asr") for e in both], [_ppl(e) for e in both]
    return [p["label"], p["count"], p["scu_in_top"], *asr, _diff(v["comparison"]), v["verdict"], *ppl]


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Draw ``plots/ablation_bars.png`` and ``plots/dose_curve.png`` from ``results`` and return report.md."""
    _plots(results, Path(run_dir) / "plots")
    m, u, st, cal = results["model"], results["units"], results["settings"], results["calibration"]
    ev, w, sec = st["eval_data"], results["weights"], results["seconds"]
    how = "each channel reads its calibration mean, FLAP's bias compensation" if st["ablation"] == "mean" else "reads 0"
    lines = [
        f"# Ablating unit categories of {m['name']} (the paper's Table 1)",
        "",
        f"{m['units_total']} units ({u['granularity']} granularity). Units: {u['source']} (metric `{u['metric']}`, "
        f"rule `{u['rule']}`, shares {u['shares']}, normalisation `{u['normalization']}`). Main calibration: "
        f"`{cal['main']}` tokens. **Ablation: `{st['ablation']}`** ({how}). Judge `{st['judge']}`; "
        f"{ev['harmful']['examples']} harmful prompts ({ev['harmful']['source']}), "
        f"{ev.get('benign', {}).get('examples', 0)} safe prompts for over-refusal, greedy replies of "
        f"{st['generation']['max_new_tokens']} new tokens; utility {', '.join(st['utility_eval'])}. Random controls: "
        f"the same count as the ablated set in every `{st['control_strata']}` stratum, one draw per seed "
        f"{st['seed_list']}."
        + (" Small sets (under 32 prompts): numbers are indicative." if (st["limit"] or 32) < 32 else ""),
        "",
        judge_line(st["judge"]),
        "",
        "ASR = harmful prompts not refused (keyword judge); coherent compliance = answered with a coherent "
        "non-refusal. Rates: value [95% Wilson interval]; random controls: mean over seeds [interval of the prompts x "
        "seeds table, each prompt counted once, widened by the seeds' spread]. Changes against the baseline in "
        "points [95% paired interval on the same prompts]; perplexity with its relative change.",
        "",
        markdown_table(TABLE_COLUMNS.split("|"), [condition_cells(t) for t in results["table"]]),
        "",
        "![ablation bars](plots/ablation_bars.png)",
        "",
        *(
            [
                "![ASR against KL](plots/asr_vs_kl.png)",
                "",
                "ASR against KL on harmless prompts for every condition "
                "(the trade-off: what removing refusal costs elsewhere); the dose curve's top-k points are joined.",
                "",
            ]
            if _kl_points(results)
            else []
        ),
        "## Verdicts",
        "",
        *summary_lines(results),
        "",
    ]
    if cal.get("difference"):
        lines += [
            "## Calibration matters",
            "",
            f"SCU found with `{cal['main']}` calibration vs with `{cal['other']}` "
            f"calibration ({cal['scu_sizes'][0]} and {cal['scu_sizes'][1]} units, Jaccard "
            f"{cal['scu_jaccard']:.3f}): differences in ASR {_diff(cal['difference']['asr'])} points, in "
            f"coherent compliance {_diff(cal['difference']['coherent_compliance'])} points.",
            "",
        ]
    if results["dose"]:
        lines += [
            "## Dose curve",
            "",
            f"Top-k units by `measure.safety_ranking` (normalised I_S - I_U of the categorisation; the SCU set has "
            f"{u['categories']['SCU']['count']} units, `SCU in top` counts them among the top k), against stratified "
            "random sets of the same counts; the verdict asks whether ablating the top k raises ASR more.",
            "",
            markdown_table(DOSE_COLUMNS.split("|"), [_dose_cells(p) for p in results["dose"]]),
            "",
            "![dose curve](plots/dose_curve.png)",
            "",
        ]
    lines.append(
        f"Model weights after all ablations: {'bit-identical to before' if w['unchanged'] else 'CHANGED'} "
        f"(sha256 {w['sha256_after'][:16]}). {len(results['conditions'])} conditions measured in "
        f"{sec['evaluation']:.0f} s; total {sec['total']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def _span(entry: dict[str, Any], key: str) -> tuple[float, float, float]:
    """(value, low, high) of a rate (95% interval) or of perplexity (min..max over seeds for a random control)."""
    v = entry.get(key)
    if v is None:
        return 0.0, 0.0, 0.0
    if key == "perplexity":
        return (v["mean"], v["min"], v["max"]) if isinstance(v, dict) else (v, v, v)
    return v["rate"], v["ci95"][0], v["ci95"][1]


def _kl_points(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """(label, KL on harmless replies, ASR, group) of every table row and dose point that has a KL measurement."""
    rows = [(t["condition"], t["row"], t["group"]) for t in results["table"]]
    rows += [(f"top {p['label']}", p["top"], "dose") for p in results.get("dose", [])]
    return [(name, r["kl"]["reply"]["mean"], r["asr"]["rate"], g) for name, r, g in rows if "kl" in r and "asr" in r]


def _plot_kl(results: dict[str, Any], folder: Path) -> None:
    """``asr_vs_kl.png``: each condition's ASR (y) against its KL on harmless replies (x); dose points joined."""
    points = _kl_points(results)
    if not points:
        return
    fig, axes = subplots(1, 1, figsize=(6.4, 4.8), squeeze=False)
    ax = axes[0][0]
    for name, kl, asr, group in points:
        color = {"baseline": "#2ca02c", "random": "#bbbbbb", "direction-random": "#bbbbbb", "dose": "#999999"}.get(
            group
        ) or CATEGORY_COLORS.get(name.split(" ")[0], "#ff7f0e")
        ax.scatter([max(kl, 1e-4)], [asr], color=color, zorder=3)
        if group != "dose":
            ax.annotate(name, (max(kl, 1e-4), asr), fontsize=6, xytext=(3, 3), textcoords="offset points")
    dose = sorted((kl, asr) for _, kl, asr, g in points if g == "dose")
    if dose:
        ax.plot([max(k, 1e-4) for k, _ in dose], [a for _, a in dose], color="#999999", label="top-k units (dose)")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KL(original || ablated) on harmless replies, nats per token")
    ax.set_ylabel("ASR")
    ax.set_ylim(-0.02, 1.05)
    fig.suptitle(f"{Path(results['model']['name']).name}: ASR against KL")
    save(fig, folder / "asr_vs_kl.png")


def _plots(results: dict[str, Any], folder: Path) -> None:
    """``ablation_bars.png`` (each Table 1 condition with 95% whiskers) and ``dose_curve.png`` (top k by safety
    rank against stratified random, bands = 95% intervals)."""
    _plot_kl(results, folder)
    name, table, dose = Path(results["model"]["name"]).name, results["table"], results["dose"]
    colors = [
        {"baseline": "#2ca02c", "random": "#bbbbbb"}.get(t["group"])
        or CATEGORY_COLORS.get(t["condition"].split(" ")[0], "#ff7f0e")
        for t in table
    ]
    keys = [k for k in ("asr", "coherent_compliance", "overrefusal", "perplexity") if k in table[0]["row"]]
    for file, panels in (("ablation_bars.png", keys), ("dose_curve.png", [k for k in keys if k != "overrefusal"])):
        if file == "dose_curve.png" and not dose:
            continue
        fig, axes = subplots(1, len(panels), figsize=(4.3 * len(panels), 4.6), squeeze=False)
        for ax, key in zip(axes[0], panels, strict=True):
            if file == "ablation_bars.png":
                x = list(range(len(table)))
                bars(ax, x, [_span(t["row"], key) for t in table], color=colors)
                ax.set_xticks(x, [t["condition"] for t in table], rotation=60, ha="right", fontsize=7)
            else:
                counts = [p["count"] for p in dose]
                for which, color in (("top", CATEGORY_COLORS["SCU"]), ("random", "#555555")):
                    spans = [_span(p[which], key) for p in dose]
                    ax.plot(counts, [s[0] for s in spans], marker="o", color=color, label=which)
                    ax.fill_between(counts, [s[1] for s in spans], [s[2] for s in spans], color=color, alpha=0.2)
                ax.set_xscale("log")
                ax.set_xlabel("units ablated (top k by safety rank, or random)")
                ax.legend(fontsize=7)
            ax.set_yscale("log") if key == "perplexity" else ax.set_ylim(-0.02, 1.05)
            ax.set_title(NAMES[key])
        fig.suptitle(f"{name}: {results['settings']['ablation']} ablation" + (" dose curve" if "dose" in file else ""))
        save(fig, folder / file)


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    st = res["settings"]
    table = Table(title=f"{res['model']['name']}: {st['ablation']} ablation (calibration {res['calibration']['main']})")
    for col in TABLE_COLUMNS.split("|"):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for t in res["table"]:
        table.add_row(*condition_cells(t))
    console = Console()
    console.print(table)
    for line in summary_lines(res):
        console.print(line)
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_ablate(r: dict[str, Any]) -> Row:
    v = r["verdicts"]["scu_vs_random"]["asr"]
    c = v["comparison"]
    cc = r["verdicts"]["scu_vs_random"].get("coherent_compliance")
    extra = f"; coherent compliance: {cc['verdict']} ({ci_points(cc['comparison'])})" if cc else ""
    st = r.get("settings", {})
    return {
        "effect": "ablating the few SCU breaks refusal (Table 1)",
        "published": "ASR +56 / +71 points after ablating SCU (Llama-2-7B-Chat / Llama-3-8B-Instruct)",
        "ours": f"SCU-ablated ASR {pct0(c['effect'])} vs random {pct0(c['control'])}: {ci_points(c)}{extra}",
        "control": random_control_text("random units", st),
        "verdict": v["verdict"],
        "judge": judge_cell(st.get("judge")),
    }
