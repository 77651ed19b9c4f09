"""The recipe registry: every experiment ssah can run, found by name, never by module-naming convention.

A recipe is a config class (every option, declared once), a ``run(config) -> RunResult`` in ``ssah.experiments``
that writes a run folder (through ``ssah.runs.write_run``) and returns it typed (:class:`ssah.results.RunResult`),
and a ``render(results, run_dir) -> markdown`` in ``ssah.reports`` that redraws its plots and report from
``results.json`` alone. The CLI, ``ssah report``, ``ssah.load_run`` and the demo look recipes up here. Entries name
their objects as ``"module:attribute"`` strings and are imported on first use, so ``import ssah`` stays cheap (torch,
plotting) and a broken optional recipe cannot stop the others from loading.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssah.errors import UserError
from ssah.results import RunResult, read_config, read_json, read_manifest

Renderer = Callable[[dict[str, Any], Path], str]


def _resolve(target: str) -> Any:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class Recipe:
    """One experiment: where its config, its run function and its report renderer live."""

    name: str
    summary: str
    config: str
    run: str
    render: str | None = None  # None: the recipe writes its report itself and cannot rebuild it from results.json
    results_file: str = "results.json"  # the file of the run folder that holds its results
    # False: the CLI holds the --out folder's lock for the whole command (ssah.runs.held_output); True: the run
    # takes it itself at its start (train: only its main process under accelerate; demo: a folder it resumes)
    locks_itself: bool = False

    def config_class(self) -> Any:
        """The recipe's pydantic config class."""
        return _resolve(self.config)

    def runner(self) -> Callable[..., RunResult[Any]]:
        """The recipe's ``run(config) -> RunResult`` function (it writes the run folder, ``RunResult.out``)."""
        return _resolve(self.run)  # type: ignore[no-any-return]

    def renderer(self) -> Renderer:
        """The recipe's ``render(results, run_dir) -> markdown``; a ``UserError`` when it has none."""
        if self.render is None:
            raise UserError(f"the `{self.name}` report cannot be rebuilt from results.json: run the command again")
        return _resolve(self.render)  # type: ignore[no-any-return]


def _recipe(
    name: str,
    summary: str,
    module: str,
    config: str,
    run: str,
    render: str | None = "render",
    report: str = "",
    results_file: str = "results.json",
    locks_itself: bool = False,
) -> Recipe:
    """An entry whose report module is ``report``, by default ``ssah.reports.<last part of module>``."""
    report = report or f"ssah.reports.{module.rsplit('.', 1)[-1]}"
    return Recipe(
        name=name,
        summary=summary,
        config=f"{module}:{config}",
        run=f"{module}:{run}",
        render=f"{report}:{render}" if render else None,
        results_file=results_file,
        locks_itself=locks_itself,
    )


_E = "ssah.experiments"

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        _recipe(
            "units",
            "Score every unit on safety and utility data; split into SCU / UCU / CU / RU.",
            f"{_E}.units",
            "UnitsConfig",
            "run_units",
        ),
        _recipe("eval", "ASR, over-refusal and utility of one model.", f"{_E}.eval", "EvalConfig", "run_eval"),
        _recipe(
            "probe",
            "Where harmful and harmless prompts separate along the reasoning direction.",
            f"{_E}.probe",
            "ProbeConfig",
            "run_probe",
        ),
        _recipe(
            "ablate",
            "Ablate unit categories against stratified random controls.",
            f"{_E}.ablate",
            "AblateConfig",
            "run_ablate",
        ),
        _recipe(
            "train",
            "Fine-tune with units frozen (or only units trained).",
            f"{_E}.train",
            "TrainConfig",
            "run_train",
            locks_itself=True,
        ),
        _recipe(
            "align",
            "Make the aligned model (SFT on refusals and helpful answers).",
            f"{_E}.align",
            "AlignConfig",
            "run_align",
        ),
        _recipe(
            "transfer",
            "Do fine-tuning attacks turn safety units into utility units?",
            f"{_E}.transfer",
            "TransferConfig",
            "run_transfer",
        ),
        _recipe(
            "protect",
            "Does freezing safety units protect against a fine-tuning attack?",
            f"{_E}.protect",
            "ProtectConfig",
            "run_protect",
        ),
        _recipe(
            "direction",
            "The refusal direction (Arditi et al.): ablate, add, orthogonalise; ASR, KL, refusals.",
            f"{_E}.direction",
            "DirectionConfig",
            "run_direction",
        ),
        _recipe("budget", "Are redundant units a good alignment budget?", f"{_E}.budget", "BudgetConfig", "run_budget"),
        _recipe(
            "demo",
            "The whole method on one model, with one report.",
            f"{_E}.demo",
            "DemoConfig",
            "run_demo",
            locks_itself=True,
        ),
        _recipe(
            "judge validate",
            "Agreement of judges with human labels.",
            f"{_E}.judge",
            "JudgeValidateConfig",
            "run_judge_validate",
        ),
        _recipe(
            "judge train",
            "Train the learned judge on labelled replies.",
            f"{_E}.judge",
            "JudgeTrainConfig",
            "run_judge_train",
            None,
            results_file="training.json",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ``UserError`` listing the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise UserError(f"no recipe called {name!r}: the known recipes are {known}") from None


# -- reading a run folder back through the registry (the core ``ssah.results`` knows no recipe) ----------------
def read_run_files(run_dir: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A finished run folder's recipe name, manifest and results (its registered results file), without its
    config; a one-line ``UserError`` when the folder is not a finished ssah run."""
    run_dir = Path(run_dir)
    command, man = read_manifest(run_dir)
    name = RECIPES[command].results_file if command in RECIPES else "results.json"
    results_file = run_dir / name
    if not results_file.is_file():
        raise UserError(f"{run_dir} has no {name}: the `{command}` run did not finish; run it again")
    results = read_json(results_file, "the results")
    if not isinstance(results, dict):
        raise UserError(f"{results_file} does not hold a JSON object: it was not written by `ssah {command}`")
    return command, man, results


def load_run(run_dir: str | Path) -> RunResult[Any]:
    """Read a finished run folder back as the :class:`RunResult` its run returned: the recipe from
    ``manifest.json``, the config re-validated from ``config.yaml`` by the recipe's config class, the results and
    their verdicts. A one-line ``UserError`` when the folder is not a finished ssah run."""
    command, man, results = read_run_files(run_dir)
    config = read_config(run_dir, get_recipe(command).config_class(), command)
    return RunResult(out=Path(run_dir), recipe=command, config=config, results=results, manifest=man)
