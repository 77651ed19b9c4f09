"""The `ssah` Typer app and the command generator: every recipe's command is built from its config class.

A registered recipe (:mod:`ssah.registry`) names a pydantic config; :func:`recipe_command` gives each field a
``--flag-name`` (type from the annotation, help from ``Field(description=...)``, default shown from the field), plus
``--config NAME|FILE`` (a shipped config, see ``ssah configs``, or a YAML file), ``--quick`` (shorthand for
``--config quick``) and trailing ``key=value`` overrides. Values are combined by :meth:`BaseConfig.resolve`:
class defaults < config < flags < overrides. No option is declared here, so none can drift from its config.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic.fields import FieldInfo
from typer.core import TyperCommand, TyperGroup

from ssah.errors import Interrupted, UserError


class RecipeGroup(TyperGroup):
    """A command group that adds a generated command for every recipe named ``<prefix><command>``."""

    prefix = ""

    def _recipes(self) -> dict[str, Any]:
        from ssah.registry import recipes

        p = self.prefix
        return {n[len(p) :]: r for n, r in recipes().items() if n.startswith(p) and " " not in n[len(p) :]}

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._recipes()})

    def invoke(self, ctx: Any) -> Any:
        """Run the command; Ctrl-C becomes :class:`Interrupted`, which the CLI reports on one line (Typer would turn
        a KeyboardInterrupt into a silent exit code 130)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = super().get_command(ctx, cmd_name)
        recipes = self._recipes()
        if found is None and cmd_name in recipes:
            found = _LazyCommand(cmd_name, recipes[cmd_name])
        return found


class _LazyCommand(TyperCommand):
    """A recipe's command whose options are generated on first use, so that listing the commands (``ssah
    --help``) imports no recipe (and no torch)."""

    def __init__(self, name: str, recipe: Any) -> None:
        self._recipe, self._loaded = recipe, None
        super().__init__(name=name, help=recipe.help)

    def _real(self) -> Any:
        if self._loaded is None:
            sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
            sub.command(self.name, help=self._recipe.help)(recipe_command(self._recipe))
            self._loaded = typer.main.get_command(sub)
        return self._loaded

    params = property(lambda self: self._real().params, lambda self, value: None)  # type: ignore[assignment]
    callback = property(lambda self: self._real().callback, lambda self, value: None)  # type: ignore[assignment]


