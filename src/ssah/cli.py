"""`ssah <command>`: each command is one experiment recipe, configured by options or a YAML ``--config``.

Options given on the command line win over the config file. Bad input ends with a one-line ``error:``
message and exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ssah.cliutil import (
    AllowPickleOpt,
    BatchSizeOpt,
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
    SharesOpt,
    TrustRemoteCodeOpt,
    app,
    build_config,
    options,
)
from ssah.errors import UserError


@app.command()
def units(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/units",
    safety: Annotated[
        str, typer.Option(help="Safety calibration set: builtin:NAME or a CSV/JSON/JSONL file.")
    ] = "builtin:safety",
    utility: Annotated[
        str, typer.Option(help="Utility calibration set: builtin:NAME or a CSV/JSON/JSONL file.")
    ] = "builtin:utility",
    column: ColumnOpt = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples of each set.")] = None,
    metric: Annotated[str, typer.Option(help="fluctuation | wanda | snip | taylor | magnitude")] = "fluctuation",
    rule: Annotated[str, typer.Option(help="ssah | pruning-sets | wei-set-difference")] = "ssah",
    shares: SharesOpt = None,
    normalization: Annotated[
        str,
        typer.Option(
            help="mean (over all units) | module-mean | zscore | rank (these three per layer-kind module) "
            "| global-rank | none"
        ),
    ] = "zscore",
    ranking: Annotated[str, typer.Option(help="global | per-module")] = "global",
    granularity: Annotated[str, typer.Option(help="neuron | head")] = "neuron",
    tokens: Annotated[
        str, typer.Option(help="Tokens counted: prompt+response | response | prompt | all")
    ] = "prompt+response",
    batch_size: BatchSizeOpt = "8",
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    stability: Annotated[bool, typer.Option(help="Also report SCU overlap between two disjoint data halves.")] = False,
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
    """Score every unit on safety and utility data and split them into SCU / UCU / CU / RU."""
    from ssah.experiments.units import UnitsConfig, run_units

    values = options(ctx, dict(locals()))
    cfg = build_config(UnitsConfig, config, model, values)
    path = run_units(cfg)
    _print_units_summary(path)


@app.command("eval")
def eval_(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write.")] = "runs/eval",
    harmful: Annotated[
        str, typer.Option(help="Harmful prompts: builtin:NAME, a preset (advbench, harmbench, ...), a file, or none.")
    ] = "builtin:harmful",
    benign: Annotated[
        str, typer.Option(help="Safe prompts for over-refusal: builtin:borderline, xstest, a file, or none.")
    ] = "builtin:borderline",
    utility: Annotated[
        list[str] | None,
        typer.Option(help="perplexity[:SPEC] | piqa | mc:FILE | gsm8k[:FILE] | none (repeatable)."),
    ] = None,
    prefill: Annotated[
        str, typer.Option(help="Compliance opener for the prefill attack ('' to skip).")
    ] = "Sure, here is",
    judge: Annotated[str, typer.Option(help="keyword[:PRESET] | classifier:PATH | guard:PATH | first-token")] = (
        "keyword:ssah"
    ),
    first_token: Annotated[bool, typer.Option(help="Also report the first-token refusal score's agreement.")] = True,
    column: ColumnOpt = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N items of each set.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per reply.")] = 64,
    batch_size: BatchSizeOpt = "16",
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
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
    """Attack success rate, over-refusal, prefill attack and utility of a model."""
    from ssah.experiments.eval import EvalConfig, run_eval

    values = options(ctx, dict(locals()))
    cfg = build_config(EvalConfig, config, model, values)
    path = run_eval(cfg)
    _print_eval_summary(path)


@app.command()
def train(
    ctx: typer.Context,
    model: ModelArg = None,
    out: Annotated[str, typer.Option(help="Run folder to write (built in OUT.partial while training).")] = (
        "runs/train"
    ),
    data: Annotated[
        str, typer.Option(help="Training data with responses: builtin:NAME, a preset, hf:NAME or a file.")
    ] = "builtin:task",
    column: Annotated[list[str] | None, typer.Option(help="Map a column, e.g. response=output (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N examples.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (default: the template's).")] = None,
    freeze: Annotated[
        str | None,
        typer.Option(
            help="Keep units bit-identical: UNITS_FILE:SCU,CU@6% (SCU + 6% of ALL units from CU by safety rank, the "
            "paper's ~7.5%); CU@6%cu = 6% of CU."
        ),
    ] = None,
    only: Annotated[str | None, typer.Option(help="Train only these units: UNITS_FILE:RU.")] = None,
    gqa: Annotated[
        str,
        typer.Option(help="Shared GQA value rows: any (in the set if any of its channels is) | strict (if all are)."),
    ] = "any",
    lora: Annotated[
        str | None, typer.Option(help="Train LoRA adapters instead: r=8[,alpha=16,dropout=0.05,targets=q_proj+v_proj].")
    ] = None,
    allow_other_weights: Annotated[
        bool, typer.Option(help="Accept a unit file computed on other weights of the same architecture.")
    ] = False,
    freeze_embeddings: Annotated[bool, typer.Option(help="Keep the input embeddings (and a tied head) fixed.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data (default 1 unless --max-steps).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after N optimizer steps.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-5,
    batch_size: Annotated[int, typer.Option(help="Examples per micro-batch (per process).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    warmup: Annotated[int, typer.Option(help="Warmup steps.")] = 0,
    schedule: Annotated[str, typer.Option(help="linear | cosine | constant")] = "linear",
    max_grad_norm: Annotated[float | None, typer.Option(help="Clip gradients to this norm (0: no clipping).")] = 1.0,
    bf16: Annotated[bool, typer.Option(help="bfloat16 mixed precision.")] = False,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    checkpoint_every: Annotated[int | None, typer.Option(help="Write a checkpoint every N steps.")] = None,
    keep_checkpoints: Annotated[bool, typer.Option(help="Keep every checkpoint, not just the last.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue OUT.partial from its newest checkpoint.")] = False,
    fsdp: Annotated[
        bool, typer.Option(help="Shard with FSDP2 (per decoder block) across the processes of torchrun/accelerate.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed (weights of new layers, data order, dropout).")] = 0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Fine-tune a model: all parameters, all but frozen units, only some units, or LoRA adapters."""
    from ssah.experiments.train import run_train
    from ssah.train import TrainConfig, parse_lora

    values = options(ctx, dict(locals()))
    if values.get("lora") is not None:
        values["lora"] = parse_lora(values["lora"]).model_dump()
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    cfg = build_config(TrainConfig, config, model, values)
    path = run_train(cfg)
    _print_train_summary(path)


