"""`ssah <command>`: the experiment commands are generated from the recipes' configs (:mod:`ssah.cliutil`);
the inspection commands (show, info, models, configs) are written here.

Precedence: config defaults < ``--config`` (shipped name or YAML) < ``--flags`` < ``key=value`` overrides.
Bad input ends with a one-line ``error:`` message and exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import app
from ssah.errors import Interrupted, UserError, one_line


@app.command()
def show(
    units_file: Annotated[Path, typer.Argument(help="A units.safetensors written by `ssah units`.")],
    model: Annotated[str | None, typer.Option(help="Check the file against this model.")] = None,
    allow_other_weights: Annotated[bool, typer.Option(help="Accept a model with other weights.")] = False,
) -> None:
    """Summarise a unit file, optionally checking that it belongs to a model."""
    import json

    from ssah.arch import get_adapter
    from ssah.models import load_model
    from ssah.units import GroupShape, UnitSpace, load_unit_sets, read_unit_file_metadata

    meta = read_unit_file_metadata(units_file)
    if model is not None:
        lm = load_model(model, device="cpu")
        space = UnitSpace.from_groups(get_adapter(lm.model).groups(), meta["granularity"], lm.fingerprint, lm.name)  # type: ignore[arg-type]
    else:
        shapes = [GroupShape(int(la), k, int(n), int(c)) for la, k, n, c in json.loads(meta["structure"])]
        space = UnitSpace(shapes, meta["granularity"], meta.get("model_fingerprint"), meta.get("model_name"))  # type: ignore[arg-type]
    sets = load_unit_sets(units_file, space, allow_other_weights=allow_other_weights)
    typer.echo(
        f"{units_file}: {space.total} units of {meta.get('model_name') or '?'} ({meta['granularity']} granularity)"
    )
    for key in ("rule", "shares", "metric"):
        if meta.get(key):
            typer.echo(f"{key}: {meta[key]}")
    for name, s in sets.items():
        typer.echo(f"{name:>6}: {len(s):>8} units ({100 * s.fraction:.2f}%)")


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Registry name, model folder, config.json, .gguf file or hub id.")],
    plan: Annotated[
        bool, typer.Option(help="Memory plan of every command from the config alone (no weights are read).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --plan: print the plan as JSON.")] = False,
    dtype: Annotated[str, typer.Option(help="With --plan: comma list of dtypes.")] = "float32,bfloat16",
    seq_len: Annotated[int, typer.Option(help="With --plan: tokens per example for units / train.")] = 512,
    prompt_len: Annotated[int, typer.Option(help="With --plan: prompt tokens for generation.")] = 256,
    new_tokens: Annotated[int, typer.Option(help="With --plan: generated tokens per reply.")] = 64,
    batch_size: Annotated[int, typer.Option(help="With --plan: batch size of the totals.")] = 8,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights (can run code).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
) -> None:
    """Show a model's family, layers, heads and unit counts; with --plan, the memory each command needs."""
    from ssah.arch import get_adapter
    from ssah.models import load_model

    if plan:
        import json

        from ssah.plan import format_plan
        from ssah.plan import plan as make_plan

        dtypes = tuple(d.strip() for d in dtype.split(",") if d.strip())
        if min(seq_len, prompt_len, new_tokens, batch_size) < 1:
            raise UserError("--seq-len, --prompt-len, --new-tokens and --batch-size must be at least 1")
        from ssah.registry import memory_rows

        p = make_plan(
            model,
            dtypes=dtypes,
            commands=memory_rows(),
            seq_len=seq_len,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            batch_size=batch_size,
        )
        typer.echo(json.dumps(p, indent=2) if json_out else format_plan(p))
        return

    lm = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device="cpu")
    adapter = get_adapter(lm.model)
    groups = adapter.groups()
    attn = [g for g in groups if g.kind == "attn"]
    typer.echo(f"model: {lm.name} ({lm.source})")
    typer.echo(f"family: {adapter.family}, layers: {adapter.num_layers}, fingerprint: {lm.fingerprint}")
    if attn:
        g = attn[0]
        typer.echo(f"attention: {g.num_heads} query heads, {g.num_kv_heads} kv heads, head size {g.head_dim}")
    n_attn = sum(g.size for g in attn)
    n_mlp = sum(g.size for g in groups if g.kind == "mlp")
    typer.echo(f"units: {n_attn + n_mlp} ({n_attn} attention channels, {n_mlp} MLP neurons)")
    typer.echo(f"loaded in {lm.load_seconds:.2f} s")


@app.command("models")
def list_models() -> None:
    """List the registry names ssah can load without a path."""
    from ssah.models import registry_names

    for name in registry_names():
        typer.echo(name)


@app.command("configs")
def configs(
    name: Annotated[str | None, typer.Argument(help="A recipe (list its configs) or RECIPE/NAME (print one).")] = None,
) -> None:
    """List the shipped configs (use one as `ssah RECIPE --config NAME`), or print one."""
    from ssah.registry import shipped_config_text, shipped_configs

    shipped = shipped_configs()
    if name is not None and "/" in name:
        recipe, _, config = name.partition("/")
        typer.echo(shipped_config_text(recipe.replace("-", " "), config), nl=False)
        return
    if name is not None and name not in shipped:
        raise UserError(f"no shipped configs for {name!r}: the recipes with some are {', '.join(shipped)}")
    for recipe, names in shipped.items():
        for config, about in names.items():
            if name in (None, recipe):
                typer.echo(f"{recipe.replace(' ', '-') + '/' + config:<18} {about}")


import ssah.commands  # noqa: E402,F401  (registers the experiment commands defined in ssah/commands/)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning bad input into a one-line error and exit code 2."""
    logging.basicConfig(level=os.environ.get("SSAH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="ssah", standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        return 2
    except (Interrupted, KeyboardInterrupt):
        typer.echo("interrupted (Ctrl-C): stopped; no partial run folder was left behind", err=True)
        return 130
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except typer.TyperException as exc:  # click's usage errors (typer vendors click): bad option, unknown command
        fmt = getattr(exc, "format_message", None)
        message = fmt() if callable(fmt) else str(exc)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None and getattr(ctx, "command_path", None) else "ssah"
        typer.echo(f"error: {one_line(message)}; see {where} --help", err=True)
        return int(getattr(exc, "exit_code", 2) or 2)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
