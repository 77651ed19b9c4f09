"""`ssah units`: score every unit on a safety and a utility set and split them into SCU / UCU / CU / RU.

``stability`` also categorises disjoint halves of the data; ``compare_safety`` also finds SCU with other safety
calibration sets (e.g. ``advbench-safety``, ``harmbench-safety``) and tests their overlap against stratified random
sets of the same count."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from ssah.arch import get_adapter
from ssah.categorize import (
    CATEGORIES,
)
from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.data.presets import preset_path
from ssah.errors import DataError, UserError
from ssah.fields import AutoBatch, CalibrationSection, Columns, Granularity, MaxLength, System, UnitCategoryFields
from ssah.measure import (
    ControlDistribution,
    FoundUnits,
    Proportion,
    check_unit_search,
    compare,
    find_units,
    random_control,
    stability_summary,
    unit_statistics,
    verdict,
)
from ssah.models import LoadedModel, load_model
from ssah.plan import auto_scoring_batch_size, wants_auto_batch
from ssah.protocol import Clock, Experiment, execute
from ssah.recipes.units import RECIPE
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder
from ssah.units import UnitSpace


class UnitsConfig(UnitCategoryFields, CalibrationSection, ModelRunConfig):
    """Everything `ssah units` needs: the calibration options (``CalibrationSection``, at top level here), the
    categorisation's and the model's."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: Out = "runs/units"
    columns: Columns = Field(default_factory=dict)
    granularity: Granularity = "neuron"
    batch_size: AutoBatch = 8  # type: ignore[assignment]  # units alone may choose it: auto (the default on GPUs)
    max_length: MaxLength = 512
    system: System = None
    stability: bool = Field(False, description="Also report SCU overlap between two disjoint data halves.")
    compare_safety: str | None = Field(
        None,
        description="Also find SCU with these other safety calibration sets (comma-separated specs, e.g. "
        "advbench-safety,harmbench-safety; each cut to the --safety set's size (after --limit) by evenly spaced "
        "examples) and report "
        "how much the SCU sets overlap, against stratified random sets of the same count.",
    )

    @property
    def calibration(self) -> UnitsConfig:
        """The calibration options :func:`ssah.measure.find_units` reads (at top level in this config)."""
        return self

    def check(self) -> None:
        """Cheap validation, done before any data or model is loaded (the output folder included)."""
        self.check_settings()
        check_output_folder(self.out, self.overwrite)

    def check_settings(self) -> None:
        """Validate the scoring and categorisation settings (for in-memory use, where no folder is written)."""
        check_unit_search(self)
        if self.limit is not None and self.limit < 2 and self.stability:
            raise UserError("--stability splits each set in two halves: use --limit 2 or more")
        specs = safety_specs(self)
        if len(set(specs)) != len(specs):
            raise UserError(f"--compare-safety names a set twice ({', '.join(specs)}): name each set once")


COMPARE_SEEDS = 5  # random-control draws of the --compare-safety overlap (no model pass: cheap)


def safety_specs(cfg: Any) -> list[str]:
    """The safety sets compared by ``--compare-safety``: ``cfg.safety`` first, then each named one (empty when
    none is named)."""
    extra = [s.strip() for s in str(cfg.compare_safety or "").split(",") if s.strip()]
    return [cfg.safety, *extra] if extra else []


