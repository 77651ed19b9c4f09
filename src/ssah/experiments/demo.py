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

from pydantic import Field

from ssah.config import Dtype, ModelRunConfig, Out
from ssah.errors import UserError
from ssah.fields import CommaList
from ssah.runs import FolderLock, atomic_write_text, check_output_folder, manifest, to_json


class DemoConfig(ModelRunConfig):
    """Everything `ssah demo` needs: the base (unaligned) model, the folder, and how small to run each stage."""

    cli_arguments = ()  # the model is an option here: the demo has a default one
    model: str = Field(
        "smollm2-135m-instruct", description="The unaligned base model (registry name, folder, .gguf file or hub id)."
    )
    out: Out = Field("runs/demo", description="Demo folder; an existing demo there is continued.")
    dtype: Dtype = "float32"
    quick: bool = Field(
        True,
        description="Every stage with its shipped quick config (--full: the full-size defaults).",
        json_schema_extra={"flag": "--quick/--full"},
    )
    stages: CommaList | None = Field(None, description="Comma-separated subset of stages, e.g. align,units,ablate.")


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


def _run(recipe: str, ctx: DemoContext, values: dict[str, Any]) -> Path:
    """Run one stage's recipe: its shipped quick config under ``--quick`` (where it has one), then ``values``."""
    from ssah.config import shipped_configs
    from ssah.recipes import get_recipe

    r = get_recipe(recipe)
    size = "quick" if ctx.cfg.quick and "quick" in shipped_configs().get(recipe, {}) else None
    stage = values.pop("out")
    return r.runner()(r.config_class().resolve(recipe, size, {**ctx.common(stage), **values}))


def _align(ctx: DemoContext) -> Path:
    return _run("align", ctx, {"out": "align", "model": ctx.cfg.model, "dtype": ctx.cfg.dtype})


def _eval(which: str) -> Callable[[DemoContext], Path]:
    def run(ctx: DemoContext) -> Path:
        model = ctx.cfg.model if which == "base" else ctx.aligned
        return _run("eval", ctx, {"out": f"eval-{which}", "model": model, "dtype": ctx.cfg.dtype})

    return run


def _units(ctx: DemoContext) -> Path:
    return _run("units", ctx, {"out": "units", "model": ctx.aligned, "dtype": ctx.cfg.dtype, "stability": True})


def _probe(ctx: DemoContext) -> Path:
    return _run("probe", ctx, {"out": "probe", "model": ctx.aligned, "compare": ctx.cfg.model})


def _ablate(ctx: DemoContext) -> Path:
    return _run("ablate", ctx, {"out": "ablate", "model": ctx.aligned, "units": ctx.units_file})


def _transfer(ctx: DemoContext) -> Path:
    return _run("transfer", ctx, {"out": "transfer", "model": ctx.aligned})


def _protect(ctx: DemoContext) -> Path:
    return _run("protect", ctx, {"out": "protect", "model": ctx.aligned, "units": ctx.units_file})


def _budget(ctx: DemoContext) -> Path:
    return _run("budget", ctx, {"out": "budget", "model": ctx.cfg.model})


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
    """The stages to run, in pipeline order (None: all); unknown names, and a list that names none, are errors."""
    if names is None:
        return list(STAGES)
    if not names:
        raise UserError(f"--stages names no stage: list some of {', '.join(STAGE_NAMES)}, or leave it out for all")
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown:
        raise UserError(f"unknown demo stage {unknown[0]!r}: use some of {', '.join(STAGE_NAMES)}")
    return [s for s in STAGES if s.name in names]


def stage_done(out: Path, name: str) -> bool:
    """A stage is done when its run folder was committed (run folders appear atomically, results.json last)."""
    return (out / name / "results.json").is_file() and (out / name / "manifest.json").is_file()


def _check_folder(out: Path, overwrite: bool) -> None:
    """A demo folder must be new, empty, or a demo folder (``demo.json``); with ``overwrite`` anything goes."""
    check_output_folder(out, overwrite=True)  # a place a folder can be written, and no other run writing it
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (out / "demo.json").is_file():
        raise UserError(f"output folder {out} exists and is not a demo folder: choose another --out")


