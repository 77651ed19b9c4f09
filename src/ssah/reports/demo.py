"""The `ssah demo` report: the published effects beside what this run measured, stage times, then every stage's
own report (rendered by its recipe from its results)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssah.judges import judge_agreement
from ssah.recipes import get_recipe
from ssah.reports.common import difference, markdown_table, pct, proportion, verdict_word


def _read(out: Path, stage: str) -> dict[str, Any] | None:
    path = out / stage / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None) -> str:
    return pct(x, 0, "n/a")


def _ci(c: dict[str, Any]) -> str:
    return difference(c, unit=" points")


def _seeds(n: Any) -> str:
    return f", {n} seeds" if n else ""


STRATA = {
    "layer-kind": "same count per (layer, kind)",
    "layer": "same count per layer",
    "kind": "same count per kind (attention / MLP)",
    "none": "same count, unstratified",
}


def _random(what: str, st: dict[str, Any]) -> str:
    """A random control named with its strata and seeds, from a stage's settings."""
    strata = st.get("control_strata", "layer-kind")
    return f"{what}, {STRATA.get(strata, f'strata {strata}')}{_seeds(st.get('seeds'))}"


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


def row_align(r: dict[str, Any]) -> Row:
    b, a, v = r["before"], r["after"], r["verdicts"]["refusal_up"]
    return {
        "effect": "alignment is cheap: a short safety SFT makes the model refuse harmful requests",
        "published": "a small change installs refusal (the hypothesis; aligned Llama-2/3 models)",
        "ours": f"refusal {_pct(b['refusal']['rate'])} -> {_pct(a['refusal']['rate'])}, difference "
        f"{_ci(v['comparison'])}; over-refusal {_pct(b['overrefusal']['rate'])} -> "
        f"{_pct(a['overrefusal']['rate'])}",
        "control": "the same model before alignment (baseline)",
        "verdict": v["verdict"],
        "judge": judge_cell(r.get("judge")),
    }


def row_overrefusal(base: dict[str, Any], aligned: dict[str, Any]) -> Row:
    """Not a published effect but its price: over-refusal of borderline-safe prompts before and after alignment."""
    b, a = base["overrefusal"], aligned["overrefusal"]
    return {
        "effect": "the safety tax: refusing borderline-safe prompts (XSTest-style) after alignment",
        "published": "not reported in the paper (reviewers asked for over-refusal)",
        "ours": f"over-refusal {proportion(b, ci_digits=0)} -> {proportion(a, ci_digits=0)} on {a['n']} "
        "borderline prompts"
        + (" (the short SFT over-generalises: see the evaluations below)" if a["rate"] - b["rate"] > 0.25 else ""),
        "control": "the unaligned model (baseline)",
        "verdict": None,
        "judge": judge_cell(aligned.get("judge_spec"), aligned.get("judge_agreement")),
    }


def row_stability(r: dict[str, Any]) -> Row | None:
    st = (r.get("stability") or {}).get("SCU")
    if not st or "verdict" not in st:
        return None
    found, chance = st["found_again"], st["found_again_by_chance"]
    share = r["categories"]["SCU"]["fraction"]
    return {
        "effect": "SCU are small and stable: one data half's SCU found again on the other half",
        "published": f"SCU are 1.3-1.4% of units (here {100 * share:.2f}%: a share chosen as an input of the "
        "method, not a finding); stability not reported (reviewers asked)",
        "ours": f"found again {proportion(found, ci_digits=0)} vs {proportion(chance, digits=2, ci_digits=2)} by "
        f"chance; Jaccard {st['jaccard']:.2f} vs {st['chance']:.3f}",
        "control": "a random set of the same count (unstratified chance share)",
        "verdict": st["verdict"]["verdict"],
        "judge": None,
    }


