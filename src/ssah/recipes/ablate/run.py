"""`ssah ablate`: the paper's Table 1 — ablate each unit category and measure safety and utility.

Units come from ``measure.find_units`` or a unit file (scores beside it give ``measure.safety_ranking``). Every
condition (baseline, each category, its layer-kind stratified random controls over seeds, the top-k dose curve
with controls at each point, SCU from prompt-only calibration) is ablated by :func:`ablated` (zero or FLAP-style
mean), measured by ``measure.measure_condition`` and judged by ``measure.verdict``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from ssah import measure
from ssah.arch import get_adapter
from ssah.categorize import (
    CATEGORIES,
    Categorization,
    load_categorization,
)
from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.direction import ablated_direction, fit_direction, random_direction, write_share
from ssah.errors import UnitFileError, UserError
from ssah.evaluate import EvalData, kl_reference
from ssah.fields import (
    Ablation,
    CalibrationSection,
    Count,
    Granularity,
    MaxLength,
    Seeds,
    Strata,
    System,
    UnitCategoryFields,
    UtilityEvalSection,
    parse_unit_shares,
    split_commas,
)
from ssah.generate import GenerationConfig
from ssah.interventions import ablate, channel_means
from ssah.judges import get_judge
from ssah.models import LoadedModel, load_model
from ssah.protocol import Clock, Experiment, execute
from ssah.provenance import held_out
from ssah.recipes.ablate import RECIPE
from ssah.recipes.ablate.table import _aggregate, _table, _verdicts
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder
from ssah.scoring import Scores
from ssah.units import UnitSet, UnitSpace, read_unit_file_metadata

# Dose points as shares of ALL units (the paper's SCU share on Llama-2-7B-Chat was 1.3%).
DEFAULT_DOSE: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05)
OTHER_CALIBRATION = {"prompt": "prompt+response"}  # the comparison calibration for a main calibration


def parse_dose(text: str | list[Any] | tuple[Any, ...]) -> list[float]:
    """Parse dose shares such as ``"0.25%,0.5%,1%"`` or ``"0.01,0.02"`` into fractions of all units in (0, 1)."""
    return parse_unit_shares(text, what="dose share", flag="--dose")


class AblateConfig(UnitCategoryFields, ModelRunConfig):
    """Everything `ssah ablate` needs (full-run sizes by default; ``--config quick`` for a small run)."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: Out = "runs/ablate"
    units: str | None = Field(
        None, description="units.safetensors of this model (default: compute the units in memory)."
    )
    allow_other_weights: bool = Field(
        False, description="Accept a unit file computed on other weights of the same architecture."
    )
    # the calibration data: units are found on it (without --units) and the mean ablation's channel means
    calibration: CalibrationSection = CalibrationSection(batch_size=32)
    granularity: Granularity = "neuron"
    max_length: MaxLength = 512
    stability: bool = Field(False, description="Also categorise each half of the calibration data.")
    ablation: Ablation = "mean"
    control_strata: Strata = "layer-kind"
    system: System = None
    eval: UtilityEvalSection = UtilityEvalSection(limit=32, batch_size=32, utility=["perplexity:builtin:task"])
    seeds: Seeds = 5
    dose: list[float] = Field(
        default_factory=lambda: list(DEFAULT_DOSE), description="Dose shares of all units, e.g. 0.25%,0.5%,1%."
    )
    categories: list[str] = Field(
        default_factory=lambda: list(CATEGORIES), description="Categories to ablate, e.g. SCU,RU."
    )
    random_for: list[str] | None = Field(
        None, description="Categories that get same-size random controls (default: every ablated one)."
    )
    compare_calibration: bool = Field(
        True, description="Also ablate SCU found with prompt-only calibration (no refusal text)."
    )
    direction: bool = Field(
        True,
        description="Also ablate the refusal direction (ssah.direction) at every layer, against random directions.",
    )
    kl: bool = Field(True, description="KL(original || ablated) on harmless prompts for every condition.")
    kl_harmless: str = Field("builtin:benign", description="Harmless prompts for the KL measurement.")
    kl_tokens: Count = Field(16, description="Tokens of the original model's greedy reply the KL is averaged over.")
    direction_kl_max: float = Field(
        0.1, gt=0, description="KL filter of the direction's selection (Arditi et al.'s 0.1)."
    )
    direction_layer_step: Count = Field(1, description="Direction candidates at every Nth layer (selection cost).")
    direction_positions: Count | None = Field(
        None, description="Direction candidates at the last N post-instruction positions (default: all, at most 5)."
    )
    direction_per_split: Count | None = Field(
        None, description="Prompts per side in each split of the direction's selection (default: all)."
    )

    @field_validator("dose", mode="before")
    @classmethod
    def _dose(cls, v: Any) -> Any:
        return parse_dose(split_commas(v))

    @field_validator("categories", "random_for", mode="before")
    @classmethod
    def _cats(cls, v: Any) -> Any:
        v = split_commas(v)
        return v if v is None else [str(x).strip().upper() for x in v]

    @property
    def controlled(self) -> list[str]:
        """The categories that get random controls."""
        return list(self.categories) if self.random_for is None else list(self.random_for)

    def check(self) -> None:
        """Validate everything that needs neither data nor model (nothing is written before this passes)."""
        if not self.categories:
            raise UserError("no categories to ablate: pass e.g. --categories SCU,UCU,CU,RU")
        for name in (*self.categories, *self.controlled):
            if name not in CATEGORIES:
                raise UserError(f"unknown category {name!r}: use one or more of {', '.join(CATEGORIES)}")
        measure.check_unit_search(self)
        self.eval.greedy(self)
        self.eval.check_judge()
        if self.units is not None and not Path(self.units).is_file():
            raise UserError(f"unit file {self.units} not found: pass the units.safetensors written by `ssah units`")
        check_output_folder(self.out, self.overwrite)