@app.command()
def align(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="The base model to align (registry name, folder, ...).")] = None,
    out: Annotated[
        str, typer.Option(help="Run folder to write; the aligned model goes to OUT/model.")
    ] = "runs/aligned",
    harmful: Annotated[str, typer.Option(help="Harmful requests with refusal responses.")] = "builtin:safety",
    borderline: Annotated[
        str, typer.Option(help="Borderline-safe requests (sound unsafe, are not) with helpful answers.")
    ] = "builtin:borderline_sft",
    benign: Annotated[str, typer.Option(help="Ordinary instructions with answers.")] = "builtin:utility",
    borderline_ratio: Annotated[float, typer.Option(help="Share of borderline-safe examples in the SFT mix.")] = 0.4,
    benign_ratio: Annotated[float, typer.Option(help="Share of ordinary examples in the SFT mix.")] = 0.3,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-5,
    freeze_embeddings: Annotated[bool, typer.Option(help="Keep the embeddings fixed.")] = True,
    eval_harmful: Annotated[str, typer.Option(help="Held-out harmful prompts.")] = "builtin:harmful",
    eval_borderline: Annotated[str, typer.Option(help="Held-out borderline-safe prompts.")] = "builtin:borderline",
    eval_benign: Annotated[
        str, typer.Option(help="Held-out ordinary prompts (with checkable answers).")
    ] = "builtin:benign",
    eval_extra_safe: Annotated[
        str | None, typer.Option(help="Another safe set for over-refusal, e.g. xstest (default: none).")
    ] = None,
    eval_limit: Annotated[
        int | None, typer.Option(help="Prompts per held-out set, a stratified sample (default: all).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per evaluation reply.")] = 48,
    judge: Annotated[str, typer.Option(help="Refusal judge.")] = "keyword:ssah",
    cache: Annotated[bool, typer.Option(help="Reuse / store the aligned model in $SSAH_CACHE/aligned.")] = True,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    config: ConfigOpt = None,
) -> None:
    """Make an aligned model by a short safety SFT (cached), with refusal and over-refusal before and after."""
    import json

    from ssah.experiments.align import AlignConfig, run_align

    values = options(ctx, dict(locals()))
    cfg = build_config(AlignConfig, config, model, values)
    path = run_align(cfg)
    res = json.loads((path / "results.json").read_text())
    b, a = res["before"], res["after"]
    for key, what in (
        ("refusal", "refusal on held-out harmful"),
        ("borderline_overrefusal", "over-refusal on held-out borderline-safe"),
        ("overrefusal", "over-refusal on held-out benign"),
    ):
        typer.echo(f"{what}: {100 * b[key]['rate']:.1f}% -> {100 * a[key]['rate']:.1f}%")
    typer.echo(f"wrote {path} (aligned model in {path / 'model'}) in {res['seconds']:.1f} s")


