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