# ----------------------------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One ablation condition: a name, its group and the units removed (None = baseline)."""

    name: str
    group: str  # baseline | category | random | calibration | dose | dose-random
    units: UnitSet | None
    target: str = ""  # the category (or dose point) a random control matches
    seed: int | None = None
    per_stratum: dict[str, int] | None = None  # a random control's count in each stratum
    overrefusal: bool = True  # dose points skip the safe prompts (the curve plots ASR, compliance and utility)
    context: Any = None  # a zero-argument context manager factory (the refusal direction) instead of units


@contextmanager
def ablated(
    model: torch.nn.Module, units: UnitSet | None, mode: str, means: Mapping[str, torch.Tensor] | None
) -> Iterator[None]:
    """THE one place this recipe ablates (``interventions.ablate``: zero, or FLAP-style mean); a condition
    without units runs the model as it is."""
    if units is None or len(units) == 0:
        yield
        return
    with ablate(model, units, mode=mode, means=means):
        yield


def measure_conditions(
    lm: LoadedModel,
    conditions: list[Condition],
    data: EvalData,
    *,
    judge: Any,
    config: GenerationConfig,
    mode: str = "mean",
    means: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    kl_ref: Any = None,
) -> list[dict[str, Any]]:
    """Measure the model under each condition in turn (ablated by :func:`ablated`, restored after it); with
    ``kl_ref`` (``evaluate.kl_reference``) also KL on harmless prompts."""
    from tqdm.auto import tqdm

    from ssah.evaluate import kl_divergence

    rows = []
    for c in tqdm(conditions, desc="conditions", disable=not progress, unit="cond"):
        with c.context() if c.context is not None else ablated(lm.model, c.units, mode, means):
            res = measure.measure_condition(
                lm.model, lm.tokenizer, data, judge=judge, config=config, overrefusal=c.overrefusal
            )
            kl = None if kl_ref is None else kl_divergence(lm.model, lm.tokenizer, kl_ref).to_dict()
        skip = ("units", "overrefusal", "context")
        own = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in skip}
        n, share = (0, 0.0) if c.units is None else (len(c.units), c.units.fraction)
        rows.append({**own, "units": n, "fraction": share, **res.to_dict(), **({"kl": kl} if kl else {})})
    return rows


# ----------------------------------------------------------------------------------------------- the recipe


