"""The demo's science table, shared by every recipe's headline rows: the cells' formats (percentages, paired
differences, random controls named with their strata and seeds, the judge with its agreement with people), the one
way several tests of a result combine into a verdict, the table itself and the verdict rule's paragraph above it.

A recipe's row builders (``row_<what>(results, ...) -> Row``) live in its report module and are registered as
:class:`ssah.registry.Headline` values; :func:`headlines` builds the table from the registry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssah.judges import judge_agreement
from ssah.reports.common import difference, markdown_table, pct, verdict_word


def read_stage(out: Path, stage: str) -> dict[str, Any] | None:
    path = out / stage / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pct0(x: float | None) -> str:
    return pct(x, 0, "n/a")


def ci_points(c: dict[str, Any]) -> str:
    return difference(c, unit=" points")


def seeds_text(n: Any) -> str:
    return f", {n} seeds" if n else ""


STRATA = {
    "layer-kind": "same count per (layer, kind)",
    "layer": "same count per layer",
    "kind": "same count per kind (attention / MLP)",
    "none": "same count, unstratified",
}


def random_control_text(what: str, st: dict[str, Any]) -> str:
    """A random control named with its strata and seeds, from a stage's settings."""
    strata = st.get("control_strata", "layer-kind")
    return f"{what}, {STRATA.get(strata, f'strata {strata}')}{seeds_text(st.get('seeds'))}"


def judge_cell(spec: str | None, measured: dict[str, Any] | None = None) -> str | None:
    """The judge of a row's ASR / refusal numbers and its shipped agreement with human labels (None: no judge)."""
    if not spec:
        return None
    m = measured if measured is not None else judge_agreement(spec)
    if not m:
        return f"`{spec}` (agreement with people not measured)"
    lo, hi = m["ci95"]
    return f"`{spec}`: {100 * m['agreement']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] agreement with people (n={m['n']})"


def all_of(verdicts: list[str]) -> str | None:
    """One verdict for a result tested several times (settings, pairs): reproduced only when every test is,
    not reproduced when any test is, otherwise inconclusive; None when nothing was tested."""
    if not verdicts:
        return None
    if all(v == "reproduced" for v in verdicts):
        return "reproduced"
    return "not reproduced" if "not reproduced" in verdicts else "inconclusive"


Row = dict[str, Any]


SCIENCE_HEADER = ("result", "published", "ours (95% interval)", "control", "verdict", "judge (agreement)")


def science_table(rows: list[Row]) -> str:
    """The science table in Markdown (the demo report's headline and the README's results block)."""
    cells = [
        [
            h["effect"],
            h["published"],
            h["ours"],
            h.get("control") or "-",
            verdict_word(h.get("verdict")),
            h.get("judge") or "-",
        ]
        for h in rows
    ]
    return markdown_table(list(SCIENCE_HEADER), [[c.replace("|", "\\|") for c in row] for row in cells])


VERDICT_RULE = (
    "Verdict rule (one for every row): *reproduced* only when the 95% interval of the difference to the control "
    "(or to the baseline where the paper has none) excludes zero in the published direction; *not reproduced* when "
    "it excludes zero the other way or lies within ±5 points of zero; otherwise *inconclusive* (each stage's report "
    "says how many prompts would decide). Conditions measured on the same prompts are compared prompt by prompt "
    "(paired); random controls keep the count in every (layer, kind) cell and enter as a prompts x seeds table, each "
    "prompt counted once (the rule's error rates: benchmarks/verdict_calibration.py). A result tested several times "
    "(settings, pairs) is reproduced only when every test is."
)


def headlines(out: Path) -> list[Row]:
    """One row per result of the paper, from the registered recipes' :class:`ssah.registry.Headline` values in
    the table's order: what it reports, what this run measured with its interval, the control, the verdict (the one
    rule) and, where an ASR or refusal rate is involved, the judge with its agreement."""
    from ssah.registry import science_rows

    rows: list[Row] = []
    for recipe, headline in science_rows():
        results = [read_stage(out, s) for s in headline.stages]
        if any(r is None for r in results):
            continue
        try:
            row = recipe.resolve(headline.row)(*results)
        except (KeyError, TypeError, ValueError) as exc:  # a run folder from another ssah version
            row = {"effect": f"{'/'.join(headline.stages)}: see its section", "published": "", "ours": f"({exc!r})"}
            row |= {"control": "", "verdict": None, "judge": None}
        if row is not None:
            rows.append(row)
    return rows
