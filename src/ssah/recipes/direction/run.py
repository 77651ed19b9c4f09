"""`ssah direction`: the refusal-direction baseline (Arditi et al. 2024) on the prompts ssah measures neurons on.

The harmful and harmless sets are each split three ways (seeded shuffle, disjoint): *train* prompts give the
difference-in-means candidates, *validation* prompts choose one (``ssah.direction.select_direction``: bypass,
induce and KL scores), *test* prompts measure it. On the test split every condition is measured by
``measure.measure_condition`` (ASR, coherent compliance, over-refusal on the benign set) and by
``evaluate.kl_divergence`` (KL on the harmless test prompts against one reference): the baseline, the direction
ablated at every layer, random directions of the same norm ablated the same way (one per seed), the orthogonalised
weights, and activation addition at the chosen layer (refusal of harmless prompts) against random additions of the
same norm at the same layer. Verdicts come from ``measure.verdict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from pydantic import Field

from ssah import measure
from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.direction import (
    KL_MAX,
    MAX_LAYER_SHARE,
    Selection,
    ablated_direction,
    added_direction,
    candidate_directions,
    last_logprobs,
    orthogonalized,
    random_direction,
    save_direction,
    select_direction,
)
from ssah.errors import UserError
from ssah.evaluate import EvalData, KLReference, kl_divergence, kl_reference
from ssah.fields import Count, EvalSection, Seeds, System
from ssah.generate import GenerationConfig
from ssah.judges import get_judge
from ssah.models import load_model
from ssah.protocol import Clock, Experiment, execute
from ssah.provenance import held_out
from ssah.recipes.direction import RECIPE
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder

NAMES = {
    "asr": "ASR",
    "coherent_compliance": "coherent compliance",
    "overrefusal": "over-refusal",
    "harmless_refusal": "refusal of harmless",
}


class DirectionConfig(ModelRunConfig):
    """Everything `ssah direction` needs (full-run sizes by default; ``--config quick`` for a small run)."""

    out: Out = "runs/direction"
    harmless: str = Field(
        "builtin:benign",
        description="Harmless prompts (direction, induce score, KL): builtin:NAME, preset, file.",
    )
    train: Count = Field(40, description="Prompts of eval.harmful and harmless for the difference in means.")
    val: Count = Field(24, description="Prompts of eval.harmful and harmless to choose the direction on.")
    seeds: Seeds = 5
    layer_step: Count = Field(1, description="Score every N-th layer's candidates.")
    positions: Count | None = Field(
        None, description="Post-instruction positions (default: the template's, at most 5)."
    )
    kl_max: float = Field(KL_MAX, gt=0, description="KL filter of the selection (the paper's 0.1).")
    max_layer_share: float = Field(
        MAX_LAYER_SHARE, gt=0, le=1, description="Candidates from layers below this share of depth (the paper's 0.8)."
    )
    kl_tokens: Count = Field(16, description="Tokens of the original's greedy reply teacher-forced for KL.")
    system: System = None
    # eval.harmful and harmless are each split into train / val / test (eval.limit) prompts
    eval: EvalSection = EvalSection(limit=32)

    def check(self) -> None:
        """Validate everything that needs neither data nor model (nothing is written before this passes)."""
        if self.eval.limit is None:
            raise UserError("the direction's test split needs a size: give eval.limit (test prompts of each set)")
        if min(self.train, self.val) < 2:  # a mean difference of one prompt, a choice made on one prompt
            raise UserError(
                f"--train {self.train} / --val {self.val}: fitting and choosing the direction need at least 2 prompts "
                "of each set in each split; pass --train 2 --val 2 or more"
            )
        self.eval.greedy(self)
        self.eval.check_judge()
        check_output_folder(self.out, self.overwrite)


def split3(ps: PromptSet, sizes: tuple[int, int, int], seed: int) -> tuple[PromptSet, PromptSet, PromptSet]:
    """Three disjoint parts of ``ps`` (train, validation, test) of the given sizes after a seeded shuffle (the
    built-in sets are ordered by category); a one-line error when the set is too small."""
    need = sum(sizes)
    if len(ps) < need:
        raise UserError(
            f"the {ps.name} set {ps.source} has {len(ps)} prompts but train + validation + test need {need}: "
            "pass a larger set or smaller --train / --val / --limit"
        )
    order = np.random.default_rng(seed).permutation(len(ps))
    parts, at = [], 0
    for what, n in zip(("train", "val", "test"), sizes, strict=True):
        picks = tuple(ps.examples[int(i)] for i in order[at : at + n])
        parts.append(PromptSet(f"{ps.name}[{what}]", ps.source, picks))
        at += n
    return parts[0], parts[1], parts[2]


def _prompts(ps: PromptSet) -> list[str]:
    return [ex.prompt for ex in ps]


def _verdict(effect: dict[str, Any], control: dict[str, Any], key: str, expected: str) -> dict[str, Any] | None:
    if key not in effect or key not in control:
        return None
    comp = measure.compare_stored(effect[key], control[key])
    return measure.verdict(comp, expected).to_dict()  # type: ignore[arg-type]


Cond = tuple[str, str, int | None, Callable[[], contextlib.AbstractContextManager[Any]], EvalData]


@dataclasses.dataclass(frozen=True)
class _Splits:
    """The prompt sets of one run: the full sets (for the manifest), their three-way splits and the benign set."""

    harmful: PromptSet
    harmless: PromptSet
    h_train: PromptSet
    h_val: PromptSet
    h_test: PromptSet
    b_train: PromptSet
    b_val: PromptSet
    b_test: PromptSet
    benign: PromptSet | None

    def parts(self) -> tuple[PromptSet, ...]:
        sets = (self.h_train, self.h_val, self.h_test, self.b_train, self.b_val, self.b_test)
        return (*sets, *([self.benign] if self.benign else []))


def _load_splits(cfg: DirectionConfig) -> _Splits:
    """Load the harmful / harmless / benign sets and split the first two (one-line error when one is empty)."""
    ev = cfg.eval
    sizes = (cfg.train, cfg.val, ev.limit or 0)
    harmful = load_prompts(ev.harmful, name="harmful")
    harmless = load_prompts(cfg.harmless, name="harmless")
    if len(harmless) == 0 or len(harmful) == 0:
        raise UserError("the direction needs harmful and harmless prompts: pass non-empty --harmful / --harmless")
    h_train, h_val, h_test = split3(harmful, sizes, cfg.seed)
    b_train, b_val, b_test = split3(harmless, sizes, cfg.seed + 1)
    benign = None if ev.benign.strip().lower() in ("", "none") else load_prompts(ev.benign).spread(ev.limit)
    return _Splits(harmful, harmless, h_train, h_val, h_test, b_train, b_val, b_test, benign)


def _conditions(
    model: Any, sel: Selection, seeds: list[int], on_harmful: EvalData, on_harmless: EvalData
) -> list[Cond]:
    """Every measured condition: baselines, ablation, orthogonalised weights, addition and their random controls."""
    conditions: list[Cond] = [
        ("baseline", "baseline", None, contextlib.nullcontext, on_harmful),
        ("baseline (harmless)", "baseline-harmless", None, contextlib.nullcontext, on_harmless),
        ("direction ablation", "ablation", None, lambda: ablated_direction(model, sel.direction), on_harmful),
        ("orthogonalised weights", "orthogonalized", None, lambda: orthogonalized(model, sel.direction), on_harmful),
    ]
    for s in seeds:
        rnd = random_direction(sel.direction, s)
        conditions.append((f"random ablation seed {s}", "random", s, _bind(ablated_direction, model, rnd), on_harmful))
    conditions.append(
        ("direction addition", "addition", None, lambda: added_direction(model, sel.direction, sel.layer), on_harmless)
    )
    for s in seeds:
        rnd = random_direction(sel.direction, 10_000 + s)
        add = _bind(added_direction, model, rnd, sel.layer)
        conditions.append((f"random addition seed {s}", "addition-random", s, add, on_harmless))
    return conditions


def _measure_conditions(
    model: Any,
    tok: Any,
    conditions: list[Cond],
    *,
    on_harmful: EvalData,
    judge: Any,
    gen: GenerationConfig,
    reference: KLReference,
    cfg: DirectionConfig,
) -> tuple[list[dict[str, Any]], float]:
    """One row per condition (rates on harmful data, harmless refusal otherwise, KL always) and the KL seconds."""
    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    kl_seconds = 0.0
    for name, group, seed, ctx, data in tqdm(conditions, desc="conditions", disable=not cfg.progress):
        with ctx():
            res = measure.measure_condition(model, tok, data, judge=judge, config=gen)
            kl = kl_divergence(model, tok, reference)
        kl_seconds += kl.seconds
        row: dict[str, Any] = {"name": name, "group": group, "seed": seed, "seconds": round(res.seconds, 3)}
        if data is on_harmful:
            row |= {k: v.to_dict() for k, v in res.rates().items()}
        elif res.overrefusal is not None:
            row["harmless_refusal"] = res.overrefusal.to_dict()
        row["kl"] = kl.to_dict(seed=cfg.seed)
        rows.append(row)
    return rows, kl_seconds


def _orthogonalization_gap(model: Any, tok: Any, sel: Selection, b_test: PromptSet, cfg: DirectionConfig) -> float:
    """Largest absolute log-prob difference between the orthogonalised weights and the ablation hooks."""
    with ablated_direction(model, sel.direction):
        hooked = last_logprobs(model, tok, _prompts(b_test), system=cfg.system, batch_size=cfg.eval.batch_size)
    with orthogonalized(model, sel.direction):
        edited = last_logprobs(model, tok, _prompts(b_test), system=cfg.system, batch_size=cfg.eval.batch_size)
    return float((hooked - edited).abs().max())


def _table_and_verdicts(
    rows: list[dict[str, Any]], layer: int, n_seeds: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The summary table (random controls aggregated over seeds) and the verdicts that could be computed."""
    by = {x["group"]: x for x in rows if x["group"] not in ("random", "addition-random")}
    rnd_abl = measure.over_seeds([x for x in rows if x["group"] == "random"])
    rnd_add = measure.over_seeds([x for x in rows if x["group"] == "addition-random"])
    table: list[dict[str, Any]] = [
        {
            "condition": "baseline",
            "row": by["baseline"] | {"harmless_refusal": by["baseline-harmless"]["harmless_refusal"]},
        },
        {"condition": "direction ablation", "row": by["ablation"]},
        {"condition": f"random direction ablation ({n_seeds} seeds)", "row": rnd_abl},
        {"condition": "orthogonalised weights", "row": by["orthogonalized"]},
        {"condition": f"direction addition (layer {layer})", "row": by["addition"]},
        {"condition": f"random direction addition ({n_seeds} seeds)", "row": rnd_add},
    ]
    base = table[0]["row"]
    verdicts = {
        "ablation_vs_random_asr": _verdict(by["ablation"], rnd_abl, "asr", "higher"),
        "ablation_vs_random_coherent": _verdict(by["ablation"], rnd_abl, "coherent_compliance", "higher"),
        "ablation_vs_baseline_asr": _verdict(by["ablation"], base, "asr", "higher"),
        "addition_vs_random_refusal": _verdict(by["addition"], rnd_add, "harmless_refusal", "higher"),
        "addition_vs_baseline_refusal": _verdict(by["addition"], base, "harmless_refusal", "higher"),
    }
    return table, {k: v for k, v in verdicts.items() if v is not None}


