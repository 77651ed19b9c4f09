"""The `ssah probe` report: which methods separate the two models, the naive probe's confound, gaps by layer
and token by token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssah.judges import judge_line
from ssah.reports.common import MODEL_COLORS, band, estimate_spans, markdown_table, proportion, save, subplots
from ssah.reports.science import Row, judge_cell
from ssah.results import RunResult

MODE_STYLES = {"greedy": "-", "forced": "--"}


def layer_ranges(layers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _fmt(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _at(d: dict[str, Any], i: int) -> str:
    return _fmt(d["mean"][i], d["lo"][i], d["hi"][i])


def plot_gap_by_layer(results: dict[str, Any], path: Path) -> Path:
    """One panel per method: the gap per layer of every model with its shaded interval."""
    methods = list(results["gaps"])
    cols = 2 if len(methods) > 1 else 1
    rows = (len(methods) + cols - 1) // cols
    fig, axes = subplots(rows, cols, figsize=(6.2 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for k, (label, row) in enumerate(results["gaps"][method].items()):
            x = np.arange(len(row["gap"]["mean"]))
            band(ax, x, estimate_spans(row["gap"]), color=MODEL_COLORS[k % len(MODEL_COLORS)], label=label, lw=1.6)
        ax.axhline(0, color="0.4", lw=0.7)
        if method == "logit-lens" and len(x) > 2:  # the embedding layer read through the head dwarfs the rest
            inner = [v for row in results["gaps"][method].values() for k in ("lo", "hi") for v in row["gap"][k][1:]]
            pad = 0.1 * (max(inner) - min(inner) + 1e-9)
            ax.set_ylim(min([*inner, 0.0]) - pad, max([*inner, 0.0]) + pad)
            ax.annotate("layer 0 off scale", (0, 1), xycoords="axes fraction", fontsize=7, va="top", color="0.4")
        info = results["methods"][method]
        ax.set_title(f"{method}: {info['label']}", fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle("refusal-minus-compliance gap by layer (positive = leaning to refuse), shaded: bootstrap interval")
    return save(fig, path)


TOKEN_PANELS = (
    ("gap", "paper's gap at layer {layer} (harmful)"),
    ("gap-contrast", "paper's gap at layer {layer}, harmful - harmless"),
    ("direction", "refusal direction at layer {layer}, harmful - harmless"),
    ("logodds", "next-token refusal log-odds (harmful)"),
)


def plot_gap_by_token(results: dict[str, Any], path: Path) -> Path:
    """Per-token curves: the paper's gap, its content-subtracted version, the refusal direction and the next-token
    refusal log-odds, per model (colour) and mode (greedy solid, forced prefix dashed)."""
    tk = results["tokens"]
    fig, axes = subplots(2, 2, figsize=(12.4, 6.6), squeeze=False)
    labels = [m["label"] for m in results["models"]]
    for ax, (key, title) in zip(axes.flat, TOKEN_PANELS, strict=True):
        for mode, per_model in tk["modes"].items():
            for k, label in enumerate(labels):
                row = per_model.get(label, {}).get(key)
                if row is None:
                    continue
                x = np.array(tk["gap_steps"] if key.startswith("gap") else range(len(row["mean"])))
                style = {"marker": "o" if key.startswith("gap") else None, "ms": 3, "lw": 1.5, "alpha": 0.12}
                color, ls = MODEL_COLORS[k % len(MODEL_COLORS)], MODE_STYLES.get(mode, "-")
                band(ax, x, estimate_spans(row), color=color, ls=ls, label=f"{label}, {mode}", **style)
        if tk.get("forced_tokens"):
            ax.axvline(tk["forced_tokens"], color="0.5", ls=":", lw=0.9)
        ax.axhline(0, color="0.4", lw=0.7)
        ax.set_title(title.format(layer=tk["layer"]), fontsize=9)
        ax.set_xlabel("generated tokens (0 = end of the query; dotted: end of the forced prefix)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, frameon=False)
    return save(fig, path)


def _pick_layers(layers: int) -> list[int]:
    return sorted({0, 1, round(layers / 4), round(layers / 2), round(3 * layers / 4), layers - 1, layers})


def render(results: dict[str, Any], run_dir: Path) -> str:
    """(Re)draw the plots into ``run_dir/plots/`` from ``results`` alone and return the Markdown report."""
    run_dir = Path(run_dir)
    plot_gap_by_layer(results, run_dir / "plots" / "gap_by_layer.png")
    if results.get("tokens"):
        plot_gap_by_token(results, run_dir / "plots" / "gap_by_token.png")
    labels = [m["label"] for m in results["models"]]
    layers = results["layers"]
    level = results["settings"]["level"]
    pct = f"{100 * level:g}%"
    d = results["data"]
    lines = [
        f"# Reasoning-direction probe: {' vs '.join(f'`{x}`' for x in labels)}",
        "",
        f"{d['harmful']['examples']} harmful prompts (`{d['harmful']['source']}`) and {d['harmless']['examples']} "
        f"harmless prompts (`{d['harmless']['source']}`), spread over each file; "
        f"{len(results['openers']['refusal'])} refusal and {len(results['openers']['compliance'])} compliance "
        f"openers; {layers} blocks (layer 0 = embeddings). Gap > 0 means the query's state leans to refusing. "
        f"Intervals: {pct} percentile bootstrap over prompts ({results['settings']['bootstrap']} resamples). "
        f"Took {results['seconds']['total']:.1f} s.",
        "",
    ]
    for m in results["models"]:
        lines.append(f"- `{m['label']}` ({m['role']}): `{m['name']}`, {m['family']}, fingerprint {m['fingerprint']}")
    lines.append("")
    lines += _verdict_section(results, labels, pct)
    lines += _confound_section(results, labels)
    lines += ["## Gap by layer", "", "![gap by layer](plots/gap_by_layer.png)", ""]
    picks = _pick_layers(layers)
    header = ["method", "model", *[f"layer {x}" for x in picks]]
    rows = []
    for method, per_model in results["gaps"].items():
        for label, row in per_model.items():
            rows.append([method, label, *[_at(row["gap"], x) for x in picks]])
    lines += [markdown_table(header, rows), ""]
    spread = [
        [
            method,
            label,
            f"{row['templates']['pairs']}",
            f"{row['templates']['min'][layers]:+.3g}",
            f"{row['templates']['max'][layers]:+.3g}",
            f"{row['templates']['sd'][layers]:.3g}",
        ]
        for method, per_model in results["gaps"].items()
        for label, row in per_model.items()
        if row.get("templates")
    ]
    if spread:
        lines += [
            f"Spread across opener templates (every refusal x compliance pair, prompt-mean gap at layer {layers}):",
            "",
            markdown_table(["method", "model", "pairs", "min", "max", "sd"], spread),
            "",
        ]
    if results.get("tokens"):
        lines += _token_section(results, labels)
    lines += ["## Methods", ""]
    for method, info in results["methods"].items():
        kind = "confound-controlled" if info["controlled"] else "not controlled for the ending word"
        lines.append(f"- `{method}` ({info['label']}; {kind}): {info['description']}.")
    notes = [f"{m['label']}: {n}" for m in results["models"] for n in m.get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines.append("")
    return "\n".join(lines)


def _verdict_section(results: dict[str, Any], labels: list[str], pct: str) -> list[str]:
    layers = results["layers"]
    later = results["later_layers"]
    if len(labels) < 2:
        return [
            "## Separation",
            "",
            "One model only: no separation verdict (pass `--compare MODEL` to compare an aligned with an unaligned "
            "model).",
            "",
        ]
    a, b = labels
    out = [
        "## Which methods separate the two models",
        "",
        f"Expected direction: `{a}` (probed) above `{b}` (compare). " + _verdict_rule(results, a, b, later),
        "",
    ]
    rows = []
    for method, s in results["separation"].items():
        info = results["methods"][method]
        gap = results["gaps"][method]
        d = s["decision"]
        word = f"**{s['verdict']}**" if s["verdict"] == "reproduced" else s["verdict"]
        run = d.get("longest_run_below", 0) if s["verdict"] == "not reproduced" else d["longest_run"]
        rows.append(
            [
                f"`{method}`" + ("" if info["controlled"] else " (uncontrolled)"),
                f"{word} (run {run}/{d['min_run']})",
                layer_ranges(s["higher"]),
                layer_ranges(s["lower"]),
                _at(gap[a]["gap"], layers),
                _at(gap[b]["gap"], layers),
            ]
        )
    out += [
        markdown_table(
            [
                "method",
                "verdict",
                f"layers {a} > {b}",
                f"layers {a} < {b}",
                f"{a} at layer {layers}",
                f"{b} at layer {layers}",
            ],
            rows,
        ),
        "",
    ]
    good = [m for m, s in results["separation"].items() if s["verdict"] == "reproduced"]
    controlled = [m for m in good if results["methods"][m]["controlled"]]
    if controlled:
        out.append(f"Confound-controlled methods that separate the models: {', '.join(f'`{m}`' for m in controlled)}.")
    else:
        out.append(
            "No confound-controlled method separates the two models in the expected direction: the paper's "
            "reasoning-direction effect did **not** reproduce here."
        )
    out.append("")
    return out


def _verdict_rule(results: dict[str, Any], a: str, b: str, later: list[int]) -> str:
    """The verdict rule in words: the simultaneous band of this version, or the Bonferroni rule of older runs."""
    decisions = [s["decision"] for s in results["separation"].values()]
    span = f"({later[0]}-{later[-1]})"
    if any("Bonferroni" in d.get("multiplicity", "") for d in decisions):  # results.json of an earlier version
        return (
            f"Verdict rule: the paired bootstrap interval of the difference `{a}` - `{b}` at each later layer {span}, "
            f"Bonferroni-corrected for the {len(later)} later layers tested, must exclude zero upwards over a run of "
            "consecutive later layers (*reproduced*); any later layer excluding zero downwards is *not reproduced*; "
            "otherwise *inconclusive*."
        )
    crit = ", ".join(sorted({f"{d['critical_value']:.2f}" for d in decisions if "critical_value" in d}))
    need = results["settings"].get("verdict_min_prompts")
    return (
        f"Verdict rule: one simultaneous {results['settings']['level']:.0%} band over the {len(later)} later layers "
        f"{span} for the paired difference `{a}` - `{b}` (studentised max-|t| bootstrap band, Montiel Olea & "
        "Plagborg-Møller 2019, with a t correction for the number of prompts"
        + (f"; critical values {crit} standard errors" if crit else "")
        + "). *reproduced*: the band lies above zero over a run of consecutive later layers and below zero at none; "
        "*not reproduced*: the same run below zero and none above; otherwise *inconclusive*"
        + (f" (also with fewer than {need} prompts)." if need else ".")
    )


def _confound_section(results: dict[str, Any], labels: list[str]) -> list[str]:
    conf = results.get("confound") or {}
    if not conf:
        return []
    layers = results["layers"]
    out = ["## The paper's probe and its confound", ""]
    for label in labels:
        c = conf[label]
        e = c["embedding_gap"]
        out.append(
            f"- `{label}`: naive gap at the embedding layer {_fmt(e['mean'], e['lo'], e['hi'])}; gap > 0 at "
            f"{c['positive_layers']} of {layers + 1} layers ({c['positive_layers_ci']} with the interval above 0, "
            f"{c['negative_layers_ci']} below)."
        )
    emb = [conf[x]["embedding_gap"]["mean"] for x in labels]
    first = conf[labels[0]]
    holds = first["positive_layers_ci"] == layers + 1
    claim = (
        "The paper's claim for an aligned model (refusal version closer at every block) "
        + ("holds" if holds else "does **not** hold")
        + f" for `{labels[0]}`: interval above 0 at {first['positive_layers_ci']} of {layers + 1} layers."
    )
    if len(labels) > 1:
        other = conf[labels[1]]
        claim += f" For `{labels[1]}`: {other['positive_layers_ci']} of {layers + 1}."
    out += ["", claim]
    out.append("")
    if any(abs(v) > 1e-6 for v in emb):
        side = "compliance" if emb[0] < 0 else "refusal"
        out.append(
            f"At the embedding layer no token has seen any other, yet the naive gap is already "
            f"{', '.join(f'{v:+.3g}' for v in emb)} (the query's state nearer the {side} version): the comparison "
            "measures which word ends the prefix, not the model's intent, so a naive gap of either sign is no "
            "evidence of a reasoning direction on its own; the content-subtracted methods cancel this part (they "
            "are 0 at the embedding layer)."
        )
    else:
        out.append("The naive gap is 0 at the embedding layer here (openers end in the same token).")
    out.append("")
    return out


def _token_section(results: dict[str, Any], labels: list[str]) -> list[str]:
    tk = results["tokens"]
    out = [
        "## Token by token",
        "",
        f"The first {tk['prompts']} harmful and {tk['prompts']} harmless prompts followed for {tk['steps']} tokens: "
        f"greedy (the model's own reply) and forced (the reply starts with `{tk.get('forced_prefix', '')}`, "
        f"{tk['forced_tokens']} tokens, then greedy). Layer {tk['layer']} for the gap and the direction.",
        "",
        "![gap by token](plots/gap_by_token.png)",
        "",
    ]
    last = tk["steps"]
    f = min(tk["forced_tokens"], last)
    rows = []
    for mode, per_model in tk["modes"].items():
        for label in labels:
            row = per_model.get(label)
            if row is None:
                continue
            cells = [mode, label]
            for key in ("direction", "logodds"):
                if key in row:
                    cells.append(f"{_at(row[key], 0)} / {_at(row[key], f)} / {_at(row[key], last)}")
                else:
                    cells.append("-")
            rep = tk.get("replies", {}).get(mode, {}).get(label)
            cells.append(proportion(rep["refusal"], digits=0) if rep else "-")
            rows.append(cells)
    out += [
        markdown_table(
            [
                "mode",
                "model",
                f"direction (harmful - harmless) at step 0 / {f} / {last}",
                f"refusal log-odds (harmful) at step 0 / {f} / {last}",
                "replies judged refusals (Wilson 95%)",
            ],
            rows,
        ),
        "",
        "Replies were judged in memory (`"
        + results["settings"]["judge"]
        + "`) and are not stored. "
        + judge_line(results["settings"]["judge"])
        + " "
        "A curve that decays over the first tokens is the paper's point: the direction holds only for a few tokens.",
        "",
    ]
    return out


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    labels = [m["label"] for m in res["models"]]
    layers = res["layers"]
    table = Table(title=f"reasoning-direction gap at layer {layers} ({' vs '.join(labels)})")
    table.add_column("method", justify="left")
    for label in labels:
        table.add_column(label, justify="right")
    if len(labels) == 2:
        table.add_column("verdict", justify="left")
    for method, per_model in res["gaps"].items():
        cells = [method]
        for label in labels:
            g = per_model[label]["gap"]
            cells.append(f"{g['mean'][layers]:+.3g} [{g['lo'][layers]:+.3g}, {g['hi'][layers]:+.3g}]")
        if len(labels) == 2:
            s = res["separation"][method]
            cells.append(
                f"{s['verdict']} (layers {layer_ranges(s['higher'])})" if s["verdict"] == "separates" else s["verdict"]
            )
        table.add_row(*cells)
    console = Console()
    console.print(table)
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
# The probe's verdict comes from one method declared before looking: the paper's distance gap with the same gap
# after harmless queries subtracted (its content confound removed). Taking whichever of several methods separates
# would be a multiple comparison; the others are listed beside it.
PRIMARY_PROBE = "contrast"


def row_probe(r: dict[str, Any]) -> Row:
    sep = r["separation"]
    controlled = [m for m in sep if m != "naive"]
    primary = PRIMARY_PROBE if PRIMARY_PROBE in sep else (controlled[0] if controlled else None)
    good = [m for m in controlled if sep[m]["verdict"] == "reproduced"]
    naive = sep.get("naive", {}).get("verdict")
    emb = [v["embedding_gap"]["mean"] for v in r.get("confound", {}).values()]
    confound = f"{emb[0]:+.2f} at the embedding layer, a word-identity confound)" if emb else "n/a)"
    return {
        "effect": "the probe: alignment shows as a refusal-leaning reasoning direction in the later layers",
        "published": "Q is closer to Q+refusal than to Q+compliance in aligned models only (Figs. 2-4)",
        "ours": (f"primary method `{primary}`: {sep[primary]['decision']['reason']}; " if primary else "")
        + f"controlled methods reproducing over a run of later layers (a simultaneous band): "
        f"{len(good)} of {len(controlled)} ({', '.join(good) or 'none'}); the paper's probe: {naive or 'n/a'} "
        "(its gap is already " + confound,
        "control": "the unaligned model; the gap after harmless queries (content) subtracted",
        "verdict": sep[primary]["verdict"] if primary else None,
        "judge": judge_cell(r.get("settings", {}).get("judge")),
    }
