"""`ssah demo`: every stage of the method on one model, resumable, with one report."""

from __future__ import annotations

from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
    ConfigOpt,
    DeviceOpt,
    OverwriteOpt,
    ProgressOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    app,
    build_config,
    options,
)


@app.command()
def demo(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option(help="The unaligned base model (registry name, folder, .gguf file or hub id).")
    ] = "smollm2-135m-instruct",
    out: Annotated[str, typer.Option(help="Demo folder; an existing demo there is continued.")] = "runs/demo",
    quick: Annotated[
        bool, typer.Option("--quick/--full", help="Small runs of every experiment (--full: the full-size ones).")
    ] = True,
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated subset of stages, e.g. align,units,ablate.")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """The whole method on a real model: align, evaluate, probe, units, ablation, transfer, protection, budget."""
    from ssah.experiments.demo import DemoConfig, run_demo

    values = options(ctx, dict(locals()))
    if values.get("stages") is not None:
        values["stages"] = [s.strip() for s in values["stages"].split(",") if s.strip()]
    cfg = build_config(DemoConfig, config, values.pop("model", model), values)
    run_demo(cfg, echo=typer.echo)
