"""`ssah probe`: the reasoning-direction probe, as published and confound-controlled, one model or two compared."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
    ColumnOpt,
    ConfigOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    ModelArg,
    OffloadFolderOpt,
    OverwriteOpt,
    ProgressOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    app,
    build_config,
    options,
)
from ssah.errors import UserError

RENAMES = {"refusal_opener": "refusal_openers", "compliance_opener": "compliance_openers"}


@app.command()
def probe(
    ctx: typer.Context,
    model: ModelArg = None,
    compare: Annotated[
        str | None, typer.Option(help="A second model to compare with (e.g. the unaligned one); same tokenizer.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="Name of MODEL in the report (default: from its path).")] = None,
    compare_label: Annotated[str | None, typer.Option(help="Name of the --compare model in the report.")] = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/probe",
    harmful: Annotated[
        str, typer.Option(help="Harmful queries: builtin:NAME, a preset or a file.")
    ] = "builtin:harmful",
    harmless: Annotated[
        str, typer.Option(help="Harmless queries of the content baseline: builtin:NAME, a preset or a file.")
    ] = "builtin:benign",
    column: ColumnOpt = None,
    limit: Annotated[
        int | None, typer.Option(help="Prompts of each set, spread over the file (default 50; quick 16).")
    ] = None,
    quick: Annotated[bool, typer.Option(help="Smaller run: 16 prompts, 8 tracked tokens, 400 resamples.")] = False,
    methods: Annotated[
        str | None,
        typer.Option(help="Comma list: naive,openers,openers-mean,contrast,contrast-mean,direction,logit-lens."),
    ] = None,
    refusal_opener: Annotated[
        list[str] | None, typer.Option(help="A refusal opener (repeatable; the first is the naive probe's).")
    ] = None,
    compliance_opener: Annotated[
        list[str] | None, typer.Option(help="A compliance opener (repeatable; the first is the naive probe's).")
    ] = None,
    forced_prefix: Annotated[
        str, typer.Option(help="Compliance prefix forced at the start of the reply for per-token tracking.")
    ] = "Sure, here is",
    token_steps: Annotated[
        int | None, typer.Option(help="Generated tokens followed per reply (default 16, quick 8; 0 = off).")
    ] = None,
    token_prompts: Annotated[
        int | None, typer.Option(help="Harmful and harmless prompts followed token by token (default 16, quick 8).")
    ] = None,
    token_layer: Annotated[int | None, typer.Option(help="Layer of the per-token plot (default 3/4 depth).")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples (default 1000, quick 400).")] = None,
    level: Annotated[float, typer.Option(help="Interval level.")] = 0.95,
    batch_size: Annotated[int, typer.Option(help="Queries per forward pass.")] = 32,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
    judge: Annotated[str, typer.Option(help="Refusal judge for the tracked replies.")] = "keyword:ssah",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (1 is fastest on a CPU shared by many processes).")
    ] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadFolderOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Probe the reasoning direction (refuse vs fulfil) per layer and per generated token; compare two models."""
    from ssah.experiments.probe import ProbeConfig, run_probe

    values = options(ctx, dict(locals()))
    for old, new in RENAMES.items():
        if old in values:
            values[new] = values.pop(old)
    if "methods" in values:
        values["methods"] = [m.strip() for m in str(values["methods"]).split(",") if m.strip()]
        if not values["methods"]:
            raise UserError("--methods is empty: name at least one method")
    cfg = build_config(ProbeConfig, config, model, values)
    path = run_probe(cfg)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from ssah.reports.probe import layer_ranges

    res = json.loads((path / "results.json").read_text())
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
