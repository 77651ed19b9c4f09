"""`ssah direction` (the refusal-direction baseline) and `ssah export` (an edited model as a plain HF folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OverwriteOpt,
    ProgressOpt,
    SeedOpt,
    TrustRemoteCodeOpt,
    app,
    build_config,
    options,
)


@app.command()
def direction(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/direction",
    quick: Annotated[
        bool, typer.Option(help="Small run: 24/12/16 train/validation/test prompts, 32 new tokens, 3 seeds.")
    ] = False,
    harmful: Annotated[str, typer.Option(help="Harmful prompts: builtin:NAME, a preset or a file.")] = (
        "builtin:harmful"
    ),
    harmless: Annotated[
        str, typer.Option(help="Harmless prompts (direction, induce score, KL): builtin:NAME, a preset or a file.")
    ] = "builtin:benign",
    benign: Annotated[str, typer.Option(help="Safe prompts for over-refusal (or none).")] = "builtin:borderline",
    judge: Annotated[str, typer.Option(help="keyword[:PRESET] | classifier:PATH | guard:PATH | learned")] = (
        "keyword:ssah"
    ),
    train: Annotated[int | None, typer.Option(help="Prompts of each set for the means (40; quick 24).")] = None,
    val: Annotated[int | None, typer.Option(help="Prompts of each set to choose the direction (24; quick 12).")] = None,
    limit: Annotated[int | None, typer.Option(help="Test prompts of each set (32; quick 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per reply (64; quick 32).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Random-direction controls (5; quick 3).")] = None,
    layer_step: Annotated[int | None, typer.Option(help="Score every N-th layer (1; quick 2).")] = None,
    positions: Annotated[
        int | None, typer.Option(help="Post-instruction positions (default: the template's, at most 5).")
    ] = None,
    kl_max: Annotated[float, typer.Option(help="KL filter of the selection (the paper's 0.1).")] = 0.1,
    max_layer_share: Annotated[float, typer.Option(help="Candidates from layers below this share of depth.")] = 0.8,
    kl_tokens: Annotated[int, typer.Option(help="Tokens of the original's reply teacher-forced for KL.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 16,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Choose the refusal direction on a validation split; ablate, add and orthogonalise it: ASR, KL, refusals."""
    from ssah.experiments.direction import DirectionConfig, run_direction, verdict_lines

    cfg = build_config(DirectionConfig, config, model, options(ctx, dict(locals())))
    path = run_direction(cfg)
    res = json.loads((path / "results.json").read_text())
    sel = res["selection"]
    typer.echo(f"direction: layer {sel['layer']}, position {sel['position']} (passed filter: {sel['passed_filter']})")
    for line in verdict_lines(res):
        typer.echo(line)
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


@app.command()
def export(
    model: ModelArg = None,
    out: Annotated[str | None, typer.Option(help="Folder to write (a plain Hugging Face model folder).")] = None,
    ablate: Annotated[
        str | None, typer.Option(help="Fold an ablation into the weights: UNITS_FILE:SET (e.g. units.safetensors:SCU).")
    ] = None,
    orthogonalize: Annotated[
        str | None, typer.Option(help="Orthogonalise the weights against the direction of an `ssah direction` run.")
    ] = None,
    mode: Annotated[str, typer.Option(help="Ablation folded: zero | mean (mean needs calibration statistics).")] = (
        "zero"
    ),
    safety: Annotated[str, typer.Option(help="Safety calibration set (mean ablation's channel means).")] = (
        "builtin:safety"
    ),
    utility: Annotated[str, typer.Option(help="Utility calibration set (mean ablation's channel means).")] = (
        "builtin:utility"
    ),
    dtype: DtypeOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write the model with an ablation or a direction folded into its weights, loadable by plain transformers."""
    from ssah.errors import UserError
    from ssah.export import export_model

    if model is None:
        raise UserError("missing MODEL: give a registry name, model folder or hub id")
    if out is None:
        raise UserError("missing --out: name the folder to write the edited model to")
    path = export_model(
        model,
        Path(out),
        ablate=ablate,
        orthogonalize=orthogonalize,
        mode=mode,
        safety=safety,
        utility=utility,
        dtype=dtype,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )
    typer.echo(f"wrote {path}")
