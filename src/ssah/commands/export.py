"""`ssah export`: an edited model (ablated units or an orthogonalised direction) as a plain Hugging Face folder.

Not a recipe (it measures nothing and writes a model, not a run folder), so it is declared here by hand;
`ssah direction` is generated from its recipe like every experiment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import app


@app.command()
def export(
    model: Annotated[str | None, typer.Argument(help="Registry name, model folder, .gguf file or hub id.")] = None,
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
    dtype: Annotated[str, typer.Option(help="Weights' dtype: auto | float32 | bfloat16 | float16.")] = "auto",
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled (.bin) weights (unsafe).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the model's own code from the hub.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
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
