"""The `ssah transfer` report: transition matrices, the moves against data noise, where the moved units sit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssah.reports.common import CATEGORY_COLORS, markdown_table, plot_by_layer, proportion, save, subplots, verdict_line
from ssah.reports.science import Row, ci_points, pct0
from ssah.results import RunResult

PANELS: tuple[tuple[str, str, str, str], ...] = (
    ("transition", "fine-tuning (full data)", "before", "after"),
    ("matched", "fine-tuning across data halves", "before, half A", "after, half B"),
    ("control", "control: unchanged model", "half A", "half B"),
)


def _heatmap(ax: Any, block: dict[str, Any], title: str, ylabel: str, xlabel: str) -> Any:
    import numpy as np

    shares, counts, order = np.array(block["row_shares"], dtype=float), block["counts"], block["order"]
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(order)), order)
    ax.set_yticks(range(len(order)), [f"{c} ({block['before'][c]})" for c in order])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    for i in range(len(order)):
        for j in range(len(order)):
            color = "white" if shares[i, j] > 0.6 else "black"
            ax.text(j, i, f"{counts[i][j]}\n{100 * shares[i, j]:.1f}%", ha="center", va="center", fontsize=8, c=color)
    return im


def plot_transition(results: dict[str, Any], path: Path) -> Path:
    """Heat maps of the row shares (counts and shares annotated): the fine-tune, and with the control the
    fine-tune across data halves beside the unchanged model across the same halves (data noise alone)."""
    panels = [p for p in PANELS if results.get(p[0])]
    fig, axes = subplots(1, len(panels), figsize=(4.9 * len(panels) + 1.0, 4.6), squeeze=False, layout="constrained")
    images = [_heatmap(ax, results[key], *labels) for ax, (key, *labels) in zip(axes[0], panels, strict=True)]
    if images:
        fig.colorbar(images[-1], ax=list(axes[0]), label="share of the row", shrink=0.8)
    fig.suptitle(f"{results['model']['name']}: unit categories ({results['transition']['units_total']} units)")
    return save(fig, path, tight=False)


def _pairs_to_plot(results: dict[str, Any], most: int = 4) -> list[str]:
    by_layer = results["moved_by_layer"]
    counts = results["transition"]["pairs"]
    pairs = [p for p in results["paper"]["tests"] if p in by_layer]  # the named moves, in the recipe's order
    rest = sorted((p for p in by_layer if p not in pairs and counts[p]["k"] > 0), key=lambda p: -counts[p]["k"])
    return pairs + rest[: max(0, most - len(pairs))]


def _matrix_table(block: dict[str, Any]) -> str:
    order, cells = block["order"], zip(block["counts"], block["row_shares"], strict=True)
    rows = [
        [f"**{a}** ({block['before'][a]})", *(f"{c} ({100 * x:.1f}%)" for c, x in zip(*ab, strict=True))]
        for a, ab in zip(order, cells, strict=True)
    ]
    return markdown_table(["before \\ after", *order], [*rows, ["(column total)", *(block["after"][c] for c in order)]])


def _of(p: dict[str, Any] | None) -> str:
    return proportion(p, ci_digits=1, counts=True)


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The paper's claim, what moved here, and each named move against data noise by the one verdict rule."""
    p = results["paper"]
    lines = [
        f"The paper: {p['claim']}.",
        f"Here, on the full calibration data, {_of(p['scu_to_cu'])} of the SCU became CU and "
        f"{_of(p['cu_to_ucu'])} of the CU became UCU (95% Wilson intervals).",
        "",
        "Verdict (`reproduced` only when the 95% interval of the difference excludes zero upwards): each move across "
        "the fine-tune (half A before -> half B after) against the same move by data noise alone (unchanged model, "
        "half A -> half B), over the same units (the category on half A before).",
        "",
    ]
    lines += [
        verdict_line(f"{pair}, with the fine-tune", t, "by noise alone", per_side="units")
        for pair, t in p["tests"].items()
    ]
    return [*lines, "", f"The paper's headline (over half of SCU became CU): **{p['verdict']}**."]


