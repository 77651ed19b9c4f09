"""`ssah demo`: the whole method on one model in one command, with one report a person can read.

Stages (each an ordinary experiment writing its own run folder under the demo folder):
align -> eval of both models -> probe -> units -> ablation -> attribute transfer -> protected fine-tuning ->
alignment budget. A stage whose folder already holds ``results.json`` is reused, so an interrupted demo continues
where it stopped; ``stages`` runs a subset. The demo folder gets ``results.json`` (timings and the headline numbers
next to the published ones), ``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssah.config import ModelRunConfig
from ssah.errors import UserError
from ssah.runs import atomic_write_text, manifest, to_json


class DemoConfig(ModelRunConfig):
    """Everything `ssah demo` needs: the base (unaligned) model, the folder, and how small to run each stage."""

    model: str = "smollm2-135m-instruct"
    out: str = "runs/demo"
    dtype: str = "float32"
    quick: bool = True
    stages: list[str] | None = None


@dataclass
class DemoContext:
    """What the stages share: the settings and where earlier stages left their results."""

    cfg: DemoConfig
    out: Path

    def folder(self, stage: str) -> Path:
        return self.out / stage

    @property
    def aligned(self) -> str:
        """The aligned model folder written by the align stage."""
        return str(self.folder("align") / "model")

    @property
    def units_file(self) -> str:
        return str(self.folder("units") / "units.safetensors")

    def common(self, stage: str) -> dict[str, Any]:
        """Options every stage's config takes."""
        c = self.cfg
        return {
            "out": str(self.folder(stage)),
            "seed": c.seed,
            "device": c.device,
            "allow_pickle": c.allow_pickle,
            "trust_remote_code": c.trust_remote_code,
            "progress": c.progress,
            "overwrite": True,  # only reached when the stage folder holds no finished run
        }


@dataclass(frozen=True)
class Stage:
    """One step of the demo: an experiment run into ``<demo>/<name>``."""

    name: str
    title: str
    needs: tuple[str, ...]
    run: Callable[[DemoContext], Path]
    module: str  # the experiment module whose ``render`` rebuilds the stage's report


def _run(module: str, config: str, function: str, values: dict[str, Any]) -> Path:
    mod = importlib.import_module(f"ssah.experiments.{module}")
    cfg = getattr(mod, config).build(values)
    return getattr(mod, function)(cfg)  # type: ignore[no-any-return]


def _align(ctx: DemoContext) -> Path:
    values = {**ctx.common("align"), "model": ctx.cfg.model, "dtype": ctx.cfg.dtype}
    if ctx.cfg.quick:
        values |= {"eval_limit": 24, "max_new_tokens": 32}
    return _run("align", "AlignConfig", "run_align", values)


def _eval(which: str) -> Callable[[DemoContext], Path]:
    def run(ctx: DemoContext) -> Path:
        model = ctx.cfg.model if which == "base" else ctx.aligned
        values = {**ctx.common(f"eval-{which}"), "model": model, "dtype": ctx.cfg.dtype}
        if ctx.cfg.quick:
            values |= {"limit": 24, "max_new_tokens": 32}
        return _run("eval", "EvalConfig", "run_eval", values)

    return run


def _units(ctx: DemoContext) -> Path:
    values = {**ctx.common("units"), "model": ctx.aligned, "dtype": ctx.cfg.dtype, "stability": True}
    return _run("units", "UnitsConfig", "run_units", values)


def _probe(ctx: DemoContext) -> Path:
    values = {**ctx.common("probe"), "model": ctx.aligned, "compare": ctx.cfg.model, "quick": ctx.cfg.quick}
    return _run("probe", "ProbeConfig", "run_probe", values)


def _ablate(ctx: DemoContext) -> Path:
    values = {**ctx.common("ablate"), "model": ctx.aligned, "units": ctx.units_file, "quick": ctx.cfg.quick}
    return _run("ablate", "AblateConfig", "run_ablate", values)


def _transfer(ctx: DemoContext) -> Path:
    values = {**ctx.common("transfer"), "model": ctx.aligned, "quick": ctx.cfg.quick}
    return _run("transfer", "TransferConfig", "run_transfer", values)


