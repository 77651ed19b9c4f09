"""`ssah judge validate` / `ssah judge train`: measure refusal judges against human labels; fit the learned judge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ssah.cliutil import ColumnOpt, ConfigOpt, OverwriteOpt, SeedOpt, app, options
from ssah.errors import UserError

judge_app = typer.Typer(
    no_args_is_help=True,
    help="Refusal judges: validate them against human labels, train the learned judge.",
)
app.add_typer(judge_app, name="judge")

DataArg = Annotated[
    list[str] | None,
    typer.Argument(help="Labelled CSV / JSONL files or folders (prompt, reply and label columns; XSTest as is)."),
]
PartialOpt = Annotated[
    str | None,
    typer.Option(help="Partial refusals: refusal (count as refusals), exclude (default, as the anchors), class."),
]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first N rows of each file (quick runs).")]


def _values(ctx: typer.Context, values: dict[str, object], data: list[str] | None) -> dict[str, object]:
    out = options(ctx, values)
    out.pop("data", None)
    if data:
        out["data"] = list(data)
    return out


def _build(cls: type, config: Path | None, values: dict[str, object]) -> object:
    if config is not None:
        return cls.from_yaml(config, **values)  # type: ignore[attr-defined]
    if "data" not in values:
        raise UserError("missing DATA: give one or more labelled CSV / JSONL files or folders (or --config)")
    return cls.build(values)  # type: ignore[attr-defined]


@judge_app.command()
def validate(
    ctx: typer.Context,
    data: DataArg = None,
    judge: Annotated[
        list[str] | None,
        typer.Option(help="A judge spec (repeatable): keyword:ssah, keyword:xstest, learned, learned:FOLDER, ..."),
    ] = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/judges",
    column: ColumnOpt = None,
    partial: PartialOpt = None,
    limit: LimitOpt = None,
    batch_size: Annotated[int, typer.Option(help="Replies per forward pass (model-based judges).")] = 8,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Agreement of each judge with human labels (95% CI), refusal precision / recall, kappa, confusion."""
    from ssah.experiments.judge import JudgeValidateConfig, run_judge_validate

    values = _values(ctx, dict(locals()), data)
    if "judge" in values:
        values["judges"] = values.pop("judge")
    cfg = _build(JudgeValidateConfig, config, values)
    path = run_judge_validate(cfg)  # type: ignore[arg-type]
    _print_validate(path)


@judge_app.command()
def train(
    ctx: typer.Context,
    data: DataArg = None,
    out: Annotated[str, typer.Option(help="Judge folder to write (use it as --judge learned:FOLDER).")] = "my-judge",
    column: ColumnOpt = None,
    partial: PartialOpt = None,
    base_model: Annotated[
        str, typer.Option(help="Model whose hidden states the head reads.")
    ] = "smollm2-135m-instruct",
    layer: Annotated[
        list[int] | None, typer.Option(help="A candidate layer (repeatable; default every other).")
    ] = None,
    max_reply_tokens: Annotated[int, typer.Option(help="Reply tokens the judge reads.")] = 64,
    limit: LimitOpt = None,
    batch_size: Annotated[int, typer.Option(help="Replies per forward pass.")] = 8,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Fit the learned judge (logistic regression on the base model's hidden states) on labelled replies."""
    from ssah.experiments.judge import JudgeTrainConfig, run_judge_train

    values = _values(ctx, dict(locals()), data)
    if "layer" in values:
        values["layers"] = values.pop("layer")
    cfg = _build(JudgeTrainConfig, config, values)
    path = run_judge_train(cfg)  # type: ignore[arg-type]
    report = json.loads((path / "training.json").read_text())
    settings = json.loads((path / "settings.json").read_text())
    typer.echo(f"layer {settings['layer']}, {settings['pooling']} pooling, C={settings['c']}")
    for source, b in (report.get("leave_one_source_out") or {}).items():
        typer.echo(f"held out {source}: {100 * b['agreement']['value']:.1f}% of {b['agreement']['n']}")
    typer.echo(f"wrote {path} in {report['seconds']:.1f} s")


def _print_validate(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    res = json.loads((path / "results.json").read_text())
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
