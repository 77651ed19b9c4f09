"""What each command prints when its run is done: a short table or a few lines from the run's
:class:`ssah.results.RunResult` (the full report is the run folder's report.md / report.html)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer

from ssah.results import RunResult


def ablate(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    from ssah.reports.ablate import TABLE_COLUMNS, condition_cells, summary_lines

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


def budget(result: RunResult[Any]) -> None:
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


def probe(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    from ssah.reports.probe import layer_ranges

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


def protect(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    for kind, v in res["verdict"].items():
        typer.echo(f"[{kind}] {v['summary']}")
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


def transfer(result: RunResult[Any]) -> None:
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


def judge_validate(result: RunResult[Any]) -> None:
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


def train(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    tr = res["trainable"]
    typer.echo(
        f"trained {res['model']['name']} ({res['mode']}): {res['steps']} steps, loss {res['first_loss']:.4f} -> "
        f"{res['final_loss']:.4f}, {tr['params']} of {tr['total']} parameters trained ({100 * tr['share']:.2f}%)"
    )
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s (model in {path / 'model'})")


def eval_(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    from ssah.reports.eval import summary_rows

    table = Table(title=f"{res['model']['name']} (judge {res['judge_spec']})")
    for col in ("measure", "value", "95% interval", "n"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in summary_rows(res):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


def units(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{res['model']['name']}: {res['model']['units_total']} units ({res['metric']}, {res['rule']})")
    for col in ("category", "units", "share", "attention", "MLP"):
        table.add_column(col, justify="right" if col != "category" else "left")
    for c, v in res["categories"].items():
        table.add_row(
            c,
            str(v["count"]),
            f"{100 * v['fraction']:.2f}%",
            str(res["by_kind"][c]["attn"]),
            str(res["by_kind"][c]["mlp"]),
        )
    console = Console(stderr=False)
    console.print(table)
    if res.get("stability"):
        console.print(
            f"SCU overlap between data halves (Jaccard): {res['stability']['SCU']['jaccard']:.3f} "
            f"(chance {res['stability']['SCU']['chance']:.3f})"
        )
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


def align(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    b, a = res["before"], res["after"]
    for key, what in (
        ("refusal", "refusal on held-out harmful"),
        ("borderline_overrefusal", "over-refusal on held-out borderline-safe"),
        ("overrefusal", "over-refusal on held-out benign"),
    ):
        if key in b:
            typer.echo(f"{what}: {100 * b[key]['rate']:.1f}% -> {100 * a[key]['rate']:.1f}%")
    typer.echo(f"wrote {path} (aligned model in {path / 'model'}) in {res['seconds']:.1f} s")


def judge_train(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    settings = json.loads((path / "settings.json").read_text())
    typer.echo(f"layer {settings['layer']}, {settings['pooling']} pooling, C={settings['c']}")
    for source, b in (res.get("leave_one_source_out") or {}).items():
        typer.echo(f"held out {source}: {100 * b['agreement']['value']:.1f}% of {b['agreement']['n']}")
    typer.echo(f"wrote {path} in {res['seconds']:.1f} s")


def direction(result: RunResult[Any]) -> None:
    path, res = result.out, result.results
    from ssah.reports.direction import verdict_lines

    sel = res["selection"]
    typer.echo(f"direction: layer {sel['layer']}, position {sel['position']} (passed filter: {sel['passed_filter']})")
    for line in verdict_lines(res):
        typer.echo(line)
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


SUMMARIES: dict[str, Callable[[RunResult[Any]], None]] = {
    "direction": direction,
    "units": units,
    "eval": eval_,
    "train": train,
    "align": align,
    "ablate": ablate,
    "probe": probe,
    "transfer": transfer,
    "protect": protect,
    "budget": budget,
    "judge validate": judge_validate,
    "judge train": judge_train,
}