def _units(
    cfg: AblateConfig, lm: LoadedModel, safety: PromptSet, utility: PromptSet
) -> tuple[Categorization, Scores, Scores, Any, dict[str, Any]]:
    """The categorisation, its scores, the calibration statistics (None when not needed) and where they came
    from: computed in memory, or a unit file (scores beside it give the ranking; the statistics for mean
    ablation are computed once on the calibration sets)."""
    if cfg.units is None:
        f = measure.find_units(lm, safety, utility, cfg)
        tokens = cfg.calibration.tokens
        computed = {"source": "computed", "calibration": tokens, "metric": cfg.metric, "stability": f.stability}
        return f.categorization, f.safety, f.utility, f.statistics, computed
    path = Path(cfg.units)
    meta = read_unit_file_metadata(path)
    adapter = get_adapter(lm.model)
    space = UnitSpace.from_groups(adapter.groups(), meta["granularity"], lm.fingerprint, lm.name)  # type: ignore[arg-type]
    try:
        cats = load_categorization(path, space, allow_other_weights=cfg.allow_other_weights)
    except UnitFileError as exc:
        raise UserError(f"units from another model: {exc}") from None
    neuron = UnitSpace.from_groups(adapter.groups(), "neuron", lm.fingerprint, lm.name)
    files = [path.parent / "scores" / f"{n}.safetensors" for n in ("safety", "utility")]
    info: dict[str, Any] = {"source": str(path), "metric": meta.get("metric", cfg.metric)}
    scores = [Scores.load(f, neuron) for f in files] if all(f.is_file() for f in files) else None
    tokens = cfg.calibration.tokens
    info["calibration"] = (scores[0].region or tokens) if scores else f"{tokens} (no scores/ beside the file)"
    found: measure.FoundUnits | None = None
    if scores is None or cfg.ablation == "mean":
        like_file = _search_as(cfg, info["calibration"].split(" ")[0], metric=info["metric"])
        found = measure.find_units(lm, safety, utility, like_file)
    if scores is None:
        assert found is not None
        scores = [found.safety, found.utility]
        info["ranking_scores"] = f"recomputed on {safety.source} / {utility.source}"
    return cats, scores[0], scores[1], None if found is None else found.statistics, info


def _dose_points(shares: list[float], order: torch.Tensor, cats: Categorization) -> list[dict[str, Any]]:
    """Each dose share as a count of top-ranked units (at least 1; a share < 1 never exceeds all units)."""
    counts = [max(1, round(share * order.numel())) for share in shares]
    scu = cats["SCU"].mask
    return [
        {"label": f"{100 * sh:g}%", "share": sh, "count": n, "scu_in_top": int(scu[order[:n]].sum())}
        for sh, n in zip(shares, counts, strict=True)
    ]


def _other_calibration_scu(
    cfg: AblateConfig,
    lm: LoadedModel,
    cats: Categorization,
    units_info: dict[str, Any],
    safety: PromptSet,
    utility: PromptSet,
) -> tuple[UnitSet, str]:
    """SCU found the same way on the other token region (prompt <-> prompt+response), and that region."""
    region = OTHER_CALIBRATION.get(units_info["calibration"].split(" ")[0], "prompt")
    same = {k: getattr(cats, k) for k in ("rule", "normalization", "ranking")} | {"shares": dict(cats.shares)}
    same |= {"metric": units_info["metric"], "granularity": cats.space.granularity}
    other = measure.find_units(lm, safety, utility, _search_as(cfg, region, **same))
    return UnitSet(cats.space, other.categorization["SCU"].mask.clone(), "SCU"), region


def _search_as(cfg: AblateConfig, tokens: str, **settings: Any) -> AblateConfig:
    """``cfg`` with another calibration token region and other unit-search ``settings`` (a unit file's)."""
    calibration = cfg.calibration.model_copy(update={"tokens": tokens})
    return cfg.model_copy(update={**settings, "calibration": calibration})


