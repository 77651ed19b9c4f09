"""`ssah budget`: redundant units as an alignment budget (paper §4.3, Table 4, and the reviewers' safety question).

The same safety SFT of a base model, each run from the same base weights: on every parameter (full SFT), on the
redundant units only (RU-only; RU from :func:`ssah.measure.find_units` or a unit file), and on as many random units
with RU's count in every (layer, kind) cell, once per seed (the control distribution). After each run: refusal of
held-out harmful prompts, over-refusal of held-out benign ones, coherent compliance, benign answers correct and
perplexity. Every verdict is :func:`ssah.measure.verdict`: RU-only against the random-units distribution and against
full SFT. The paper's claim (Table 4): RU-only SFT keeps more utility than full SFT.

``--method`` aligns every condition the way ``ssah align`` can: ``sft`` (above), ``dpo`` (trl's preference step on
pairs built once from the base model's own replies, the same pairs for every condition) or ``sft+dpo``; the unit
masks (RU-only, random units only) apply to both steps.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ssah.arch import get_adapter
from ssah.config import Dtype, ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.data.training import alignment_mix
from ssah.errors import UserError
from ssah.evaluate import EvalData, load_eval_sets
from ssah.fields import (
    CalibrationSection,
    Columns,
    CommaList,
    Count,
    MaxLength,
    Seeds,
    Strata,
    System,
    UnitCategoryFields,
    UtilityEvalSection,
)
from ssah.judges import get_judge
from ssah.measure import (
    ControlDistribution,
    Proportion,
    answer_accuracy,
    check_unit_search,
    compare_measured,
    find_units,
    measure_condition,
    random_control,
    restored_weights,
    verdict,
)
from ssah.models import load_model
from ssah.protocol import Clock, Experiment, execute
from ssah.provenance import held_out
from ssah.recipes.budget import RECIPE
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder
from ssah.training import (
    DpoSection,
    Method,
    Pair,
    TrainConfig,
    TrainResult,
    TrainSection,
    parse_unit_spec,
    preference_pairs,
    preference_step,
    resolve_unit_spec,
    train_model,
    uses_dpo,
)
from ssah.units import UnitSet, save_unit_sets

CONDITIONS: tuple[str, ...] = ("full", "ru", "random")
LABELS = {"base": "base (no SFT)", "full": "full SFT", "ru": "RU-only", "random": "random units only"}
ALIGNMENT = "builtin:alignment"
# Training only a sliver of the weights moves the model far less per step than full SFT at the same rate, so
# the units-only conditions get their own (higher) learning rate; it is recorded with the results. Measured on
# SmolLM2 (8 steps, 16 held-out harmful prompts): RU-only at 3e-4 left refusal at the base's 6%, 1e-3 gave 25%,
# 3e-3 gave 44% with perplexity up by a third; full SFT at 3e-5 gave 19% (8 steps) and 38% (10 steps).
DEFAULT_LR_UNITS = 1e-3
# Full SFT must itself align the model, or "RU-only keeps more utility" compares with a model that barely moved.
# Measured on SmolLM2 (quick: 10 steps of batch 8, bf16, 16 held-out harmful / benign prompts): full SFT at 3e-5
# and at 5e-5 left refusal at the base's 6%; at 1e-4 it refused 94% with 0% over-refusal, perplexity 19.0 -> 15.8.
DEFAULT_LR_FULL = 1e-4
# (metric, label, direction the budget hypothesis expects for RU-only against the other condition)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("refusal", "refusal of held-out harmful prompts", "higher"),
    ("overrefusal", "over-refusal of held-out benign prompts", "lower"),
    ("task_accuracy", "utility: benign answers correct", "higher"),
)
PAPER_CLAIM = "RU-only alignment SFT keeps more utility than full SFT (paper Table 4: GSM8K 13.4 vs 8.8)"


class BudgetConfig(UnitCategoryFields, ModelRunConfig):
    """Everything `ssah budget` needs."""

    out: Out = "runs/budget"
    dtype: Dtype = "float32"
    data: str = Field(
        ALIGNMENT, description="Alignment data with responses (default: the `ssah align` mix), a preset or a file."
    )
    columns: Columns = Field(default_factory=dict)
    conditions: CommaList = Field(
        default_factory=lambda: list(CONDITIONS),
        description="Conditions to run: full, ru, random (repeatable).",
        json_schema_extra={"flag": "--condition"},
    )
    units: str | None = Field(
        None, description="Train these units instead of RU found on the base model: UNITS_FILE:RU."
    )
    allow_other_weights: bool = Field(
        False, description="Accept a unit file computed on other weights of the same architecture."
    )
    seeds: Seeds = 5
    control_strata: Strata = "layer-kind"
    # training, as `ssah align`
    steps: Count = Field(20, description="SFT steps per condition.")
    # full SFT's; the units-only conditions take lr_units and never freeze embeddings (they train units only)
    train: TrainSection = TrainSection(
        lr=DEFAULT_LR_FULL, schedule="constant", max_grad_norm=None, freeze_embeddings=True
    )
    lr_units: float = Field(
        DEFAULT_LR_UNITS, gt=0, description="Learning rate of the units-only conditions (RU and random)."
    )
    method: Method = "sft"
    dpo: DpoSection = DpoSection()
    dpo_lr_units: float | None = Field(
        None, gt=0, description="Preference-step learning rate of the units-only conditions (default: dpo.lr scaled "
        "by lr_units / train.lr, as the SFT step's).",
    )  # fmt: skip
    harmful: str = Field(
        "builtin:safety", description="The harmful requests of --data (their pairs reject the model's own reply)."
    )
    max_length: MaxLength = 512
    system: System = None
    calibration: CalibrationSection = CalibrationSection()  # finding RU on the base model (neuron units)
    # evaluation on held-out sets: eval.benign answers are checked, eval.utility is a perplexity set
    eval: UtilityEvalSection = UtilityEvalSection(
        benign="builtin:benign", utility=["builtin:task"], limit=50, max_new_tokens=48
    )

    def train_config(self, condition: str) -> TrainConfig:
        """The SFT settings of one condition: the same steps, batch, schedule and data order; the units' own rate."""
        full, t = condition == "full", self.train
        same = self.model_dump(include={"model", "out", "dtype", "max_length", "system", "seed", "progress", "bf16"})
        units_only = {} if full else {"lr": self.lr_units, "freeze_embeddings": False}
        return TrainConfig.build({**same, **t.model_dump(), "max_steps": self.steps, **units_only})

    def dpo_section(self, condition: str) -> DpoSection:
        """The preference step of one condition: the units-only conditions get their own rate."""
        if condition == "full":
            return self.dpo
        lr = self.dpo_lr_units or self.dpo.lr * self.lr_units / self.train.lr
        return self.dpo.model_copy(update={"lr": lr})

    def check(self) -> None:
        """Cheap validation before any data or model is loaded (the output folder included)."""
        if not self.conditions:
            raise UserError(f"no conditions to run: pass some of {', '.join(CONDITIONS)}")
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad or len(set(self.conditions)) != len(self.conditions):
            raise UserError(f"conditions must be distinct names among {', '.join(CONDITIONS)}, got {self.conditions}")
        for c in self.conditions:
            self.train_config(c)  # a UserError on a bad training setting
        if self.units is not None:
            parse_unit_spec(self.units)
        else:
            check_unit_search(self)
        self.eval.greedy(self)
        self.eval.check_judge()
        check_output_folder(self.out, self.overwrite)


