"""`ssah localize`: every localisation method finds a unit set at the same budgets; each set is ablated on the
same held-out prompts and compared, prompt by prompt, with stratified random sets of its own make-up and with the
other methods.

Methods come from :data:`ssah.localizers.LOCALIZERS` (a user's registered method is valid here like a built-in).
Evidence (scores on the calibration sets, activation statistics over their prompts) is computed once and shared.
Every condition is measured by ``measure.measure_condition`` under ``interventions.ablate`` (zero, or FLAP-style
mean from the calibration statistics), with KL on harmless prompts; verdicts by ``measure.compare_prompts`` and
``measure.verdict``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from pydantic import Field, field_validator

from ssah import measure
from ssah.arch import get_adapter
from ssah.categorize import expected_random_jaccard
from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.errors import UserError
from ssah.evaluate import EvalData, kl_divergence, kl_reference
from ssah.fields import Ablation, CalibrationSection, Count, MaxLength, Seeds, Strata, System, UtilityEvalSection
from ssah.interventions import ablate, channel_means
from ssah.judges import get_judge
from ssah.localizers import LOCALIZERS, Evidence, budget_units, parse_budgets
from ssah.localizers.model_evidence import ModelEvidence
from ssah.models import LoadedModel, load_model
from ssah.protocol import Clock, Experiment, execute
from ssah.provenance import held_out
from ssah.recipes.localize import RECIPE
from ssah.results import RunResult
from ssah.units import UnitSet, UnitSpace

DEFAULT_BUDGETS = (0.001, 0.005, 0.013, 0.03)  # shares of all units; 1.3% is the paper's SCU share
RATES = ("asr", "coherent_compliance")  # the rates each method's set is compared on


class LocalizeConfig(ModelRunConfig):
    """Everything `ssah localize` needs (full-run sizes by default; ``--config quick`` for a small run)."""

    out: Out = "runs/localize"
    base: str | None = Field(None, description="The base model (same architecture), for the aligned-vs-base method.")
    methods: list[str] | None = Field(
        None, description="Localisation methods, e.g. ssah,wei-snip (default: all; aligned-vs-base needs --base)."
    )
    budgets: list[float] = Field(
        default_factory=lambda: list(DEFAULT_BUDGETS),
        description="Unit budgets as shares of all units, e.g. 0.5%,1.3%.",
    )
    calibration: CalibrationSection = CalibrationSection(batch_size=16)
    max_length: MaxLength = 512
    ablation: Ablation = "mean"
    control_strata: Strata = "layer-kind"
    system: System = None
    eval: UtilityEvalSection = UtilityEvalSection(limit=32, batch_size=32, utility=["perplexity:builtin:task"])
    seeds: Seeds = 5
    kl: bool = Field(True, description="KL(original || ablated) on harmless prompts for every condition.")
    kl_harmless: str = Field("builtin:benign", description="Harmless prompts for the KL measurement.")
    kl_tokens: Count = Field(16, description="Tokens of the original model's greedy reply the KL is averaged over.")

    @field_validator("budgets", mode="before")
    @classmethod
    def _budgets(cls, v: Any) -> Any:
        return parse_budgets(v)

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        if v is None:
            return None
        names = [s.strip() for s in (v.split(",") if isinstance(v, str) else v) if str(s).strip()]
        return [LOCALIZERS.check(n) for n in names] or None

    def method_names(self) -> list[str]:
        """The methods this run compares: those asked for, or every registered one (aligned-vs-base only with a
        base model)."""
        if self.methods is not None:
            return list(self.methods)
        return [n for n in LOCALIZERS if self.base is not None or not LOCALIZERS.get(n).needs_base]

    def check(self) -> None:
        needs = [n for n in self.method_names() if LOCALIZERS.get(n).needs_base]
        if needs and self.base is None:
            raise UserError(f"method {needs[0]} compares with the base model: pass --base BASE_MODEL or drop it")


def run_localize(cfg: LocalizeConfig) -> RunResult[LocalizeConfig]:
    """Compare the methods and write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, localize_experiment)


