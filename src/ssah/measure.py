"""The measurement core every experiment shares: finding units, measuring a condition and weight restoration
between conditions; with the statistics of verdicts (:mod:`ssah.verdicts`: proportions, paired comparisons, the one
verdict rule), stratified random controls (:mod:`ssah.controls`) and unit selections (``"SCU,CU@6%"``,
:mod:`ssah.selections`) re-exported, so ``ssah.measure`` stays the one place recipes import them from.

Everything here takes explicit inputs (no files, no CLI), so recipes stay thin and the rules a reviewer checks
live in one place; a random control keeps the controlled set's count in every (layer, kind) cell
(:func:`random_control`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from ssah.controls import STRATA, Control, Strata, check_seeds, random_control
from ssah.errors import UserError
from ssah.evaluate import EvalData, Sample
from ssah.selections import Selection, SelectionItem, parse_selection, select
from ssah.units import UnitSet, UnitSpace
from ssah.verdicts import (  # the statistics of verdicts, re-exported (ssah.measure.Proportion, ...)
    VERDICTS,
    Comparison,
    ControlDistribution,
    Direction,
    Measured,
    Proportion,
    Verdict,
    compare,
    compare_measured,
    compare_prompts,
    compare_stored,
    measured_from,
    over_seeds,
    prompts_digest,
    stored_measurement,
    t95,
    verdict,
)


# ------------------------------------------------------------------------------------------------ finding units
class UnitSearch(Protocol):
    """The settings :func:`find_units` reads: the categorisation fields (``ssah.fields.UnitCategoryFields``), the
    ``calibration`` section (token region, batch size; ``ssah.fields.CalibrationSection``), the model-run options
    below, and where a recipe offers them ``granularity`` and ``stability`` (neuron units, no halves otherwise)."""

    metric: str
    rule: str
    shares: dict[str, float]
    normalization: str
    ranking: str
    max_length: int
    system: str | None
    progress: bool

    @property
    def calibration(self) -> Any: ...


def check_unit_search(cfg: Any) -> None:
    """Validate the unit-search settings a config has (metric, rule and shares, normalisation, ranking,
    granularity, tokens, control strata), before any data or model is loaded. One place for every recipe."""
    from ssah.categorize import NORMALIZATIONS, RANKINGS, check_shares
    from ssah.data.chat import TOKEN_REGIONS
    from ssah.scoring import check_metric
    from ssah.units import GRANULARITIES

    if hasattr(cfg, "metric"):
        check_metric(cfg.metric)
    if hasattr(cfg, "rule"):
        check_shares(cfg.rule, getattr(cfg, "shares", None))
    for key, what, allowed in (
        ("normalization", "normalization", NORMALIZATIONS),
        ("ranking", "ranking", RANKINGS),
        ("granularity", "granularity", GRANULARITIES),
        ("tokens", "tokens", TOKEN_REGIONS),
        ("control_strata", "control strata", STRATA),
    ):
        value = getattr(cfg, key, None)
        if value is not None and value not in allowed:
            raise UserError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")


@dataclass
class FoundUnits:
    """Scores and categories of one model on one pair of calibration sets, in memory.

    ``statistics`` is the merged (safety + utility) calibration statistics: its per-channel means are what
    mean-ablation folds into the output.
    """

    categorization: Any  # ssah.categorize.Categorization
    safety: Any  # ssah.scoring.Scores
    utility: Any
    statistics: Any  # ssah.stats.UnitStatistics
    stability: dict[str, Any] | None = None


def stability_summary(a: Any, b: Any) -> dict[str, Any]:
    """How stable each category is between two categorisations (e.g. of disjoint data halves).

    Per category: the Jaccard overlap with its chance level, and the verdict on "stable beyond chance" by the one
    rule: the share of ``a``'s units found again in ``b`` (a :class:`Proportion`) against the share of all units
    that ``b`` holds (what a random set would find again), ``reproduced`` when the interval of the difference
    excludes zero upwards.
    """
    from ssah.categorize import CATEGORIES, expected_random_jaccard

    out: dict[str, Any] = {"method": "categorise each disjoint half of both calibration sets, compare the sets"}
    n = a.space.total
    for c in CATEGORIES:
        k = (len(a[c]) + len(b[c])) // 2
        entry: dict[str, Any] = {
            "jaccard": round(a[c].jaccard(b[c]), 4),
            "chance": round(expected_random_jaccard(k, n), 4),
        }
        if len(a[c]) and len(b[c]):
            found = Proportion(len(a[c] & b[c]), len(a[c]))
            chance = Proportion(len(b[c]), n)
            entry["found_again"] = found.to_dict()
            entry["found_again_by_chance"] = chance.to_dict()
            entry["verdict"] = verdict(compare(found, chance), "higher").to_dict()
        out[c] = entry
    out["jaccard_scu"] = out["SCU"]["jaccard"]
    return out


def unit_statistics(lm: Any, data: Any, cfg: UnitSearch, *, desc: str) -> Any:
    """One scoring pass over ``data`` with a unit search's settings (token region, batch size, length, system
    prompt, and the gradients ``cfg.metric`` needs): the statistics every unit score is computed from."""
    from ssah.scoring import collect_statistics, gradient_mode

    return collect_statistics(
        lm.model,
        lm.tokenizer,
        data,
        region=cfg.calibration.tokens,
        batch_size=cfg.calibration.batch_size,
        max_length=cfg.max_length,
        system=cfg.system,
        gradients=gradient_mode(cfg.metric),
        progress=cfg.progress,
        desc=desc,
    )


def find_units(lm: Any, safety: Any, utility: Any, cfg: UnitSearch) -> FoundUnits:
    """Score a loaded model's units on the safety and utility sets and categorise them (no files written).

    Every experiment that needs units computes them here. ``cfg.stability`` also categorises each disjoint
    half of the data (statistics merge exactly, so the halves cost no extra pass).
    """
    tokens, halves_too = cfg.calibration.tokens, getattr(cfg, "stability", False)
    granularity = getattr(cfg, "granularity", "neuron")
    from ssah.arch import get_adapter
    from ssah.categorize import categorize
    from ssah.scoring import compute_scores

    for data in (safety, utility):
        if tokens == "response" and not data.has_responses:
            raise UserError(
                f"tokens 'response' counts response tokens only, and the {data.name} set has examples without a "
                "response: use a set with responses (--column response=NAME) or --tokens prompt+response "
                "(--calibration-tokens outside ssah units)"
            )
    adapter = get_adapter(lm.model)
    neuron_space = UnitSpace.from_groups(adapter.groups(), "neuron", lm.fingerprint, lm.name)
    space = UnitSpace.from_groups(adapter.groups(), granularity, lm.fingerprint, lm.name)
    halves: list[list[Any]] = []
    full: list[Any] = []
    for data in (safety, utility):
        parts = data.split(2) if halves_too else [data]
        stats = [
            unit_statistics(lm, p, cfg, desc=f"{data.name} {i + 1}/{len(parts)}" if len(parts) > 1 else data.name)
            for i, p in enumerate(parts)
        ]
        halves.append(stats)
        merged = stats[0]
        for part in stats[1:]:
            merged = merged.merge(part)
        full.append(merged)

    def scores(stats: Any, data: Any) -> Any:
        return compute_scores(
            lm.model, stats, cfg.metric, neuron_space, dataset=data.source, region=tokens, adapter=adapter
        )

    options: dict[str, Any] = {
        "rule": cfg.rule,
        "shares": cfg.shares,
        "normalization": cfg.normalization,
        "ranking": cfg.ranking,
        "granularity": granularity,
        "space": space,
    }
    for stats, data in zip(full, (safety, utility), strict=True):
        if stats.tokens == 0:
            raise UserError(
                f"no {tokens} tokens were counted in the {data.name} set (cut away by --max-length?): "
                "raise --max-length or choose other tokens (--tokens; --calibration-tokens outside ssah units)"
            )
    s_scores, u_scores = scores(full[0], safety), scores(full[1], utility)
    cats = categorize(s_scores, u_scores, **options)
    stability = None
    if halves_too:
        a = categorize(scores(halves[0][0], safety), scores(halves[1][0], utility), **options)
        b = categorize(scores(halves[0][1], safety), scores(halves[1][1], utility), **options)
        stability = stability_summary(a, b)
    return FoundUnits(cats, s_scores, u_scores, full[0].merge(full[1]), stability)


def safety_ranking(found_or_cats: Any, safety: Any = None, utility: Any = None) -> torch.Tensor:
    """One value per unit, higher = more safety-critical: the categorisation's own normalised I_S - I_U within
    its ranking domains (so selections like ``CU@6%`` follow the same ranking that made SCU)."""
    from ssah.categorize import normalize_scores

    cats = found_or_cats.categorization if isinstance(found_or_cats, FoundUnits) else found_or_cats
    if isinstance(found_or_cats, FoundUnits):
        safety, utility = found_or_cats.safety, found_or_cats.utility
    if safety is None or utility is None:
        raise UserError("a safety ranking needs the safety and utility scores (keep scores/ beside the unit file)")
    space = cats.space
    s = space.join({k: space.aggregate(k, v) for k, v in safety.values.items()}).to(torch.float64)
    u = space.join({k: space.aggregate(k, v) for k, v in utility.values.items()}).to(torch.float64)
    return normalize_scores(s, space, cats.normalization, cats.ranking) - normalize_scores(
        u, space, cats.normalization, cats.ranking
    )


# ------------------------------------------------------------------------------------------------ conditions
def answered(output: str, answer: str) -> bool:
    """A question counts as answered when its reference answer appears in the reply (case and digit-group commas
    ignored)."""

    def norm(text: str) -> str:
        return re.sub(r"(?<=\d),(?=\d)", "", text).lower()

    return norm(answer).strip() in norm(output)


def answer_accuracy(examples: Sequence[Any], samples: Sequence[Sample]) -> Proportion | None:
    """Replies (``samples``, in the order of ``examples``) that contain their example's reference answer, over
    the examples that have one; None when none has."""
    pairs = [(ex, s) for ex, s in zip(examples, samples, strict=True) if ex.answer]
    digest = prompts_digest([ex.prompt for ex, _ in pairs])
    return Proportion.of([answered(s.output, ex.answer) for ex, s in pairs], digest) if pairs else None


@dataclass
class ConditionResult:
    """What one condition (a model as it is now: ablated, fine-tuned, edited) measured, as counts.

    ``asr``: harmful prompts not refused; ``coherent_compliance``: harmful prompts answered with a coherent
    non-refusal (a broken model that emits garbage is not refusing, but it is not complying either);
    ``overrefusal``: safe prompts refused; ``perplexity`` of reference responses; ``accuracy`` (multiple
    choice) and ``exact_match`` (GSM8K) as counts.
    """

    asr: Proportion | None = None
    coherent_compliance: Proportion | None = None
    overrefusal: Proportion | None = None
    perplexity: float | None = None
    accuracy: Proportion | None = None
    exact_match: Proportion | None = None
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def rates(self) -> dict[str, Proportion]:
        """The measured proportions by name (those present)."""
        names = ("asr", "coherent_compliance", "overrefusal", "accuracy", "exact_match")
        return {k: v for k in names if (v := getattr(self, k)) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The one JSON shape of a condition's measurement (no samples)."""
        out: dict[str, Any] = {k: v.to_dict() for k, v in self.rates().items()}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        out["seconds"] = round(self.seconds, 3)
        return out


