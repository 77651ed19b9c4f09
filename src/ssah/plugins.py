"""Plug-in registries: one generic :class:`Registry` of named values, reused by every kind of plug-in.

Each kind has one registry, next to its public ``register_*`` call: judges (:func:`ssah.judges.register_judge`),
importance metrics (:func:`ssah.metrics.register_metric`), categorisation rules and score normalisations
(:func:`ssah.rules.register_rule`, :func:`ssah.rules.register_normalization`) and keyword presets
(:func:`ssah.judges.register_keyword_preset`). The built-ins register through that same call, one file each, and
their package then calls :meth:`Registry.seal` so that a user cannot replace them by accident; a user's name can be
registered again (the newer value wins). Every list of names, every help text and every error's list of choices is
read from the registry, so a registered name is valid everywhere a built-in one is.

A user's plug-ins reach the CLI through the entry-point group ``ssah.plugins`` (``[project.entry-points.
"ssah.plugins"] mine = "my_pkg.plugins"``): the first read of any registry imports each named module once
(:func:`load_plugins`), and the module's own ``register_*`` calls do the rest; a program may instead import its
plug-ins itself.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from ssah.errors import UserError
from ssah.validate import quote

__all__ = ["Entry", "Registry"]

T = TypeVar("T")
_NAME = re.compile(r"[\w.\-+]+")


ENTRY_POINTS = "ssah.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module of the ``ssah.plugins`` entry-point group, once per process (their ``register_*``
    calls add them). A plug-in that fails to import is logged and skipped: it must not stop ssah."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before importing: a plug-in that reads a registry must not load the group again
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as exc:  # a user's broken plug-in must not stop ssah
            logging.getLogger(__name__).warning("cannot load plug-in entry point %s: %s", ep.value, exc)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered plug-in: its name, its value (a class, a function or a settings object), a line about it,
    and whether it ships with ssah."""

    name: str
    value: T
    about: str = ""
    builtin: bool = False


class Registry(Sequence[str], Generic[T]):
    """Named plug-ins of one ``kind`` (``"metric"``, ``"judge"`` ...), in registration order, with aliases.

    As a sequence it is the live tuple of valid names (:meth:`names`): ``name in METRICS``, ``", ".join(RULES)``
    and ``for n in NORMALIZATIONS`` always see what is registered now."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, value: T, *, about: str = "", aliases: tuple[str, ...] = ()) -> T:
        """Add ``value`` under ``name`` (and ``aliases``); returns ``value``, so it also works as a decorator's
        body. A name: letters, digits, ``_ - . +``, no ``:``. Registering a user's name again replaces it;
        a built-in name cannot be replaced (a one-line :class:`UserError`)."""
        for key in (name, *aliases):
            self._check_name(key)
        self._entries[name] = Entry(name, value, " ".join(about.split()))
        self._aliases = {a: t for a, t in self._aliases.items() if a != name}
        for alias in aliases:
            self._aliases[alias] = name
        return value

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(
                f"invalid {self.kind} name {quote(name)}: use letters, digits, '_', '-', '+' or '.' without ':'"
            )
        taken = self._entries.get(self._aliases.get(name, name))
        if taken is not None and taken.builtin:
            raise UserError(
                f"{self.kind} name {name!r} names a built-in kind of {self.kind}: register yours under another name"
            )

    def seal(self) -> None:
        """Mark every name registered so far as built-in (the package calls this once its built-ins are in)."""
        self._entries = {k: Entry(e.name, e.value, e.about, True) for k, e in self._entries.items()}

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Registrations made inside the block are undone on leaving it (for tests and one-off experiments)."""
        entries, aliases = dict(self._entries), dict(self._aliases)
        try:
            yield self
        finally:
            self._entries, self._aliases = entries, aliases

    # --- reading -------------------------------------------------------------------------------------------------

    def names(self) -> tuple[str, ...]:
        """Every valid name: the registered ones in registration order, then the aliases."""
        load_plugins()
        return (*self._entries, *self._aliases)

    def builtin_names(self) -> tuple[str, ...]:
        """The names that ship with ssah (not their aliases)."""
        return tuple(k for k, e in self._entries.items() if e.builtin)

    def user_names(self) -> list[str]:
        """The names a user registered, sorted."""
        load_plugins()
        return sorted(k for k, e in self._entries.items() if not e.builtin)

    def aliases(self) -> dict[str, str]:
        """Alias -> the name it stands for."""
        return dict(self._aliases)

    def canonical(self, name: str) -> str:
        """``name`` with an alias resolved (unknown names come back unchanged)."""
        return self._aliases.get(name, name)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return isinstance(name, str) and self.canonical(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries) + len(self._aliases)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self.names()[index]

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name`` (aliases resolved), or a one-line :class:`UserError` listing the choices."""
        load_plugins()
        found = self._entries.get(self.canonical(name)) if isinstance(name, str) else None
        if found is None:
            raise UserError(self.unknown(name))
        return found

    def get(self, name: str) -> T:
        """The value registered under ``name``, or a one-line :class:`UserError` listing the choices."""
        return self.entry(name).value

    def check(self, name: str) -> str:
        """``name`` if it is registered, else a one-line :class:`UserError` listing the choices."""
        self.entry(name)
        return name

    def about(self, name: str) -> str:
        """The line registered with ``name``; an alias says what it stands for."""
        if name in self._aliases:
            return f"alias of {self._aliases[name]}"
        return self.entry(name).about

    def abouts(self) -> dict[str, str]:
        """Name -> its line, for every name (aliases included), in :meth:`names` order."""
        return {n: self.about(n) for n in self.names()}

    def choices(self, sep: str = ", ") -> str:
        """The valid names joined by ``sep``, for help texts and errors."""
        return sep.join(self.names())

    def unknown(self, name: Any) -> str:
        """The one-line message for a name that is not registered."""
        return f"unknown {self.kind} {quote(name)}: use one of {self.choices()}"

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.choices()})"