def render(results: dict[str, Any], run_dir: Path) -> str:
    """(Re)draw the plots into ``run_dir/plots`` from ``results`` alone and return the Markdown report."""
    run_dir = Path(run_dir)
    plot_transition(results, run_dir / "plots" / "transition.png")
    pairs = _pairs_to_plot(results)
    panels = {p: (results["moved_by_layer"][p], CATEGORY_COLORS.get(p.split("->")[1], "#333333")) for p in pairs}
    title = f"{results['model']['name']}: units that changed category after fine-tuning, by layer"
    plot_by_layer(panels, run_dir / "plots" / "moved_by_layer.png", title=title)
    m, ft, cat, tr = results["model"], results["finetuned"], results["categorization"], results["transition"]
    t = ft["training"]
    how = f"Fine-tuned model: `{ft['name']}` (fingerprint `{ft['fingerprint']}`)."
    if t is not None:
        how = f"`{m['name']}` **fine-tuned in memory** on `{t['data']['source']}` ({t['data']['examples']} examples), "
        how += f"{t['steps']} steps of batch {t['batch_size']}, lr {t['lr']:g}, all parameters, loss "
        how += f"{t['first_loss']:.3f} -> {t['final_loss']:.3f}; its weights were restored after."
    lines = [f"# Attribute transfer: {m['name']}", "", how]
    if ft.get("same_weights"):
        lines += ["", "**Warning**: the fine-tuned model has the same weights as the base model; nothing can move."]
    lines += [
        "",
        f"Both models categorised on the same calibration sets (`{cat['data']['safety']}` {cat['examples']['safety']} "
        f"and `{cat['data']['utility']}` {cat['examples']['utility']} examples) with metric `{cat['metric']}`, rule "
        f"`{cat['rule']}` {cat['shares']}, normalisation `{cat['normalization']}`, ranking `{cat['ranking']}`, "
        f"{cat['granularity']} granularity, tokens `{cat['token_region']}`. {m['units_total']} units in "
        f"{m['layers']} layers.",
        "",
        "## Transition matrix (rows: before fine-tuning, columns: after; counts and row shares)",
        "",
        _matrix_table(tr),
        "",
        "![transition matrices](plots/transition.png)",
        "",
        f"{tr['moved']} units ({100 * tr['moved_share']:.1f}%) changed category. SCU overlap before/after (Jaccard): "
        f"{results['scu_overlap']['jaccard']:.3f} (chance {results['scu_overlap']['chance']:.4f}).",
        "",
        "## Compared with the paper",
        "",
        *verdict_lines(results),
        "",
    ]
    for block in (b for b in (results.get("matched"), results.get("control")) if b):
        lines += [f"{block['method'][0].upper()}{block['method'][1:]}: {block['moved']} units changed category.", ""]
    by_layer, s = results["moved_by_layer"], results["seconds"]
    kinds = [(p, *(sum(r[k] for r in by_layer[p]) for k in ("attn", "mlp"))) for p in _pairs_to_plot(results, 6)]
    lines += [
        "## Where the moved units sit",
        "",
        "![moved units by layer](plots/moved_by_layer.png)",
        "",
        "; ".join(f"{p}: {a} attention, {m} MLP" for p, a, m in kinds) + ".",
        "",
        f"Took {s['total']:.1f} s (model loads {s['load_models']:.1f} s, fine-tuning {s['fine_tune']:.1f} s, "
        f"categorisations {s['categorize']:.1f} s).",
    ]
    return "\n".join(lines) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    tr, p = res["transition"], res["paper"]
    order = tr["order"]
    typer.echo("before \\ after " + " ".join(f"{c:>8}" for c in order))
    for i, a in enumerate(order):
        typer.echo(f"{a:>14} " + " ".join(f"{n:>8}" for n in tr["counts"][i]))
    for pair, t in p["tests"].items():
        share = res["transition"]["pairs"][pair]
        rate = "-" if share is None else f"{100 * share['rate']:.1f}%"
        line = f"{pair.replace('->', ' -> ')}: {rate} (full data)"
        if "comparison" in t:
            c = t["comparison"]
            line += (
                f"; across data halves {100 * c['effect']:.1f}% with the fine-tune vs {100 * c['control']:.1f}% by "
                f"noise, difference [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] points"
            )
        typer.echo(f"{line}: {t['verdict']} ({t['reason']})")
    typer.echo(f"paper's claim (over half of SCU -> CU, beyond data noise): {p['verdict']}")
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_transfer(r: dict[str, Any]) -> Row:
    p = r["paper"]
    t = p["tests"]["SCU->CU"]
    ours = f"SCU->CU {proportion(p.get('scu_to_cu'), ci_digits=0)} on the full data"
    if "comparison" in t:
        c = t["comparison"]
        ours += f"; across data halves {pct0(c['effect'])} vs {pct0(c['control'])}, difference {ci_points(c)}"
    return {
        "effect": "a benign fine-tune turns SCU into CU (attribute transfer, Fig. 5)",
        "published": "over half of SCU became CU; part of CU became UCU",
        "ours": f"{ours}: {t['reason']}",
        "control": "the same categorisation on disjoint data halves without fine-tuning (data noise)",
        "verdict": p["verdict"],
        "judge": None,
    }