def measure_condition(
    model: nn.Module,
    tokenizer: Any,
    data: EvalData,
    *,
    judge: Any,
    config: Any,
    overrefusal: bool = True,
    progress: bool = False,
) -> ConditionResult:
    """Measure the model as it is now on the given sets (in memory; no reload, so ablations and fine-tunes
    apply). Harmful and safe prompts go through one generation pass (cheaper than two), judged by ``judge``.
    ``overrefusal=False`` skips the safe prompts (e.g. dose points, where only ASR and utility are plotted)."""
    import time

    from ssah.data import PromptSet
    from ssah.evaluate import evaluate_safety, gsm8k_exact_match, multiple_choice_outcomes, perplexity

    t0 = time.time()
    res = ConditionResult()
    harmful = list(data.harmful) if data.harmful is not None else []
    benign = list(data.benign) if (data.benign is not None and overrefusal) else []
    if harmful or benign:
        both = PromptSet("condition", "measure", (*harmful, *benign))
        _, samples = evaluate_safety(model, tokenizer, both, judge=judge, config=config, progress=progress)
        h, b = samples[: len(harmful)], samples[len(harmful) :]
        for smp, ps in ((h, data.harmful), (b, data.benign)):
            for x in smp:
                x.set = ps.name if ps is not None else x.set
        if h:
            hd = prompts_digest([ex.prompt for ex in harmful])
            res.asr = Proportion.of([not s.refused for s in h], hd)
            res.coherent_compliance = Proportion.of([(not s.refused) and bool(s.coherent) for s in h], hd)
        if b:
            res.overrefusal = Proportion.of([bool(s.refused) for s in b], prompts_digest([ex.prompt for ex in benign]))
        res.samples = samples
    if data.perplexity is not None:
        res.perplexity = perplexity(
            model, tokenizer, data.perplexity, batch_size=config.batch_size, system=config.system
        )
    if data.multiple_choice is not None:
        _, items = data.multiple_choice
        right = multiple_choice_outcomes(model, tokenizer, items, batch_size=config.batch_size)
        res.accuracy = Proportion.of(right, prompts_digest([item.question for item in items]))
    if data.gsm8k is not None:
        import dataclasses

        gcfg = dataclasses.replace(config, max_new_tokens=max(config.max_new_tokens, 256))
        _, m_samples = gsm8k_exact_match(model, tokenizer, data.gsm8k, config=gcfg, progress=progress)
        digest = prompts_digest([item.question for item in data.gsm8k])
        res.exact_match = Proportion.of([bool(s.correct) for s in m_samples], digest)
        res.samples += m_samples
    res.seconds = time.time() - t0
    return res


# ------------------------------------------------------------------------------------------------ weights
def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (proves a condition left the weights untouched)."""
    from ssah.models import state_items

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in state_items(model):  # offloaded weights too
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def restored_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Run a condition that changes weights in place (a fine-tune, an edit) and get the original weights back
    on exit, bit for bit, whatever happened inside. The snapshot lives on CPU."""
    snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(snapshot[k].to(v.device))
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
            p.grad = None
        model.train(training)