def _protect(ctx: DemoContext) -> Path:
    values = {**ctx.common("protect"), "model": ctx.aligned, "units": ctx.units_file, "quick": ctx.cfg.quick}
    return _run("protect", "ProtectConfig", "run_protect", values)


def _budget(ctx: DemoContext) -> Path:
    values = {**ctx.common("budget"), "model": ctx.cfg.model, "quick": ctx.cfg.quick}
    return _run("budget", "BudgetConfig", "run_budget", values)


STAGES: tuple[Stage, ...] = (
    Stage("align", "Aligning the model (safety SFT)", (), _align, "align"),
    Stage("eval-base", "Evaluating the unaligned model", (), _eval("base"), "eval"),
    Stage("eval-aligned", "Evaluating the aligned model", ("align",), _eval("aligned"), "eval"),
    Stage("probe", "Probing the reasoning direction, aligned vs unaligned", ("align",), _probe, "probe"),
    Stage("units", "Scoring and categorising units of the aligned model", ("align",), _units, "units"),
    Stage("ablate", "Ablating each unit category, with random controls", ("align", "units"), _ablate, "ablate"),
    Stage("transfer", "Attribute transfer after a short benign fine-tune", ("align",), _transfer, "transfer"),
    Stage("protect", "Fine-tuning with safety-critical units frozen", ("align", "units"), _protect, "protect"),
    Stage("budget", "Aligning the base model through its redundant units only", (), _budget, "budget"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def check_stages(names: list[str] | None) -> list[Stage]:
    """The stages to run, in pipeline order; unknown names are an error."""
    if not names:
        return list(STAGES)
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown:
        raise UserError(f"unknown demo stage {unknown[0]!r}: use some of {', '.join(STAGE_NAMES)}")
    return [s for s in STAGES if s.name in names]


def stage_done(out: Path, name: str) -> bool:
    """A stage is done when its run folder was committed (run folders appear atomically, results.json last)."""
    return (out / name / "results.json").is_file() and (out / name / "manifest.json").is_file()


def _check_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file: choose a folder with --out")
    if out.is_dir() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not (out / "demo.json").is_file():
            raise UserError(f"output folder {out} exists and is not a demo folder: choose another --out")


def run_demo(cfg: DemoConfig, *, echo: Callable[[str], None] = print) -> Path:
    """Run (or continue) the demo and write its report; returns the demo folder."""
    t0 = time.time()
    out = Path(cfg.out)
    selected = check_stages(cfg.stages)
    _check_folder(out, cfg.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial-*"):  # staging folders of a stage that was killed
        shutil.rmtree(stale, ignore_errors=True)
    state_path = out / "demo.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and (state.get("model") != cfg.model or state.get("quick") != cfg.quick):
        raise UserError(
            f"{out} holds a demo of {state.get('model')} (quick={state.get('quick')}): use the same settings to "
            "continue it, or --overwrite to start over"
        )
    state |= {"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed}
    stages_state: dict[str, Any] = state.setdefault("stages", {})
    atomic_write_text(state_path, to_json(state))
    ctx = DemoContext(cfg, out)
    for i, stage in enumerate(selected, 1):
        missing = [n for n in stage.needs if not stage_done(out, n) and n not in [s.name for s in selected[:i]]]
        if missing:
            raise UserError(f"stage {stage.name} needs stage {missing[0]}: add it to --stages or run it first")
        prefix = f"[{i}/{len(selected)}] {stage.title}"
        if stage_done(out, stage.name):
            echo(f"{prefix}: done before, reusing {out / stage.name}")
            continue
        echo(f"{prefix} ...")
        t = time.time()
        stage.run(ctx)
        seconds = round(time.time() - t, 1)
        stages_state[stage.name] = {"seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(state_path, to_json(state))
        echo(f"{prefix}: {seconds:.1f} s")
    results = demo_results(out, state, session_seconds=time.time() - t0)
    atomic_write_text(out / "results.json", to_json(results))
    atomic_write_text(
        out / "manifest.json",
        to_json(
            manifest(command="demo", seed=cfg.seed, started=t0, model={"name": cfg.model}, data={}, quick=cfg.quick)
        ),
    )
    write_demo_report(out, results)
    echo(f"demo finished: {results['seconds']['stages_total']:.0f} s of stage time; report in {out / 'report.html'}")
    return out


def _read(out: Path, stage: str) -> dict[str, Any] | None:
    path = out / stage / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def demo_results(out: Path, state: dict[str, Any], *, session_seconds: float) -> dict[str, Any]:
    """The demo's own results: which stages ran, their times, and the headline numbers next to the published ones."""
    stages = {
        s.name: {
            "title": s.title,
            "done": stage_done(out, s.name),
            "seconds": state.get("stages", {}).get(s.name, {}).get("seconds"),
        }
        for s in STAGES
    }
    total = sum(v["seconds"] or 0 for v in stages.values())
    return {
        "model": state.get("model"),
        "quick": state.get("quick"),
        "seed": state.get("seed"),
        "stages": stages,
        "headlines": headlines(out),
        "seconds": {"stages_total": round(total, 1), "this_session": round(session_seconds, 1)},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _headline_align(r: dict[str, Any]) -> dict[str, Any]:
    b, a, v = r["before"], r["after"], r["verdicts"]
    return {
        "effect": "a short safety SFT makes the model refuse harmful requests",
        "published": "alignment is cheap: a small change installs refusal (the hypothesis)",
        "ours": f"refusal {_pct(b['refusal']['rate'])} -> {_pct(a['refusal']['rate'])}, over-refusal "
        f"{_pct(b['overrefusal']['rate'])} -> {_pct(a['overrefusal']['rate'])}",
        "verdict": v["refusal_up"]["verdict"],
        "reproduced": v["refusal_up"]["verdict"] == "reproduced",
    }


def _headline_probe(r: dict[str, Any]) -> dict[str, Any]:
    sep = r["separation"]
    good = [m for m, v in sep.items() if v["verdict"] == "reproduced" and m != "naive"]
    naive = sep.get("naive", {}).get("verdict")
    emb = [v["embedding_gap"]["mean"] for v in r.get("confound", {}).values()]
    return {
        "effect": "alignment shows as a refusal-leaning reasoning direction in the later layers",
        "published": "Q is closer to Q+refusal than to Q+compliance in aligned models only (Figs. 2-4)",
        "ours": f"controlled methods that separate aligned from unaligned: {', '.join(good) or 'none'}; the paper's "
        f"probe: {naive or 'n/a'} (its gap is already "
        + (f"{emb[0]:+.2f} at the embedding layer, a word-identity confound)" if emb else "n/a)"),
        "reproduced": bool(good),
    }


def _headline_ablate(r: dict[str, Any]) -> dict[str, Any]:
    c = r["comparison"]
    return {
        "effect": "ablating the few SCU breaks refusal; random units of the same count do not (Table 1)",
        "published": "ASR rises sharply after ablating ~1.3% SCU (Llama-2-7B-Chat)",
        "ours": f"ASR {_pct(c['baseline_asr'])} -> {_pct(c['scu_asr'])} (coherent compliance "
        f"{_pct(c['scu_coherent_compliance'])}); random same-size: mean {_pct(c['random_asr_mean'])}, max "
        f"{_pct(c['random_asr_max'])} over {c['seeds']} seeds"
        + (
            f" (coherent compliance max {_pct(c['random_coherent_compliance_max'])}"
            + ("" if c.get("scu_coherent_exceeds_random_max") else ": SCU not beyond random on that measure")
            + ")"
            if c.get("random_coherent_compliance_max") is not None
            else ""
        ),
        "reproduced": bool(c["scu_asr_exceeds_random_max"]),
    }


def _headline_transfer(r: dict[str, Any]) -> dict[str, Any]:
    p = r["paper"]
    return {
        "effect": "a benign fine-tune turns SCU into CU and CU into UCU (attribute transfer, Fig. 5)",
        "published": "over half of SCU became CU; part of CU became UCU",
        "ours": f"SCU->CU {_pct(p['scu_to_cu'])} (data-noise control {_pct(p.get('control_scu_to_cu'))}), "
        f"CU->UCU {100 * p['cu_to_ucu']:.1f}% (control {_pct(p.get('control_cu_to_ucu'))})",
        "reproduced": bool(p["reproduced"]),
    }


def _headline_protect(r: dict[str, Any]) -> dict[str, Any]:
    parts, verdicts = [], []
    names = {"full": "full", "freeze-scu-cu": "frozen SCU+CU", "random": "random-frozen", "lora": "LoRA"}
    for kind, v in r["verdict"].items():
        comps = {(c["a"], c["b"]): c for c in v["comparisons"]}
        c = comps.get(("freeze-scu-cu", "random")) or comps.get(("freeze-scu-cu", "full"))
        if c is None:
            continue
        cells = [x for x in r.get("cells", []) if x["kind"] == kind]
        last = max((x["steps"] for x in cells), default=None)
        asr = {x["setting"]: x["asr"]["rate"] for x in cells if x["steps"] == last}
        after = ", ".join(f"{label} {_pct(asr[k])}" for k, label in names.items() if k in asr)
        initial = r.get("initial", {}).get("asr", {}).get("rate")
        parts.append(
            f"{kind}, ASR {_pct(initial)} before -> after {last} steps: {after} "
            f"(frozen SCU+CU vs {c['b']}: {c['outcome']})"
            if after
            else f"{kind}: frozen SCU+CU ASR {_pct(c['asr_a'])} vs {c['b']} {_pct(c['asr_b'])} ({c['outcome']})"
        )
        verdicts.append(c["outcome"] == "lower")
    return {
        "effect": "freezing SCU (+ top CU) while fine-tuning keeps safety better than full fine-tuning (Tables 2-3)",
        "published": "Alpaca: ASR 5.3% full vs 2.96% frozen SCU+6% CU (Llama-2-7B-Chat)",
        "ours": "; ".join(parts) or "n/a",
        "reproduced": bool(verdicts) and all(verdicts),
    }


def _headline_budget(r: dict[str, Any]) -> dict[str, Any]:
    c = r["comparison"]
    tax = c["tax"]
    return {
        "effect": "aligning through redundant units only reaches full SFT's safety with less tax (Table 4)",
        "published": "RU-only SFT (about 20% of units) matches or beats full SFT on utility",
        "ours": f"refusal gain: full {_pct(tax['full']['refusal_gain'])}, RU-only {_pct(tax['ru']['refusal_gain'])}, "
        f"random units {_pct(tax.get('random', {}).get('refusal_gain'))}; RU-only trains "
        f"{100 * c['ru_params_vs_full']:.0f}% of full's parameters",
        "reproduced": bool(c["ru_reached_full_refusal"] and c["ru_less_tax"]),
    }


HEADLINES: tuple[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ("align", _headline_align),
    ("probe", _headline_probe),
    ("ablate", _headline_ablate),
    ("transfer", _headline_transfer),
    ("protect", _headline_protect),
    ("budget", _headline_budget),
)


def _overrefusal_row(out: Path) -> dict[str, Any] | None:
    """Not a published effect but its price: over-refusal of borderline-safe prompts before and after alignment."""
    base, aligned = _read(out, "eval-base"), _read(out, "eval-aligned")
    if not base or not aligned:
        return None
    b, a = base["overrefusal"], aligned["overrefusal"]
    return {
        "effect": "the safety tax: refusing borderline-safe prompts (XSTest-style) after alignment",
        "published": "not reported in the paper (reviewers asked for over-refusal)",
        "ours": f"over-refusal {_pct(b['rate'])} -> {_pct(a['rate'])} on {a['n']} borderline prompts"
        + (" (the short SFT over-generalises: see the evaluations below)" if a["rate"] - b["rate"] > 0.25 else ""),
        "reproduced": None,
    }


def headlines(out: Path) -> list[dict[str, Any]]:
    """One row per published effect: what the paper reports, what this run measured, and whether it reproduced."""
    rows: list[dict[str, Any]] = []
    for stage, make in HEADLINES:
        r = _read(out, stage)
        if r is None:
            continue
        try:
            rows.append(make(r))
        except (KeyError, TypeError, ValueError) as exc:  # a run folder from another ssah version
            rows.append(
                {"effect": f"{stage}: see its section", "published": "", "ours": f"({exc!r})", "reproduced": None}
            )
    units = _read(out, "units")
    if units and units.get("stability"):
        st = units["stability"]["SCU"]
        rows.insert(
            1,
            {
                "effect": "safety-critical units are a small, stable set (SCU overlap between data halves)",
                "published": "about 1.3% of units are SCU",
                "ours": f"{units['categories']['SCU']['count']} SCU ({100 * units['categories']['SCU']['fraction']:.1f}"
                f"%), Jaccard {st['jaccard']:.2f} vs chance {st['chance']:.3f}",
                "reproduced": st["jaccard"] > 10 * max(st["chance"], 1e-3),
            },
        )
    try:
        row = _overrefusal_row(out)
    except (KeyError, TypeError):  # eval folders from another ssah version
        row = None
    if row is not None:
        rows.insert(1 if rows and rows[0]["effect"].startswith("a short safety SFT") else 0, row)
    return rows


def _stage_markdown(out: Path, stage: Stage) -> str:
    """A stage's report re-rendered, headings one level down and image paths made relative to the demo folder."""
    results = _read(out, stage.name)
    if results is None:
        return f"## {stage.title}\n\nNot run yet (`ssah demo --stages {stage.name}`).\n"
    mod = importlib.import_module(f"ssah.experiments.{stage.module}")
    render = getattr(mod, "render", None)
    md = render(results, out / stage.name) if render else (out / stage.name / "report.md").read_text()
    md = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", md, flags=re.MULTILINE)
    md = re.sub(r"\]\((?!https?:|/|#)([^)]+)\)", lambda m: f"]({stage.name}/{m.group(1)})", md)
    return md


def _seconds(stage: dict[str, Any]) -> str:
    if stage["seconds"] is not None:
        return f"{stage['seconds']:.0f}"
    return "reused" if stage["done"] else "not run"


def render(results: dict[str, Any], run_dir: Path) -> str:
    """The demo report: headline table, stage timings, then every stage's own report."""
    from ssah.report import markdown_table

    def yes(v: bool | None) -> str:
        return "yes" if v else ("no" if v is not None else "n/a")

    # Read again from the stage folders, so that `ssah report` shows the current comparison of the numbers there.
    rows = headlines(run_dir) or results.get("headlines", [])

    lines = [
        f"# ssah demo: {results['model']}",
        "",
        f"{'Quick' if results['quick'] else 'Full'} settings, seed {results['seed']}. Every number below comes from "
        "the run folders beside this report; `ssah report` rebuilds it.",
        "",
        "## Published effects and what we measured",
        "",
        markdown_table(
            ["effect", "published", "ours", "reproduced"],
            [[h["effect"], h["published"], h["ours"], yes(h["reproduced"])] for h in rows],
        ),
        "",
        "## Stages and time",
        "",
        markdown_table(
            ["stage", "what", "seconds"],
            [
                [
                    name,
                    s["title"],
                    f"{s['seconds']:.0f}" if s["seconds"] is not None else ("reused" if s["done"] else "-"),
                ]
                for name, s in results["stages"].items()
            ],
        ),
        "",
        f"Stage time in total: {results['seconds']['stages_total']:.0f} s.",
        "",
    ]
    for stage in STAGES:
        if results["stages"].get(stage.name, {}).get("done"):
            lines += [_stage_markdown(run_dir, stage), ""]
    return "\n".join(lines)


def write_demo_report(out: Path, results: dict[str, Any]) -> None:
    """Write report.md and the self-contained report.html of a demo folder."""
    from ssah.htmlreport import write_report_files

    write_report_files(out, render(results, out), f"ssah demo: {results['model']}")