def load_training_data(cfg: BudgetConfig) -> PromptSet:
    """The alignment data: the `ssah align` mix (seeded as there) or any data spec with responses."""
    if cfg.data == ALIGNMENT:
        return alignment_mix(seed=cfg.seed)
    data = load_prompts(cfg.data, columns=cfg.columns or None, name="alignment")
    if not data.has_responses:
        raise UserError(f"alignment data {cfg.data} needs a response on every example: pass a set with responses")
    return data


def load_eval_data(cfg: BudgetConfig, train: PromptSet) -> EvalData:
    """The held-out sets; none may share a prompt with the training data."""
    data = load_eval_sets(cfg.eval.harmful, cfg.eval.benign, cfg.eval.utility, limit=cfg.eval.limit)
    seen = set(train.prompts())
    for what, ps in (("harmful", data.harmful), ("benign", data.benign), ("utility", data.perplexity)):
        if ps is None:
            raise UserError(f"--eval-{what} is needed: give a held-out set")
        if overlap := seen & set(ps.prompts()):
            raise UserError(
                f"{len(overlap)} --eval-{what} prompts are also alignment training prompts: use held-out sets"
            )
    return data


def measure(model: Any, tokenizer: Any, data: EvalData, judge: Any, cfg: BudgetConfig) -> dict[str, Any]:
    """One condition's measurement: the core's counts plus refusal and benign answers correct, as Proportions."""
    res = measure_condition(model, tokenizer, data, judge=judge, config=cfg.eval.greedy(cfg), progress=cfg.progress)
    assert res.asr is not None and data.benign is not None
    out = res.to_dict()
    out["refusal"] = res.asr.complement().to_dict()
    benign = [s for s in res.samples if s.set == data.benign.name]
    accuracy = answer_accuracy(data.benign.examples, benign)
    out["task_accuracy"] = accuracy.to_dict() if accuracy else None
    return out