def _dose(points: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each dose point: the top-k row, its random controls over seeds, and whether the top k raise ASR more."""
    dose = []
    for p in points:
        row = next(x for x in rows if x["group"] == "dose" and x["target"] == p["label"])
        agg = _aggregate([x for x in rows if x["group"] == "dose-random" and x["target"] == p["label"]])
        comp = measure.compare_stored(row["asr"], agg["asr"])
        dose.append({**p, "top": row, "random": agg, "asr_vs_random": measure.verdict(comp, "higher").to_dict()})
    return dose


def _load_data(cfg: AblateConfig) -> tuple[EvalData, PromptSet, PromptSet]:
    """The evaluation sets and the two calibration sets, each spread over its file to the run's limit."""
    return cfg.eval.load("ablate"), *cfg.calibration.load()


# the settings of AblateConfig that ablate's results record under "settings"
_SETTINGS = {"categories", "ablation", "control_strata", "compare_calibration", "seeds", "dose"}
_SETTINGS |= {"direction", "kl", "kl_harmless", "kl_tokens", "direction_kl_max", "direction_layer_step"}
_SETTINGS |= {"direction_positions", "direction_per_split"}


def _controls(
    cfg: AblateConfig, seeds: list[int], units: UnitSet, target: str, group: str, overrefusal: bool = True
) -> list[Condition]:
    """Random controls matched to ``units`` (one per seed, stratified by ``cfg.control_strata``)."""
    out = []
    for s in seeds:
        c = measure.random_control(units, s, strata=cfg.control_strata)
        out.append(Condition(f"random~{target} seed {s}", group, c.units, target, s, c.counts, overrefusal))
    return out


def _direction_conditions(
    cfg: AblateConfig,
    lm: LoadedModel,
    cats: Categorization,
    safety: PromptSet,
    utility: PromptSet,
    seeds: list[int],
) -> tuple[list[Condition], dict[str, Any]]:
    """Fit the refusal direction on the calibration prompts: its ablation, random-direction controls, and its
    summary (with each category's write share)."""
    sel = fit_direction(
        lm.model,
        lm.tokenizer,
        [e.prompt for e in safety],
        [e.prompt for e in utility],
        system=cfg.system,
        layer_step=cfg.direction_layer_step,
        positions=cfg.direction_positions,
        kl_max=cfg.direction_kl_max,
        per_split=cfg.direction_per_split,
    )
    info = {k: v for k, v in sel.summary().items() if k != "candidates"}
    info["write_share"] = {c: write_share(lm.model, cats[c], sel.direction) for c in CATEGORIES}
    name = "refusal direction"
    conditions = [Condition(name, "direction", None, context=lambda: ablated_direction(lm.model, sel.direction))]
    for s in seeds:
        ctx = lambda r=random_direction(sel.direction, s): ablated_direction(lm.model, r)  # noqa: E731
        conditions.append(Condition(f"random direction seed {s}", "direction-random", None, name, s, context=ctx))
    return conditions, info


def _build_conditions(
    cfg: AblateConfig,
    lm: LoadedModel,
    cats: Categorization,
    order: torch.Tensor,
    units_info: dict[str, Any],
    calibration_sets: tuple[PromptSet, PromptSet],
    seconds: dict[str, float],
) -> tuple[list[Condition], dict[str, Any], list[dict[str, Any]]]:
    """Every condition in measurement order (baseline, categories with controls, direction, other calibration,
    dose points with controls), the calibration summary and the dose points; timings go into ``seconds``."""
    safety, utility = calibration_sets
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    conditions = [Condition("baseline", "baseline", None)]
    for c in cfg.categories:
        conditions.append(Condition(c, "category", cats[c]))
        if c in cfg.controlled:
            conditions += _controls(cfg, seeds, cats[c], c, "random")
    if cfg.direction:
        t = time.time()
        direction, units_info["direction"] = _direction_conditions(cfg, lm, cats, safety, utility, seeds)
        seconds["direction"] = time.time() - t
        conditions += direction
    calibration: dict[str, Any] = {"main": units_info["calibration"]}
    t = time.time()
    if cfg.compare_calibration:
        other_scu, other_region = _other_calibration_scu(cfg, lm, cats, units_info, safety, utility)
        conditions.append(Condition(f"SCU (calibration: {other_region})", "calibration", other_scu))
        calibration |= {"other": other_region, "scu_jaccard": cats["SCU"].jaccard(other_scu)}
        calibration["scu_sizes"] = [len(cats["SCU"]), len(other_scu)]
    seconds["other_calibration"] = time.time() - t
    points = _dose_points(cfg.dose, order, cats)
    for p in points:
        top = UnitSet.from_indices(cats.space, order[: p["count"]], f"top {p['label']}")
        conditions.append(Condition(f"top {p['label']}", "dose", top, p["label"], overrefusal=False))
        conditions += _controls(cfg, seeds, top, p["label"], "dose-random", overrefusal=False)
    return conditions, calibration, points


def run_ablate(cfg: AblateConfig) -> RunResult[AblateConfig]:
    """Ablate every condition and write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, ablate_experiment)


def ablate_experiment(cfg: AblateConfig, clock: Clock) -> Experiment:
    """Load the model once, find the units, ablate every condition in memory and measure it."""
    data, safety, utility = _load_data(cfg)
    used = {"calibration safety": safety, "calibration utility": utility}  # units, direction and means chosen here
    prompts = held_out(data.prompts(), used, allow_overlap=cfg.eval.allow_overlap)
    lm = load_model(cfg.model, **cfg.load_options())
    judge = get_judge(cfg.eval.judge, model=lm.model, tokenizer=lm.tokenizer)
    gen = cfg.eval.greedy(cfg)
    hooks = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in lm.model.modules())  # noqa: E731
    before, hooks_before = measure.weights_digest(lm.model), hooks()
    seconds: dict[str, float] = {}

    t = time.time()
    cats, s_scores, u_scores, stats, units_info = _units(cfg, lm, safety, utility)
    seconds["units"] = time.time() - t
    means = channel_means(stats) if cfg.ablation == "mean" else None
    order = torch.argsort(-measure.safety_ranking(cats, s_scores, u_scores), stable=True)
    kl_ref = None
    if cfg.kl:
        t = time.time()
        harmless, ev = load_prompts(cfg.kl_harmless).spread(cfg.eval.limit), cfg.eval
        kl_ref = kl_reference(lm.model, lm.tokenizer, harmless, reply_tokens=cfg.kl_tokens, system=cfg.system,
                              batch_size=ev.batch_size)  # fmt: skip
        seconds["kl_reference"] = time.time() - t
    conditions, calibration, points = _build_conditions(cfg, lm, cats, order, units_info, (safety, utility), seconds)

    t = time.time()
    rows = measure_conditions(
        lm,
        conditions,
        data,
        judge=judge,
        config=gen,
        mode=cfg.ablation,
        means=means,
        progress=cfg.progress,
        kl_ref=kl_ref,
    )
    seconds["evaluation"] = time.time() - t
    after, hooks_left = measure.weights_digest(lm.model), hooks() - hooks_before
    if after != before or hooks_left:
        raise RuntimeError("an ablation was not undone: the model's weights or hooks changed")  # a bug, not input

    table = _table(rows)
    by = {t["condition"]: t["row"] for t in table}
    if cfg.compare_calibration and "SCU" in by:
        other_row = next(r for r in rows if r["group"] == "calibration")
        calibration["difference"] = {
            k: measure.compare_stored(by["SCU"][k], other_row[k]).to_dict() for k in ("asr", "coherent_compliance")
        }
    results: dict[str, Any] = {
        "model": {k: getattr(lm, k) for k in ("name", "source", "fingerprint", "family")}
        | {"units_total": cats.space.total},
        "units": {**units_info, **cats.summary()},
        "settings": {
            **cfg.model_dump(include=_SETTINGS),
            "calibration_limit": cfg.calibration.limit,
            **cfg.eval.model_dump(include={"judge", "limit", "max_new_tokens"}),
            "utility_eval": cfg.eval.utility,
            "random_for": cfg.controlled,
            "seed_list": [cfg.seed + i for i in range(cfg.seeds)],
            "generation": dataclasses.asdict(gen),
            "eval_data": data.describe(),
            "calibration_data": {ps.name: {"source": ps.source, "examples": len(ps)} for ps in (safety, utility)},
        },
        "conditions": rows,
        "table": table,
        "dose": _dose(points, rows),
        "verdicts": _verdicts(table),
        "prompts": prompts,
        "calibration": calibration,
        "weights": dict(sha256_before=before, sha256_after=after, unchanged=before == after, hooks_left=hooks_left),
        "seconds": {"load_model": round(lm.load_seconds, 3), **{k: round(v, 3) for k, v in seconds.items()}}
        | {"total": 0.0},  # the protocol's
    }
    used = data.describe() | {ps.name: {"source": ps.source, "sha256": ps.fingerprint()} for ps in (safety, utility)}
    model = {k: results["model"][k] for k in ("name", "source", "fingerprint")}

    def files(run: RunDir) -> None:
        if cfg.units is None:
            cats.save(run.file("units.safetensors"), {"metric": cfg.metric, "token_region": cfg.calibration.tokens})

    return Experiment(results, model, used, device=lm.model.device, files=files)
