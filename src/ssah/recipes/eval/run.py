"""`ssah eval`: attack success rate, over-refusal, prefill attack and utility of one model.

``evaluate_model`` works on a model in memory (an ablation context or a fine-tune applied), returning an
``EvalReport``; the experiments call it in loops. ``run_eval`` loads the model and writes a run folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet
from ssah.evaluate import (
    DEFAULT_PREFILL,
    EvalData,
    OverRefusalResult,
    PrefillResult,
    SafetyResult,
    Sample,
    UtilityResult,
    evaluate_overrefusal,
    evaluate_prefill,
    evaluate_safety,
    gsm8k_exact_match,
    load_eval_sets,
    multiple_choice_accuracy,
    perplexity,
)
from ssah.fields import AutoBatch, Columns, System, UtilityEvalSection
from ssah.generate import GenerationConfig, generation_batch_size
from ssah.judges import (
    FirstTokenJudge,
    Judge,
    calibrated_agreement,
    check_judge_spec,
    get_judge,
    judge_agreement,
)
from ssah.measure import Proportion
from ssah.models import load_model
from ssah.plan import wants_auto_batch
from ssah.protocol import Clock, Experiment, execute
from ssah.recipes.eval import RECIPE
from ssah.results import RunResult
from ssah.runs import RunDir, check_output_folder, to_json


class EvalConfig(UtilityEvalSection, ModelRunConfig):
    """Everything `ssah eval` needs: the evaluation options (``UtilityEvalSection``, at top level here) and the
    model's; a data option set to "none" skips that block."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: Out = "runs/eval"
    batch_size: AutoBatch = 16  # type: ignore[assignment]  # eval alone may choose it: auto (the default on GPUs)
    prefill: str = Field(DEFAULT_PREFILL, description="Compliance opener for the prefill attack ('' to skip).")
    first_token: bool = Field(True, description="Also report the first-token refusal score's agreement.")
    columns: Columns = Field(default_factory=dict)
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    system: System = None

    def generation(self) -> GenerationConfig:
        g = GenerationConfig(
            self.max_new_tokens,
            self.do_sample,
            self.temperature,
            self.top_p,
            self.seed,
            self.batch_size,
            self.system,
            bf16=self.bf16,
        )
        g.check()
        return g

    def check(self) -> None:
        """Before any work: the generation settings, then the output folder."""
        self.generation()
        check_output_folder(self.out, self.overwrite)


def load_eval_data(cfg: EvalConfig) -> EvalData:
    """Read every set named in the config (before any model is loaded, so bad data fails fast)."""
    return load_eval_sets(cfg.harmful, cfg.benign, cfg.utility, columns=cfg.columns or None, limit=cfg.limit)