def row_calibration(r: dict[str, Any]) -> Row | None:
    cal = r.get("calibration_sets")
    if not cal or not cal.get("pairs"):
        return None
    parts = [
        f"{p['a']} -> {p['b']}: {proportion(p.get('found_again'), ci_digits=0)} vs "
        f"{proportion(p.get('stratified_control'), ci_digits=1)} ({p['verdict']['verdict']})"
        for p in cal["pairs"]
    ]
    return {
        "effect": "SCU are stable across safety calibration sets (built-in vs AdvBench- vs HarmBench-based)",
        "published": "SCU identified with AdvBench calibration data; not checked across sets (reviewers asked)",
        "ours": "SCU of one set found again with the other: " + "; ".join(parts),
        "control": _random("random units", {"seeds": cal.get("seeds")}),
        "verdict": all_of([p["verdict"]["verdict"] for p in cal["pairs"]]),
        "judge": None,
    }


def row_ablate(r: dict[str, Any]) -> Row:
    v = r["verdicts"]["scu_vs_random"]["asr"]
    c = v["comparison"]
    cc = r["verdicts"]["scu_vs_random"].get("coherent_compliance")
    extra = f"; coherent compliance: {cc['verdict']} ({_ci(cc['comparison'])})" if cc else ""
    st = r.get("settings", {})
    return {
        "effect": "ablating the few SCU breaks refusal (Table 1)",
        "published": "ASR +56 / +71 points after ablating SCU (Llama-2-7B-Chat / Llama-3-8B-Instruct)",
        "ours": f"SCU-ablated ASR {_pct(c['effect'])} vs random {_pct(c['control'])}: {_ci(c)}{extra}",
        "control": _random("random units", st),
        "verdict": v["verdict"],
        "judge": judge_cell(st.get("judge")),
    }


def row_transfer(r: dict[str, Any]) -> Row:
    p = r["paper"]
    t = p["tests"]["SCU->CU"]
    ours = f"SCU->CU {proportion(p.get('scu_to_cu'), ci_digits=0)} on the full data"
    if "comparison" in t:
        c = t["comparison"]
        ours += f"; across data halves {_pct(c['effect'])} vs {_pct(c['control'])}, difference {_ci(c)}"
    return {
        "effect": "a benign fine-tune turns SCU into CU (attribute transfer, Fig. 5)",
        "published": "over half of SCU became CU; part of CU became UCU",
        "ours": f"{ours}: {t['reason']}",
        "control": "the same categorisation on disjoint data halves without fine-tuning (data noise)",
        "verdict": p["verdict"],
        "judge": None,
    }


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
            f"{kind}, ASR before {_pct(initial)} -> after: full {_pct(full['comparison']['control'])}, "
            f"{label} {_pct(full['comparison']['effect'])} ({full['verdict']} vs full: {_ci(full['comparison'])})"
        )
        if rand is not None:
            text += f", random-frozen (mean of seeds) {_pct(rand['comparison']['control'])} ({rand['verdict']})"
            verdicts.append(rand["verdict"])
        else:
            verdicts.append(full["verdict"])
        parts.append(text)
    st = r.get("settings", {})
    return {
        "effect": "freezing SCU (+ top CU) while fine-tuning keeps safety (Tables 2-3)",
        "published": "Alpaca: ASR 5.3% full vs 2.96% frozen SCU + 6% (Llama-2-7B-Chat; no random control)",
        "ours": "; ".join(parts) or "n/a",
        "control": _random("random frozen units", st) + "; full fine-tune",
        "verdict": all_of(verdicts),
        "judge": judge_cell(st.get("judge")),
    }


def row_budget(r: dict[str, Any]) -> Row:
    first: dict[str, Any] = {}
    for x in r["conditions"]:
        first.setdefault(x["name"], x)
    ours = ", ".join(
        f"refusal {x['label']} {_pct(x['eval']['refusal']['rate'])}" for n, x in first.items() if n != "random"
    )
    v = r["verdicts"]
    if "ru_vs_random" in v:
        ours += "; RU-only vs random units: " + ", ".join(f"{k} {x['verdict']}" for k, x in v["ru_vs_random"].items())
    c = v.get("ru_vs_full", {}).get("task_accuracy", {}).get("comparison")
    if c:
        ours += (
            f"; benign answers correct RU-only {_pct(c['effect'])} vs full {_pct(c['control'])}, difference {_ci(c)}"
        )
    st = r.get("settings", {})
    return {
        "effect": "redundant units are an alignment budget: RU-only SFT keeps more utility than full SFT (Table 4)",
        "published": "RU-only SFT: GSM8K 13.4 vs 8.8 for full SFT (Llama-2-7B)",
        "ours": ours,
        "control": "full SFT (utility); " + _random("random units of RU's count", st),
        "verdict": r["paper"]["verdict"],
        "judge": judge_cell(st.get("judge")),
    }


