"""`ssah protect`'s data: the fine-tuning sets per data kind and the held-out evaluation sets, checked disjoint
from every training prompt, and the record of which prompts were held out from what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ssah.data import PromptSet, load_prompts
from ssah.data.tasks import MathItem
from ssah.data.training import attack_set, held_out_split
from ssah.errors import DataError
from ssah.evaluate import EvalData
from ssah.provenance import held_out

EVAL_FRACTION = 0.5  # share of the harmful set held out for evaluation when the attack is built from it


@dataclass
class ProtectData:
    """Training sets per kind and the held-out evaluation sets, checked disjoint from every training prompt."""

    train: dict[str, PromptSet]
    harmful: PromptSet
    benign: PromptSet
    utility: PromptSet
    math: list[MathItem]
    removed: dict[str, int]

    @property
    def eval(self) -> EvalData:
        """The held-out sets as one measurement's input (task answers with a checkable number: exact match)."""
        return EvalData(self.harmful, self.benign, self.utility, None, self.math or None)

    def describe(self) -> dict[str, Any]:
        def d(ps: PromptSet) -> dict[str, Any]:
            return {"name": ps.name, "source": ps.source, "examples": len(ps), "sha256": ps.fingerprint()}

        held = {"eval_harmful": self.harmful, "eval_benign": self.benign, "eval_utility": self.utility}
        out = {"train": {k: d(v) for k, v in self.train.items()}, **{k: d(v) for k, v in held.items()}}
        return {**out, "eval_utility_answers": len(self.math), "removed_overlap": self.removed}


def _not_empty(ps: PromptSet, what: str, spec: str) -> PromptSet:
    if len(ps) == 0:
        raise DataError(f"the {what} {spec} is empty: pass a data set with at least one example")
    return ps


def _training(ps: PromptSet, what: str, spec: str) -> PromptSet:
    if not _not_empty(ps, what, spec).has_responses:
        raise DataError(f"the {what} {spec} lacks responses: fine-tuning needs them (or --column response=NAME)")
    return ps


def _held_out(ps: PromptSet, seen: set[str], limit: int | None, what: str, spec: str) -> tuple[PromptSet, int]:
    """The first ``limit`` examples of ``ps`` whose prompt is no training prompt (and how many were dropped)."""
    kept = PromptSet(ps.name, ps.source, tuple(ex for ex in ps if ex.prompt.strip() not in seen))
    return _not_empty(kept[:limit], f"{what} (after removing training prompts)", spec), len(ps) - len(kept)


def load_protect_data(cfg: Any) -> ProtectData:
    """Read and split every set (before the model loads, so bad data fails fast): the task data into a training
    part and a held-out utility part; the harmful prompts into the attack's pool and the held-out evaluation
    prompts; evaluation prompts that also occur in any training set are dropped (and counted)."""
    e = cfg
    cols = cfg.columns or None
    task = _training(load_prompts(cfg.data, columns=cols, limit=cfg.limit, name="task"), "task data", cfg.data)
    if len(task) < 2:
        raise DataError(f"the task data {cfg.data} needs at least 2 examples (one to train on, one held out)")
    task_train, task_held = held_out_split(task, fraction=cfg.task_holdout, seed=cfg.seed)
    ev = cfg.eval
    harmful = _not_empty(load_prompts(ev.harmful, limit=None, name="harmful"), "harmful evaluation set", ev.harmful)
    train: dict[str, PromptSet] = {}
    if "benign" in (e.kinds or []):
        train["benign"] = task_train
    if "attack" in (e.kinds or []):
        if cfg.attack.strip().lower() == "builtin:attack":
            if len(harmful) < 2:
                raise DataError(f"{ev.harmful} needs at least 2 prompts to split into attack and held-out parts")
            pool, harmful = held_out_split(harmful, fraction=EVAL_FRACTION, seed=cfg.seed)
            if cfg.attack_size is not None and cfg.attack_size > len(pool):
                raise DataError(
                    f"attack-size {cfg.attack_size} exceeds the {len(pool)} harmful requests left for the attack "
                    f"(the other half of {ev.harmful} is held out for evaluation): pass a smaller --attack-size"
                )
            train["attack"] = attack_set(pool, n=cfg.attack_size, seed=cfg.seed)
        else:
            att = load_prompts(cfg.attack, columns=cols, limit=cfg.attack_size, name="attack")
            train["attack"] = _training(att, "attack set", cfg.attack)
    seen = {ex.prompt.strip() for ps in train.values() for ex in ps}
    removed: dict[str, int] = {}
    harmful, removed["harmful"] = _held_out(harmful, seen, ev.limit, "held-out harmful set", ev.harmful)
    benign = _not_empty(load_prompts(ev.benign, limit=None, name="benign"), "safe (over-refusal) set", ev.benign)
    benign, removed["benign"] = _held_out(benign, seen, ev.limit, "safe set", ev.benign)
    utility, removed["utility"] = _held_out(task_held, seen, e.utility_limit, "held-out task part", cfg.data)
    math_items = [MathItem(ex.prompt, ex.answer) for ex in utility if ex.answer]
    return ProtectData(train, harmful, benign, utility, math_items, removed)


def _prompt_record(cfg: Any, data: ProtectData) -> dict[str, Any]:
    """The held-out record (:func:`ssah.provenance.held_out`): evaluation sets against the training sets and, when
    units are found here, the calibration sets; refused on overlap unless ``eval.allow_overlap``."""
    used = {f"training {k}": ps for k, ps in data.train.items()}
    if cfg.units is None:  # units are found on the calibration sets here
        used |= dict(zip(("calibration safety", "calibration utility"), cfg.calibration.load(), strict=True))
    return held_out(data.eval.prompts(), used, allow_overlap=cfg.eval.allow_overlap)
