"""`ssah budget`: full SFT vs RU-only vs random-units-only safety alignment of a base model (paper Table 4)."""

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
    DtypeOpt,
    ModelArg,
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
def budget(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/budget",
    data: Annotated[
        str, typer.Option(help="Alignment data with responses (default: the `ssah align` mix), a preset or a file.")
    ] = "builtin:alignment",
    column: ColumnOpt = None,
    condition: Annotated[
        list[str] | None, typer.Option(help="Conditions to run: full, ru, random (repeatable; default all three).")
    ] = None,
    units: Annotated[
        str | None, typer.Option(help="Train these units instead of RU found on the base model: UNITS_FILE:RU.")
    ] = None,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Accept a unit file computed on other weights of the same architecture.")
    ] = False,
    seeds: Annotated[
        int | None, typer.Option(help="Random-units runs, one per seed (5; quick 3; at least that many).")
    ] = None,
    control_strata: Annotated[
        str, typer.Option(help="Random units keep RU's count per: layer-kind | layer | kind | none.")
    ] = "layer-kind",
    steps: Annotated[int | None, typer.Option(help="SFT steps per condition (20; quick 10).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per SFT step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate of full SFT.")] = 3e-5,
    lr_units: Annotated[float, typer.Option(help="Learning rate of the units-only conditions (RU and random).")] = 1e-3,
    schedule: Annotated[str, typer.Option(help="linear | cosine | constant")] = "constant",
    freeze_embeddings: Annotated[bool, typer.Option(help="Keep the embeddings fixed in full SFT.")] = True,
    safety: Annotated[str, typer.Option(help="Safety calibration set (finding RU).")] = "builtin:safety",
    utility: Annotated[str, typer.Option(help="Utility calibration set (finding RU).")] = "builtin:utility",
    limit: Annotated[int | None, typer.Option(help="Calibration examples per set (quick: 32).")] = None,
    metric: Annotated[str, typer.Option(help="fluctuation | wanda | snip | taylor | magnitude")] = "fluctuation",
    rule: Annotated[str, typer.Option(help="ssah | pruning-sets | wei-set-difference")] = "ssah",
    shares: SharesOpt = None,
    normalization: Annotated[str, typer.Option(help="mean|module-mean|zscore|rank|global-rank|none")] = "zscore",
    ranking: Annotated[str, typer.Option(help="global | per-module")] = "global",
    tokens: Annotated[
        str, typer.Option(help="Tokens counted: prompt+response | response | prompt | all")
    ] = "prompt+response",
    eval_harmful: Annotated[str, typer.Option(help="Held-out harmful prompts.")] = "builtin:harmful",
    eval_benign: Annotated[str, typer.Option(help="Held-out benign prompts (answers checked).")] = "builtin:benign",
    eval_utility: Annotated[str, typer.Option(help="Held-out answers for perplexity.")] = "builtin:task",
    eval_limit: Annotated[int | None, typer.Option(help="Prompts per held-out set (50; quick 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens generated per reply (48; quick 32).")] = None,
    judge: Annotated[str, typer.Option(help="Refusal judge.")] = "keyword:ssah",
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    quick: Annotated[
        bool,
        typer.Option(
            help="A small run: 10 steps, 3 random seeds, 16 prompts per set, 32 new tokens, 32 calibration examples."
        ),
    ] = False,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Alignment budget: safety SFT of all parameters vs only the redundant units vs as many random units."""
    from ssah.experiments.budget import BudgetConfig, run_budget

    values = options(ctx, dict(locals()))
    if "condition" in values:
        values["conditions"] = values.pop("condition")
    cfg = build_config(BudgetConfig, config, model, values)
    path = run_budget(cfg)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    res = json.loads((path / "results.json").read_text())
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
