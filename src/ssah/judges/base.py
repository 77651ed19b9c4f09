"""What every judge shares: the :class:`Verdict` it returns and the :class:`Judge` protocol (a module of its own so
that the judges and :mod:`ssah.judges.learned` import it without importing each other)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ssah.errors import UserError

__all__ = ["Judge", "Verdict", "check_pairs"]


@dataclass(frozen=True)
class Verdict:
    """One judgement: ``refused`` is what every metric uses; ``score`` and ``label`` are judge-specific."""

    refused: bool
    score: float | None = None  # e.g. probability of a harmful completion, first-token log-odds of refusing
    label: str = ""  # e.g. "refusal", "compliance", "safe", "unsafe", a classifier's label name
    detail: str = ""  # e.g. the refusal phrase that matched, or the guard model's raw answer


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and a ``judge`` method returning one verdict per (prompt, output) pair."""

    name: str

    def judge(self, prompts: Sequence[str], outputs: Sequence[str]) -> list[Verdict]: ...


def check_pairs(prompts: Sequence[str], outputs: Sequence[str]) -> None:
    """One output per prompt, or a UserError."""
    if len(prompts) != len(outputs):
        raise UserError(f"got {len(prompts)} prompts and {len(outputs)} outputs: pass one output per prompt")
