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

``get_judge("keyword:xstest")`` builds one from a spec ``kind[:argument]``. One module per kind (``keyword``,
``classifier``, ``guard``, ``first_token``, ``learned``), each ending with the :func:`register_judge` call a user
makes for a judge of their own; ``base`` holds the protocol, ``registry`` the registry (``JUDGES``) and
:func:`get_judge`; the keyword presets have a registry of their own (``KEYWORD_PRESETS``,
:func:`register_keyword_preset`). This package holds the measured agreement and re-exports every public name::

    register_judge("length", LengthJudge, argument="limit")   # get_judge("length:40"), --judge length:40
    register_keyword_preset("mine", ["I won't", "I refuse"], match="opening", case_sensitive=False)
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from ssah.judges.base import Judge, Verdict

__all__ = [
    "COMPLIANCE_OPENERS",
    "FILLER_WORDS",
    "GUARD_TEMPLATE",
    "HARMFUL_LABELS",
    "JUDGES",
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
    "JudgeKind",
    "KeywordJudge",
    "KeywordPreset",
    "LearnedJudge",
    "Verdict",
    "best_threshold",
    "calibrated_agreement",
    "check_judge_spec",
    "first_token_refusal_scores",
    "get_judge",
    "incoherence_reason",
    "is_coherent",
    "is_nonword",
    "judge_agreement",
    "judge_line",
    "judge_specs",
    "keyword_judge",
    "keyword_preset_info",
    "keyword_preset_names",
    "opener_token_ids",
    "opening",
    "parse_guard_answer",
    "parse_match_rule",
    "register_judge",
    "register_keyword_preset",
    "registered_judges",
]


# One module per kind of judge, each registering itself on import, in this order (the order of help texts and
# error messages); the names every caller uses are re-exported here.
# isort: off
from ssah.judges.registry import JUDGES, JudgeKind, check_judge_spec, get_judge, judge_specs, register_judge
from ssah.judges.keyword import (
    KEYWORD_ALIASES,
    KEYWORD_PRESETS,
    SSAH_REFUSAL_STRINGS,
    KeywordJudge,
    KeywordPreset,
    keyword_judge,
    keyword_preset_info,
    keyword_preset_names,
    opening,
    parse_match_rule,
    register_keyword_preset,
)
from ssah.judges.classifier import HARMFUL_LABELS, ClassifierJudge
from ssah.judges.coherence import (
    FILLER_WORDS,
    STOP_WORDS,
    CoherenceCheck,
    incoherence_reason,
    is_coherent,
    is_nonword,
)
from ssah.judges.guard import GUARD_TEMPLATE, GuardJudge, parse_guard_answer
from ssah.judges.first_token import (
    COMPLIANCE_OPENERS,
    REFUSAL_OPENERS,
    FirstTokenJudge,
    best_threshold,
    calibrated_agreement,
    first_token_refusal_scores,
    opener_token_ids,
)
from ssah.judges.learned import LearnedJudge
# isort: on

JUDGES.seal()
JUDGE_KINDS: tuple[str, ...] = JUDGES.builtin_names()
"""Built-in judge kinds of a spec ``kind[:argument]`` (every kind, built-in or registered: ``JUDGES``)."""


def registered_judges() -> list[str]:
    """Names of user-registered judges."""
    return JUDGES.user_names()


# --- measured agreement with people ------------------------------------------------------------------------------


def _canonical_spec(spec: str) -> str:
    """A judge spec with keyword aliases resolved (``keyword`` -> ``keyword:ssah``, ``keyword:gcg`` ->
    ``keyword:llm_attacks_evaluate``), so that a measurement is found under any of its names."""
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    if kind == "keyword":
        return f"keyword:{KEYWORD_PRESETS.canonical(arg or 'ssah')}"
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
