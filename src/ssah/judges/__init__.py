"""Judges: decide whether a model's reply to a prompt is a refusal, behind one protocol.

- ``KeywordJudge``: refusal phrases with a match rule (substring, prefix or the reply's opening sentence, case, a
  minimum word count), with named presets shipped as package data (``judges/data/keywords.json``): ``ssah`` and
  ``ssah-prefix`` (ours) and public lists with their sources' own rules, attribution and licence.
- ``LearnedJudge`` (``learned``, ``learned:FOLDER``): a logistic head on a small local model's hidden states,
  trained on human-labelled replies (:mod:`ssah.judges.learned`); the shipped one is in ``judges/data/learned``.
- ``ClassifierJudge``: an HF sequence classifier that labels (prompt, reply) as a harmful completion or not.
- ``GuardJudge``: a causal guard model (LlamaGuard-style prompt) that answers "safe" or "unsafe".
- ``FirstTokenJudge``: refusal vs compliance openers' first-token log-probabilities, one forward pass per batch,
  no generation (for fast sweeps).
- ``is_coherent`` / ``CoherenceCheck``: separates a real answer from a broken, looping, echoed, non-word or
  off-topic output, so that "not refused" can be split into coherent compliance and junk.
- ``judge_agreement(spec)``: the shipped measurement of a judge's agreement with human labels.

``get_judge("keyword:xstest")`` builds one from a spec; ``register_judge`` adds user judges. One module per kind
(``keyword``, ``coherence``, ``classifier``, ``guard``, ``first_token``, ``learned``; ``base`` holds the protocol);
this package holds the registry and the measured agreement, and re-exports every public name.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

from ssah.errors import UserError
from ssah.judges.base import Judge, Verdict

__all__ = [
    "COMPLIANCE_OPENERS",
    "FILLER_WORDS",
    "GUARD_TEMPLATE",
    "HARMFUL_LABELS",
    "JUDGE_KINDS",
    "KEYWORD_ALIASES",
    "KEYWORD_PRESETS",
    "REFUSAL_OPENERS",
    "SSAH_REFUSAL_STRINGS",
    "STOP_WORDS",
    "ClassifierJudge",
    "CoherenceCheck",
    "FirstTokenJudge",
    "GuardJudge",
    "Judge",
    "KeywordJudge",
    "LearnedJudge",
    "Verdict",
    "best_threshold",
    "calibrated_agreement",
    "first_token_refusal_scores",
    "get_judge",
    "incoherence_reason",
    "is_coherent",
    "is_nonword",
    "judge_agreement",
    "judge_line",
    "keyword_judge",
    "keyword_preset_info",
    "keyword_preset_names",
    "opener_token_ids",
    "opening",
    "parse_guard_answer",
    "parse_match_rule",
    "register_judge",
    "registered_judges",
]


# One module per kind of judge; the names every caller uses are re-exported here.
from ssah.judges.classifier import HARMFUL_LABELS, ClassifierJudge
from ssah.judges.coherence import (
    FILLER_WORDS,
    STOP_WORDS,
    CoherenceCheck,
    incoherence_reason,
    is_coherent,
    is_nonword,
)
from ssah.judges.first_token import (
    COMPLIANCE_OPENERS,
    REFUSAL_OPENERS,
    FirstTokenJudge,
    best_threshold,
    calibrated_agreement,
    first_token_refusal_scores,
    opener_token_ids,
)
from ssah.judges.guard import GUARD_TEMPLATE, GuardJudge, parse_guard_answer
from ssah.judges.keyword import (
    KEYWORD_ALIASES,
    KEYWORD_PRESETS,
    SSAH_REFUSAL_STRINGS,
    KeywordJudge,
    keyword_judge,
    keyword_preset_info,
    keyword_preset_names,
    opening,
    parse_match_rule,
)
from ssah.judges.learned import LearnedJudge

# --- registry ----------------------------------------------------------------------------------------------------

JUDGE_KINDS: tuple[str, ...] = ("keyword", "classifier", "guard", "first-token", "learned")
"""Built-in judge kinds of a spec ``kind[:argument]``."""

_REGISTRY: dict[str, Callable[..., Judge]] = {}
_CONTEXT_KWARGS = ("model", "tokenizer")  # what evaluation passes to every judge; only some judges use it


def register_judge(name: str, factory: Callable[..., Judge]) -> None:
    """Make ``get_judge(name, **kwargs)`` (or ``get_judge("name:arg")``, passing ``arg`` first) call ``factory``.
    Registering a name again replaces the factory; built-in kinds cannot be replaced."""
    if not name or ":" in name or not re.fullmatch(r"[\w.\-]+", name):
        raise UserError(f"invalid judge name {name!r}: use letters, digits, '_', '-' or '.' without ':'")
    if name in JUDGE_KINDS:
        raise UserError(f"judge name {name!r} is a built-in kind: register your judge under another name")
    if not callable(factory):
        raise UserError(f"judge factory for {name!r} is not callable: pass a class or a function returning a judge")
    _REGISTRY[name] = factory


def registered_judges() -> list[str]:
    """Names of user-registered judges."""
    return sorted(_REGISTRY)


def _valid_specs() -> str:
    """The valid judge specs, for error messages."""
    specs = [
        "keyword",
        "keyword:<preset>",
        "classifier:<path>",
        "guard:<path>",
        "first-token",
        "learned",
        "learned:<folder>",
    ]
    return ", ".join(specs + registered_judges())


def _build(kind: str, factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call a judge factory, turning unexpected options into a UserError."""
    try:
        return factory(*args, **kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise UserError(
                f"judge {kind!r} does not take the options {sorted(kwargs)} ({exc}): drop them or check their names"
            ) from exc
        raise


def _accepted(factory: Callable[..., Any], context: dict[str, Any]) -> dict[str, Any]:
    """The context keyword arguments (model, tokenizer) that a factory's signature accepts."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


def get_judge(spec: str, **kwargs: Any) -> Judge:
    """A judge from a spec: ``keyword`` (= ``keyword:ssah``), ``keyword:<preset>``, ``classifier:<path or hub
    id>``, ``guard:<path or hub id>``, ``first-token`` (needs ``model=`` and ``tokenizer=``), ``learned`` (the
    shipped learned judge) or ``learned:<folder>`` (one made by `ssah judge train`), or a registered name
    (``name`` or ``name:<argument>``, the argument passed first). ``model``/``tokenizer`` (the model under
    evaluation) go only to judges that take them; other keyword arguments go to the judge's constructor."""
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    context = {k: kwargs.pop(k) for k in _CONTEXT_KWARGS if k in kwargs}
    if kind in _REGISTRY:
        factory = _REGISTRY[kind]
        judge = _build(kind, factory, (arg,) if arg else (), {**_accepted(factory, context), **kwargs})
        if not isinstance(judge, Judge):
            raise UserError(f"judge factory {kind!r} returned {type(judge).__name__}, which has no name and judge()")
        return judge
    if kind == "keyword":
        if kwargs:
            raise UserError(f"keyword judges take no options (got {sorted(kwargs)}): drop them")
        if spec.endswith(":") and not arg:
            raise UserError(f"empty keyword preset in {spec!r}: use one of {', '.join(keyword_preset_names())}")
        return keyword_judge(arg or "ssah")
    if kind in ("classifier", "guard"):
        if not arg:
            raise UserError(f"judge spec {spec!r} names no model: use {kind}:<folder or hub id>")
        cls = ClassifierJudge if kind == "classifier" else GuardJudge
        return _build(kind, cls, (arg,), kwargs)
    if kind == "learned":
        from ssah.judges.learned import LearnedJudge

        return _build(kind, LearnedJudge, (arg,) if arg else (), kwargs)
    if kind == "first-token":
        try:
            threshold = kwargs.pop("threshold", float(arg) if arg else 0.0)
        except ValueError:
            raise UserError(
                f"bad threshold in {spec!r}: use first-token or first-token:<number>, e.g. first-token:0.5"
            ) from None
        return _build(
            kind, FirstTokenJudge, (context.get("model"), context.get("tokenizer")), {"threshold": threshold, **kwargs}
        )
    raise UserError(f"unknown judge {spec!r}: use one of {_valid_specs()}")


# --- measured agreement with people ------------------------------------------------------------------------------


def _canonical_spec(spec: str) -> str:
    """A judge spec with keyword aliases resolved (``keyword`` -> ``keyword:ssah``, ``keyword:gcg`` ->
    ``keyword:llm_attacks_evaluate``), so that a measurement is found under any of its names."""
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    if kind == "keyword":
        arg = arg or "ssah"
        return f"keyword:{KEYWORD_ALIASES.get(arg, arg)}"
    return spec


@lru_cache(maxsize=1)
def _shipped_agreement() -> dict[str, dict[str, Any]]:
    text = (resources.files("ssah.judges") / "data" / "agreement.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return {_canonical_spec(k): v for k, v in data.get("judges", {}).items()}


def judge_agreement(spec: str) -> dict[str, Any] | None:
    """The shipped measurement of a judge's agreement with human labels (``agreement``, ``ci95``, ``n``,
    ``data``, ``command``), or None when the judge was never measured (a user's classifier or judge folder)."""
    entry = _shipped_agreement().get(_canonical_spec(spec))
    return None if entry is None else dict(entry)


def judge_line(spec: str, measured: dict[str, Any] | None = None) -> str:
    """One sentence naming the judge and its measured agreement with people (or saying it was not measured);
    every report with an ASR table prints it, so a reader knows what the numbers rest on."""
    measured = measured if measured is not None else judge_agreement(spec)
    if not measured:
        return f"The judge `{spec}` has no shipped measurement of agreement with human labels."
    lo, hi = measured["ci95"]
    return (
        f"The judge `{spec}` agrees with human labels on {100 * measured['agreement']:.1f}% "
        f"[{100 * lo:.1f}, {100 * hi:.1f}] of {measured['n']} replies ({measured['data']})."
    )