app = typer.Typer(
    cls=RecipeGroup,
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


def _plain(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation admits, ``None`` and ``Annotated`` stripped (``int | None`` -> (int,))."""
    if typing.get_origin(annotation) is Annotated:
        return _plain(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(annotation) if a is not type(None) for t in _plain(a))
    return (annotation,)


_OWN = object()  # "the field's own default" (a section's default instance may hold None)


def _option(
    name: str, field: FieldInfo, default: Any = _OWN, panel: str | None = None
) -> tuple[Any, typer.models.OptionInfo]:
    """The CLI type and Typer option of one config field; structured values are passed as text, which the
    field's validators read (``--shares scu=0.01``, ``--dose 1%,5%``, ``--lora r=8``). ``name`` is the dotted key
    (``eval.limit`` -> ``--eval-limit``); ``default`` the value shown, when not the field's own (a section's)."""
    kinds = _plain(field.annotation)
    kind = kinds[0] if len(kinds) == 1 else str
    flag = _flag(name, field)
    if kind is bool:
        cli: Any = bool
        flag = flag if "/" in flag else f"{flag}/--no-{flag.removeprefix('--')}"
    elif kind in (int, float, str):
        cli = kind
    elif typing.get_origin(kind) in (list, tuple, dict):  # repeatable; dict items as key=value
        cli = list[str]
    else:
        cli = str
    default = field.get_default(call_default_factory=True) if default is _OWN else default
    shown = default if not isinstance(default, bool) else (flag.split("/")[0] if default else flag.split("/")[1])
    show = (
        json.dumps(shown)
        if isinstance(shown, dict | list) and shown
        else (str(shown) if shown not in (None, "", {}, []) else None)
    )
    help_ = field.description or ""
    return cli | None, typer.Option(flag, help=help_, show_default=show or False, rich_help_panel=panel)


def _flag(name: str, field: FieldInfo) -> str:
    """``--flag-name`` of a (dotted) key, or the field's own ``flag``; a section's key is its prefix."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    *section, leaf = name.split(".")
    flag = str(extra.get("flag") or f"--{leaf.replace('_', '-')}")
    return "/".join(f"--{'-'.join(section)}-{f.removeprefix('--')}" for f in flag.split("/")) if section else flag


def _fields(cls: Any) -> list[tuple[str, str, FieldInfo, Any, str | None]]:
    """(parameter name, dotted key, field, default shown, help panel) of every generated option: each plain field,
    and each field of a section (``eval`` -> ``eval.limit`` as parameter ``eval__limit``, shown in its own panel,
    its default from the recipe's default instance). Two fields with one flag are a programming error."""
    from ssah.config import sections

    nested = sections(cls)
    skip = set(cls.cli_arguments) | set(cls.cli_skip())
    out: list[tuple[str, str, FieldInfo, Any, str | None]] = []
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        if name not in nested:
            out.append((name, name, field, _OWN, None))
            continue
        section = field.get_default(call_default_factory=True)
        panel = f"{nested[name][1].title or name.capitalize()} ({name}.KEY)"
        for sub, subfield in nested[name][1].model_fields.items():
            out.append((f"{name}__{sub}", f"{name}.{sub}", subfield, getattr(section, sub, _OWN), panel))
    flags = [_flag(key, f).split("/")[0] for _, key, f, _, _ in out]
    twice = sorted({f for f in flags if flags.count(f) > 1})
    if twice:
        raise RuntimeError(f"{cls.__name__}: two config fields give the flag {twice[0]}: rename one")  # a bug
    return out


def recipe_command(recipe: Any) -> Callable[..., None]:
    """The Typer command function of a recipe, its parameters generated from the recipe's config class."""
    from ssah.registry import shipped_configs

    cls = recipe.config_class()
    shipped = shipped_configs().get(recipe.name, {})
    positional = cls.cli_arguments
    params = []
    kw = inspect.Parameter.KEYWORD_ONLY
    what = " ".join(f"[{p.upper()}{'...' if _is_list(cls, p) else ''}]" for p in positional)
    args_help = f"{what + ' then ' if what else ''}key=value overrides (dotted for nested fields), e.g. seeds=7"
    params.append(
        inspect.Parameter(
            "args_",
            kw,
            default=None,
            annotation=Annotated[list[str] | None, typer.Argument(help=args_help, metavar="ARGS")],
        )
    )
    for param, key, field, default, panel in _fields(cls):
        cli, opt = _option(key, field, default, panel)
        params.append(inspect.Parameter(param, kw, default=None, annotation=Annotated[cli, opt]))
    names = ", ".join(shipped) or "none shipped"
    params.append(
        inspect.Parameter(
            "config_",
            kw,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option("--config", help=f"A shipped config ({names}; see `ssah configs`) or a YAML file."),
            ],
        )
    )
    if "quick" in shipped and "quick" not in cls.model_fields:
        about = shipped["quick"]
        params.append(
            inspect.Parameter(
                "quick_",
                kw,
                default=False,
                annotation=Annotated[bool, typer.Option("--quick", help=f"--config quick: {about}")],
            )
        )

    def command(**values: Any) -> None:
        args, config, quick = values.pop("args_") or [], values.pop("config_"), values.pop("quick_", False)
        if quick:
            if config is not None:
                raise UserError("give --quick or --config, not both (--quick is --config quick)")
            config = "quick"
        flags: dict[str, Any] = {}
        for k, v in values.items():
            if v is not None and v != []:
                *parent, leaf = k.split("__")  # a section's field (eval__limit) goes under its key (eval.limit)
                (flags.setdefault(parent[0], {}) if parent else flags)[leaf] = v
        given = [a for a in args if "=" not in a]
        if positional and given:
            many = _is_list(cls, positional[0])
            flags[positional[0]] = given if many else given[0]
            given = [] if many else given[1:]
        if given:
            raise UserError(
                f"override {given[0]!r} is not key=value: write e.g. seeds=7 (see ssah {recipe.name} --help)"
            )
        cfg = cls.resolve(recipe.name, config, flags, [a for a in args if "=" in a])
        recipe.summarize(_run_holding_out(recipe, cfg))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = recipe.help
    return command


def _run_holding_out(recipe: Any, cfg: Any) -> Any:
    """Run a recipe holding its ``--out`` folder's lock from the start (a second run into the same folder stops at
    once, before loading anything), unless the recipe takes the lock itself."""
    out = getattr(cfg, "out", None)
    if recipe.locks_itself or not isinstance(out, str):
        return recipe.runner()(cfg)
    from ssah.runs import held_output

    with held_output(out, bool(getattr(cfg, "overwrite", False))):
        return recipe.runner()(cfg)


def _is_list(cls: Any, name: str) -> bool:
    return any(typing.get_origin(t) is list for t in _plain(cls.model_fields[name].annotation))