def overlap_across_safety_sets(found: dict[str, Any], *, seeds: int, seed: int = 0) -> dict[str, Any]:
    """How stable SCU is across calibration sets: for every pair (a, b) of categorisations (name -> the
    categorisation, in order), the share of a's SCU that are SCU with b, against the same share for random sets
    with a's count in every (layer, kind) cell (``seeds`` draws: a distribution), decided by the one verdict rule
    (expected higher). The unstratified chance level of ``stability_summary`` is kept beside it."""
    names = list(found)
    pairs = []
    for i, a_name in enumerate(names):
        for b_name in names[i + 1 :]:
            a, b = found[a_name]["SCU"], found[b_name]["SCU"]
            entry: dict[str, Any] = {"a": a_name, "b": b_name, "scu": [len(a), len(b)]}
            st = stability_summary(found[a_name], found[b_name])["SCU"]
            entry |= {k: st[k] for k in ("jaccard", "chance") if k in st}
            if len(a) and len(b):
                hit = Proportion(len(a & b), len(a))
                draws = tuple(Proportion(len(random_control(a, seed + s).units & b), len(a)) for s in range(seeds))
                control = ControlDistribution(draws)
                c = compare(hit, control)
                entry |= {
                    "found_again": hit.to_dict(),
                    "stratified_control": control.to_dict(),
                    "unstratified_chance": st["found_again_by_chance"],
                    "comparison": c.to_dict(),
                    "verdict": verdict(c, "higher").to_dict(),
                }
            else:
                entry["verdict"] = {"verdict": "inconclusive", "reason": "one of the sets has no SCU"}
            pairs.append(entry)
    return {
        "method": "SCU found with each safety set (same model, utility set and settings); a's SCU found again "
        "among b's SCU vs random units with a's count in every (layer, kind) cell",
        "control": f"stratified random units (same count per layer and kind), {seeds} seeds",
        "seeds": seeds,
        "pairs": pairs,
    }


def categorize_model(lm: LoadedModel, safety: PromptSet, utility: PromptSet, cfg: UnitsConfig) -> FoundUnits:
    """Score and categorise a loaded model's units with ``cfg``'s settings (no files written)."""
    cfg.check_settings()
    return find_units(lm, safety, utility, cfg)


def categorize_with_safety_set(lm: LoadedModel, safety: PromptSet, found: FoundUnits, cfg: UnitsConfig) -> Any:
    """The categorisation with another safety set and ``found``'s utility scores, as ``find_units`` would make it
    with that safety set (same settings): only the safety pass is run, since the utility scores do not change."""
    from ssah.categorize import categorize
    from ssah.scoring import compute_scores

    stats = unit_statistics(lm, safety, cfg, desc=safety.source)
    if stats.tokens == 0:
        raise UserError(f"no {cfg.tokens} tokens were counted in {safety.source}: raise --max-length")
    scores = compute_scores(
        lm.model,
        stats,
        cfg.metric,
        found.safety.space,  # the neuron-level space of the scores
        dataset=safety.source,
        region=cfg.tokens,
        adapter=get_adapter(lm.model),
    )
    return categorize(
        scores,
        found.utility,
        rule=cfg.rule,
        shares=cfg.shares,
        normalization=cfg.normalization,
        ranking=cfg.ranking,
        granularity=cfg.granularity,  # type: ignore[arg-type]
        space=found.categorization.space,
    )


