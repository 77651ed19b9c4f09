"""`ssah ablate`: the paper's Table 1 with random controls, a dose curve and the calibration comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
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
    SharesOpt,
    TrustRemoteCodeOpt,
    app,
    build_config,
    options,
)


@app.command()
def ablate(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/ablate",
    units: Annotated[
        str | None, typer.Option(help="units.safetensors of this model (default: compute the units in memory).")
    ] = None,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Accept a unit file computed on other weights of the same architecture.")
    ] = False,
    quick: Annotated[
        bool, typer.Option(help="Small run: 16 harmful + 16 safe prompts, 32 new tokens, 3 seeds, 3 dose points.")
    ] = False,
    safety: Annotated[str, typer.Option(help="Safety calibration set (when computing units).")] = "builtin:safety",
    utility: Annotated[str, typer.Option(help="Utility calibration set (when computing units).")] = "builtin:utility",
    calibration_limit: Annotated[
        int | None, typer.Option(help="Use N examples (spread over the set) of each calibration set.")
    ] = None,
    metric: Annotated[str, typer.Option(help="fluctuation | wanda | snip | taylor | magnitude")] = "fluctuation",
    normalization: Annotated[
        str, typer.Option(help="Normalisation when computing units: mean|module-mean|zscore|rank|global-rank|none")
    ] = "zscore",
    rule: Annotated[str, typer.Option(help="ssah | pruning-sets | wei-set-difference")] = "ssah",
    shares: SharesOpt = None,
    tokens: Annotated[
        str, typer.Option(help="Calibration tokens counted: prompt+response | response | prompt | all")
    ] = "prompt+response",
    harmful: Annotated[str, typer.Option(help="Harmful prompts: builtin:NAME, a preset, or a file.")] = (
        "builtin:harmful"
    ),
    benign: Annotated[str, typer.Option(help="Safe prompts for over-refusal (or none).")] = "builtin:borderline",
    utility_eval: Annotated[
        list[str] | None,
        typer.Option(help="perplexity[:SPEC] | piqa | mc:FILE | gsm8k[:FILE] | none (repeatable; as in ssah eval)."),
    ] = None,
    judge: Annotated[str, typer.Option(help="keyword[:PRESET] | classifier:PATH | guard:PATH | first-token")] = (
        "keyword:ssah"
    ),
    limit: Annotated[
        int | None, typer.Option(help="Harmful and safe prompts per condition (default 32; quick 16).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens per reply (default 64; quick 32).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generation batch.")] = 32,
    ablation: Annotated[
        str, typer.Option(help="zero | mean (FLAP-style: a removed channel reads its calibration mean).")
    ] = "mean",
    control_strata: Annotated[
        str, typer.Option(help="Random controls keep the count per layer-kind | layer | kind | none (uniform).")
    ] = "layer-kind",
    seeds: Annotated[int | None, typer.Option(help="Random-control seeds (default 5; quick 3; at least that).")] = None,
    dose: Annotated[
        str | None, typer.Option(help="Dose shares of all units, e.g. 0.25%,0.5%,1%,2%,5% (the default).")
    ] = None,
    categories: Annotated[str | None, typer.Option(help="Categories to ablate, e.g. SCU,RU (default all).")] = None,
    random_for: Annotated[
        str | None, typer.Option(help="Categories that get same-size random controls (default: all ablated).")
    ] = None,
    compare_calibration: Annotated[
        bool, typer.Option(help="Also ablate SCU found with prompt-only calibration (no refusal text).")
    ] = True,
    direction: Annotated[
        bool, typer.Option(help="Also ablate the refusal direction (Arditi et al.) and random directions.")
    ] = True,
    kl: Annotated[bool, typer.Option(help="KL(original || ablated) on harmless prompts for every condition.")] = True,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
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
    """Ablate each unit category (and same-size random units) and measure ASR, coherent compliance and utility."""
    from ssah.experiments.ablate import AblateConfig, run_ablate

    values = options(ctx, dict(locals()))
    if values.get("utility_eval") is None:
        values.pop("utility_eval", None)
    cfg = build_config(AblateConfig, config, model, values)
    path = run_ablate(cfg)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from ssah.experiments.ablate import TABLE_COLUMNS, condition_cells, summary_lines

    res = json.loads((path / "results.json").read_text())
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
