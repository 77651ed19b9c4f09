"""The recipe protocol: what every run does around its experiment, written once.

A recipe's run is only its experiment, ``experiment(cfg, clock) -> Experiment``: it loads, measures and returns
its results, the manifest's model and data, and (``files``) how to write its own files (unit sets, samples,
scores) into the run folder. :func:`execute` owns the rest, in this order:

1. ``cfg.check()``: every check that can fail before work starts (the ``--out`` folder, values that depend on
   each other), so bad input costs nothing;
2. the seeds (:func:`ssah.runs.set_seed`) and the clock;
3. the experiment;
4. the run folder (:class:`ssah.runs.RunDir`: staged, exclusive, atomic): the experiment's files, the run's wall
   time (into ``results["seconds"]["total"]``, or ``results["seconds"]`` where that is a number), then
   ``config.yaml``, the results file, the report (the recipe's ``render``) and ``manifest.json``
   (:func:`ssah.runs.write_run`).

Recipes that own their folder differently (``train``: one writer under accelerate, resumable; ``demo``: a folder of
runs it continues) keep their own run function; they register it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ssah.results import ConfigT, RunResult
from ssah.runs import RunDir, manifest, set_seed, write_run


@dataclass
class Clock:
    """When the run started (before its checks); ``seconds()`` since then, rounded as results store them."""

    started: float = field(default_factory=time.time)

    def seconds(self) -> float:
        return round(time.time() - self.started, 3)


@dataclass
class Experiment:
    """What an experiment hands back to :func:`execute`."""

    results: dict[str, Any]
    model: Mapping[str, Any]  # the manifest's model identity (name, source, fingerprint)
    data: Mapping[str, Any]  # the manifest's data identities (sources, hashes, sizes)
    device: Any = "cpu"
    files: Callable[[RunDir], None] | None = None  # writes the experiment's own files into the staging folder
    manifest: Mapping[str, Any] = field(default_factory=dict)  # further manifest entries
    config: Any = None  # the config as run, where the experiment settled a value (an automatic batch size)
    render: Any = None  # the report of a recipe whose report cannot be rebuilt later (it has no ``render``)


def _stamp_total(results: dict[str, Any], seconds: float) -> None:
    """The run's wall time, where the results keep it: ``seconds.total``, or ``seconds`` itself."""
    held = results.get("seconds")
    if isinstance(held, dict):
        held["total"] = seconds
    elif isinstance(held, int | float):
        results["seconds"] = seconds


def execute(recipe: Any, cfg: ConfigT, experiment: Callable[[ConfigT, Clock], Experiment]) -> RunResult[ConfigT]:
    """Run ``experiment`` as ``recipe`` (a :class:`ssah.registry.Recipe`: its name, renderer and results file)
    under the protocol above; returns the run's :class:`RunResult`."""
    clock = Clock()
    cfg.check()  # type: ignore[attr-defined]
    set_seed(cfg.seed)  # type: ignore[attr-defined]
    done = experiment(cfg, clock)
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:  # type: ignore[attr-defined]
        if done.files is not None:
            done.files(run)
        _stamp_total(done.results, clock.seconds())
        mf = manifest(
            command=recipe.name,
            seed=cfg.seed,  # type: ignore[attr-defined]
            started=clock.started,
            device=done.device,
            model=done.model,
            data=done.data,
            **done.manifest,
        )
        result = write_run(
            run,
            recipe.name,
            config=cfg if done.config is None else done.config,
            results=done.results,
            manifest=mf,
            render=recipe.renderer() if done.render is None else done.render,
            results_file=recipe.results_file,
        )
    return result
