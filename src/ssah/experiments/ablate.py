"""`ssah ablate`: the paper's Table 1 — ablate each unit category and measure safety and utility.

One model load; the units come from a unit file of that model or are computed in memory. Every condition
(baseline, each category, random sets of the same sizes over several seeds, the top-k SCU dose curve with its
random control, and SCU found with prompt-only calibration) is applied with ``interventions.ablate`` (a pre-hook,
undone on exit) and evaluated in memory: keyword ASR *and* coherent compliance on harmful prompts (a broken model
that emits garbage is not refusing, but it is not complying either), over-refusal on safe prompts, and utility.
Rates carry 95% Wilson intervals; random controls report the mean and min/max over seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from ssah.arch import get_adapter
from ssah.categorize import CATEGORIES, Categorization, _normalize, load_categorization
from ssah.config import ModelRunConfig
from ssah.data import PromptSet, load_prompts
from ssah.errors import UnitFileError, UserError
from ssah.evaluate import wilson_interval
from ssah.experiments.eval import EvalConfig, EvalData, check_judge_spec, evaluate_model, load_eval_data
from ssah.experiments.units import REGIONS, UnitsConfig, categorize_model
from ssah.generate import GenerationConfig
from ssah.interventions import ablate
from ssah.judges import Judge, get_judge
from ssah.models import LoadedModel, load_model, state_items
from ssah.report import CATEGORY_COLORS, markdown_table
from ssah.runs import RunDir, check_output_folder, manifest, set_seed
from ssah.scoring import Scores
from ssah.units import UnitSet, UnitSpace, read_unit_file_metadata

__all__ = [
    "AblateConfig",
    "Condition",
    "evaluate_conditions",
    "parse_dose",
    "random_control",
    "render",
    "run_ablate",
    "scu_ranking",
    "summary_lines",
    "summary_rows",
    "weights_digest",
]

# Dose points as shares of ALL units (the paper's SCU share on Llama-2-7B-Chat was 1.3%).
DEFAULT_DOSE: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05)
QUICK_DOSE: tuple[float, ...] = (0.0025, 0.01, 0.03)
# 32 prompts per set keeps the full run on SmolLM2 under 15 min on 2 cores (13.5 min measured idle).
FULL = {"limit": 32, "max_new_tokens": 64, "seeds": 3, "calibration_limit": None}
QUICK = {"limit": 16, "max_new_tokens": 32, "seeds": 2, "calibration_limit": 64}
OTHER_CALIBRATION = {"prompt": "prompt+response"}  # the comparison calibration for a main calibration


def parse_dose(text: str | list[Any] | tuple[Any, ...]) -> list[float]:
    """Parse dose shares such as ``"0.25%,0.5%,1%"`` or ``"0.01,0.02"`` into fractions of all units in (0, 1)."""
    items = [str(x) for x in text] if isinstance(text, list | tuple) else str(text).split(",")
    out: list[float] = []
    for item in items:
        raw = item.strip()
        if not raw:
            continue
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise UserError(f"bad dose share {raw!r}: write shares of all units as 0.5% or 0.005") from None
        if not 0 < value < 1 or math.isnan(value):
            raise UserError(f"dose share {raw!r} is outside (0, 100%): give a share of all units, e.g. 1% or 0.01")
        out.append(value)
    if not out:
        raise UserError("no dose shares given: pass e.g. --dose 0.25%,0.5%,1%")
    return sorted(set(out))


class AblateConfig(ModelRunConfig):
    """Everything `ssah ablate` needs; options left at None take the full-run or ``quick`` value."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: str = "runs/ablate"
    quick: bool = False
    units: str | None = None
    allow_other_weights: bool = False
    safety: str = "builtin:safety"
    utility: str = "builtin:utility"
    calibration_limit: int | None = None
    metric: str = "fluctuation"
    rule: str = "ssah"
    shares: dict[str, float] = Field(default_factory=dict)
    tokens: str = "prompt+response"
    harmful: str = "builtin:harmful"
    benign: str = "builtin:borderline"
    utility_eval: list[str] = Field(default_factory=lambda: ["perplexity:builtin:task"])
    judge: str = "keyword:ssah"
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 32
    system: str | None = None
    seeds: int | None = None
    dose: list[float] | None = None
    categories: list[str] = Field(default_factory=lambda: list(CATEGORIES))
    random_for: list[str] | None = None
    compare_calibration: bool = True

    @field_validator("dose", mode="before")
    @classmethod
    def _dose(cls, v: Any) -> Any:
        return None if v is None else parse_dose(v)

    @field_validator("categories", "random_for", mode="before")
    @classmethod
    def _cats(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [x for x in v.split(",") if x.strip()]
        return v if v is None else [str(x).strip().upper() for x in v]

    def resolved(self) -> dict[str, Any]:
        """The settings in force: explicit values, else the quick or full-run defaults."""
        base = QUICK if self.quick else FULL
        return {
            "limit": self.limit if self.limit is not None else base["limit"],
            "max_new_tokens": self.max_new_tokens if self.max_new_tokens is not None else base["max_new_tokens"],
            "seeds": self.seeds if self.seeds is not None else base["seeds"],
            "calibration_limit": self.calibration_limit
            if self.calibration_limit is not None
            else base["calibration_limit"],
            "dose": list(self.dose) if self.dose is not None else list(QUICK_DOSE if self.quick else DEFAULT_DOSE),
            "random_for": list(self.random_for)
            if self.random_for is not None
            else (["SCU"] if self.quick else list(self.categories)),
        }

    def units_config(self, tokens: str | None = None) -> UnitsConfig:
        """The in-memory categorisation settings (``tokens`` overrides the calibration region)."""
        return UnitsConfig(
            model=self.model,
            metric=self.metric,
            rule=self.rule,
            shares=self.shares,
            tokens=tokens or self.tokens,
            system=self.system,
            progress=self.progress,
        )

    def generation(self) -> GenerationConfig:
        """Greedy decoding with the resolved reply length."""
        g = GenerationConfig(
            max_new_tokens=self.resolved()["max_new_tokens"],
            seed=self.seed,
            batch_size=self.batch_size,
            system=self.system,
        )
        g.check()
        return g

    def check(self) -> None:
        """Validate everything that needs neither data nor model (nothing is written before this passes)."""
        r = self.resolved()
        for name in (*self.categories, *r["random_for"]):
            if name not in CATEGORIES:
                raise UserError(f"unknown category {name!r}: use one or more of {', '.join(CATEGORIES)}")
        if not self.categories:
            raise UserError("no categories to ablate: pass e.g. --categories SCU,UCU,CU,RU")
        if r["seeds"] < 1:
            raise UserError(f"--seeds must be at least 1 (random controls), got {r['seeds']}")
        for key in ("limit", "calibration_limit"):
            if r[key] is not None and r[key] < 1:
                raise UserError(f"{key} must be at least 1, got {r[key]}")
        if self.tokens not in REGIONS:
            raise UserError(f"unknown tokens {self.tokens!r}: use one of {', '.join(REGIONS)}")
        self.units_config().check_settings()
        self.generation()
        check_judge_spec(self.judge)
        if self.units is not None and not Path(self.units).is_file():
            raise UserError(f"unit file {self.units} not found: pass the units.safetensors written by `ssah units`")
        check_output_folder(self.out, self.overwrite)


# ----------------------------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One ablation condition: a name, the group it belongs to and the units zeroed (None = baseline)."""

    name: str
    group: str  # baseline | category | random | calibration | dose | dose-random
    units: UnitSet | None
    target: str = ""  # the category (or dose point) a random control matches
    seed: int | None = None
    count: int | None = None
    overrefusal: bool = True  # dose points skip the safe prompts (the curve plots ASR, compliance and utility)


def random_control(space: UnitSpace, count: int, seed: int, name: str = "") -> UnitSet:
    """``count`` units drawn uniformly from all units, reproducible by seed (nested across counts for a seed)."""
    template = UnitSet.from_indices(space, torch.arange(count), name or "template")
    return template.random_like(seed, name=name or f"random({count},seed={seed})")


def scu_ranking(cats: Categorization, safety: Scores, utility: Scores) -> torch.Tensor:
    """Flat unit indices in safety-critical order: SCU first, then the other non-RU units, each by highest
    normalised I_S - I_U (the ssah rule's ranking), so the first len(SCU) entries are exactly the SCU set."""
    space = cats.space
    s = space.join({k: space.aggregate(k, v) for k, v in safety.values.items()}).to(torch.float64)
    u = space.join({k: space.aggregate(k, v) for k, v in utility.values.items()}).to(torch.float64)
    norm = cats.normalization if cats.normalization in ("mean", "rank", "none") else "mean"
    if cats.ranking == "per-module":
        domains = [space.group_slice(sh.layer, sh.kind) for sh in space.shapes]
    else:
        domains = [slice(0, space.total)]
    diff = torch.empty(space.total, dtype=torch.float64)
    for d in domains:
        diff[d] = _normalize(s[d], norm) - _normalize(u[d], norm)
    order = torch.argsort(-diff, stable=True)
    scu, ru = cats["SCU"].mask[order], cats["RU"].mask[order]
    return torch.cat([order[scu], order[~scu & ~ru]])


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit (proves the ablations left the weights untouched)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in state_items(model):  # offloaded weights too
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _rate(k: int, n: int) -> dict[str, Any]:
    ci = wilson_interval(k, n)
    return {"rate": k / n, "k": k, "n": n, "ci95": [ci.low, ci.high]}


def _metrics(rep: Any) -> dict[str, Any]:
    """The numbers of one evaluation: rates as counts with Wilson intervals, utility as reported."""
    out: dict[str, Any] = {}
    if rep.safety is not None:
        n = rep.safety.n
        out["asr"] = _rate(round(rep.safety.asr * n), n)
        out["coherent_compliance"] = _rate(round(rep.safety.coherent_compliance * n), n)
    if rep.overrefusal is not None:
        n = rep.overrefusal.n
        out["overrefusal"] = _rate(round(rep.overrefusal.rate * n), n)
    if rep.utility is not None:
        out["utility"] = json.loads(json.dumps(dataclasses.asdict(rep.utility)))
    return out


def evaluate_conditions(
    lm: LoadedModel,
    conditions: list[Condition],
    data: EvalData,
    *,
    judge: Judge,
    config: GenerationConfig,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate the model under each condition in turn, the condition's units ablated and restored after it."""
    from tqdm.auto import tqdm

    rows = []
    no_benign = dataclasses.replace(data, benign=None)
    for c in tqdm(conditions, desc="conditions", disable=not progress, unit="cond"):
        t = time.time()
        cdata = data if c.overrefusal else no_benign
        with contextlib.ExitStack() as stack:
            if c.units is not None and len(c.units) > 0:
                stack.enter_context(ablate(lm.model, c.units))
            rep = evaluate_model(
                lm.model, lm.tokenizer, cdata, judge=judge, config=config, prefill="", first_token=False, progress=False
            )
        n = 0 if c.units is None else len(c.units)
        total = c.units.space.total if c.units is not None else None
        rows.append(
            {
                "name": c.name,
                "group": c.group,
                "target": c.target,
                "seed": c.seed,
                "units": n,
                "fraction": (n / total) if total else 0.0,
                **_metrics(rep),
                "seconds": round(time.time() - t, 3),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------- aggregation

RATE_KEYS = ("asr", "coherent_compliance", "overrefusal")


def _utility_value(row: dict[str, Any]) -> tuple[str, float] | None:
    u = row.get("utility") or {}
    for key in ("perplexity", "accuracy", "exact_match"):
        if u.get(key) is not None:
            return key, float(u[key])
    return None


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and min/max over the seeds of a random control, for each rate and the utility number."""
    out: dict[str, Any] = {
        "seeds": [r["seed"] for r in rows],
        "units": rows[0]["units"],
        "fraction": rows[0]["fraction"],
    }
    for key in RATE_KEYS:
        vals = [r[key]["rate"] for r in rows if key in r]
        if vals:
            out[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "values": vals}
    util = [_utility_value(r) for r in rows]
    if all(u is not None for u in util) and util:
        vals = [u[1] for u in util if u is not None]
        out["utility"] = {"metric": util[0][0], "mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}  # type: ignore[index]
    return out


def _table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 1 rows: baseline, each category, its random control (aggregated), the other-calibration SCU."""
    base = next(r for r in rows if r["group"] == "baseline")
    table: list[dict[str, Any]] = []

    def delta(entry: dict[str, Any], kind: str) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key in RATE_KEYS:
            if key in base and key in entry:
                value = entry[key]["rate"] if kind == "single" else entry[key]["mean"]
                d[key] = value - base[key]["rate"]
        bu, eu = _utility_value(base), (_utility_value(entry) if kind == "single" else None)
        if kind != "single" and "utility" in entry:
            eu = (entry["utility"]["metric"], entry["utility"]["mean"])
        if bu is not None and eu is not None:
            d["utility"] = eu[1] - bu[1]
        return d

    for r in rows:
        if r["group"] in ("baseline", "category", "calibration"):
            table.append(
                {"condition": r["name"], "group": r["group"], "kind": "single", "row": r, "delta": delta(r, "single")}
            )
            if r["group"] == "category":
                reps = [x for x in rows if x["group"] == "random" and x["target"] == r["name"]]
                if reps:
                    agg = _summary(reps)
                    table.append(
                        {
                            "condition": f"random (size of {r['name']})",
                            "group": "random",
                            "kind": "random",
                            "row": agg,
                            "delta": delta(agg, "random"),
                        }
                    )
    return table


def _dose(rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in points:
        scu = next(r for r in rows if r["group"] == "dose" and r["target"] == p["label"])
        reps = [r for r in rows if r["group"] == "dose-random" and r["target"] == p["label"]]
        out.append({**p, "scu": scu, "random": _summary(reps) if reps else None})
    return out


def _comparison(rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """SCU against its random control of the same size: does the SCU ablation exceed the random maximum?"""
    scu = next((r for r in rows if r["group"] == "category" and r["name"] == "SCU"), None)
    rand = next((t["row"] for t in table if t["condition"] == "random (size of SCU)"), None)
    base = next(r for r in rows if r["group"] == "baseline")
    if scu is None or rand is None or "asr" not in scu:
        return None
    return {
        "baseline_asr": base["asr"]["rate"],
        "baseline_coherent_compliance": base["coherent_compliance"]["rate"],
        "scu_asr": scu["asr"]["rate"],
        "scu_asr_ci95": scu["asr"]["ci95"],
        "scu_coherent_compliance": scu["coherent_compliance"]["rate"],
        "random_asr_mean": rand["asr"]["mean"],
        "random_asr_max": rand["asr"]["max"],
        "random_coherent_compliance_max": rand["coherent_compliance"]["max"],
        "seeds": len(rand["seeds"]),
        "scu_asr_exceeds_random_max": scu["asr"]["rate"] > rand["asr"]["max"],
        "scu_coherent_exceeds_random_max": scu["coherent_compliance"]["rate"] > rand["coherent_compliance"]["max"],
        "scu_asr_ci_low_above_random_max": scu["asr"]["ci95"][0] > rand["asr"]["max"],
    }


# ----------------------------------------------------------------------------------------------- the recipe


def _spread(ps: PromptSet, n: int | None) -> PromptSet:
    """``n`` examples evenly spread over the set (files are sorted by category; the first n would be one topic)."""
    if n is None or n >= len(ps):
        return ps
    idx = [int(i * len(ps) / n) for i in range(n)]
    return PromptSet(ps.name, ps.source, tuple(ps.examples[i] for i in idx))


def _load_units(
    cfg: AblateConfig, lm: LoadedModel, safety: PromptSet, utility: PromptSet
) -> tuple[Categorization, Scores, Scores, dict[str, Any], float]:
    """The categorisation, its scores and where they came from: the unit file (scores beside it when present,
    else recomputed for the dose ranking) or an in-memory categorisation."""
    adapter = get_adapter(lm.model)
    t = time.time()
    if cfg.units is None:
        outcome = categorize_model(lm, safety, utility, cfg.units_config())
        computed = {"source": "computed", "calibration": cfg.tokens, "metric": cfg.metric, "rule": cfg.rule}
        return outcome.categorization, outcome.safety, outcome.utility, computed, time.time() - t
    path = Path(cfg.units)
    meta = read_unit_file_metadata(path)
    space = UnitSpace.from_groups(adapter.groups(), meta["granularity"], lm.fingerprint, lm.name)  # type: ignore[arg-type]
    try:
        cats = load_categorization(path, space, allow_other_weights=cfg.allow_other_weights)
    except UnitFileError as exc:
        raise UserError(f"units from another model: {exc}") from None
    neuron = UnitSpace.from_groups(adapter.groups(), "neuron", lm.fingerprint, lm.name)
    s_file, u_file = path.parent / "scores" / "safety.safetensors", path.parent / "scores" / "utility.safetensors"
    info: dict[str, Any] = {"source": str(path), "metric": meta.get("metric", "?"), "rule": cats.rule}
    if s_file.is_file() and u_file.is_file():
        s_scores, u_scores = Scores.load(s_file, neuron), Scores.load(u_file, neuron)
        info["calibration"] = s_scores.region or "unknown"
        info["dose_ranking"] = "scores beside the unit file"
    else:
        ucfg = cfg.units_config().model_copy(update={"metric": meta.get("metric", cfg.metric)})
        outcome = categorize_model(lm, safety, utility, ucfg)
        s_scores, u_scores = outcome.safety, outcome.utility
        info["calibration"] = "unknown (no scores/ beside the unit file)"
        info["dose_ranking"] = f"scores recomputed on {safety.source} / {utility.source} ({ucfg.tokens})"
    return cats, s_scores, u_scores, info, time.time() - t


def _dose_points(cfg: AblateConfig, space: UnitSpace, ranking: torch.Tensor, n_scu: int) -> list[dict[str, Any]]:
    points = []
    for share in cfg.resolved()["dose"]:
        want = max(1, round(share * space.total))
        count = min(want, ranking.numel())
        points.append(
            {
                "label": f"{100 * share:g}%",
                "share": share,
                "count": count,
                "requested": want,
                "clipped": count < want,
                "beyond_scu": count > n_scu,
            }
        )
    return points


def run_ablate(cfg: AblateConfig) -> Path:
    """Load the model once, ablate every condition in memory, write the run folder; returns its path."""
    t0 = time.time()
    cfg.check()
    r = cfg.resolved()
    set_seed(cfg.seed)
    ecfg = EvalConfig(
        model=cfg.model, harmful=cfg.harmful, benign=cfg.benign, utility=cfg.utility_eval, system=cfg.system
    )
    data = load_eval_data(ecfg)
    data.harmful = _spread(data.harmful, r["limit"]) if data.harmful is not None else None
    data.benign = _spread(data.benign, r["limit"]) if data.benign is not None else None
    if data.perplexity is not None:
        data.perplexity = _spread(data.perplexity, r["limit"])
    if data.harmful is None:
        raise UserError("ablate measures safety on harmful prompts: --harmful cannot be none")
    # Calibration sets: for computing the units, the other-calibration comparison, or (a unit file without
    # scores beside it) the dose ranking. Loading them is cheap, so they are always read and checked up front.
    safety = _spread(load_prompts(cfg.safety, name="safety"), r["calibration_limit"])
    utility = _spread(load_prompts(cfg.utility, name="utility"), r["calibration_limit"])
    lm = load_model(cfg.model, **cfg.load_options())
    judge = get_judge(cfg.judge, model=lm.model, tokenizer=lm.tokenizer)
    gen = cfg.generation()
    digest_before, hooks_before = weights_digest(lm.model), _hook_count(lm.model)

    cats, s_scores, u_scores, units_info, units_seconds = _load_units(cfg, lm, safety, utility)
    space = cats.space
    ranking = scu_ranking(cats, s_scores, u_scores)
    n_scu = len(cats["SCU"])
    seeds = [cfg.seed + i for i in range(r["seeds"])]

    conditions = [Condition("baseline", "baseline", None)]
    for c in cfg.categories:
        conditions.append(Condition(c, "category", cats[c], count=len(cats[c])))
        if c in r["random_for"]:
            for s in seeds:
                conditions.append(
                    Condition(
                        f"random~{c} seed {s}", "random", random_control(space, len(cats[c]), s), c, s, len(cats[c])
                    )
                )
    other = None
    calib_seconds = 0.0
    if cfg.compare_calibration:
        main_region = units_info["calibration"]
        other_region = OTHER_CALIBRATION.get(main_region, "prompt")
        t = time.time()
        other = categorize_model(
            lm,
            safety,
            utility,
            cfg.units_config(tokens=other_region).model_copy(
                update={
                    "rule": cats.rule,
                    "shares": cats.shares,
                    "normalization": cats.normalization if cats.normalization in ("mean", "rank", "none") else "mean",
                    "ranking": cats.ranking if cats.ranking in ("global", "per-module") else "global",
                    "granularity": space.granularity,
                    "metric": units_info["metric"] if units_info["metric"] != "?" else cfg.metric,
                }
            ),
        )
        calib_seconds = time.time() - t
        other_scu = UnitSet(space, other.categorization["SCU"].mask.clone(), "SCU")
        conditions.append(
            Condition(f"SCU (calibration: {other_region})", "calibration", other_scu, count=len(other_scu))
        )
    points = _dose_points(cfg, space, ranking, n_scu)
    for p in points:
        top = UnitSet.from_indices(space, ranking[: p["count"]], f"SCU top {p['count']}")
        conditions.append(
            Condition(f"SCU top {p['label']}", "dose", top, p["label"], count=p["count"], overrefusal=False)
        )
        for s in seeds:
            conditions.append(
                Condition(
                    f"random {p['label']} seed {s}",
                    "dose-random",
                    random_control(space, p["count"], s),
                    p["label"],
                    s,
                    p["count"],
                    overrefusal=False,
                )
            )

    t_eval = time.time()
    rows = evaluate_conditions(lm, conditions, data, judge=judge, config=gen, progress=cfg.progress)
    eval_seconds = time.time() - t_eval
    digest_after, hooks_after = weights_digest(lm.model), _hook_count(lm.model)
    if digest_after != digest_before or hooks_after != hooks_before:
        raise RuntimeError("an ablation was not undone: the model's weights or hooks changed")  # a bug, not bad input

    table = _table(rows)
    calibration: dict[str, Any] = {"main": units_info["calibration"]}
    if other is not None:
        ocats = other.categorization
        calibration.update(
            {
                "other": other_region,
                "scu_jaccard": cats["SCU"].jaccard(UnitSet(space, ocats["SCU"].mask.clone(), "SCU")),
                "scu_sizes": [n_scu, len(ocats["SCU"])],
            }
        )
    results: dict[str, Any] = {
        "model": {
            "name": lm.name,
            "source": lm.source,
            "fingerprint": lm.fingerprint,
            "family": lm.family,
            "units_total": space.total,
        },
        "units": {
            **units_info,
            "granularity": space.granularity,
            "rule": cats.rule,
            "shares": cats.shares,
            "normalization": cats.normalization,
            "ranking": cats.ranking,
            "categories": {c: {"count": len(cats[c]), "fraction": cats[c].fraction} for c in CATEGORIES},
        },
        "settings": {
            **{k: v for k, v in r.items()},
            "quick": cfg.quick,
            "seed_list": seeds,
            "categories": cfg.categories,
            "judge": cfg.judge,
            "generation": dataclasses.asdict(gen),
            "compare_calibration": cfg.compare_calibration,
            "calibration_data": {
                "safety": safety.source,
                "utility": utility.source,
                "examples": [len(safety), len(utility)],
            },
            "eval_data": data.describe(),
            "utility_eval": cfg.utility_eval,
            "random_control": "uniform over all units, same count as the ablated set, one draw per seed",
            "dose_ranking": "SCU first, then the other non-RU units, by highest normalised I_S - I_U",
        },
        "conditions": rows,
        "table": [{k: v for k, v in t.items()} for t in table],
        "dose": _dose(rows, points),
        "comparison": _comparison(rows, table),
        "calibration": calibration,
        "weights": {
            "sha256_before": digest_before,
            "sha256_after": digest_after,
            "unchanged": digest_before == digest_after,
            "hooks_left": hooks_after - hooks_before,
        },
        "seconds": {
            "load_model": round(lm.load_seconds, 3),
            "units": round(units_seconds, 3),
            "other_calibration": round(calib_seconds, 3),
            "evaluation": round(eval_seconds, 3),
            "total": round(time.time() - t0, 3),
        },
    }
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        run.write_yaml("config.yaml", cfg.model_dump())
        if cfg.units is None:
            cats.save(run.file("units.safetensors"), {"metric": cfg.metric, "token_region": cfg.tokens})
        results["seconds"]["total"] = round(time.time() - t0, 3)
        run.write_json("results.json", results)
        run.write_text("report.md", render(results, run.path))
        run.write_json(
            "manifest.json",
            manifest(
                command="ablate",
                seed=cfg.seed,
                started=t0,
                device=lm.model.device,
                model={"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint},
                data={
                    **data.describe(),
                    "safety": {"source": safety.source, "sha256": safety.fingerprint()},
                    "utility": {"source": utility.source, "sha256": utility.fingerprint()},
                },
            ),
        )
    return run.out


# ----------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pp(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def _cell(entry: dict[str, Any], key: str) -> str:
    """A rate with its interval (single run) or mean [min, max] over seeds (random control)."""
    if key not in entry:
        return "-"
    v = entry[key]
    if "rate" in v:
        return f"{_pct(v['rate'])} [{100 * v['ci95'][0]:.0f}, {100 * v['ci95'][1]:.0f}]"
    return f"{_pct(v['mean'])} (min {_pct(v['min'])}, max {_pct(v['max'])})"


def _util_cell(entry: dict[str, Any]) -> str:
    u = entry.get("utility")
    if not u:
        return "-"
    if "mean" in u:
        fmt = "{:.2f}" if u["metric"] == "perplexity" else "{:.1%}"
        return f"{fmt.format(u['mean'])} ({fmt.format(u['min'])}..{fmt.format(u['max'])})"
    value = _utility_value(entry)
    if value is None:
        return "-"
    return f"{value[1]:.2f}" if value[0] == "perplexity" else _pct(value[1])


def _utility_name(results: dict[str, Any]) -> str:
    base = next(r for r in results["conditions"] if r["group"] == "baseline")
    value = _utility_value(base)
    return {"perplexity": "perplexity", "accuracy": "accuracy", "exact_match": "exact match"}.get(
        value[0] if value else "", "utility"
    )


def _table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in results["table"]:
        e, d = t["row"], t["delta"]
        rows.append(
            [
                t["condition"],
                f"{e['units']} ({100 * e['fraction']:.2f}%)",
                _cell(e, "asr"),
                _pp(d.get("asr")),
                _cell(e, "coherent_compliance"),
                _pp(d.get("coherent_compliance")),
                _cell(e, "overrefusal"),
                _pp(d.get("overrefusal")),
                _util_cell(e),
                "" if d.get("utility") is None else f"{d['utility']:+.2f}",
            ]
        )
    return rows


def _verdict(results: dict[str, Any]) -> list[str]:
    """Plain sentences: SCU against its random control, both numbers, and the paper's claim."""
    cmp = results.get("comparison")
    if not cmp:
        return ["No SCU-vs-random comparison was run (SCU or its random control was not among the conditions)."]
    n = cmp["seeds"]
    lines = [
        f"Ablating the {results['units']['categories']['SCU']['count']} SCU "
        f"({100 * results['units']['categories']['SCU']['fraction']:.2f}% of units) moved keyword ASR "
        f"{_pct(cmp['baseline_asr'])} -> {_pct(cmp['scu_asr'])} "
        f"(95% interval {100 * cmp['scu_asr_ci95'][0]:.0f}-{100 * cmp['scu_asr_ci95'][1]:.0f}%), and coherent "
        f"compliance {_pct(cmp['baseline_coherent_compliance'])} -> {_pct(cmp['scu_coherent_compliance'])}; "
        f"random sets of the same size over {n} seeds gave ASR {_pct(cmp['random_asr_mean'])} on average "
        f"(max {_pct(cmp['random_asr_max'])}) and coherent compliance at most "
        f"{_pct(cmp['random_coherent_compliance_max'])}."
    ]
    if cmp["scu_asr_exceeds_random_max"]:
        strength = (
            "and the lower end of its 95% interval is above that maximum"
            if cmp["scu_asr_ci_low_above_random_max"]
            else "but its 95% interval still reaches down to that maximum, so the gap is not clear-cut at this size"
        )
        lines.append(f"The SCU ablation's ASR exceeds the random control's maximum, {strength}.")
    else:
        lines.append(
            "The SCU ablation's ASR does NOT exceed the random control's maximum: the paper's effect (SCU ablation "
            "raises ASR far more than ablating as many other units) did not reproduce here."
        )
    if cmp["scu_asr"] > cmp["baseline_asr"] and cmp["scu_coherent_compliance"] < 0.5 * cmp["scu_asr"]:
        lines.append(
            "Most of the SCU ablation's 'successful attacks' are not coherent compliance: the keyword ASR flatters "
            "the effect, part of it is the model breaking rather than complying."
        )
    if cmp["scu_coherent_exceeds_random_max"]:
        lines.append("Coherent compliance under the SCU ablation also exceeds the random control's maximum.")
    else:
        lines.append(
            "By coherent compliance the SCU ablation does NOT exceed the random control's maximum: on that measure "
            "SCU are not shown to be special here."
        )
    return lines


def _short(entry: dict[str, Any], key: str) -> str:
    """A rate as value [interval] for one run, mean (max) for a random control."""
    if key not in entry:
        return "-"
    v = entry[key]
    if "rate" in v:
        return f"{100 * v['rate']:.0f}% [{100 * v['ci95'][0]:.0f}-{100 * v['ci95'][1]:.0f}]"
    return f"{100 * v['mean']:.0f}% (max {100 * v['max']:.0f})"


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """The short table the CLI prints: one row per Table 1 condition."""
    rows = []
    for t in results["table"]:
        u = t["row"].get("utility") or {}
        util = f"{u['mean']:.2f}" if "mean" in u else _util_cell(t["row"])
        rows.append(
            [
                t["condition"],
                f"{t['row']['units']} ({100 * t['row']['fraction']:.1f}%)",
                _short(t["row"], "asr"),
                _short(t["row"], "coherent_compliance"),
                _short(t["row"], "overrefusal"),
                util,
            ]
        )
    return rows


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The plain sentences the CLI prints under the table (SCU against random)."""
    return _verdict(results)


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Draw ``plots/dose_curve.png`` and ``plots/ablation_bars.png`` from ``results`` and return report.md."""
    run_dir = Path(run_dir)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    _plot_bars(results, run_dir / "plots" / "ablation_bars.png")
    if results.get("dose"):
        _plot_dose(results, run_dir / "plots" / "dose_curve.png")
    m, u, st = results["model"], results["units"], results["settings"]
    cal = results["calibration"]
    gen = st["generation"]
    lines = [
        f"# Ablating unit categories of {m['name']} (the paper's Table 1)",
        "",
        f"{m['units_total']} units ({u['granularity']} granularity). Units: {u['source']} (metric `{u['metric']}`, "
        f"rule `{u['rule']}`, shares {u['shares']}). **Main table calibration: `{cal['main']}` tokens** of the "
        f"safety set{' (harmful requests with refusal text)' if 'response' in str(cal['main']) else ''}.",
        f"Judge `{st['judge']}`; {st['eval_data'].get('harmful', {}).get('examples', '?')} harmful prompts "
        f"({st['eval_data'].get('harmful', {}).get('source', '?')}), "
        f"{st['eval_data'].get('benign', {}).get('examples', 0)} safe prompts for over-refusal, greedy replies of "
        f"{gen['max_new_tokens']} new tokens; utility: {_utility_name(results)} ({', '.join(st['utility_eval'])}). "
        f"Random controls: {st['random_control']}, seeds {st['seed_list']}."
        + (" Quick run (small sets: numbers are indicative)." if st.get("quick") else ""),
        "",
        "ASR = share of harmful prompts not refused (keyword judge). Coherent compliance = share answered with a "
        "coherent non-refusal (a broken model's garbage counts for ASR but not here). Rates: value [95% Wilson "
        "interval]; random controls: mean (min, max over seeds). Changes are against the baseline, in percentage "
        "points (utility: difference).",
        "",
        markdown_table(
            [
                "condition",
                "units ablated",
                "ASR",
                "dASR",
                "coherent compliance",
                "dCC",
                "over-refusal",
                "dOR",
                _utility_name(results),
                "d",
            ],
            _table_rows(results),
        ),
        "",
        "![ablation bars](plots/ablation_bars.png)",
        "",
        "## SCU against random units",
        "",
        *_verdict(results),
        "",
    ]
    if cal.get("other"):
        main_scu = next((t["row"] for t in results["table"] if t["condition"] == "SCU"), None)
        other_row = next((t["row"] for t in results["table"] if t["group"] == "calibration"), None)
        lines += ["## Calibration matters", ""]
        if main_scu is not None and other_row is not None and "asr" in main_scu:
            lines.append(
                f"SCU found with `{cal['main']}` calibration: ASR {_pct(main_scu['asr']['rate'])}, coherent "
                f"compliance {_pct(main_scu['coherent_compliance']['rate'])}. SCU found with `{cal['other']}` "
                f"calibration ({'no refusal text' if cal['other'] == 'prompt' else 'refusal text included'}): ASR "
                f"{_pct(other_row['asr']['rate'])}, coherent compliance "
                f"{_pct(other_row['coherent_compliance']['rate'])}. The two SCU sets "
                f"({cal['scu_sizes'][0]} and {cal['scu_sizes'][1]} units) overlap with Jaccard "
                f"{cal['scu_jaccard']:.3f}."
            )
            d_asr = main_scu["asr"]["rate"] - other_row["asr"]["rate"]
            d_cc = main_scu["coherent_compliance"]["rate"] - other_row["coherent_compliance"]["rate"]
            which = "stronger" if d_cc > 0 else "weaker" if d_cc < 0 else "as strong"
            lines.append(
                f"By coherent compliance the main calibration's SCU ablation is {which} "
                f"({100 * d_cc:+.1f} points; ASR {100 * d_asr:+.1f} points) than the `{cal['other']}` one."
            )
        lines.append("")
    if results.get("dose"):
        lines += ["## Dose curve", ""]
        dose_rows = []
        for p in results["dose"]:
            scu, rnd = p["scu"], p["random"] or {}
            dose_rows.append(
                [
                    p["label"] + (" (clipped)" if p["clipped"] else ""),
                    p["count"],
                    "yes" if p["beyond_scu"] else "no",
                    _cell(scu, "asr"),
                    _cell(rnd, "asr") if rnd else "-",
                    _cell(scu, "coherent_compliance"),
                    _cell(rnd, "coherent_compliance") if rnd else "-",
                    _util_cell(scu),
                    _util_cell(rnd) if rnd else "-",
                ]
            )
        n_scu = u["categories"]["SCU"]["count"]
        lines += [
            f"Top-k units by the SCU ranking ({st['dose_ranking']}; the first {n_scu} are exactly the SCU set, "
            f"larger doses continue down the same ranking), shares {[p['label'] for p in results['dose']]} of all "
            "units, against random sets of the same counts.",
            "",
            markdown_table(
                [
                    "dose",
                    "units",
                    "beyond SCU",
                    "ASR (SCU top-k)",
                    "ASR (random)",
                    "CC (SCU top-k)",
                    "CC (random)",
                    f"{_utility_name(results)} (SCU top-k)",
                    f"{_utility_name(results)} (random)",
                ],
                dose_rows,
            ),
            "",
            "![dose curve](plots/dose_curve.png)",
            "",
        ]
    w = results["weights"]
    sec = results["seconds"]
    lines.append(
        f"Model weights after all ablations: {'bit-identical to before' if w['unchanged'] else 'CHANGED'} "
        f"(sha256 {w['sha256_after'][:16]}). {len(results['conditions'])} conditions evaluated in "
        f"{sec['evaluation']:.0f} s; total {sec['total']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def _short_name(results: dict[str, Any]) -> str:
    name = str(results["model"]["name"])
    parts = Path(name).parts
    return name if len(parts) <= 2 else ".../" + "/".join(parts[-2:])


def _span(entry: dict[str, Any] | None) -> tuple[float, float, float]:
    """(value, low, high) of a rate: its Wilson interval for one run, min..max over seeds for a random control."""
    if entry is None:
        return 0.0, 0.0, 0.0
    if "rate" in entry:
        return entry["rate"], entry["ci95"][0], entry["ci95"][1]
    return entry["mean"], entry["min"], entry["max"]


def _utility_span(row: dict[str, Any]) -> tuple[float, float, float]:
    """(value, low, high) of the utility number (min..max over seeds for a random control)."""
    u = row.get("utility") or {}
    if "mean" in u:
        return u["mean"], u["min"], u["max"]
    v = _utility_value(row)
    val = v[1] if v else 0.0
    return val, val, val


def _errs(values: list[float], lows: list[float], highs: list[float]) -> list[list[float]]:
    return [
        [max(0.0, v - lo) for v, lo in zip(values, lows, strict=True)],
        [max(0.0, hi - v) for v, hi in zip(values, highs, strict=True)],
    ]


def _plot_bars(results: dict[str, Any], path: Path) -> None:
    """Bars per condition with whiskers: Wilson intervals for single runs, min..max over seeds for random sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    names = [t["condition"] for t in table]
    colors = []
    for t in table:
        base = t["condition"].split(" ")[0]
        colors.append(
            "#2ca02c"
            if t["group"] == "baseline"
            else "#bbbbbb"
            if t["group"] == "random"
            else CATEGORY_COLORS.get(base, "#ff7f0e")
        )
    panels = [k for k in RATE_KEYS if any(k in t["row"] for t in table)]
    has_util = any(t["row"].get("utility") for t in table)
    fig, axes = plt.subplots(
        1, len(panels) + int(has_util), figsize=(4.2 * (len(panels) + int(has_util)), 4.8), squeeze=False
    )
    titles = {"asr": "ASR (keyword)", "coherent_compliance": "coherent compliance", "overrefusal": "over-refusal"}
    x = list(range(len(table)))
    for ax, key in zip(axes[0], panels, strict=False):
        spans = [_span(t["row"].get(key)) for t in table]
        vals, lo, hi = ([s[i] for s in spans] for i in range(3))
        ax.bar(x, vals, color=colors, yerr=_errs(vals, lo, hi), capsize=3)
        ax.set_ylim(0, 1.05)
        ax.set_title(titles[key])
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    if has_util:
        ax = axes[0][-1]
        spans = [_utility_span(t["row"]) for t in table]
        vals, lo, hi = ([s[i] for s in spans] for i in range(3))
        ax.bar(x, vals, color=colors, yerr=_errs(vals, lo, hi), capsize=3)
        name = _utility_name(results)
        if name == "perplexity" and max(vals, default=0) > 0:
            ax.set_yscale("log")
        ax.set_title(f"utility: {name}")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    fig.suptitle(f"{_short_name(results)}: ablating unit categories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_dose(results: dict[str, Any], path: Path) -> None:
    """ASR, coherent compliance and utility against the number of top SCU-ranked units ablated, with random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dose = results["dose"]
    counts = [p["count"] for p in dose]
    keys = [k for k in ("asr", "coherent_compliance") if k in dose[0]["scu"]]
    has_util = _utility_value(dose[0]["scu"]) is not None
    n = len(keys) + int(has_util)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, 3.8), squeeze=False)
    titles = {"asr": "ASR (keyword)", "coherent_compliance": "coherent compliance"}
    n_scu = results["units"]["categories"]["SCU"]["count"]
    for ax, key in zip(axes[0], keys, strict=False):
        v = [p["scu"][key]["rate"] for p in dose]
        ax.errorbar(
            counts,
            v,
            yerr=_errs(v, [p["scu"][key]["ci95"][0] for p in dose], [p["scu"][key]["ci95"][1] for p in dose]),
            marker="o",
            color=CATEGORY_COLORS["SCU"],
            capsize=3,
            label="SCU ranking, top k",
        )
        if all(p["random"] and key in p["random"] for p in dose):
            m = [p["random"][key]["mean"] for p in dose]
            ax.plot(counts, m, marker="s", color="#555555", label="random units (mean)")
            ax.fill_between(
                counts,
                [p["random"][key]["min"] for p in dose],
                [p["random"][key]["max"] for p in dose],
                color="#999999",
                alpha=0.3,
                label="random min..max",
            )
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(titles[key])
    if has_util:
        ax = axes[0][-1]
        name = _utility_name(results)
        ax.plot(
            counts,
            [_utility_span(p["scu"])[0] for p in dose],
            marker="o",
            color=CATEGORY_COLORS["SCU"],
            label="SCU ranking, top k",
        )
        if all(p["random"] and "utility" in p["random"] for p in dose):
            ax.plot(
                counts,
                [p["random"]["utility"]["mean"] for p in dose],
                marker="s",
                color="#555555",
                label="random (mean)",
            )
            ax.fill_between(
                counts,
                [p["random"]["utility"]["min"] for p in dose],
                [p["random"]["utility"]["max"] for p in dose],
                color="#999999",
                alpha=0.3,
            )
        ax.set_title(f"utility: {name}")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(counts, [f"{c}\n{p['label']}" for c, p in zip(counts, dose, strict=True)], fontsize=7)
        if n_scu > 0:
            ax.axvline(n_scu, color=CATEGORY_COLORS["SCU"], linestyle=":", linewidth=1)
        ax.set_xlabel("units ablated (dotted: SCU size)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{_short_name(results)}: dose curve (top-k SCU-ranked units vs random)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
