"""What every `ssah` command shares: the Typer app, option declarations and config building.

Commands live in :mod:`ssah.cli` (core) and in one module per experiment under :mod:`ssah.commands`; both
import the app from here, so adding a command never touches another command's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ssah.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ssah: see, protect and install the safety of a language model at neuron level.",
)


@app.callback()
def _global_options(
    threads: Annotated[
        int | None,
        typer.Option(
            envvar="SSAH_THREADS",
            min=1,
            help="CPU threads for torch in every command (1-2 is fastest when several runs share a small CPU).",
        ),
    ] = None,
) -> None:
    """Options that apply to every command; given before the command name, e.g. ``ssah --threads 1 demo``."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config; command-line options override it.")]
# Options shared by several commands, declared once.
ModelArg = Annotated[str | None, typer.Argument(help="Registry name, model folder, .gguf file or hub id.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")]
SharesOpt = Annotated[str | None, typer.Option(help="Rule shares, e.g. scu=0.013,ucu=0.133,ru=0.148")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")]
AllowPickleOpt = Annotated[bool, typer.Option(help="Allow pickled .bin weights (can run code).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option(help="Allow the model's own Python code.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing run folder.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        help="Spread a big model over devices: auto | balanced | balanced_low_0 | sequential | a JSON file of "
        "module -> device (0, 1, cpu, disk). Overrides --device."
    ),
]
MaxMemoryOpt = Annotated[
    str | None, typer.Option(help="Memory per device for --device-map, e.g. 0=70GiB,1=70GiB,cpu=200GiB.")
]
OffloadFolderOpt = Annotated[
    str | None, typer.Option(help="Folder for weights offloaded to disk (default: a temporary folder in the cache).")
]
BatchSizeOpt = Annotated[
    str,
    typer.Option(
        help="Examples per batch, or auto: the largest that fits (from `ssah info --plan`, halved on "
        "out-of-memory, remembered in the cache); auto is the default on GPUs."
    ),
]
ColumnOpt = Annotated[list[str] | None, typer.Option(help="Map a column, e.g. prompt=goal (repeatable).")]


def explicit(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the options the user actually typed (so that a --config file's values are not overridden by defaults)."""
    out = {}
    for key, value in values.items():
        source = ctx.get_parameter_source(key)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            out[key] = value
    return out


def options(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The typed options of a command as config values (``--config`` dropped, ``--column`` and ``--shares`` parsed)."""
    out = explicit(ctx, values)
    out.pop("config", None)
    if "column" in out:
        out["columns"] = columns(out.pop("column"))
    if isinstance(out.get("batch_size"), str):
        out["batch_size"] = parse_batch_size(out["batch_size"])
    if isinstance(out.get("shares"), str):
        from ssah.categorize import parse_shares

        out["shares"] = parse_shares(out["shares"])
    return out


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive number or ``auto``."""
    value = text.strip().lower()
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise UserError(f"bad --batch-size {text!r}: pass a positive number or auto")


def columns(items: list[str] | None) -> dict[str, str]:
    from ssah.data import parse_column_mapping

    return parse_column_mapping(items or [])


def build_config(cls: Any, config: Path | None, model: str | None, values: dict[str, Any]) -> Any:
    """A config of class ``cls`` from a YAML file and/or the typed options (typed options win)."""
    if config is not None:
        return cls.from_yaml(config, **values)
    if model is None:
        raise UserError("missing MODEL: give a registry name, model folder, .gguf file or hub id (or --config)")
    return cls.build({"model": model, **values})