@dataclass
class EvalReport:
    """Results of one evaluation, JSON-ready through ``to_dict``."""

    safety: SafetyResult | None = None
    overrefusal: OverRefusalResult | None = None
    prefill: PrefillResult | None = None
    utility: UtilityResult | None = None
    agreement: dict[str, Any] | None = None
    samples: list[Sample] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every proportion in the one shape ``{"k", "n", "rate", "ci95": [low, high]}`` (``ssah.Proportion``)."""
        out: dict[str, Any] = {}
        if (s := self.safety) is not None:
            out["safety"] = {
                "asr": Proportion(s.k, s.n).to_dict(),
                "refusal": Proportion(s.n - s.k, s.n).to_dict(),
                "coherent_compliance": Proportion(s.coherent, s.n).to_dict(),
                "per_category": {c: Proportion(v["k"], v["n"]).to_dict() for c, v in s.per_category.items()},
                "n": s.n,
                "judge": s.judge,
            }
            if self.agreement is not None:
                out["safety"]["agreement"] = self.agreement
        if (o := self.overrefusal) is not None:
            out["overrefusal"] = {**Proportion(o.k, o.n).to_dict(), "judge": o.judge}
        if (p := self.prefill) is not None:
            out["prefill"] = {
                "asr": Proportion(p.k, p.n).to_dict(),
                "recovered": Proportion(p.n - p.k, p.n).to_dict(),
                "n": p.n,
                "prefill": p.prefill,
                "judge": p.judge,
            }
        if (u := self.utility) is not None:
            out["utility"] = {"perplexity": u.perplexity, "n": dict(u.n)}
            for key, value in (("accuracy", u.accuracy), ("exact_match", u.exact_match)):
                if value is not None:
                    task = next(t for t in u.correct if (t == "gsm8k") == (key == "exact_match"))
                    out["utility"][key] = Proportion(u.correct[task], u.n[task]).to_dict()
        return json.loads(to_json(out))


def evaluate_model(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    *,
    judge: Judge | str = "keyword:ssah",
    config: GenerationConfig | None = None,
    prefill: str = DEFAULT_PREFILL,
    first_token: bool = True,
    progress: bool = True,
) -> EvalReport:
    """Evaluate a model in memory on the given sets (no reload: ablations and fine-tunes apply as they are)."""
    config = config or GenerationConfig()
    config.check()
    if isinstance(judge, str):
        judge = get_judge(judge, model=model, tokenizer=tokenizer)
    rep = EvalReport()
    t = time.time()
    if data.harmful is not None:
        rep.safety, samples = evaluate_safety(
            model, tokenizer, data.harmful, judge=judge, config=config, progress=progress
        )
        rep.samples += samples
        rep.agreement = _agreement(model, tokenizer, data.harmful, samples, config, first_token)
        rep.seconds["safety"] = round(time.time() - t, 3)
        if prefill:
            t = time.time()
            rep.prefill, samples = evaluate_prefill(
                model, tokenizer, data.harmful, judge=judge, config=config, prefill=prefill, progress=progress
            )
            rep.samples += samples
            rep.seconds["prefill"] = round(time.time() - t, 3)
    if data.benign is not None:
        t = time.time()
        rep.overrefusal, samples = evaluate_overrefusal(
            model, tokenizer, data.benign, judge=judge, config=config, progress=progress
        )
        rep.samples += samples
        rep.seconds["overrefusal"] = round(time.time() - t, 3)
    if data.perplexity is not None or data.multiple_choice is not None or data.gsm8k is not None:
        t = time.time()
        util = UtilityResult()
        if data.perplexity is not None:
            util.perplexity = perplexity(
                model, tokenizer, data.perplexity, batch_size=config.batch_size, system=config.system
            )
            util.n["perplexity"] = len(data.perplexity)
        if data.multiple_choice is not None:
            name, items = data.multiple_choice
            util.accuracy = multiple_choice_accuracy(model, tokenizer, items, batch_size=config.batch_size)
            util.n[name] = len(items)
            util.correct[name] = round(util.accuracy * len(items))  # accuracy = correct / n, exact in float
        if data.gsm8k is not None:
            gsm_cfg = dataclasses.replace(config, max_new_tokens=max(config.max_new_tokens, 256))
            util.exact_match, samples = gsm8k_exact_match(
                model, tokenizer, data.gsm8k, config=gsm_cfg, progress=progress
            )
            util.n["gsm8k"] = len(data.gsm8k)
            util.correct["gsm8k"] = sum(bool(x.correct) for x in samples)
            rep.samples += samples
        rep.utility = util
        rep.seconds["utility"] = round(time.time() - t, 3)
    return rep


def _agreement(
    model: Any, tokenizer: Any, harmful: PromptSet, samples: list[Sample], config: GenerationConfig, first_token: bool
) -> dict[str, Any]:
    """How the judge, the coherence check and the first-token score agree on the harmful prompts."""
    n = len(samples)
    complied = [s for s in samples if not s.refused]
    out: dict[str, Any] = {
        "coherent_share_of_compliance": (sum(bool(s.coherent) for s in complied) / len(complied)) if complied else None,
    }
    if first_token:
        ft = FirstTokenJudge(model, tokenizer, system=config.system, batch_size=config.batch_size)
        scores = ft.scores(harmful.prompts())
        for s, score in zip(samples, scores, strict=True):
            s.judge_detail = (s.judge_detail + f" first_token={score:.3f}").strip()
        out["first_token_refusal_rate"] = sum(sc > 0 for sc in scores) / n
        out["first_token_vs_judge"] = sum((sc > 0) == s.refused for sc, s in zip(scores, samples, strict=True)) / n
        # threshold fitted on every other judged reply of this model, agreement measured on the rest
        out["first_token_calibrated"] = calibrated_agreement(scores, [s.refused for s in samples])
    return out


def run_eval(cfg: EvalConfig) -> RunResult[EvalConfig]:
    """Load data and model, evaluate, write the run folder (:func:`ssah.protocol.execute`); returns its RunResult."""
    return execute(RECIPE, cfg, eval_experiment)


def eval_experiment(cfg: EvalConfig, clock: Clock) -> Experiment:
    """Load data and model, then evaluate (generation, judge, over-refusal, prefill, utility)."""
    gen = cfg.generation()
    data = load_eval_data(cfg)
    check_judge_spec(cfg.judge)
    lm = load_model(cfg.model, **cfg.load_options())
    if wants_auto_batch(cfg, lm.model):  # one size for generation and the other passes, found by generating
        prompts = [e.prompt for s in (data.harmful, data.benign) if s is not None for e in s]
        auto = dataclasses.replace(gen, batch_size="auto")
        cfg = cfg.model_copy(update={"batch_size": generation_batch_size(lm.model, lm.tokenizer, prompts, auto)})
        gen = cfg.generation()
    judge = get_judge(cfg.judge, model=lm.model, tokenizer=lm.tokenizer)
    rep = evaluate_model(
        lm.model,
        lm.tokenizer,
        data,
        judge=judge,
        config=gen,
        prefill=cfg.prefill,
        first_token=cfg.first_token,
        progress=cfg.progress,
    )
    results: dict[str, Any] = {
        "model": {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint, "family": lm.family},
        "judge": getattr(judge, "name", cfg.judge),
        "judge_spec": cfg.judge,
        "judge_agreement": judge_agreement(cfg.judge),
        "generation": dataclasses.asdict(gen),
        **rep.to_dict(),
        "data": data.describe(),
        "seconds": {**rep.seconds, "load_model": round(lm.load_seconds, 3), "total": clock.seconds()},
    }
    model = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint}

    def files(run: RunDir) -> None:
        run.write_text("samples.jsonl", "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in rep.samples))

    return Experiment(results, model, data.describe(), device=lm.model.device, files=files, config=cfg)
