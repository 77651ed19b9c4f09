"""`ssah protect`: protected fine-tuning (full / freeze SCU / SCU + 6% of units from CU / SCU + all CU / stratified
random controls over seeds / LoRA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
    ColumnOpt,
    ConfigOpt,
    DeviceOpt,
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
def protect(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/protect",
    data: Annotated[
        str,
        typer.Option(help="Benign task data: builtin:task, alpaca-safety-only, dolly-safety-only, gsm8k-sft, a file."),
    ] = "builtin:task",
    attack: Annotated[
        str, typer.Option(help="Attack set: builtin:attack (harmful requests + compliance openers) or a file.")
    ] = "builtin:attack",
    attack_size: Annotated[int | None, typer.Option(help="Harmful examples in the attack (its strength).")] = 10,
    kinds: Annotated[
        str | None, typer.Option(help="Data kinds to fine-tune on: benign,attack (default both; --quick: benign).")
    ] = None,
    settings: Annotated[
        str | None,
        typer.Option(
            help="Subset of full,freeze-scu,freeze-scu-cu,freeze-scu-all-cu,random,random-all-cu,lora (default all)."
        ),
    ] = None,
    cu_share: Annotated[
        float, typer.Option(help="Share of ALL units taken from CU by safety rank and frozen with SCU (paper: 0.06).")
    ] = 0.06,
    seeds: Annotated[
        int | None, typer.Option(help="Random frozen sets per control (default 3 quick, 5 full; at least that).")
    ] = None,
    control_strata: Annotated[
        str, typer.Option(help="Random controls keep the count per: layer-kind (default) | layer | kind | none.")
    ] = "layer-kind",
    steps: Annotated[str | None, typer.Option(help="Step counts to measure at, e.g. 5,10,20 (one run each).")] = None,
    lr: Annotated[float, typer.Option(help="Learning rate (AdamW).")] = 5e-5,
    lora_lr: Annotated[float | None, typer.Option(help="LoRA's learning rate (default 10x --lr).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training examples per step.")] = None,
    schedule: Annotated[str, typer.Option(help="constant (default: step k = a k-step run) | linear | cosine")] = (
        "constant"
    ),
    lora: Annotated[str, typer.Option(help="LoRA setting: r=8[,alpha=16,dropout=0.05,targets=q_proj+v_proj].")] = (
        "r=8"
    ),
    units: Annotated[
        str | None, typer.Option(help="units.safetensors of this model (default: computed here and saved).")
    ] = None,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Accept a unit file computed on other weights of the same architecture.")
    ] = False,
    safety: Annotated[str, typer.Option(help="Safety calibration set (when units are computed).")] = "builtin:safety",
    utility: Annotated[str, typer.Option(help="Utility calibration set (when units are computed).")] = (
        "builtin:utility"
    ),
    harmful: Annotated[str, typer.Option(help="Held-out harmful prompts for ASR.")] = "builtin:harmful",
    benign: Annotated[str, typer.Option(help="Safe prompts for over-refusal.")] = "builtin:borderline",
    eval_limit: Annotated[int | None, typer.Option(help="Prompts per evaluation set.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens generated per evaluation reply.")] = None,
    utility_limit: Annotated[int | None, typer.Option(help="Held-out task examples for utility.")] = None,
    calibration_limit: Annotated[int | None, typer.Option(help="Calibration examples per set (units).")] = None,
    judge: Annotated[str, typer.Option(help="Refusal judge.")] = "keyword:ssah",
    limit: Annotated[int | None, typer.Option(help="Read at most N examples of the task data.")] = 2000,
    column: ColumnOpt = None,
    quick: Annotated[bool, typer.Option(help="Small run: 4 settings, 3 seeds, steps 3,6, 16 prompts, 32 tokens.")] = (
        False
    ),
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune one model under several protection settings and measure what safety survives (Tables 2, 3, 5)."""
    from ssah.experiments.protect import ProtectConfig, run_protect

    values = options(ctx, dict(locals()))
    cfg = build_config(ProtectConfig, config, model, values)
    path = run_protect(cfg)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    res = json.loads((path / "results.json").read_text())
    for kind, v in res["verdict"].items():
        typer.echo(f"[{kind}] {v['summary']}")
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")