def get_units(lm: Any, cfg: BudgetConfig) -> tuple[UnitSet, dict[str, Any]]:
    """The units RU-only trains: RU of the base model (core ``find_units``), or the set ``cfg.units`` names."""
    if cfg.units is not None:
        same = {"fingerprint": lm.fingerprint, "model_name": lm.name, "allow_other_weights": cfg.allow_other_weights}
        return resolve_unit_spec(cfg.units, lm.model, **same), {"source": cfg.units, "found_on_base": False}
    safety, utility = cfg.calibration.load(cfg.columns)
    cats = find_units(lm, safety, utility, cfg).categorization
    info = {"source": "RU found on the base model", "found_on_base": True, "metric": cfg.metric, "rule": cats.rule}
    info["calibration"] = {"safety": safety.source, "utility": utility.source, "examples": [len(safety), len(utility)]}
    return cats["RU"], info | {"shares": cats.shares, "normalization": cats.normalization, "ranking": cats.ranking}


def decide(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RU-only against the random-units distribution and against full SFT, by the one verdict rule (paired on
    the evaluation prompts every arm answered)."""
    evals: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        evals.setdefault(r["name"], []).append(r["eval"])
    out: dict[str, Any] = {}
    for other in ("random", "full") if "ru" in evals else ():
        block: dict[str, Any] = {}
        for key, label, expected in METRICS if other in evals else ():
            mine, theirs = evals["ru"][0].get(key), [e.get(key) for e in evals[other]]
            if mine is None or any(t is None for t in theirs):
                block[key] = {"label": label, "verdict": "inconclusive", "reason": f"no {label} measured"}
                continue
            draws = tuple(Proportion.from_dict(t) for t in theirs if t is not None)
            control = ControlDistribution(draws) if other == "random" else draws[0]
            v = verdict(compare_measured(Proportion.from_dict(mine), control), expected)  # type: ignore[arg-type]
            block[key] = {"label": label, **v.to_dict()}
        if block:
            out[f"ru_vs_{other}"] = block
    return out


def build_pairs(cfg: BudgetConfig, model: Any, tokenizer: Any, train: PromptSet) -> tuple[list[Pair], dict[str, int]]:
    """The preference pairs of the training data, with the base model's own greedy replies to its harmful requests
    (judged by ``cfg.eval.judge``: those it refuses give no pair); built once, before any condition trains."""
    import dataclasses

    harmful = set(load_prompts(cfg.harmful, name="harmful").prompts())
    gen = dataclasses.replace(cfg.eval.greedy(cfg), max_new_tokens=cfg.dpo.max_new_tokens)
    return preference_pairs(
        model, tokenizer, train, harmful, judge=get_judge(cfg.eval.judge), generation=gen, seed=cfg.seed,
        progress=cfg.progress,
    )  # fmt: skip


def align(
    cfg: BudgetConfig, cond: str, model: Any, tok: Any, train: PromptSet, pairs: list[Pair], only: UnitSet | None
) -> tuple[Any, dict[str, Any]]:
    """One condition's alignment by ``cfg.method``, in place (``only``: train just those units, in both steps);
    returns the trained model and what the training record keeps."""
    tcfg = cfg.train_config(cond)
    info: dict[str, Any] = {"method": cfg.method, "lr": tcfg.lr, "freeze_embeddings": tcfg.freeze_embeddings}
    result: TrainResult | None = None
    if cfg.method != "dpo":
        result = train_model(model, tok, train, tcfg, only=only, progress=cfg.progress)
        info = {**result.summary(), **info}
    if uses_dpo(cfg.method):
        dpo = cfg.dpo_section(cond)
        step = preference_step(model, tok, pairs, tcfg, dpo, only=only, progress=cfg.progress)
        info["dpo"] = {**step.summary(), "lr": dpo.lr, "beta": dpo.beta}
        if result is None:  # dpo alone: the preference step is the training record
            info = {**step.summary(), **info, "lr": dpo.lr}
        result = result or step
    assert result is not None  # one of the steps ran: the method is sft, dpo or sft+dpo
    return result.model, info


def run_budget(cfg: BudgetConfig) -> RunResult[BudgetConfig]:
    """Run the recipe and write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, budget_experiment)