def _prompts_only(ps: PromptSet, name: str) -> PromptSet:
    """The prompts of a calibration set without its responses: the contrast methods read prompt tokens only."""
    from dataclasses import replace

    return PromptSet(name, f"{ps.source} (prompts)", tuple(replace(ex, response="") for ex in ps.examples))


class _Measurer:
    """Measures the model under one unit set (ablated, then restored), with KL against the unedited model."""

    def __init__(self, cfg: LocalizeConfig, lm: LoadedModel, data: EvalData, means: Any, conditions: int) -> None:
        from tqdm.auto import tqdm

        self.cfg, self.lm, self.data, self.means = cfg, lm, data, means
        self.bar = tqdm(total=conditions, desc="conditions", unit="cond", disable=not cfg.progress)
        self.judge = get_judge(cfg.eval.judge, model=lm.model, tokenizer=lm.tokenizer)
        self.gen = cfg.eval.greedy(cfg)
        self.kl_ref = None
        if cfg.kl:
            harmless = load_prompts(cfg.kl_harmless).spread(cfg.eval.limit)
            self.kl_ref = kl_reference(lm.model, lm.tokenizer, harmless, reply_tokens=cfg.kl_tokens,
                                       system=cfg.system, batch_size=cfg.eval.batch_size)  # fmt: skip

    def __call__(self, units: UnitSet | None) -> tuple[dict[str, Any], measure.ConditionResult]:
        model = self.lm.model
        edit = nullcontext() if units is None else ablate(model, units, mode=self.cfg.ablation, means=self.means)
        with edit:
            res = measure.measure_condition(model, self.lm.tokenizer, self.data, judge=self.judge, config=self.gen)
            kl = None if self.kl_ref is None else kl_divergence(model, self.lm.tokenizer, self.kl_ref).to_dict()
        row = {"units": 0 if units is None else len(units), **res.to_dict(), **({"kl": kl} if kl else {})}
        self.bar.update()
        return row, res


def _method_rows(
    cfg: LocalizeConfig, ev: Evidence, name: str, k: int, seeds: list[int], run: _Measurer
) -> tuple[dict[str, Any], UnitSet, measure.ConditionResult | None]:
    """One method at one budget: its set, its measurement and its stratified random controls (a seeded method,
    ``random``, is measured once per seed instead and is itself the chance row)."""
    loc = LOCALIZERS.get(name)
    if loc.seeded:
        sets = [loc(ev, k, s) for s in seeds]
        return {"seeded": True, "conditions": [run(u)[0] for u in sets]}, sets[0], None
    units = loc(ev, k, cfg.seed)
    row, res = run(units)
    controls = [run(measure.random_control(units, s, strata=cfg.control_strata).units) for s in seeds]
    vs_random = {}
    for rate in RATES:
        effect = res.rates()[rate]
        draws = [c[1].rates()[rate] for c in controls]
        comp = measure.compare_prompts(effect.outcomes, [d.outcomes for d in draws])  # type: ignore[arg-type]
        vs_random[rate] = measure.verdict(comp, "higher").to_dict()
    out = {
        "seeded": False,
        "condition": row,
        "by_group": units.counts_by_group(),
        "controls": [c[0] for c in controls],
        "vs_random": vs_random,
    }
    return out, units, res


def _pairwise(results: dict[str, measure.ConditionResult]) -> dict[str, Any]:
    """Every pair of methods at one budget, paired on the prompts: ASR and coherent compliance of a minus b."""
    names, out = sorted(results), {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"{a} vs {b}"] = {
                rate: measure.compare_measured(results[a].rates()[rate], results[b].rates()[rate]).to_dict()
                for rate in RATES
            }
    return out


def _overlap(sets: dict[str, UnitSet], k: int, total: int) -> dict[str, Any]:
    names = list(sets)
    return {
        "jaccard": {a: {b: round(sets[a].jaccard(sets[b]), 4) for b in names} for a in names},
        "chance": round(expected_random_jaccard(k, total), 6),
    }