def run_units(cfg: UnitsConfig) -> RunResult[UnitsConfig]:
    """Run the recipe and write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, units_experiment)


def units_experiment(cfg: UnitsConfig, clock: Clock) -> Experiment:
    """Load data and model, score and categorise every unit (and the stability / calibration-set checks)."""
    safety, utility = cfg.load(cfg.columns)
    for data in (safety, utility):
        if cfg.stability and len(data) < 2:
            raise UserError(f"--stability needs at least 2 examples in the {data.name} set, it has {len(data)}")
    # the other safety sets of --compare-safety, loaded before the model so that a bad spec fails at once
    others = {
        spec: load_prompts(spec, columns=cfg.columns or None, name="safety")  # cut evenly to the --safety size
        for spec in safety_specs(cfg)[1:]
    }
    lm = load_model(cfg.model, **cfg.load_options())
    if wants_auto_batch(cfg, lm.model):
        size = auto_scoring_batch_size(
            lm.model, lm.tokenizer, [safety, utility], max_length=cfg.max_length, system=cfg.system
        )
        cfg = cfg.model_copy(update={"batch_size": size})
    adapter = get_adapter(lm.model)
    space = UnitSpace.from_groups(adapter.groups(), cfg.granularity, lm.fingerprint, lm.name)  # type: ignore[arg-type]
    t_score = time.time()
    outcome = categorize_model(lm, safety, utility, cfg)
    cats, s_scores, u_scores, stability = outcome.categorization, outcome.safety, outcome.utility, outcome.stability
    score_seconds = time.time() - t_score
    calibration, compared = None, []
    if safety_specs(cfg):
        t_cmp = time.time()
        found = {cfg.safety: cats}
        sets = [{"spec": cfg.safety, "source": safety.source, "examples": len(safety), "scu": len(cats["SCU"])}]
        for spec in safety_specs(cfg)[1:]:
            other = others[spec].spread(len(safety))
            compared.append(other)
            found[spec] = categorize_with_safety_set(lm, other, outcome, cfg)
            sets.append({"spec": spec, "source": other.source, "examples": len(other), "scu": len(found[spec]["SCU"])})
        calibration = {"sets": sets, **overlap_across_safety_sets(found, seeds=COMPARE_SEEDS, seed=cfg.seed)}
        calibration["seconds"] = round(time.time() - t_cmp, 3)

    summary = cats.summary()
    results: dict[str, Any] = {
        "model": {
            "name": lm.name,
            "source": lm.source,
            "fingerprint": lm.fingerprint,
            "family": lm.family,
            "layers": adapter.num_layers,
            "units_total": space.total,
        },
        "metric": cfg.metric,
        "rule": cats.rule,
        "shares": cats.shares,
        "normalization": cats.normalization,
        "normalization_scope": summary["normalization_scope"],
        "ranking": cats.ranking,
        "ranking_domains": summary["ranking_domains"],
        "granularity": cfg.granularity,
        "token_region": cfg.tokens,
        "tokens": {"safety": s_scores.tokens, "utility": u_scores.tokens},
        "examples": {"safety": len(safety), "utility": len(utility)},
        "data": {"safety": safety.source, "utility": utility.source},
        "categories": summary["categories"],
        "by_layer": summary["by_layer"],
        "by_kind": {c: {k: sum(row[c][k] for row in summary["by_layer"]) for k in ("attn", "mlp")} for c in CATEGORIES},
        "stability": stability,
        "calibration_sets": calibration,
        "seconds": {
            "load_model": round(lm.load_seconds, 3),
            "scoring": round(score_seconds, 3),
            "total": clock.seconds(),
        },
    }
    data = {ps.name: {"source": ps.source, "sha256": ps.fingerprint(), "examples": len(ps)} for ps in (safety, utility)}
    for i, ps in enumerate(compared, 1):  # the --compare-safety sets, as used
        data[f"safety-compare-{i}"] = {"source": ps.source, "sha256": ps.fingerprint(), "examples": len(ps)}
    model = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint}

    def files(run: RunDir) -> None:
        s_scores.save(run.file("scores/safety.safetensors"))
        u_scores.save(run.file("scores/utility.safetensors"))
        meta = {"metric": cfg.metric, "safety_data": safety.fingerprint(), "utility_data": utility.fingerprint()}
        cats.save(run.file("units.safetensors"), meta)

    return Experiment(results, model, data, device=lm.model.device, files=files, config=cfg)


# SCU stability across safety calibration sets (issue 18): the demo's units stage also finds SCU with these
# public-benchmark safety sets (each cut to the built-in set's size) when the shared benchmark data is present.
COMPARE_SAFETY = ("advbench-safety", "harmbench-safety")


def available_safety_sets(names: tuple[str, ...] = COMPARE_SAFETY) -> list[str]:
    """The presets of ``names`` whose data files are present (none without the shared benchmark data)."""
    found = []
    for name in names:
        try:
            preset_path(name)
        except DataError:
            continue
        found.append(name)
    return found


def demo_options(ctx: Any) -> dict[str, Any]:
    """The demo's units stage also compares safety calibration sets where the public data is present."""
    sets = available_safety_sets()
    return {"compare_safety": ",".join(sets)} if sets else {}
