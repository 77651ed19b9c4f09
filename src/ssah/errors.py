"""Exceptions. A ``UserError`` is bad input: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations


class SsahError(Exception):
    """Base class of every error ssah raises on purpose."""


class UserError(SsahError):
    """Bad input that the user can fix; the message names the problem and the fix, on one line."""


class DataError(UserError):
    """A data file or data spec that cannot be read as a prompt set."""


class ModelError(UserError):
    """A model that cannot be found, loaded or handled."""


class UnsupportedModelError(ModelError):
    """A model family that ssah has no architecture adapter for."""


class UnitFileError(UserError):
    """A unit or score file that does not belong to the model at hand, or is malformed."""


class Interrupted(SsahError):
    """Ctrl-C during a command (the CLI prints one line and exits with code 130); not a KeyboardInterrupt, so the
    CLI framework (which turns a KeyboardInterrupt into a silent exit code) lets it through."""


MESSAGE_LIMIT = 400  # characters of an error line: a bad value is quoted, never printed whole


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` on one line (runs of whitespace, newlines included, become one space), cut to ``limit`` characters
    with a note of how much was left out: an alias bomb or a megabyte of JSON in a value never floods the terminal."""
    flat = " ".join(str(text).split())
    if len(flat) <= limit:
        return flat
    cut = limit - 40
    return f"{flat[:cut]}... ({len(flat) - cut} more characters)"
