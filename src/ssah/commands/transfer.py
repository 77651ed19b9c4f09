"""`ssah transfer`: how unit categories move when a model is fine-tuned (attribute transfer, paper Fig. 5)."""

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
def transfer(
    ctx: typer.Context,
    model: ModelArg = None,
    finetuned: Annotated[
        str | None, typer.Option(help="The fine-tuned model (folder, ...); without it a copy is fine-tuned in memory.")
    ] = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/transfer",
    data: Annotated[
        str, typer.Option(help="Fine-tuning data when --finetuned is absent (builtin:NAME, a preset or a file).")
    ] = "builtin:task",
    steps: Annotated[
        int | None, typer.Option(help="Fine-tuning steps when --finetuned is absent (20; quick 8).")
    ] = None,
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate when --finetuned is absent.")] = 2e-5,
    train_batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 8,
    safety: Annotated[str, typer.Option(help="Safety calibration set.")] = "builtin:safety",
    utility: Annotated[str, typer.Option(help="Utility calibration set.")] = "builtin:utility",
    column: ColumnOpt = None,
    limit: Annotated[
        int | None, typer.Option(help="Use only the first N examples of each calibration set (quick: 48).")
    ] = None,
    metric: Annotated[str, typer.Option(help="fluctuation | wanda | snip | taylor | magnitude")] = "fluctuation",
    rule: Annotated[str, typer.Option(help="ssah | pruning-sets | wei-set-difference")] = "ssah",
    shares: SharesOpt = None,
    normalization: Annotated[str, typer.Option(help="mean|module-mean|zscore|rank|global-rank|none")] = "zscore",
    ranking: Annotated[str, typer.Option(help="global | per-module")] = "global",
    granularity: Annotated[str, typer.Option(help="neuron | head")] = "neuron",
    tokens: Annotated[
        str, typer.Option(help="Tokens counted: prompt+response | response | prompt | all")
    ] = "prompt+response",
    batch_size: Annotated[int, typer.Option(help="Examples per scoring forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    control: Annotated[
        bool,
        typer.Option(
            help="Categorise disjoint data halves too (the noise control; without it the verdict is inconclusive)."
        ),
    ] = True,
    quick: Annotated[bool, typer.Option(help="A small run: 48 calibration examples per set, 8 fine-tuning steps.")] = (
        False
    ),
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Attribute transfer: the SCU / UCU / CU / RU transition matrix between a model and its fine-tune."""
    from ssah.experiments.transfer import TransferConfig, run_transfer

    values = options(ctx, dict(locals()))
    cfg = build_config(TransferConfig, config, model, values)
    path = run_transfer(cfg)
    _print_summary(path)


def _print_summary(path: Path) -> None:
    res = json.loads((path / "results.json").read_text())
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
