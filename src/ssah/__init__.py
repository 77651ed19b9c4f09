"""ssah: see, protect and install the safety of a language model at neuron level.

The public API is imported lazily so that ``import ssah`` stays fast:

    lm = ssah.load_model("smollm2-135m-instruct")
    s = ssah.score_units(lm.model, lm.tokenizer, ssah.load_prompts("builtin:safety"))
    u = ssah.score_units(lm.model, lm.tokenizer, ssah.load_prompts("builtin:utility"))
    cats = ssah.categorize(s, u, rule="ssah")

Every recipe's ``run(config)`` returns a typed :class:`RunResult`; :func:`load_run` reads any finished run folder
back as one:

    result = ssah.load_run("runs/ablate")
    result.config.seeds, result.verdicts["verdicts.scu_vs_random.asr"].verdict, result.report_path

A recipe of one's own (its command, configs, report, demo stage) is one package that registers itself with
``ssah.register_recipe(ssah.Recipe(...))``; :mod:`ssah.registry` says how recipes are found.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "ssah.models",
    "LoadedModel": "ssah.models",
    "model_fingerprint": "ssah.models",
    "get_adapter": "ssah.arch",
    "UnitSpace": "ssah.units",
    "UnitSet": "ssah.units",
    "save_unit_sets": "ssah.units",
    "load_unit_sets": "ssah.units",
    "score_units": "ssah.scoring",
    "Scores": "ssah.scoring",
    "collect_statistics": "ssah.scoring",
    "compute_scores": "ssah.scoring",
    "categorize": "ssah.categorize",
    "Categorization": "ssah.categorize",
    "load_categorization": "ssah.categorize",
    "load_prompts": "ssah.data",
    "PromptSet": "ssah.data",
    "Example": "ssah.data",
    "ablate": "ssah.interventions",
    "channel_means": "ssah.interventions",
    "Proportion": "ssah.measure",
    "ControlDistribution": "ssah.measure",
    "compare": "ssah.measure",
    "compare_prompts": "ssah.measure",
    "verdict": "ssah.measure",
    "find_units": "ssah.measure",
    "select": "ssah.measure",
    "safety_ranking": "ssah.measure",
    "random_control": "ssah.measure",
    "measure_condition": "ssah.measure",
    "restored_weights": "ssah.measure",
    "RunResult": "ssah.results",
    "load_run": "ssah.registry",
    "Recipe": "ssah.registry",
    "register_recipe": "ssah.registry",
    "TrainConfig": "ssah.training",
    "train_model": "ssah.training",
    "SsahError": "ssah.errors",
    "UserError": "ssah.errors",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from ssah.arch import get_adapter
    from ssah.categorize import Categorization, categorize, load_categorization
    from ssah.data import Example, PromptSet, load_prompts
    from ssah.errors import SsahError, UserError
    from ssah.interventions import ablate, channel_means
    from ssah.measure import (
        ControlDistribution,
        Proportion,
        compare,
        compare_prompts,
        find_units,
        measure_condition,
        random_control,
        restored_weights,
        safety_ranking,
        select,
        verdict,
    )
    from ssah.models import LoadedModel, load_model, model_fingerprint
    from ssah.registry import Recipe, load_run, register_recipe
    from ssah.results import RunResult
    from ssah.scoring import Scores, collect_statistics, compute_scores, score_units
    from ssah.training import TrainConfig, train_model
    from ssah.units import UnitSet, UnitSpace, load_unit_sets, save_unit_sets


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ssah' has no attribute {name!r}")
