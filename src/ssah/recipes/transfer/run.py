"""`ssah transfer`: attribute transfer (paper §4.2, Fig. 5) — how unit categories move when a model is fine-tuned.

MODEL and its fine-tune (``--finetuned``, or MODEL fine-tuned in memory on ``--data`` and restored after) are
categorised by :func:`ssah.measure.find_units` on the same calibration sets: a 4x4 transition matrix SCU / UCU /
CU / RU before -> after, where the moved units sit, and the SCU overlap with its chance level. The paper's "over
half of the SCU became CU" is decided by :func:`ssah.measure.verdict` at equal data noise: the share of SCU (model
before, calibration half A) that is CU after fine-tuning (half B) against the same share on the unchanged model
(half A -> half B: the data-noise control). Without the control the verdict is ``inconclusive``.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, cast

from pydantic import Field
from transformers import PreTrainedModel

from ssah.arch import get_adapter
from ssah.categorize import (
    CATEGORIES,
    Categorization,
    expected_random_jaccard,
)
from ssah.config import Dtype, ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.errors import UserError
from ssah.fields import (
    CalibrationSection,
    Columns,
    Count,
    Granularity,
    MaxLength,
    System,
    UnitCategoryFields,
)
from ssah.measure import (
    Proportion,
    check_unit_search,
    compare,
    find_units,
    restored_weights,
    stability_summary,
    verdict,
)
from ssah.models import LoadedModel, load_model, model_fingerprint
from ssah.protocol import Clock, Experiment, execute
from ssah.recipes.transfer import RECIPE
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder
from ssah.training import TrainConfig, TrainSection, train_model
from ssah.units import UnitSpace

PAPER_CLAIM = "over half of the SCU became CU and part of the CU became UCU (paper §4.2, Fig. 5)"
# The transitions the paper names: each is tested against the data-noise control; the plot always shows them.
KEY_PAIRS: tuple[str, ...] = ("SCU->CU", "CU->UCU")
CONTROL_METHOD = "the unchanged model on disjoint calibration halves A -> B: what moves by data noise alone"
MATCHED_METHOD = "half A on the model before fine-tuning -> half B on the model after: the fine-tune plus that noise"


class TransferConfig(UnitCategoryFields, ModelRunConfig):
    """Everything `ssah transfer` needs: the fine-tuned model (or how to make one) and the categorisation."""

    out: Out = "runs/transfer"
    dtype: Dtype = "float32"
    finetuned: str | None = Field(
        None, description="The fine-tuned model (folder, ...); without it a copy is fine-tuned in memory."
    )
    # in-memory fine-tuning when ``finetuned`` is not given
    data: str = Field(
        "builtin:task", description="Fine-tuning data when --finetuned is absent (builtin:NAME, a preset or a file)."
    )
    steps: Count = Field(20, description="Fine-tuning steps when --finetuned is absent.")
    train: TrainSection = TrainSection()
    # categorisation, as in `ssah units`
    calibration: CalibrationSection = CalibrationSection()
    columns: Columns = Field(default_factory=dict)
    granularity: Granularity = "neuron"
    max_length: MaxLength = 512
    system: System = None
    control: bool = Field(
        True,
        description="Categorise disjoint data halves too (the noise control; without it the verdict is inconclusive).",
    )

    def train_config(self) -> TrainConfig:
        """Settings of the in-memory fine-tune (used when no ``finetuned`` model is given)."""
        same = {"model", "out", "dtype", "data", "columns", "system", "max_length", "seed", "progress", "bf16"}
        return TrainConfig.build({**self.model_dump(include=same), **self.train.model_dump(), "max_steps": self.steps})

    def check(self) -> None:
        """Cheap validation before any data or model is loaded (the output folder included)."""
        check_unit_search(self)
        if self.finetuned is None:
            self.train_config()  # a UserError on a bad training setting
        limit = self.calibration.limit
        if self.control and limit is not None and limit < 2:
            raise UserError(
                "the data-noise control splits each calibration set in two: use --calibration-limit 2 or more"
            )
        check_output_folder(self.out, self.overwrite)


# -- analysis ---------------------------------------------------------------------------------------------------
def transition_summary(before: Categorization, after: Categorization) -> dict[str, Any]:
    """Counts, row shares, overlaps and moved units between two categorisations of the same unit space; each
    category change as a Proportion of the units in the row's category before (None when that is empty)."""
    if before.space != after.space:
        raise UserError("the two categorisations have different unit layouts: compare models of one architecture")
    counts = before.transition(after).tolist()
    rows = [sum(r) for r in counts]
    n = before.space.total
    overlap = {}
    for c in CATEGORIES:
        chance = expected_random_jaccard((len(before[c]) + len(after[c])) // 2, n)
        overlap[c] = {"jaccard": round(before[c].jaccard(after[c]), 4), "chance": round(chance, 4)}
    pairs = {
        f"{a}->{b}": Proportion(counts[i][j], rows[i]).to_dict() if rows[i] else None
        for i, a in enumerate(CATEGORIES)
        for j, b in enumerate(CATEGORIES)
        if i != j
    }
    moved = n - sum(counts[i][i] for i in range(len(CATEGORIES)))
    shares = [[round(c / rows[i], 4) if rows[i] else 0.0 for c in r] for i, r in enumerate(counts)]
    out: dict[str, Any] = {"order": list(CATEGORIES), "counts": counts, "row_shares": shares}
    out |= {"before": dict(zip(CATEGORIES, rows, strict=True))}
    out |= {"after": {c: sum(r[j] for r in counts) for j, c in enumerate(CATEGORIES)}, "units_total": n}
    return out | {"moved": moved, "moved_share": round(moved / n, 6), "pairs": pairs, "overlap": overlap}


def moved_by_layer(before: Categorization, after: Categorization) -> dict[str, list[dict[str, int]]]:
    """For every category change with at least one unit (and the paper's key pairs), the moved units per layer."""
    out: dict[str, list[dict[str, int]]] = {}
    for a in CATEGORIES:
        for b in CATEGORIES:
            moved = before[a] & after[b]
            if a != b and (len(moved) or f"{a}->{b}" in KEY_PAIRS):
                out[f"{a}->{b}"] = [{"layer": i, **row} for i, row in enumerate(moved.counts_by_layer())]
    return out


def paper_tests(matched: dict[str, Any] | None, control: dict[str, Any] | None) -> dict[str, Any]:
    """Each named move (SCU -> CU, CU -> UCU) across the fine-tune against the same move by data noise alone, at
    equal noise (both from half A of the unchanged model), by the one verdict rule; no control: inconclusive."""
    out: dict[str, Any] = {}
    for pair in KEY_PAIRS:
        effect, noise = (b["pairs"][pair] if b else None for b in (matched, control))
        out[pair] = {"effect": effect, "control": noise, "verdict": "inconclusive"}
        if effect is None or noise is None:
            out[pair]["reason"] = "no control" if control is None else f"no {pair.split('->')[0]} on calibration half A"
        else:
            out[pair] |= verdict(compare(Proportion.from_dict(effect), Proportion.from_dict(noise)), "higher").to_dict()
    return out


def check_same_layout(base: LoadedModel, other: LoadedModel) -> None:
    """A fine-tuned model must have the base model's architecture and unit layout (else nothing compares)."""
    a, b = (UnitSpace.from_groups(get_adapter(lm.model).groups(), "neuron") for lm in (base, other))
    if base.family != other.family or a != b:
        raise UserError(
            f"the fine-tuned model {other.name!r} ({other.family}, {b.total} units in {len(b.shapes)} groups) has "
            f"another architecture or unit layout than {base.name!r} ({base.family}, {a.total} units in "
            f"{len(a.shapes)} groups): pass a fine-tune of the same model"
        )


# -- the recipe -------------------------------------------------------------------------------------------------
def run_transfer(cfg: TransferConfig) -> RunResult[TransferConfig]:
    """Compare the categories before and after a fine-tune, and write the run folder (:func:`ssah.protocol.execute`);
    returns its RunResult."""
    return execute(RECIPE, cfg, transfer_experiment)


def transfer_experiment(cfg: TransferConfig, clock: Clock) -> Experiment:
    """Categorise MODEL and its fine-tune (in memory, or ``finetuned``) and compare, with the data-noise control."""
    cols, limit = cfg.columns or None, cfg.calibration.limit
    safety, utility = cfg.calibration.load(cols)
    for data in [d for d in (safety, utility) if cfg.control and len(d) < 2]:
        raise UserError(f"the data-noise control needs 2 or more examples in the {data.name} set")
    train_data: PromptSet | None = None
    if cfg.finetuned is None:
        train_data = load_prompts(cfg.data, columns=cols, name="fine-tuning")
        if not train_data.has_responses:
            raise UserError(f"fine-tuning data {cfg.data} has no responses: pass a set with a response column")

    def load(spec: str) -> LoadedModel:
        opts: dict[str, Any] = {"allow_pickle": cfg.allow_pickle, "trust_remote_code": cfg.trust_remote_code}
        return load_model(spec, dtype=cfg.dtype, device=cfg.device, **opts)

    base = load(cfg.model)
    if (ft := load(cfg.finetuned) if cfg.finetuned is not None else None) is not None:
        check_same_layout(base, ft)
    t_load = time.time() - clock.started
    halves = list(zip(safety.split(2), utility.split(2), strict=True)) if cfg.control else []

    def categorize(lm: LoadedModel, sets: tuple[PromptSet, PromptSet]) -> Categorization:
        return find_units(lm, *sets, cfg).categorization  # each half on its own (transfer has no stability)

    t_cat = time.time()
    before = categorize(base, (safety, utility))
    base_a, base_b = (categorize(base, halves[0]), categorize(base, halves[1])) if halves else (None, None)
    training: dict[str, Any] | None = None
    with restored_weights(base.model) if ft is None else nullcontext():  # an in-memory fine-tune: MODEL restored
        if ft is None:
            assert train_data is not None
            result = train_model(base.model, base.tokenizer, train_data, cfg.train_config(), progress=cfg.progress)
            result.model.eval()
            ft = LoadedModel(cast(PreTrainedModel, result.model), base.tokenizer, f"{base.name} (fine-tuned)", "memory")
            data_id = {"source": train_data.source, "examples": len(train_data), "sha256": train_data.fingerprint()}
            training = {**result.summary(), "lr": cfg.train.lr, "batch_size": cfg.train.batch_size, "data": data_id}
        fp_after = model_fingerprint(ft.model)
        after = categorize(ft, (safety, utility))
        ft_b = categorize(ft, halves[1]) if halves else None
    cat_seconds = time.time() - t_cat - (training["seconds"] if training else 0.0)
    transfer = transition_summary(before, after)
    control = matched = None
    if base_a is not None and base_b is not None and ft_b is not None:
        control = {"method": CONTROL_METHOD, **transition_summary(base_a, base_b)}
        matched = {"method": MATCHED_METHOD, **transition_summary(base_a, ft_b)}
    tests = paper_tests(matched, control)
    fp_before, n = base.fingerprint, before.space.total
    ids = [{"name": lm.name, "source": lm.source, "fingerprint": fp} for lm, fp in ((base, fp_before), (ft, fp_after))]
    results: dict[str, Any] = {
        "model": ids[0] | {"family": base.family, "layers": get_adapter(base.model).num_layers, "units_total": n},
        "finetuned": ids[1]
        | {"in_memory": cfg.finetuned is None, "same_weights": fp_before == fp_after}
        | {"training": training},
        "categorization": {"rule": before.rule, "shares": before.shares, "normalization": before.normalization}
        | cfg.model_dump(include={"metric", "ranking", "granularity"})
        | {"token_region": cfg.calibration.tokens, "limit": limit}
        | {"examples": {"safety": len(safety), "utility": len(utility)}}
        | {"data": {"safety": safety.source, "utility": utility.source}},
        "transition": transfer,
        "moved_by_layer": moved_by_layer(before, after),
        "scu_overlap": transfer["overlap"]["SCU"],
        "control": control,
        "matched": matched,
        "stability": stability_summary(base_a, base_b) if base_a is not None else None,
        "paper": {"claim": PAPER_CLAIM, "tests": tests, "verdict": tests["SCU->CU"]["verdict"]}
        | {"scu_to_cu": transfer["pairs"]["SCU->CU"], "cu_to_ucu": transfer["pairs"]["CU->UCU"]},
        "seed": cfg.seed,
        "seconds": {"load_models": round(t_load, 3), "fine_tune": training["seconds"] if training else 0.0}
        | {"categorize": round(cat_seconds, 3), "total": 0.0},
    }
    data_info = {
        name: {"source": ps.source, "sha256": ps.fingerprint(), "examples": len(ps)}
        for name, ps in (("safety", safety), ("utility", utility), ("fine_tuning", train_data))
        if ps is not None
    }

    def files(run: RunDir) -> None:
        before.save(run.file("units_before.safetensors"), {"metric": cfg.metric})
        after.save(run.file("units_after.safetensors"), {"metric": cfg.metric})

    extra = {"finetuned": ids[1]}
    return Experiment(results, ids[0], data_info, device=base.model.device, files=files, manifest=extra)
