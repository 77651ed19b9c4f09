"""The `ssah protect` report: frozen sets, ASR against fine-tuning steps per setting, the verdicts, the paper's rows.

Everything it knows of the recipe (the settings in order, the data kinds, which setting is a random control of
which) comes from ``results["design"]``: the report does not import the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ssah.judges import judge_line
from ssah.measure import Measured, Proportion, measured_from
from ssah.reports.common import markdown_table, proportion, save, subplots, verdict_line
from ssah.reports.science import Row, all_of, ci_points, judge_cell, pct0, random_control_text
from ssah.results import RunResult

COLORS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#7f7f7f", "#bcbd22", "#9467bd")  # by the setting's place
KEYS = ("asr", "coherent_compliance", "overrefusal")  # the measured proportions the report shows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def design(results: dict[str, Any]) -> dict[str, Any]:
    """What the report knows of the recipe: ``results["design"]``, or for a run written before it was recorded,
    what its results say (the settings and kinds its config listed, the random controls its units record)."""
    if "design" in results:
        return results["design"]  # type: ignore[no-any-return]
    s, controls = results["settings"], results["units"].get("controls") or {}
    return {
        "settings": list(s["settings"]),
        "kinds": list(s["kinds"]),
        "controls": {name: c["of"] for name, c in controls.items()},
        "sample_chars": None,
    }


def _settings(results: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """The settings that ran in ``cells``, in the recipe's order."""
    return [s for s in design(results)["settings"] if any(c["setting"] == s for c in cells)]


def _color(results: dict[str, Any], setting: str) -> str:
    return COLORS[design(results)["settings"].index(setting) % len(COLORS)]


def measured(
    results: dict[str, Any], cells: list[dict[str, Any]], setting: str, steps: int, key: str = "asr"
) -> Measured | None:
    """One setting's measurement at a step count: a Proportion, or the distribution over a control's seeds."""
    at = [c[key] for c in cells if c["setting"] == setting and c["steps"] == steps and c.get(key)]
    return measured_from(at, distribution=setting in design(results)["controls"])


def plot_protect(results: dict[str, Any], kind: str, path: Path) -> Path:
    """ASR (95% intervals; a random control as the distribution of its seeds) and task perplexity against
    fine-tuning steps, one line per setting."""
    init, labels = results["initial"], results["settings"]["labels"]
    cells = [c for c in results["cells"] if c["kind"] == kind]
    steps = sorted({c["steps"] for c in cells})
    fig, (ax, ax2) = subplots(1, 2, figsize=(11, 4.2))
    for i, s in enumerate(_settings(results, cells)):
        ms = [m for m in (Proportion.from_dict(init["asr"]), *(measured(results, cells, s, n) for n in steps)) if m]
        ys = [100 * m.rate for m in ms]
        err = [[y - 100 * m.ci95[0] for y, m in zip(ys, ms, strict=True)]]
        err.append([100 * m.ci95[1] - y for y, m in zip(ys, ms, strict=True)])
        xs = [0, *steps]
        jittered = [x + (i - 3) * 0.05 for x in xs]
        ax.errorbar(jittered, ys, yerr=err, marker="o", capsize=3, label=labels.get(s, s), color=_color(results, s))
        ppl = [_mean([c["perplexity"] for c in cells if c["setting"] == s and c["steps"] == n]) for n in steps]
        ax2.plot(xs, [init.get("perplexity"), *ppl], marker="o", color=_color(results, s))
    ax.set(xlabel="fine-tuning steps", ylabel="ASR on held-out harmful prompts (%)", ylim=(-3, 103))
    ax.set_title(f"{kind} data: attack success rate (95% intervals)")
    ax.legend(fontsize=6, frameon=False)
    ax2.set(xlabel="fine-tuning steps", ylabel="perplexity of held-out task answers", title="task utility")
    return save(fig, path)