def _read_state(path: Path) -> dict[str, Any]:
    """The demo's state file (``demo.json``), or {} when there is none; a damaged one is a user error."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}): pass --overwrite to start the demo over") from None
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("model"), str)
        and isinstance(state.get("quick"), bool)
        and isinstance(state.get("stages", {}), dict)
    )
    if not ok:
        raise UserError(f"{path} is not a demo state (damaged or edited): pass --overwrite to start the demo over")
    return state  # type: ignore[no-any-return]


def _check_continuation(out: Path, state: dict[str, Any], cfg: DemoConfig) -> None:
    """Continuing a demo needs the settings it was started with: stages run with another model, size or seed
    would be mixed into one report."""
    if not state:
        return
    theirs = {"model": state.get("model"), "quick": state.get("quick"), "seed": state.get("seed", cfg.seed)}
    ours = {"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed}
    for key in theirs:
        if theirs[key] != ours[key]:
            started = ", ".join(f"{k}={v}" for k, v in theirs.items())
            raise UserError(
                f"{out} holds a demo started with {started}, not {key}={ours[key]}: use the same settings to "
                "continue it, or --overwrite to start over"
            )


def _check_needs(out: Path | None, selected: list[Stage]) -> None:
    """Every selected stage's prerequisites are done in ``out`` (None: a new folder) or selected before it;
    checked before anything is written."""
    for i, stage in enumerate(selected):
        earlier = [s.name for s in selected[:i]]
        missing = [n for n in stage.needs if not (out is not None and stage_done(out, n)) and n not in earlier]
        if missing:
            raise UserError(f"stage {stage.name} needs stage {missing[0]}: add it to --stages or run it first")


def run_demo(cfg: DemoConfig, *, echo: Callable[[str], None] = print) -> Path:
    """Run (or continue) the demo and write its report; returns the demo folder.

    The demo folder's lock (:class:`ssah.runs.FolderLock`) is held throughout, so two demos cannot write one
    folder; every check (folder, state, settings, stage order) happens before the first write."""
    t0 = time.time()
    out = Path(cfg.out)
    selected = check_stages(cfg.stages)
    _check_folder(out, cfg.overwrite)
    lock = FolderLock(out).acquire()
    try:
        return _run_locked(cfg, out, selected, t0, echo)
    finally:
        lock.release()


def _run_locked(cfg: DemoConfig, out: Path, selected: list[Stage], t0: float, echo: Callable[[str], None]) -> Path:
    state_path = out / "demo.json"
    state: dict[str, Any] = {}
    if cfg.overwrite:
        _check_needs(None, selected)  # the folder is about to be replaced: no stage is done
        if out.exists():
            shutil.rmtree(out)
    else:
        _check_folder(out, overwrite=False)  # again, under the lock
        state = _read_state(state_path)
        _check_continuation(out, state, cfg)
        _check_needs(out, selected)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.partial-*"):  # staging folders of a stage that was killed (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    state |= {"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed}
    stages_state: dict[str, Any] = state.setdefault("stages", {})
    atomic_write_text(state_path, to_json(state))
    ctx = DemoContext(cfg, out)
    for i, stage in enumerate(selected, 1):
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


def _ci(c: dict[str, Any]) -> str:
    lo, hi = c["ci95"]
    return f"{100 * c['difference']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _headline_align(r: dict[str, Any]) -> dict[str, Any]:
    b, a, v = r["before"], r["after"], r["verdicts"]["refusal_up"]
    return {
        "effect": "a short safety SFT makes the model refuse harmful requests",
        "published": "alignment is cheap: a small change installs refusal (the hypothesis)",
        "ours": f"refusal {_pct(b['refusal']['rate'])} -> {_pct(a['refusal']['rate'])} "
        f"({_ci(v['comparison'])}), over-refusal {_pct(b['overrefusal']['rate'])} -> "
        f"{_pct(a['overrefusal']['rate'])}",
        "verdict": v["verdict"],
    }


# The probe's verdict comes from one method declared before looking: the paper's distance gap with the same gap
# after harmless queries subtracted (its content confound removed). Taking whichever of several methods separates
# would be a multiple comparison; the others are listed beside it.
PRIMARY_PROBE = "contrast"


def _headline_probe(r: dict[str, Any]) -> dict[str, Any]:
    sep = r["separation"]
    controlled = [m for m in sep if m != "naive"]
    primary = PRIMARY_PROBE if PRIMARY_PROBE in sep else (controlled[0] if controlled else None)
    good = [m for m in controlled if sep[m]["verdict"] == "reproduced"]
    naive = sep.get("naive", {}).get("verdict")
    emb = [v["embedding_gap"]["mean"] for v in r.get("confound", {}).values()]
    confound = f"{emb[0]:+.2f} at the embedding layer, a word-identity confound)" if emb else "n/a)"
    return {
        "effect": "alignment shows as a refusal-leaning reasoning direction in the later layers",
        "published": "Q is closer to Q+refusal than to Q+compliance in aligned models only (Figs. 2-4)",
        "ours": (f"primary method `{primary}`: {sep[primary]['decision']['reason']}; " if primary else "")
        + f"controlled methods reproducing over a run of later layers (Bonferroni-corrected): "
        f"{len(good)} of {len(controlled)} ({', '.join(good) or 'none'}); the paper's probe: {naive or 'n/a'} "
        "(its gap is already " + confound,
        "verdict": sep[primary]["verdict"] if primary else None,
    }


def _headline_ablate(r: dict[str, Any]) -> dict[str, Any]:
    v = r["verdicts"]["scu_vs_random"]["asr"]
    c = v["comparison"]
    cc = r["verdicts"]["scu_vs_random"].get("coherent_compliance")
    extra = f"; coherent compliance: {cc['verdict']} ({_ci(cc['comparison'])})" if cc else ""
    return {
        "effect": "ablating the few SCU breaks refusal; stratified random units of the same count do not (Table 1)",
        "published": "ASR +56 / +71 points after ablating SCU (Llama-2-7B-Chat / Llama-3-8B-Instruct)",
        "ours": f"SCU-ablated ASR {_pct(c['effect'])} vs random (same count per layer and kind) "
        f"{_pct(c['control'])}: {_ci(c)}{extra}",
        "verdict": v["verdict"],
    }


def _headline_transfer(r: dict[str, Any]) -> dict[str, Any]:
    p = r["paper"]
    t = p["tests"]["SCU->CU"]
    ours = f"SCU->CU {_pct((p.get('scu_to_cu') or {}).get('rate'))} on the full data"
    if "comparison" in t:
        c = t["comparison"]
        ours += f"; across data halves {_pct(c['effect'])} vs data-noise control {_pct(c['control'])} ({_ci(c)})"
    return {
        "effect": "a benign fine-tune turns SCU into CU and CU into UCU (attribute transfer, Fig. 5)",
        "published": "over half of SCU became CU; part of CU became UCU",
        "ours": f"{ours}: {t['reason']}",
        "verdict": p["verdict"],
    }


def _headline_protect(r: dict[str, Any]) -> dict[str, Any]:
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
    verdict = (
        None
        if not verdicts
        else "reproduced"
        if all(x == "reproduced" for x in verdicts)
        else "not reproduced"
        if any(x == "not reproduced" for x in verdicts)
        else "inconclusive"
    )
    return {
        "effect": "freezing SCU (+ top CU) while fine-tuning keeps safety better than random frozen units (Tables 2-3)",
        "published": "Alpaca: ASR 5.3% full vs 2.96% frozen SCU + 6% (Llama-2-7B-Chat; no random control)",
        "ours": "; ".join(parts) or "n/a",
        "verdict": verdict,
    }


def _headline_budget(r: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = {}
    for x in r["conditions"]:
        first.setdefault(x["name"], x)
    ours = ", ".join(
        f"refusal {x['label']} {_pct(x['eval']['refusal']['rate'])}" for n, x in first.items() if n != "random"
    )
    v = r["verdicts"]
    if "ru_vs_random" in v:
        ours += f"; RU-only vs {r['settings']['seeds']} random-unit seeds: " + ", ".join(
            f"{k} {x['verdict']}" for k, x in v["ru_vs_random"].items()
        )
    c = v.get("ru_vs_full", {}).get("task_accuracy", {}).get("comparison")
    if c:
        ours += f"; benign answers correct RU-only {_pct(c['effect'])} vs full {_pct(c['control'])} ({_ci(c)})"
    return {
        "effect": "aligning through redundant units only keeps more utility than full SFT (Table 4)",
        "published": "RU-only SFT: GSM8K 13.4 vs 8.8 for full SFT (Llama-2-7B)",
        "ours": ours,
        "verdict": r["paper"]["verdict"],
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
        "verdict": None,
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
            rows.append({"effect": f"{stage}: see its section", "published": "", "ours": f"({exc!r})", "verdict": None})
    units = _read(out, "units")
    if units and units.get("stability") and "verdict" in units["stability"]["SCU"]:
        st = units["stability"]["SCU"]
        found, chance = st["found_again"], st["found_again_by_chance"]
        rows.insert(
            1,
            {
                "effect": "safety-critical units are a stable set (SCU found again on disjoint data halves)",
                "published": "SCU identified from calibration data (the share, 1.3%, is an input of the method)",
                "ours": f"{_pct(found['rate'])} of one half's SCU are SCU on the other half, vs {_pct(chance['rate'])}"
                f" by chance (Jaccard {st['jaccard']:.2f} vs {st['chance']:.3f})",
                "verdict": st["verdict"]["verdict"],
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

    def word(v: str | None) -> str:
        return "n/a" if v is None else f"**{v}**" if v == "reproduced" else v

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
        "Verdict rule (one for every row): *reproduced* only when the 95% interval of the difference to the "
        "control (or to the baseline where the paper has none) excludes zero in the published direction; *not "
        "reproduced* when it excludes zero the other way or lies within ±5 points of zero; otherwise "
        "*inconclusive* (each stage's report says how many prompts would decide). Random controls keep the count "
        "in every (layer, kind) cell and are compared as a distribution over seeds.",
        "",
        markdown_table(
            ["effect", "published", "ours", "verdict"],
            [[h["effect"], h["published"], h["ours"], word(h.get("verdict"))] for h in rows],
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
