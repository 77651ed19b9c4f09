"""What every judge shares: the :class:`Verdict` it returns, the :class:`Judge` protocol, and the loading checks of
the judges that run a model of their own (a module of its own so that the judge modules import it without
importing each other or the package)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ssah.errors import ModelError, UserError

__all__ = ["Judge", "Verdict", "check_pairs", "judge_model", "read_config"]


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


def judge_model(
    kind: str, path: str | None, model: Any, tokenizer: Any, load: Callable[[str], tuple[Any, Any]]
) -> tuple[Any, Any]:
    """A model judge's model and tokenizer: both given, or loaded from ``path``; a one-line UserError otherwise."""
    if model is None:
        if not path:
            raise UserError(f"a {kind} judge needs a model: pass {kind}:<folder or hub id>")
        return load(path)
    if tokenizer is None:
        raise UserError(f"a {kind} judge given a model also needs its tokenizer: pass tokenizer=")
    return model, tokenizer


def read_config(path: str) -> Any:
    """The model config of a folder or hub id, or a one-line ModelError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load judge model {path!r}: {first}; pass a model folder or a hub id available offline"
        ) from exc
