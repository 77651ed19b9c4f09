"""`ssah demo`: the whole method on one model in one command, with one report a person can read.

Stages (each an ordinary experiment writing its own run folder under the demo folder; every registered recipe's
:class:`ssah.registry.DemoStage`, in their order): align -> eval of both models -> probe -> units -> ablation ->
attribute transfer -> protected fine-tuning -> alignment budget. A stage whose folder already holds
``results.json`` is reused, so an interrupted demo continues where it stopped; ``stages`` runs a subset. The demo
folder gets ``results.json`` (timings and the science table: each result of the paper next to ours, with its
interval, control, verdict and judge, from the recipes' :class:`ssah.registry.Headline` rows), ``report.md`` and a
self-contained ``report.html``; ``ssah report DEMO --readme README.md`` copies the science table into a README.
The units stage also finds SCU with AdvBench- and HarmBench-based safety sets when the public data is present
(SCU stability across calibration sets).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from ssah.config import Dtype, ModelRunConfig, Out
from ssah.errors import UserError
from ssah.fields import CommaList
from ssah.models import native_bf16, resolve_bf16
from ssah.recipes.demo import RECIPE
from ssah.registry import DemoStage, Recipe, demo_stages, shipped_configs
from ssah.reports.science import headlines
from ssah.results import RunResult
from ssah.runs import FolderLock, atomic_write_text, check_output_folder, manifest, to_json, write_report


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
    bf16: bool | None = Field(
        None,
        description="bf16 autocast for generation and fine-tuning in every stage (statistics stay fp32). Default: "
        "auto, on where the hardware runs bf16 natively (a GPU with bf16, a CPU with AVX512-BF16 or AMX: about 2x "
        "faster, benchmarks/bench_mixed_precision.py), fp32 elsewhere (an AVX2-only CPU emulates bf16, 38x slower "
        "measured). --bf16 / --no-bf16 force it.",
    )


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
            "bf16": c.bf16,
            "overwrite": True,  # only reached when the stage folder holds no finished run
        }


@dataclass(frozen=True)
class Stage:
    """One step of the demo: a registered recipe's :class:`ssah.registry.DemoStage`, run into ``<demo>/<name>``."""

    recipe: Recipe
    spec: DemoStage

    name = property(lambda self: self.spec.name)
    title = property(lambda self: self.spec.title)
    needs = property(lambda self: self.spec.needs)

    def options(self, ctx: DemoContext) -> dict[str, Any]:
        """The base or the aligned model; where asked the demo's dtype, the units stage's file, the base model to
        compare with; the stage's fixed settings and what its ``options(ctx)`` adds."""
        c, s = ctx.cfg, self.spec
        wanted = {"dtype": (s.dtype, c.dtype), "units": (s.units, ctx.units_file), "compare": (s.compare, c.model)}
        chosen = {k: v for k, (on, v) in wanted.items() if on}
        extra = self.recipe.resolve(s.options)(ctx) if s.options is not None else {}
        return {"model": c.model if s.model == "base" else ctx.aligned, **s.fixed, **chosen, **extra}

    def run(self, ctx: DemoContext) -> RunResult[Any]:
        """The recipe's shipped ``quick`` config under a quick demo (where it ships one), then the stage's options."""
        name = self.recipe.name
        size = "quick" if ctx.cfg.quick and "quick" in shipped_configs().get(name, {}) else None
        values = {**ctx.common(self.name), **self.options(ctx)}
        return self.recipe.runner()(self.recipe.config_class().resolve(name, size, values))


def stages() -> tuple[Stage, ...]:
    """The demo's stages in pipeline order: every registered recipe's demo stages (align -> eval of both models ->
    probe -> units -> ablation -> attribute transfer -> protected fine-tuning -> alignment budget, then any
    user recipe's)."""
    return tuple(Stage(recipe, spec) for recipe, spec in demo_stages())


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in stages())


def check_stages(names: list[str] | None) -> list[Stage]:
    """The stages to run, in pipeline order (None: all); unknown names, and a list that names none, are errors."""
    every = stages()
    known = ", ".join(s.name for s in every)
    if names is None:
        return list(every)
    if not names:
        raise UserError(f"--stages names no stage: list some of {known}, or leave it out for all")
    unknown = [n for n in names if n not in {s.name for s in every}]
    if unknown:
        raise UserError(f"unknown demo stage {unknown[0]!r}: use some of {known}")
    return [s for s in every if s.name in names]


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
    theirs["bf16"] = state.get("bf16", False)  # demos from before the option ran in fp32
    ours = {k: getattr(cfg, k) for k in ("model", "quick", "seed", "bf16")}
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


def run_demo(cfg: DemoConfig, *, echo: Callable[[str], None] = print) -> RunResult[DemoConfig]:
    """Run (or continue) the demo and write its report; returns its RunResult (each stage's run folder is a run
    of its own: ``load_run(result.out / "ablate")``).

    The demo folder's lock (:class:`ssah.runs.FolderLock`) is held throughout, so two demos cannot write one
    folder; every check (folder, state, settings, stage order) happens before the first write."""
    t0 = time.time()
    out = Path(cfg.out)
    selected = check_stages(cfg.stages)
    forced = cfg.bf16 is True
    cfg = cfg.model_copy(update={"bf16": resolve_bf16(cfg.bf16, cfg.device)})  # every stage gets a plain bool
    _check_folder(out, cfg.overwrite)
    slow = forced and not native_bf16(cfg.device)  # said once every check has passed (errors stay one line)
    lock = FolderLock(out).acquire()
    try:
        return _run_locked(cfg, out, selected, t0, echo, slow_bf16=slow)
    finally:
        lock.release()


def _run_locked(
    cfg: DemoConfig,
    out: Path,
    selected: list[Stage],
    t0: float,
    echo: Callable[[str], None],
    *,
    slow_bf16: bool = False,
) -> RunResult[DemoConfig]:
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
    state |= {"model": cfg.model, "quick": cfg.quick, "seed": cfg.seed, "bf16": cfg.bf16}
    stages_state: dict[str, Any] = state.setdefault("stages", {})
    atomic_write_text(state_path, to_json(state))
    if slow_bf16:
        echo("note: --bf16 on a device without native bf16 (emulated, slower than fp32): drop it for auto")
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
    results = json.loads(to_json(demo_results(out, state, session_seconds=time.time() - t0)))
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(out / "results.json", to_json(results))
    mf = manifest(command="demo", seed=cfg.seed, started=t0, model={"name": cfg.model}, data={}, quick=cfg.quick)
    atomic_write_text(out / "manifest.json", to_json(mf))
    write_report(out, "demo", results, RECIPE.renderer())
    echo(f"demo finished: {results['seconds']['stages_total']:.0f} s of stage time; report in {out / 'report.html'}")
    return RunResult(out=out, recipe="demo", config=cfg, results=results, manifest=json.loads(to_json(mf)))


def demo_results(out: Path, state: dict[str, Any], *, session_seconds: float) -> dict[str, Any]:
    """The demo's own results: which stages ran, their times, and the headline numbers next to the published ones."""
    done = {
        s.name: {
            "title": s.title,
            "done": stage_done(out, s.name),
            "seconds": state.get("stages", {}).get(s.name, {}).get("seconds"),
        }
        for s in stages()
    }
    total = sum(v["seconds"] or 0 for v in done.values())
    return {
        "model": state.get("model"),
        "quick": state.get("quick"),
        "seed": state.get("seed"),
        "bf16": state.get("bf16", False),
        "stages": done,
        "headlines": headlines(out),
        "seconds": {"stages_total": round(total, 1), "this_session": round(session_seconds, 1)},
    }
