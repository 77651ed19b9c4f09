"""Which prompts a run's verdicts were computed on, and which it used to calibrate units or to choose settings.

A verdict computed on prompts that also chose something (the units' calibration, a normalisation, a direction's
layer, a threshold) is partly selected: its interval is too optimistic. Every recipe that decides verdicts records
both groups here (``results.json``: ``prompts``) and is refused, in one line, when they share a prompt; a user who
forces it (``eval.allow_overlap``) gets the overlap printed as a caveat at the top of the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ssah.errors import UserError

__all__ = ["caveat", "held_out"]


def _digest(prompts: list[str]) -> str:
    blob = json.dumps(prompts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def held_out(evaluated: Mapping[str, Any], used: Mapping[str, Any], *, allow_overlap: bool = False) -> dict[str, Any]:
    """The prompt record of one run: each evaluated set and each set used to calibrate or choose (name -> a
    ``PromptSet`` or a list of prompts; None entries are skipped), with the SHA-256 of its prompts in order, and the
    prompts any evaluated set shares with a used one. A shared prompt is a ``UserError`` unless ``allow_overlap``."""

    def prompts_of(x: Any) -> list[str]:
        return x.prompts() if hasattr(x, "prompts") else [str(p) for p in x]

    ev = {k: prompts_of(v) for k, v in evaluated.items() if v is not None}
    us = {k: prompts_of(v) for k, v in used.items() if v is not None}
    overlap = []
    for en, eps in ev.items():
        eset = set(eps)
        for un, ups in us.items():
            shared = len(eset & set(ups))
            if shared:
                overlap.append({"evaluated": en, "used": un, "prompts": shared, "of": len(eset)})
    if overlap and not allow_overlap:
        o = overlap[0]
        raise UserError(
            f"{o['prompts']} of the {o['of']} {o['evaluated']} prompts that verdicts are computed on are also "
            f"{o['used']} prompts (used to calibrate units or choose settings): use disjoint sets, or "
            "--eval-allow-overlap to run anyway with the overlap printed as a caveat"
        )
    return {
        "evaluated": {k: {"prompts": len(v), "sha256": _digest(v)} for k, v in ev.items()},
        "used": {k: {"prompts": len(v), "sha256": _digest(v)} for k, v in us.items()},
        "overlap": overlap,
    }


def caveat(results: Mapping[str, Any]) -> str | None:
    """The report's caveat line when a run's verdicts were computed on prompts it also used; None otherwise."""
    record = results.get("prompts") if isinstance(results, Mapping) else None
    overlap = record.get("overlap") if isinstance(record, Mapping) else None
    if not overlap:
        return None
    parts = "; ".join(
        f"{o['prompts']} of {o['of']} {o['evaluated']} prompts are also {o['used']} prompts" for o in overlap
    )
    return (
        f"**Caveat: verdicts computed on prompts that also calibrated units or chose settings** ({parts}; forced "
        "with eval.allow_overlap): the intervals below are optimistic."
    )