# The probe's verdict comes from one method declared before looking: the paper's distance gap with the same gap
# after harmless queries subtracted (its content confound removed). Taking whichever of several methods separates
# would be a multiple comparison; the others are listed beside it.
PRIMARY_PROBE = "contrast"


def row_probe(r: dict[str, Any]) -> Row:
    sep = r["separation"]
    controlled = [m for m in sep if m != "naive"]
    primary = PRIMARY_PROBE if PRIMARY_PROBE in sep else (controlled[0] if controlled else None)
    good = [m for m in controlled if sep[m]["verdict"] == "reproduced"]
    naive = sep.get("naive", {}).get("verdict")
    emb = [v["embedding_gap"]["mean"] for v in r.get("confound", {}).values()]
    confound = f"{emb[0]:+.2f} at the embedding layer, a word-identity confound)" if emb else "n/a)"
    return {
        "effect": "the probe: alignment shows as a refusal-leaning reasoning direction in the later layers",
        "published": "Q is closer to Q+refusal than to Q+compliance in aligned models only (Figs. 2-4)",
        "ours": (f"primary method `{primary}`: {sep[primary]['decision']['reason']}; " if primary else "")
        + f"controlled methods reproducing over a run of later layers (a simultaneous band): "
        f"{len(good)} of {len(controlled)} ({', '.join(good) or 'none'}); the paper's probe: {naive or 'n/a'} "
        "(its gap is already " + confound,
        "control": "the unaligned model; the gap after harmless queries (content) subtracted",
        "verdict": sep[primary]["verdict"] if primary else None,
        "judge": judge_cell(r.get("settings", {}).get("judge")),
    }


# The science table: the paper's results in the paper's order, each built from the results of the stages named
# (a row is left out when one of its stages did not run, or when its builder returns None). A new recipe adds its
# row here, e.g. issue 15's refusal-direction recipe: ``(("direction",), row_direction)`` after the ablation.
SCIENCE: tuple[tuple[tuple[str, ...], Callable[..., Row | None]], ...] = (
    (("align",), row_align),
    (("eval-base", "eval-aligned"), row_overrefusal),
    (("units",), row_stability),
    (("units",), row_calibration),
    (("ablate",), row_ablate),
    (("transfer",), row_transfer),
    (("protect",), row_protect),
    (("budget",), row_budget),
    (("probe",), row_probe),
)

SCIENCE_HEADER = ("result", "published", "ours (95% interval)", "control", "verdict", "judge (agreement)")


def headlines(out: Path) -> list[Row]:
    """One row per result of the paper: what it reports, what this run measured with its interval, the control,
    the verdict (the one rule) and, where an ASR or refusal rate is involved, the judge with its agreement."""
    rows: list[Row] = []
    for stages, make in SCIENCE:
        results = [_read(out, s) for s in stages]
        if any(r is None for r in results):
            continue
        try:
            row = make(*results)
        except (KeyError, TypeError, ValueError) as exc:  # a run folder from another ssah version
            row = {"effect": f"{'/'.join(stages)}: see its section", "published": "", "ours": f"({exc!r})"}
            row |= {"control": "", "verdict": None, "judge": None}
        if row is not None:
            rows.append(row)
    return rows


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


def _stage_markdown(out: Path, name: str, title: str) -> str:
    """A stage's report re-rendered by its recipe (named in the stage's manifest), headings one level down and
    image paths made relative to the demo folder."""
    results = _read(out, name)
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