def run_direction(cfg: DirectionConfig) -> RunResult[DirectionConfig]:
    """Run the recipe and write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, direction_experiment)


def direction_experiment(cfg: DirectionConfig, clock: Clock) -> Experiment:
    """Choose the refusal direction on the validation split and measure its interventions on the test split."""
    sp = _load_splits(cfg)
    evaluated = {"harmful test": sp.h_test, "harmless test": sp.b_test, "benign": sp.benign}
    used = {
        "harmful train": sp.h_train,
        "harmful val": sp.h_val,
        "harmless train": sp.b_train,
        "harmless val": sp.b_val,
    }
    prompts = held_out(evaluated, used, allow_overlap=cfg.eval.allow_overlap)  # the direction is chosen on val
    lm = load_model(cfg.model, **cfg.load_options())
    model, tok = lm.model, lm.tokenizer
    judge = get_judge(cfg.eval.judge, model=model, tokenizer=tok)
    gen = cfg.eval.greedy(cfg)
    before = measure.weights_digest(model)
    seconds: dict[str, float] = {}

    t = time.time()
    directions = candidate_directions(
        model, tok, _prompts(sp.h_train), _prompts(sp.b_train), positions=cfg.positions, system=cfg.system,
        batch_size=cfg.eval.batch_size,
    )  # fmt: skip
    seconds["directions"] = time.time() - t
    t = time.time()
    sel = select_direction(
        model, tok, directions, _prompts(sp.h_val), _prompts(sp.b_val), system=cfg.system,
        batch_size=cfg.eval.batch_size, kl_max=cfg.kl_max, max_layer_share=cfg.max_layer_share,
        layer_step=cfg.layer_step, progress=cfg.progress,
    )  # fmt: skip
    seconds["selection"] = time.time() - t

    t = time.time()
    reference = kl_reference(
        model, tok, sp.b_test, reply_tokens=cfg.kl_tokens, system=cfg.system, batch_size=cfg.eval.batch_size
    )
    seconds["kl_reference"] = time.time() - t
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    on_harmful = EvalData(harmful=sp.h_test, benign=sp.benign)
    conditions = _conditions(model, sel, seeds, on_harmful, EvalData(benign=sp.b_test))
    t = time.time()
    rows, kl_seconds = _measure_conditions(
        model, tok, conditions, on_harmful=on_harmful, judge=judge, gen=gen, reference=reference, cfg=cfg
    )
    seconds["evaluation"] = time.time() - t
    seconds["kl"] = kl_seconds

    # exactness of the orthogonalised weights against the hooks, on the harmless test prompts
    exact = _orthogonalization_gap(model, tok, sel, sp.b_test, cfg)
    after = measure.weights_digest(model)
    if after != before:
        raise RuntimeError("an intervention was not undone: the model's weights changed")  # a bug, not input

    table, verdicts = _table_and_verdicts(rows, sel.layer, len(seeds))
    results: dict[str, Any] = {
        "model": {k: getattr(lm, k) for k in ("name", "source", "fingerprint", "family")},
        "settings": {
            **cfg.model_dump(include={"train", "val", "seeds", "layer_step", "kl_max", "max_layer_share", "kl_tokens"}),
            **cfg.eval.model_dump(include={"limit", "max_new_tokens", "judge"}),
            "positions": cfg.positions,
            "seed_list": seeds,
            "generation": dataclasses.asdict(gen),
            "data": {ps.name: {"source": ps.source, "examples": len(ps)} for ps in sp.parts()},
        },
        "selection": sel.summary(),
        "conditions": rows,
        "table": table,
        "verdicts": verdicts,
        "prompts": prompts,
        "orthogonalization": {"max_abs_logprob_difference_vs_hooks": exact},
        "weights": {"sha256_before": before, "unchanged": after == before},
        "seconds": {"load_model": round(lm.load_seconds, 3), **{k: round(v, 3) for k, v in seconds.items()}}
        | {"total": 0.0},  # the protocol's
    }

    def files(run: RunDir) -> None:
        save_direction(run.path, sel, fingerprint=lm.fingerprint, model_name=lm.name, directions=directions)

    data_ids = {ps.name: {"source": ps.source, "sha256": ps.fingerprint()} for ps in (sp.harmful, sp.harmless)}
    model_info = {k: results["model"][k] for k in ("name", "source", "fingerprint")}
    return Experiment(results, model_info, data_ids, device=model.device, files=files)


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A zero-argument context factory (lambdas in a loop would all see the last seed)."""

    def make() -> Iterator[Any]:
        return fn(*args)  # type: ignore[no-any-return]

    return make  # type: ignore[return-value]
