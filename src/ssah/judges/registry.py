"""The judge registry: :func:`register_judge`, the one call that adds a kind of judge (every built-in kind makes it
at the end of its module), and :func:`get_judge`, which builds a judge from a spec ``kind[:argument]``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssah.errors import UserError
from ssah.judges.base import Judge
from ssah.plugins import Registry
from ssah.validate import quote

__all__ = [
    "JUDGES",
    "JudgeKind",
    "check_judge_spec",
    "get_judge",
    "judge_specs",
    "register_judge",
    "register_model_judge",
]

CONTEXT = ("model", "tokenizer")  # what evaluation passes to every judge: the model under evaluation


@dataclass(frozen=True)
class JudgeKind:
    """A registered kind of judge: its ``factory`` (called with the spec's argument first, when the spec has one,
    then keyword options), the name of that ``argument`` in help texts (``""``: none is shown), whether it
    ``needs_argument``, which of ``model`` / ``tokenizer`` (the model under evaluation) it gets (``context``;
    None: those its signature names) and ``check``, which refuses a bad argument without loading anything."""

    factory: Callable[..., Judge]
    argument: str = ""
    needs_argument: bool = False
    context: tuple[str, ...] | None = None
    check: Callable[[str | None], object] | None = None

    def forms(self, name: str) -> list[str]:
        """How a spec of this kind is written: ``keyword``, ``keyword:<preset>``."""
        short = [] if self.needs_argument else [name]
        return short + ([f"{name}:<{self.argument}>"] if self.argument else [])


JUDGES: Registry[JudgeKind] = Registry("judge")
"""Every kind of judge by name (live: a registered judge is valid wherever a judge spec is read)."""


def register_judge(
    name: str,
    factory: Callable[..., Judge],
    *,
    argument: str = "",
    needs_argument: bool = False,
    context: tuple[str, ...] | None = None,
    check: Callable[[str | None], object] | None = None,
    about: str = "",
) -> None:
    """Make ``get_judge(name, **kwargs)`` (or ``get_judge("name:arg")``, passing ``arg`` first) call ``factory``
    (see :class:`JudgeKind` for the options). Registering a user's name again replaces its factory; a built-in kind
    cannot be replaced."""
    if not callable(factory):
        raise UserError(f"judge factory for {name!r} is not callable: pass a class or a function returning a judge")
    JUDGES.register(name, JudgeKind(factory, argument, needs_argument, context, check), about=about)


def register_model_judge(name: str, cls: Callable[..., Judge], *, about: str = "") -> None:
    """Register a kind whose spec names the judge's own model, ``name:<path>`` (a folder or hub id), built by
    ``cls(path, **options)``; the model under evaluation is not passed to it."""

    def named(path: str | None) -> None:
        if not path:
            raise UserError(f"judge spec {name!r} names no model: use {name}:<folder or hub id>")

    def factory(path: str = "", **options: Any) -> Judge:
        named(path)
        return cls(path, **options)

    register_judge(name, factory, argument="path", needs_argument=True, context=(), check=named, about=about)


def judge_specs(sep: str = ", ") -> str:
    """Every valid way to write a judge spec, from the registry (for help texts and errors)."""
    return sep.join(form for name in JUDGES for form in JUDGES.get(name).forms(name))


def _kind(spec: str) -> tuple[str, JudgeKind, tuple[str, ...]]:
    """The kind's name and registration and the positional arguments of a spec, or the error listing the specs."""
    spec = (spec or "").strip()
    name, colon, arg = spec.partition(":")
    if name not in JUDGES:
        raise UserError(f"unknown judge {quote(spec)}: use one of {judge_specs()}")
    return name, JUDGES.get(name), (arg,) if colon else ()


def check_judge_spec(spec: str) -> None:
    """Fail now, before any data or model is loaded, on a judge spec that can never work: an unknown kind, or an
    argument the kind's ``check`` refuses (an unknown keyword preset, a threshold that is not a number)."""
    _, kind, args = _kind(spec)
    if kind.check is not None:
        kind.check(args[0] if args else None)


def _build(name: str, factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a judge factory, turning unexpected options into a UserError."""
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise UserError(
                f"judge {name!r} does not take the options {sorted(kwargs)} ({exc}): drop them or check their names"
            ) from exc
        raise


def _accepted(kind: JudgeKind, context: dict[str, Any]) -> dict[str, Any]:
    """The context keyword arguments (model, tokenizer) the kind takes: those it declared, or those the factory's
    signature accepts."""
    if kind.context is not None:
        return {k: v for k, v in context.items() if k in kind.context}
    try:
        params = inspect.signature(kind.factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


def get_judge(spec: str, **kwargs: Any) -> Judge:
    """A judge from a spec ``kind`` or ``kind:<argument>`` (the argument, the text after the first ``:``, passed
    first), for every registered kind; the built-ins: ``keyword`` (= ``keyword:ssah``), ``keyword:<preset>``,
    ``classifier:<path or hub id>``, ``guard:<path or hub id>``, ``first-token[:<threshold>]`` (needs ``model=``
    and ``tokenizer=``), ``learned`` (the shipped learned judge) or ``learned:<folder>`` (one made by
    `ssah judge train`). ``model``/``tokenizer`` (the model under evaluation) go only to judges that take them;
    other keyword arguments go to the judge's factory."""
    name, kind, args = _kind(spec)
    context = {k: kwargs.pop(k) for k in CONTEXT if k in kwargs}
    judge = _build(name, kind.factory, args, {**_accepted(kind, context), **kwargs})
    if not isinstance(judge, Judge):
        raise UserError(f"judge factory {name!r} returned {type(judge).__name__}, which has no name and judge()")
    return judge
