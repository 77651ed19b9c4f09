"""The `ssah align` report: each held-out measure of the base and the aligned model with its 95% interval, the
change in refusal and over-refusal, and the verdict against each target."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

from ssah.judges import judge_line
from ssah.reports.common import markdown_table, pct, proportion
from ssah.reports.science import Row, ci_points, judge_cell, pct0
from ssah.results import RunResult

TARGET_NAMES = {
    "harmful_refusal": "refusal of held-out harmful",
    "borderline_overrefusal": "over-refusal of held-out borderline-safe",
    "benign_accuracy_change": "change in ordinary answers correct",
    "perplexity_ratio": "perplexity ratio",
}


def render(results: dict[str, Any], run_dir: Path | None = None) -> str:
    """The Markdown report of an align run from its results alone (it has no plots to draw into ``run_dir``): each
    measure base vs aligned with its interval, and the verdict against each target."""
    b, a, t = results["before"], results["after"], results["training"]
    cell = functools.partial(proportion, counts=True)

    rows = [
        ["refusal of held-out harmful prompts", cell(b["refusal"]), cell(a["refusal"])],
        [
            "over-refusal of held-out borderline-safe prompts",
            cell(b.get("borderline_overrefusal")),
            cell(a.get("borderline_overrefusal")),
        ],
        ["over-refusal of held-out ordinary prompts", cell(b["overrefusal"]), cell(a["overrefusal"])],
    ]
    if b.get("extra_overrefusal") is not None:
        rows.append(["over-refusal of the extra safe set", cell(b["extra_overrefusal"]), cell(a["extra_overrefusal"])])
    if b.get("benign_accuracy") is not None:
        rows.append(["ordinary prompts answered correctly", cell(b["benign_accuracy"]), cell(a["benign_accuracy"])])
    rows.append(["coherent compliance on harmful", cell(b["coherent_compliance"]), cell(a["coherent_compliance"])])
    if b.get("perplexity") is not None:
        rows.append(
            ["perplexity of reference answers (geometric mean)", f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}"]
        )
    v = results["verdicts"]
    up, over = v["refusal_up"], v["overrefusal_change"]
    lo, hi = up["comparison"]["ci95"]
    olo, ohi = over["ci95"]
    cache = f" (reused from the cache {t['from_cache']})" if t.get("from_cache") else ""
    lines = [f"# Safety alignment of {results['model']['base']}", ""]
    method = t.get("method", "sft")
    if method != "dpo":
        sft = "Safety SFT: " if method != "sft" else ""
        lines.append(
            f"{sft}{t['steps']} steps, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}, "
            f"{100 * t['trainable']['share']:.1f}% of parameters trained{cache}."
        )
    if t.get("dpo"):
        lines.append(_dpo_line(t["dpo"], cache if method == "dpo" else ""))
    kinds = results["data"]["train"].get("kinds")
    if kinds:
        lines.append(
            f"Training mix: {results['data']['train']['examples']} examples, {pct(kinds['harmful'])} harmful requests "
            f"with refusals, {pct(kinds['borderline'])} borderline-safe requests with helpful answers, "
            f"{pct(kinds['benign'])} ordinary instructions with answers; loss on the reply tokens only."
        )
    lines += [
        "",
        markdown_table(["measure (95% Wilson interval)", "base", "aligned"], rows),
        "",
        f"Refusal went up by {100 * up['comparison']['difference']:+.1f} points (95% interval "
        f"{100 * lo:+.1f} to {100 * hi:+.1f}): **{up['verdict']}**. Over-refusal of ordinary prompts changed by "
        f"{100 * over['difference']:+.1f} points ({100 * olo:+.1f} to {100 * ohi:+.1f}): {over['direction']}.",
    ]
    bc = v.get("borderline_change")
    if bc:
        blo, bhi = bc["ci95"]
        lines.append(
            f"Over-refusal of borderline-safe prompts changed by {100 * bc['difference']:+.1f} points "
            f"({100 * blo:+.1f} to {100 * bhi:+.1f}): {bc['direction']}."
        )
    lines += _targets_section(results.get("targets") or {})
    n_b = a.get("borderline_overrefusal", {}).get("n", 0)
    lines += [
        "",
        f"Judge `{results['judge']}`; {a['refusal']['n']} harmful, {n_b} borderline-safe and {a['overrefusal']['n']} "
        "ordinary held-out prompts, none of them in the training mix; every reply and verdict is in "
        "`samples.jsonl`. The aligned model is in `model/`. "
        f"Took {results['seconds']:.1f} s"
        + (f" (training {t['align_seconds']:.1f} s)" if t.get("align_seconds") is not None else "")
        + ". "
        + judge_line(results["judge"]),
        "",
    ]
    return "\n".join(lines)


def _dpo_line(d: dict[str, Any], cache: str) -> str:
    """What the preference step did: its pairs, steps, DPO loss and reward margin."""
    p = d["pairs"]
    margins = [r["rewards/margins"] for r in d.get("log") or [] if "rewards/margins" in r]
    margin = f", reward margin {margins[0]:.3f} -> {margins[-1]:.3f}" if margins else ""
    return (
        f"Preference step (DPO, beta {d['beta']}): {p['pairs']} pairs ({p['harmful']} harmful requests: the data's "
        f"refusal over the base model's own reply; {p['safe']} safe requests: the answer over a refusal; "
        f"{p['harmful_already_refused']} harmful requests the base model already refused give no pair), "
        f"{d['steps']} steps, loss {d['first_loss']:.3f} -> {d['final_loss']:.3f}{margin}, "
        f"{100 * d['trainable']['share']:.1f}% of parameters trained{cache}."
    )


def _targets_section(targets: dict[str, Any]) -> list[str]:
    """The "Targets" section: each target, the aligned model's 95% interval and the verdict (empty without targets)."""
    if not targets:
        return []
    trows = []
    for key, tgt in targets.items():
        lo_, hi_ = tgt["ci95"]
        fmt = (lambda x: f"{x:.3f}") if key == "perplexity_ratio" else pct
        trows.append([TARGET_NAMES.get(key, key), tgt["target"], f"{fmt(lo_)} to {fmt(hi_)}", f"**{tgt['verdict']}**"])
    return [
        "",
        "## Targets",
        "",
        markdown_table(["measure", "target", "aligned: 95% interval", "verdict"], trows),
        "",
        "A target is *met* when the whole 95% interval is on its side, *not met* when the whole interval is on "
        "the other side, *inconclusive* otherwise (more held-out prompts would decide it).",
    ]


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    b, a = res["before"], res["after"]
    for key, what in (
        ("refusal", "refusal on held-out harmful"),
        ("borderline_overrefusal", "over-refusal on held-out borderline-safe"),
        ("overrefusal", "over-refusal on held-out benign"),
    ):
        if key in b:
            typer.echo(f"{what}: {100 * b[key]['rate']:.1f}% -> {100 * a[key]['rate']:.1f}%")
    typer.echo(f"wrote {path} (aligned model in {path / 'model'}) in {res['seconds']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_align(r: dict[str, Any]) -> Row:
    b, a, v = r["before"], r["after"], r["verdicts"]["refusal_up"]
    return {
        "effect": "alignment is cheap: a short safety SFT makes the model refuse harmful requests",
        "published": "a small change installs refusal (the hypothesis; aligned Llama-2/3 models)",
        "ours": f"refusal {pct0(b['refusal']['rate'])} -> {pct0(a['refusal']['rate'])}, difference "
        f"{ci_points(v['comparison'])}; over-refusal {pct0(b['overrefusal']['rate'])} -> "
        f"{pct0(a['overrefusal']['rate'])}",
        "control": "the same model before alignment (baseline)",
        "verdict": v["verdict"],
        "judge": judge_cell(r.get("judge")),
    }
