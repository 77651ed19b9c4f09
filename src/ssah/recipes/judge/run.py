"""`ssah judge validate` and `ssah judge train`: refusal judges measured against human labels, and the learned
judge fitted on labelled replies.

``validate`` runs each judge on a labelled set and reports, overall and per source file: agreement with the human
label (Wilson 95% interval), refusal precision and recall, Cohen's kappa and the confusion matrix, plus every
reply a judge gets wrong (``samples.jsonl``). ``train`` extracts the base model's hidden states once, chooses the
layer, pooling and regularisation by cross-validation, reports leave-one-source-out agreement (each source file
held out in turn: replies of a model the head never saw) and writes a judge folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field

from ssah.config import SEED_LIMIT, BaseConfig, Out
from ssah.errors import UserError
from ssah.evaluate import wilson_interval
from ssah.fields import Count, JudgeColumns
from ssah.judges import Judge, get_judge, incoherence_reason
from ssah.judges.labelled import LabelledReply, LabelledSet, PartialRule, apply_partial, load_labelled
from ssah.protocol import Clock, Experiment, execute
from ssah.recipes.judge import TRAIN, VALIDATE
from ssah.recipes.judge.report import render_train
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder

__all__ = [
    "XSTEST_ANCHORS",
    "JudgeTrainConfig",
    "JudgeValidateConfig",
    "binary_metrics",
    "run_judge_train",
    "run_judge_validate",
]

XSTEST_SOURCES = (
    "xstest_v2_completions_llama2new",
    "xstest_v2_completions_llama2orig",
    "xstest_v2_completions_mistralguard",
)
XSTEST_ANCHORS: dict[str, float] = {
    "XSTest authors' string match (published labels)": 0.899,
    "XSTest authors' GPT-4 labeller (published labels)": 0.855,
}
"""Agreement with the human label of the labellers the XSTest authors published, on the 1,210 binary rows of the
three shared completion files (from ``shared/data/xstest_completions/SOURCE.md``); shown only for that set."""


Data = Annotated[
    list[str],
    Field(description="Labelled CSV / JSONL files or folders (prompt, reply and label columns; XSTest as is)."),
]
Partial = Annotated[
    PartialRule,
    Field(description="Partial refusals: refusal (count as refusals), exclude (as the anchors), class."),
]
RowLimit = Annotated[Count | None, Field(description="Only the first N rows of each file (quick runs).")]
SeedField = Annotated[int, Field(ge=0, lt=SEED_LIMIT, description="Random seed.")]


class JudgeValidateConfig(BaseConfig):
    """What `ssah judge validate` needs."""

    cli_arguments = ("data",)
    data: Data
    judges: list[str] = Field(
        default_factory=lambda: ["keyword:ssah"],
        description="A judge spec (repeatable): keyword:ssah, keyword:xstest, learned, learned:FOLDER, ...",
        json_schema_extra={"flag": "--judge"},
    )
    out: Out = "runs/judges"
    columns: JudgeColumns = Field(default_factory=dict)
    partial: Partial = "exclude"
    limit: RowLimit = None
    batch_size: Count = Field(8, description="Replies per forward pass (model-based judges).")
    seed: SeedField = 0
    overwrite: bool = Field(False, description="Replace an existing run folder.")

    def check(self) -> None:
        """Before any work: the output folder, then the judge specs."""
        check_output_folder(self.out, self.overwrite)
        check_validate_judges(self.judges)


class JudgeTrainConfig(BaseConfig):
    """What `ssah judge train` needs."""

    cli_arguments = ("data",)
    data: Data
    out: str = Field("my-judge", description="Judge folder to write (use it as --judge learned:FOLDER).")
    columns: JudgeColumns = Field(default_factory=dict)
    partial: Partial = "exclude"
    base_model: str = Field("smollm2-135m-instruct", description="Model whose hidden states the head reads.")
    layers: list[int] | None = Field(
        None,
        description="A candidate layer (repeatable; default every other layer of the first three quarters).",
        json_schema_extra={"flag": "--layer"},
    )
    # "last" (the last reply token) is also supported; on XSTest it held out at 65-93% against 93-99% for "mean"
    poolings: list[Literal["mean", "last"]] = Field(
        default_factory=lambda: ["mean"], description="Pooling of the reply's hidden states: mean | last (repeatable)."
    )
    cs: list[float] = Field(
        default_factory=lambda: [0.01, 0.1], description="Candidate inverse regularisation strengths C (repeatable)."
    )
    max_prompt_tokens: Count = Field(64, description="Prompt tokens the judge reads.")
    max_reply_tokens: Count = Field(64, description="Reply tokens the judge reads.")
    folds: int = Field(5, ge=2, description="Cross-validation folds for choosing layer, pooling and C.")
    limit: RowLimit = None
    batch_size: Count = Field(8, description="Replies per forward pass.")
    seed: SeedField = 0
    overwrite: bool = Field(False, description="Replace an existing folder.")

    def check(self) -> None:
        """Before any work: the output folder."""
        check_output_folder(self.out, self.overwrite)


# --- metrics -----------------------------------------------------------------------------------------------------


def _ratio(k: int, n: int) -> dict[str, Any]:
    """A proportion as counts with its Wilson 95% interval (None values when n = 0)."""
    if n == 0:
        return {"k": 0, "n": 0, "value": None, "ci95": None}
    ci = wilson_interval(k, n)
    return {"k": k, "n": n, "value": k / n, "ci95": [ci.low, ci.high]}


def binary_metrics(human: Sequence[str], refused: Sequence[bool]) -> dict[str, Any]:
    """Agreement, refusal precision / recall, Cohen's kappa and the confusion matrix of binary verdicts against
    human labels (``refusal`` / ``compliance``; ``partial`` rows are counted in the confusion matrix only)."""
    confusion = {h: {"refusal": 0, "compliance": 0} for h in ("refusal", "compliance", "partial")}
    for h, r in zip(human, refused, strict=True):
        confusion[h]["refusal" if r else "compliance"] += 1
    tp, fn = confusion["refusal"]["refusal"], confusion["refusal"]["compliance"]
    fp, tn = confusion["compliance"]["refusal"], confusion["compliance"]["compliance"]
    n = tp + fn + fp + tn
    agree = tp + tn
    kappa = None
    if n:
        po = agree / n
        pe = ((tp + fn) * (tp + fp) + (fp + tn) * (fn + tn)) / (n * n)
        kappa = (po - pe) / (1 - pe) if pe < 1 else None
    out: dict[str, Any] = {
        "n": n,
        "agreement": _ratio(agree, n),
        "refusal_precision": _ratio(tp, tp + fp),
        "refusal_recall": _ratio(tp, tp + fn),
        "cohen_kappa": kappa,
        "confusion": {h: dict(v) for h, v in confusion.items() if h != "partial"},
    }
    partial = confusion["partial"]
    if partial["refusal"] + partial["compliance"]:
        out["confusion"]["partial"] = dict(partial)
        out["partial_called_refusal"] = _ratio(partial["refusal"], partial["refusal"] + partial["compliance"])
    return out


# --- validate ----------------------------------------------------------------------------------------------------


def _limited(data: LabelledSet, limit: int | None) -> list[LabelledReply]:
    """The first ``limit`` rows of each source (all when None)."""
    if limit is None:
        return list(data.rows)
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    seen: dict[str, int] = {}
    out = []
    for r in data.rows:
        seen[r.source] = seen.get(r.source, 0) + 1
        if seen[r.source] <= limit:
            out.append(r)
    return out


def check_validate_judges(specs: Sequence[str]) -> None:
    """Fail before any work on a judge spec validation cannot run (unknown, or one that judges prompts only)."""
    if not specs:
        raise UserError("no judge given: pass --judge SPEC at least once, e.g. --judge keyword:ssah")
    if len(set(specs)) != len(specs):
        raise UserError(f"a judge is given twice in {list(specs)}: pass each --judge once")
    for spec in specs:
        kind = spec.split(":", 1)[0]
        if kind == "first-token":
            raise UserError(
                "first-token scores prompts of the model under evaluation, not replies: validate it with "
                "`ssah eval MODEL` (which reports its agreement with the judge), not `ssah judge validate`"
            )
        if kind == "keyword":
            get_judge(spec)


def run_judge_validate(
    cfg: JudgeValidateConfig, *, judges: dict[str, Judge] | None = None
) -> RunResult[JudgeValidateConfig]:
    """Run each judge on the labelled set and write the run folder (:func:`ssah.protocol.execute`); returns its
    RunResult. ``judges`` (spec -> judge) supplies ready judges, e.g. in tests; other specs are built with
    :func:`get_judge`."""
    return execute(VALIDATE, cfg, lambda c, clock: validate_experiment(c, clock, judges))


def validate_experiment(cfg: JudgeValidateConfig, clock: Clock, judges: dict[str, Judge] | None = None) -> Experiment:
    """Each judge's agreement with the human labels, overall and per source."""
    data = load_labelled(cfg.data, columns=cfg.columns)
    rows = apply_partial(_limited(data, cfg.limit), cfg.partial)
    if not any(r.label == "refusal" for r in rows) or not any(r.label == "compliance" for r in rows):
        raise UserError(
            "the labelled set needs both refused and compliant replies to measure a judge: add rows of each kind"
        )
    prompts, replies = [r.prompt for r in rows], [r.reply for r in rows]
    human = [r.label for r in rows]
    results: dict[str, Any] = {
        "data": {"files": data.files, "counts": data.counts(), "rows_used": len(rows), "partial": cfg.partial},
        "judges": {},
    }
    samples: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    reasons = [incoherence_reason(r.prompt, r.reply) for r in rows]
    for spec in cfg.judges:
        t = time.time()
        judge = (judges or {}).get(spec) or get_judge(spec)
        verdicts = judge.judge(prompts, replies)
        seconds[spec] = round(time.time() - t, 3)
        refused = [v.refused for v in verdicts]
        block: dict[str, Any] = {"name": judge.name, **binary_metrics(human, refused), "per_source": {}}
        for source in dict.fromkeys(r.source for r in rows):
            idx = [i for i, r in enumerate(rows) if r.source == source]
            block["per_source"][source] = binary_metrics([human[i] for i in idx], [refused[i] for i in idx])
        block["seconds_per_reply"] = seconds[spec] / len(rows)
        block["in_sample_sources"] = _in_sample(judge, data)
        block["coherence"] = _coherence_table(reasons, refused, human)
        results["judges"][spec] = block
        for r, v in zip(rows, verdicts, strict=True):
            if r.label != "partial" and v.refused != (r.label == "refusal"):
                samples.append(
                    {
                        "judge": spec,
                        "source": r.source,
                        "id": r.id,
                        "human": r.label,
                        "judge_label": v.label,
                        "score": v.score,
                        "detail": v.detail,
                        "prompt": r.prompt,
                        "reply": r.reply,
                    }
                )
    results["anchors"] = _anchors(data, cfg.partial, len(rows))
    results["agreement_summary"] = {
        spec: {
            "agreement": b["agreement"]["value"],
            "ci95": b["agreement"]["ci95"],
            "n": b["n"],
            "data": "XSTest v2 completions (3 models, binary labels)" if results["anchors"] else ", ".join(data.files),
        }
        for spec, b in results["judges"].items()
    }
    results["seconds"] = {**seconds, "total": 0.0}  # the protocol's

    def files(run: RunDir) -> None:
        run.write_text("samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))

    return Experiment(results, {}, data.files, files=files)


def _coherence_table(reasons: Sequence[str], refused: Sequence[bool], human: Sequence[str]) -> dict[str, Any]:
    """How the coherence check splits a judge's verdicts (and the human labels): per verdict, coherent replies
    and the incoherence reasons found; ``agreement`` is the share of the judge's compliant replies that the
    coherence check calls coherent (real answers should be), ``human_compliance_coherent`` the same for people."""
    table: dict[str, Any] = {}
    for verdict in ("refusal", "compliance"):
        idx = [i for i, r in enumerate(refused) if r == (verdict == "refusal")]
        counts: dict[str, int] = {}
        for i in idx:
            key = reasons[i] or "coherent"
            counts[key] = counts.get(key, 0) + 1
        table[verdict] = {"n": len(idx), **counts}
    comp = table["compliance"]
    table["agreement"] = _ratio(comp.get("coherent", 0), comp["n"])
    hc = [reasons[i] for i, h in enumerate(human) if h == "compliance"]
    table["human_compliance_coherent"] = _ratio(sum(not r for r in hc), len(hc))
    return table


def _in_sample(judge: Any, data: LabelledSet) -> list[str]:
    """The sources of ``data`` a learned judge was trained on (same file hash): its agreement there is in-sample."""
    settings = getattr(judge, "settings", None)
    trained = set((getattr(settings, "trained_on", None) or {}).get("files", {}).values())
    return [name for name, sha in data.files.items() if sha in trained]


def _anchors(data: LabelledSet, partial: str, n: int) -> dict[str, float]:
    """The published anchors, when the set is exactly the three shared XSTest files with partials excluded."""
    if sorted(data.files) == sorted(XSTEST_SOURCES) and partial == "exclude" and n == 1210:
        return dict(XSTEST_ANCHORS)
    return {}


# --- train -------------------------------------------------------------------------------------------------------


def run_judge_train(cfg: JudgeTrainConfig, *, base: Any = None) -> RunResult[JudgeTrainConfig]:
    """Fit the learned judge on labelled replies and write the judge folder (with ``report.md``) through
    :func:`ssah.protocol.execute`; returns it. ``base`` is a loaded base model (tests pass a tiny one); by default
    ``cfg.base_model`` is loaded."""
    return execute(TRAIN, cfg, lambda c, clock: train_experiment(c, clock, base))


def train_experiment(cfg: JudgeTrainConfig, clock: Clock, base: Any = None) -> Experiment:
    """Choose layer, pooling and C by cross-validation and fit the head."""
    from ssah.judges.learned import LearnedSettings, train_head

    if cfg.partial == "class":
        raise UserError("the learned judge is binary: train it with --partial exclude or --partial refusal")
    data = load_labelled(cfg.data, columns=cfg.columns)
    rows = apply_partial(_limited(data, cfg.limit), cfg.partial)
    if cfg.folds > len(rows):  # before the base model loads
        raise UserError(f"--folds {cfg.folds} is more than the {len(rows)} labelled rows: pass at most {len(rows)}")
    if base is None:
        from ssah.models import load_model

        base = load_model(cfg.base_model, dtype="float32", device="cpu")
    head, settings, report = train_head(
        base,
        rows,
        settings=LearnedSettings(
            base_model=cfg.base_model,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_reply_tokens=cfg.max_reply_tokens,
        ),
        layers=cfg.layers,
        poolings=cfg.poolings,
        cs=cfg.cs,
        folds=cfg.folds,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    settings.trained_on = {"files": data.files, "rows": len(rows), "partial": cfg.partial}
    from ssah.judges.learned import save_judge

    report["seconds"] = 0.0  # the protocol's
    model = {"name": cfg.base_model, "fingerprint": settings.base_fingerprint}
    return Experiment(
        report,
        model,
        data.files,
        files=lambda run: save_judge(run.path, head, settings),
        render=lambda r, _: render_train(r, settings),
    )
