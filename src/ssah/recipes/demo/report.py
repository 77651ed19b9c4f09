"""The `ssah demo` report: the published effects beside what this run measured (the science table of
:mod:`ssah.reports.science`, its rows from the registered recipes), stage times, then every stage's own report
(rendered by its recipe from its results)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ssah.registry import get_recipe
from ssah.reports.common import markdown_table
from ssah.reports.science import VERDICT_RULE, headlines, read_stage, science_table


def _stage_markdown(out: Path, name: str, title: str) -> str:
    """A stage's report re-rendered by its recipe (named in the stage's manifest), headings one level down and
    image paths made relative to the demo folder."""
    results = read_stage(out, name)
    if results is None:
        return f"## {title}\n\nNot run yet (`ssah demo --stages {name}`).\n"
    command = json.loads((out / name / "manifest.json").read_text(encoding="utf-8"))["command"]
    md = get_recipe(command).renderer()(results, out / name)
    md = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", md, flags=re.MULTILINE)
    return re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({name}/{m.group(1)})", md)


def _seconds(stage: dict[str, Any]) -> str:
    if stage["seconds"] is not None:
        return f"{stage['seconds']:.0f}"
    return "reused" if stage["done"] else "not run"


PRECISION = {
    True: "bf16 autocast for generation and fine-tuning (statistics in fp32)",
    False: "fp32 throughout",
}


def render(results: dict[str, Any], run_dir: Path) -> str:
    """The demo report: headline table, stage timings, then every stage's own report."""
    # Read again from the stage folders, so that `ssah report` shows the current comparison of the numbers there.
    rows = headlines(run_dir) or results.get("headlines", [])

    lines = [
        f"# ssah demo: {results['model']}",
        "",
        f"{'Quick' if results['quick'] else 'Full'} settings, seed {results['seed']}, "
        f"{PRECISION[bool(results.get('bf16'))]}. Every number below comes from the run folders beside this report; "
        "`ssah report` rebuilds it.",
        "",
        "## Published effects and what we measured",
        "",
        VERDICT_RULE,
        "",
        science_table(rows),
        "",
        "## Stages and time",
        "",
        markdown_table(
            ["stage", "what", "seconds"],
            [[name, s["title"], _seconds(s)] for name, s in results["stages"].items()],
        ),
        "",
        f"Stage time in total: {results['seconds']['stages_total']:.0f} s.",
        "",
    ]
    for name, stage in results["stages"].items():
        if stage.get("done"):
            lines += [_stage_markdown(Path(run_dir), name, stage["title"]), ""]
    return "\n".join(lines)