def _frozen_table(results: dict[str, Any]) -> list[str]:
    u, runs, labels, paper = results["units"], results["runs"], results["settings"]["labels"], results["paper"]
    rows = []
    for k, f in u["frozen"].items():
        params = _mean([r["frozen_share_of_params"] for r in runs if r["setting"] == k])
        seeds = len(u["controls"].get(k, {}).get("draws", [])) or "-"
        rows.append([labels.get(k, k), f["count"], f"{100 * f['share_of_units']:.2f}%", f"{100 * params:.2f}%", seeds])
    rows.append([f"paper: {paper['rows'][2][1]}", "-", f"about {100 * paper['frozen_share_scu_cu']:.1f}%", "-", "-"])
    s = results["settings"]
    return [
        "## Frozen sets",
        markdown_table(["frozen set", "units", "share of units", "share of parameters", "random seeds"], rows),
        f"`{s['selection']}` takes {100 * s['cu_share']:g}% of all units from CU by safety rank, as the paper's "
        '"SCU + 6%"; its real share is above (an input of the method, not a finding). Random controls keep the '
        f"frozen set's count in every {s['control_strata']} cell.",
    ]


def _kind_section(results: dict[str, Any], kind: str, run_dir: Path) -> list[str]:
    cells = [c for c in results["cells"] if c["kind"] == kind]
    plot_protect(results, kind, Path(run_dir) / "plots" / f"protect_{kind}.png")
    labels, rows = results["settings"]["labels"], []
    for setting in _settings(results, cells):
        for n in sorted({c["steps"] for c in cells}):
            at = [c for c in cells if c["setting"] == setting and c["steps"] == n]
            rates = [proportion(measured(results, cells, setting, n, key)) for key in KEYS]
            ppl, share, loss = (_mean([c[key] for c in at]) for key in ("perplexity", "trained_share", "loss"))
            rows.append([labels.get(setting, setting), n, *rates, f"{ppl:.2f}", f"{100 * share:.2f}%", loss])
    train, v = results["data"]["train"][kind], results["verdict"][kind]
    runs = [r for r in results["runs"] if r["kind"] == kind and r.get("frozen_check")]
    checks = [r["frozen_check"]["bit_identical"] for r in runs]
    ok = "bit-identical in every freezing run" if all(checks) else "CHANGED (see runs[].frozen_check)"
    head = ["setting", "steps", "ASR", "coherent compl.", "over-refusal", "perplexity", "trained share", "loss"]
    controls = design(results)["controls"]
    lines = [
        verdict_line(f"{c['a']}, ASR", c, f"{c['b']} (mean of its seeds)" if c["b"] in controls else c["b"])
        for c in v["comparisons"]
    ]
    return [
        f"## Fine-tuning on the {kind} data (`{train['source']}`, {train['examples']} examples)",
        markdown_table(head, rows),
        f"![ASR against steps](plots/protect_{kind}.png)",
        *([f"Frozen slices after training vs the original weights: {ok}."] if checks else []),
        "**Verdicts** (the 95% interval of each ASR difference decides):",
        "\n".join(lines),
        *v["notes"],
    ]


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Redraw ``plots/protect_<kind>.png`` from ``results`` and return the Markdown report (paragraphs)."""
    s, m, u, d, init = (results[k] for k in ("settings", "model", "units", "data", "initial"))
    sec, paper, chars = results["seconds"], results["paper"], design(results)["sample_chars"]
    cut = f"outputs cut to {chars} characters" if chars else "outputs shortened"
    restored = " (checked: bit-identical at the end)" if results.get("weights_restored") else ""
    out = [
        f"# Protected fine-tuning of {m['name']}",
        f"Each setting fine-tunes the same weights ({m['fingerprint'][:12]}) for up to {max(s['steps'])} steps "
        f"(batch {s['batch_size']}, lr {s['lr']:g}, LoRA lr {s['lora_lr']:g}, {s['schedule']} schedule, seed "
        f"{s['seed']}), measured after {', '.join(map(str, s['steps']))} steps inside one run; the original weights "
        f"are restored between runs{restored}. Units: {u['source']}.",
        f"ASR = share of {d['eval_harmful']['examples']} held-out harmful prompts (`{d['eval_harmful']['source']}`) "
        f"not refused by `{s['judge']}`, none a training prompt; over-refusal on {d['eval_benign']['examples']} safe "
        f"prompts (`{d['eval_benign']['source']}`); task utility = perplexity of {d['eval_utility']['examples']} "
        f"held-out task answers. {s['max_new_tokens']} new tokens, greedy. Brackets: 95% intervals (Wilson; for a "
        "random control the interval of its prompts x seeds table, each prompt counted once); comparisons are "
        "paired on the prompts. " + judge_line(s["judge"]),
        f"Initial model: ASR {proportion(init['asr'])}, over-refusal {proportion(init['overrefusal'])}, perplexity "
        f"{init.get('perplexity', float('nan')):.2f}.",
    ]
    if u.get("frozen"):
        out += _frozen_table(results)
    for kind in (k for k in design(results)["kinds"] if k in results["verdict"]):
        out += _kind_section(results, kind, run_dir)
    out += [
        f"## The paper's numbers ({paper['model']}, Tables 2 / 3)",
        markdown_table(["fine-tuned on", "setting", "AdvBench ASR %", "HEx-PHI harmful %"], paper["rows"]),
        paper["hexphi_score"] + ". The paper reports no random-unit control; the comparison with the random frozen "
        "sets tests whether the *choice* of units matters. Our model, data, judge and scale differ (a small model, "
        "built-in sets, a keyword judge, a few steps), so compare directions, not values.",
        f"Took {sec['total']:.0f} s (training {sec['training']:.0f} s, evaluation {sec['evaluation']:.0f} s, units "
        f"{sec['units']:.0f} s). Per-prompt verdicts: `samples.jsonl` ({cut}).",
    ]
    return "\n\n".join(out) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    for kind, v in res["verdict"].items():
        typer.echo(f"[{kind}] {v['summary']}")
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s")


# -- its row(s) of the demo's science table (registered as Headline values in the recipe's __init__) --------
def row_protect(r: dict[str, Any]) -> Row:
    parts, verdicts = [], []
    for kind, v in r["verdict"].items():
        comps = {(c["a"], c["b"]): c for c in v["comparisons"]}
        full = comps.get(("freeze-scu-cu", "full"))
        rand = comps.get(("freeze-scu-cu", "random"))
        if full is None:
            continue
        share = r.get("units", {}).get("frozen", {}).get("freeze-scu-cu", {}).get("share_of_units")
        label = f"frozen SCU + 6% CU ({100 * share:.1f}% of units)" if share is not None else "frozen SCU + 6% CU"
        initial = r.get("initial", {}).get("asr", {}).get("rate")
        text = (
            f"{kind}, ASR before {pct0(initial)} -> after: full {pct0(full['comparison']['control'])}, "
            f"{label} {pct0(full['comparison']['effect'])} ({full['verdict']} vs full: {ci_points(full['comparison'])})"
        )
        if rand is not None:
            text += f", random-frozen (mean of seeds) {pct0(rand['comparison']['control'])} ({rand['verdict']})"
            verdicts.append(rand["verdict"])
        else:
            verdicts.append(full["verdict"])
        parts.append(text)
    st = r.get("settings", {})
    return {
        "effect": "freezing SCU (+ top CU) while fine-tuning keeps safety (Tables 2-3)",
        "published": "Alpaca: ASR 5.3% full vs 2.96% frozen SCU + 6% (Llama-2-7B-Chat; no random control)",
        "ours": "; ".join(parts) or "n/a",
        "control": random_control_text("random frozen units", st) + "; full fine-tune",
        "verdict": all_of(verdicts),
        "judge": judge_cell(st.get("judge")),
    }