def localize_experiment(cfg: LocalizeConfig, clock: Clock) -> Experiment:
    """Load the model(s), compute the evidence once, find and ablate every method's set at every budget."""
    data = cfg.eval.load("localize")
    safety, utility = cfg.calibration.load()
    used = {"calibration safety": safety, "calibration utility": utility}  # every method's set is chosen here
    prompts = held_out(data.prompts(), used, allow_overlap=cfg.eval.allow_overlap)
    lm = load_model(cfg.model, **cfg.load_options())
    space = UnitSpace.from_groups(get_adapter(lm.model).groups(), "neuron")
    base = load_model(cfg.base, **cfg.load_options()) if cfg.base is not None else None
    if base is not None and UnitSpace.from_groups(get_adapter(base.model).groups(), "neuron") != space:
        raise UserError(f"{cfg.base} has other units than {cfg.model}: pass the base of the same architecture")
    sets = {"safety": safety, "utility": utility}
    sets |= {"harmful": _prompts_only(safety, "harmful"), "harmless": _prompts_only(utility, "harmless")}
    source = ModelEvidence(lm.model, lm.tokenizer, space, sets, base=None if base is None else base.model,
                           batch_size=cfg.calibration.batch_size, max_length=cfg.max_length,
                           progress=cfg.progress)  # fmt: skip
    ev = Evidence(space, source)
    before = measure.weights_digest(lm.model)
    seconds: dict[str, float] = {}
    t = time.time()
    means = channel_means(source.statistics("safety").merge(source.statistics("utility")))
    means = means if cfg.ablation == "mean" else None
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    per_budget = sum(cfg.seeds if LOCALIZERS.get(n).seeded else 1 + cfg.seeds for n in cfg.method_names())
    run = _Measurer(cfg, lm, data, means, 1 + per_budget * len(cfg.budgets))
    baseline, _ = run(None)
    budgets = []
    for share in cfg.budgets:
        k = budget_units(share, space)
        rows, found, measured = {}, {}, {}
        for name in cfg.method_names():
            rows[name], found[name], res = _method_rows(cfg, ev, name, k, seeds, run)
            if res is not None:
                measured[name] = res
        budgets.append({"share": share, "units": k, "methods": rows, "pairwise": _pairwise(measured),
                        "overlap": _overlap(found, k, space.total)})  # fmt: skip
    seconds["measurement"] = time.time() - t
    run.bar.close()
    results = {
        "model": {k: getattr(lm, k) for k in ("name", "source", "fingerprint", "family")}
        | {"units_total": space.total},
        "base": None if base is None else {k: getattr(base, k) for k in ("name", "source", "fingerprint")},
        "settings": cfg.model_dump(include={"ablation", "control_strata", "seeds", "kl_harmless", "kl_tokens"})
        | {"methods": cfg.method_names(), "budgets": cfg.budgets, "judge": cfg.eval.judge,
           "max_new_tokens": cfg.eval.max_new_tokens, "abouts": {n: LOCALIZERS.about(n) for n in cfg.method_names()}},
        "prompts": prompts,
        "baseline": baseline,
        "budgets": budgets,
        "seconds": {"load_model": round(lm.load_seconds, 3), **{k: round(v, 3) for k, v in seconds.items()}}
        | {"total": 0.0},  # the protocol's
    }  # fmt: skip
    after = measure.weights_digest(lm.model)
    if after != before:
        raise RuntimeError("an ablation was not undone: the model's weights changed")  # a bug, not bad input
    results["weights"] = {"sha256_before": before, "sha256_after": after, "unchanged": True}
    used = data.describe() | {ps.name: {"source": ps.source, "sha256": ps.fingerprint()} for ps in (safety, utility)}
    model = {k: results["model"][k] for k in ("name", "source", "fingerprint")}
    return Experiment(results, model, used, device=lm.model.device)