def budget_experiment(cfg: BudgetConfig, clock: Clock) -> Experiment:
    """Full SFT vs RU-only vs random-units-only SFT (one run per seed) from one base model."""
    train = load_training_data(cfg)
    eval_data = load_eval_data(cfg, train)
    used = {"training": train}
    if cfg.units is None and any(c != "full" for c in cfg.conditions):  # RU are found on the calibration sets here
        used |= dict(zip(("calibration safety", "calibration utility"), cfg.calibration.load(cfg.columns), strict=True))
    prompts = held_out(eval_data.prompts(), used, allow_overlap=cfg.eval.allow_overlap)
    opts: dict[str, Any] = {"allow_pickle": cfg.allow_pickle, "trust_remote_code": cfg.trust_remote_code}
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, **opts)
    model, tok = lm.model, lm.tokenizer
    judge = get_judge(cfg.eval.judge, model=model, tokenizer=tok)
    units, units_info, controls = None, None, []
    if {"ru", "random"} & set(cfg.conditions):
        units, units_info = get_units(lm, cfg)
        if len(units) == 0:
            raise UserError("the unit set to train is empty: choose other --shares or another --units category")
        units_info |= {"count": len(units), "share": units.fraction, "units_total": units.space.total}
        if "random" in cfg.conditions:
            seeds = range(cfg.seed, cfg.seed + cfg.seeds)
            controls = [random_control(units, s, strata=cfg.control_strata) for s in seeds]
            units_info["controls"] = [c.summary() | {"jaccard_ru": round(units.jaccard(c.units), 4)} for c in controls]
    rows: list[dict[str, Any]] = [{"name": "base", "label": LABELS["base"], "training": None}]
    rows[0]["eval"] = measure(model, tok, eval_data, judge, cfg)
    runs: list[tuple[str, Any, int | None]] = [(c, units if c == "ru" else None, None) for c in cfg.conditions]
    runs = [r for r in runs if r[0] != "random"] + [("random", c.units, c.seed) for c in controls]
    pairs, pair_counts = build_pairs(cfg, model, tok, train) if uses_dpo(cfg.method) else ([], {})
    for cond, only, seed in runs:
        with restored_weights(model):  # every run starts from the base weights, bit for bit
            trained, training = align(cfg, cond, model, tok, train, pairs, only)
            trained.eval()
            row: dict[str, Any] = {"name": cond, "label": LABELS[cond], "seed": seed, "training": training}
            row["eval"] = measure(trained, tok, eval_data, judge, cfg)
            rows.append(row)

    fp = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint}
    train_info = {"source": train.source, "examples": len(train), "sha256": train.fingerprint()}
    results: dict[str, Any] = {
        "model": fp | {"family": lm.family, "layers": get_adapter(model).num_layers},
        "data": {"train": train_info, **eval_data.describe()},
        "units": units_info,
        "settings": {"steps": cfg.steps, "max_new_tokens": cfg.eval.max_new_tokens, "eval_limit": cfg.eval.limit}
        | {"lr_full": cfg.train.lr, "freeze_embeddings_full": cfg.train.freeze_embeddings, "seeds": len(controls)}
        | cfg.train.model_dump(include={"batch_size", "schedule"})
        | cfg.model_dump(include={"lr_units", "control_strata", "seed", "method"})
        | ({"dpo": cfg.dpo.model_dump(), "pairs": pair_counts} if uses_dpo(cfg.method) else {})
        | {"judge": cfg.eval.judge},
        "conditions": rows,
        "verdicts": decide(rows),
        "prompts": prompts,
        "paper": {"claim": PAPER_CLAIM},
        "seconds": {"load_model": round(lm.load_seconds, 3), "total": 0.0},
    }
    test = results["verdicts"].get("ru_vs_full", {}).get("task_accuracy")
    results["paper"] |= {k: test[k] for k in ("verdict", "reason")} if test else {"verdict": "inconclusive"}
    results["paper"].setdefault("reason", "RU-only and full SFT were not both run")

    def files(run: RunDir) -> None:
        if units is not None:
            sets = {"RU": units} | {f"random-{c.seed}": c.units for c in controls}
            meta = {"source": units_info["source"], "control_strata": cfg.control_strata}  # type: ignore[index]
            save_unit_sets(run.file("units.safetensors"), sets, meta)

    return Experiment(results, fp, results["data"], device=model.device, files=files)