def _print_train_summary(path: Path) -> None:
    import json

    results = path / "results.json"
    if not results.is_file():  # not the main process of a distributed run
        return
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    res = json.loads(results.read_text())
    tr = res["trainable"]
    typer.echo(
        f"trained {res['model']['name']} ({res['mode']}): {res['steps']} steps, loss {res['first_loss']:.4f} -> "
        f"{res['final_loss']:.4f}, {tr['params']} of {tr['total']} parameters trained ({100 * tr['share']:.2f}%)"
    )
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s (model in {path / 'model'})")


def _print_eval_summary(path: Path) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    from ssah.experiments.eval import summary_rows

    res = json.loads((path / "results.json").read_text())
    table = Table(title=f"{res['model']['name']} (judge {res['judge_spec']})")
    for col in ("measure", "value", "95% interval", "n"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for row in summary_rows(res):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


def _print_units_summary(path: Path) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    res = json.loads((path / "results.json").read_text())
    table = Table(title=f"{res['model']['name']}: {res['model']['units_total']} units ({res['metric']}, {res['rule']})")
    for col in ("category", "units", "share", "attention", "MLP"):
        table.add_column(col, justify="right" if col != "category" else "left")
    for c, v in res["categories"].items():
        table.add_row(
            c,
            str(v["count"]),
            f"{100 * v['fraction']:.2f}%",
            str(res["by_kind"][c]["attn"]),
            str(res["by_kind"][c]["mlp"]),
        )
    console = Console(stderr=False)
    console.print(table)
    if res.get("stability"):
        console.print(
            f"SCU overlap between data halves (Jaccard): {res['stability']['SCU']['jaccard']:.3f} "
            f"(chance {res['stability']['SCU']['chance']:.3f})"
        )
    console.print(f"wrote {path} in {res['seconds']['total']:.1f} s")


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
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
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
        p = make_plan(
            model,
            dtypes=dtypes,
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


import ssah.commands  # noqa: E402,F401  (registers the experiment commands defined in ssah/commands/)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning bad input into a one-line error and exit code 2."""
    logging.basicConfig(level=os.environ.get("SSAH_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    command = typer.main.get_command(app)
    try:
        rc = command.main(args=argv, prog_name="ssah", standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
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
        typer.echo(f"error: {' '.join(message.split())}; see {where} --help", err=True)
        return int(getattr(exc, "exit_code", 2) or 2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
