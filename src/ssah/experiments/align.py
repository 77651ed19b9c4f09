"""`ssah align`: make the *aligned* model of the paper by a short safety SFT, and measure what it did.

Safety SFT on harmful requests with refusal responses mixed with benign instructions with answers (built-in
sets by default), embeddings frozen. Refusal on held-out harmful prompts and over-refusal on held-out benign
prompts are measured before and after. The trained model is cached under ``$SSAH_CACHE/aligned/<key>`` (key =
base-model fingerprint + every training setting), so the demo and the slow tests do not retrain it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ssah.config import Dtype, ModelRunConfig
from ssah.data import PromptSet, load_prompts
from ssah.data.training import alignment_mix
from ssah.errors import UserError
from ssah.evaluate import EvalData
from ssah.fields import Count, JudgeSpec, MaxLength, Schedule, System
from ssah.generate import GenerationConfig
from ssah.judges import get_judge, judge_line
from ssah.measure import Proportion, compare, measure_condition, verdict
from ssah.models import LoadedModel, cache_dir, load_model, model_fingerprint
from ssah.reports.common import markdown_table
from ssah.reports.html import report_title, write_report_files
from ssah.runs import RunDir, check_output_folder, manifest, set_seed
from ssah.training import TrainConfig, train_model

TRAINING_KEYS = (
    "harmful",
    "benign",
    "benign_ratio",
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "schedule",
    "max_grad_norm",
    "freeze_embeddings",
    "max_length",
    "seed",
    "dtype",
    "system",
)


class AlignConfig(ModelRunConfig):
    """Everything `ssah align` needs."""

    out: str = Field("runs/aligned", description="Run folder to write; the aligned model goes to OUT/model.")
    dtype: Dtype = "float32"
    harmful: str = Field("builtin:safety", description="Harmful requests with refusal responses.")
    benign: str = Field("builtin:utility", description="Benign instructions with answers.")
    benign_ratio: float = Field(0.5, ge=0, le=1, description="Share of benign examples in the SFT mix.")
    steps: Count = Field(20, description="Optimizer steps.")
    batch_size: Count = Field(8, description="Examples per step.")
    lr: float = Field(3e-5, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup: int = Field(0, ge=0, description="Warmup steps.")
    schedule: Schedule = "constant"
    max_grad_norm: float | None = Field(None, gt=0, description="Clip gradients to this norm (default: no clipping).")
    freeze_embeddings: bool = Field(True, description="Keep the embeddings fixed.")
    max_length: MaxLength = 512
    system: System = None
    eval_harmful: str = Field("builtin:harmful", description="Held-out harmful prompts.")
    eval_benign: str = Field("builtin:benign", description="Held-out benign prompts.")
    eval_limit: Count = Field(50, description="Prompts per held-out set.")
    max_new_tokens: Count = Field(48, description="Tokens generated per evaluation reply.")
    judge: JudgeSpec = "keyword:ssah"
    cache: bool = Field(True, description="Reuse / store the aligned model in $SSAH_CACHE/aligned.")

    def training_key(self, fingerprint: str) -> str:
        """Identity of the trained weights: the base model and every setting that changes them."""
        blob = json.dumps({"model": fingerprint, **{k: getattr(self, k) for k in TRAINING_KEYS}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _evaluate(model: Any, tokenizer: Any, cfg: AlignConfig, harmful: PromptSet, benign: PromptSet) -> dict[str, Any]:
    """Refusal of held-out harmful prompts, over-refusal of held-out benign ones (counts with intervals)."""
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=16, system=cfg.system)
    m = measure_condition(
        model, tokenizer, EvalData(harmful=harmful, benign=benign), judge=get_judge(cfg.judge), config=gen
    )
    assert m.asr is not None and m.coherent_compliance is not None and m.overrefusal is not None
    return {
        "refusal": Proportion(m.asr.n - m.asr.k, m.asr.n).to_dict(),
        "asr": m.asr.to_dict(),
        "coherent_compliance": m.coherent_compliance.to_dict(),
        "overrefusal": m.overrefusal.to_dict(),
    }


def alignment_verdicts(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the alignment did, by the one verdict rule: refusal of harmful prompts up (the aim), and whether
    over-refusal of benign prompts went up (the tax: ``higher`` there is a cost, not a success)."""
    p = {k: (Proportion.from_dict(before[k]), Proportion.from_dict(after[k])) for k in ("refusal", "overrefusal")}
    return {
        "refusal_up": verdict(compare(p["refusal"][1], p["refusal"][0]), "higher").to_dict(),
        "overrefusal_change": compare(p["overrefusal"][1], p["overrefusal"][0]).to_dict(),
    }


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a model folder, hard-linking files where the file system allows (the cache is read-only to us)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def _training_mix(cfg: AlignConfig) -> PromptSet:
    return alignment_mix(
        harmful_with_refusals=load_prompts(cfg.harmful, name="harmful"),
        benign=load_prompts(cfg.benign, name="benign"),
        benign_ratio=cfg.benign_ratio,
        seed=cfg.seed,
    )


def _train_or_reuse(cfg: AlignConfig, lm: LoadedModel, mix: PromptSet, key: str) -> tuple[LoadedModel, dict[str, Any]]:
    """The aligned model: from the cache when ``cfg.cache`` and present, else trained (and stored if caching)."""
    cached = cache_dir() / "aligned" / key
    if cfg.cache and (cached / "model" / "config.json").is_file():
        train_summary = json.loads((cached / "train.json").read_text())
        train_summary["from_cache"] = str(cached)
        return load_model(str(cached / "model"), dtype=cfg.dtype, device=cfg.device), train_summary
    tcfg = TrainConfig(
        model=cfg.model,
        out=cfg.out,
        dtype=cfg.dtype,
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        schedule=cfg.schedule,
        max_grad_norm=cfg.max_grad_norm,
        freeze_embeddings=cfg.freeze_embeddings,
        max_length=cfg.max_length,
        system=cfg.system,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    result = train_model(lm.model, lm.tokenizer, mix, tcfg, progress=cfg.progress)
    train_summary = {**result.summary(), "from_cache": None}
    if cfg.cache:
        tmp = cached.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        result.model.save_pretrained(tmp / "model", safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp / "model")
        (tmp / "train.json").write_text(json.dumps(train_summary, indent=2))
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    return lm, train_summary


def aligned_model(
    base: str = "smollm2-135m-instruct", *, cfg: AlignConfig | None = None, progress: bool = False
) -> Path:
    """The folder of ``base`` aligned by the default recipe (or ``cfg``), trained once and then read from the cache.

    This is what the demo, the experiments and the slow tests use to get the paper's *aligned* model without
    retraining it; no evaluation is run (use ``ssah align`` for the before/after numbers).
    """
    cfg = cfg or AlignConfig(model=base, progress=progress)
    if not cfg.cache:
        raise UserError("aligned_model needs the cache: set cache=True")
    set_seed(cfg.seed)
    mix = _training_mix(cfg)
    lm = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    key = cfg.training_key(lm.fingerprint)
    folder = cache_dir() / "aligned" / key / "model"
    if not (folder / "config.json").is_file():
        _train_or_reuse(cfg, lm, mix, key)
    return folder


def run_align(cfg: AlignConfig) -> Path:
    """Train (or reuse the cached) aligned model, evaluate base and aligned, write the run folder."""
    t0 = time.time()
    if cfg.steps < 1 or cfg.lr <= 0:
        raise UserError("align needs steps >= 1 and a positive learning rate: fix --steps / --lr")
    check_output_folder(cfg.out, cfg.overwrite)
    set_seed(cfg.seed)
    mix = _training_mix(cfg)
    eval_harmful = load_prompts(cfg.eval_harmful, limit=cfg.eval_limit, name="held-out harmful")
    eval_benign = load_prompts(cfg.eval_benign, limit=cfg.eval_limit, name="held-out benign")
    overlap = set(mix.prompts()) & (set(eval_harmful.prompts()) | set(eval_benign.prompts()))
    if overlap:
        raise UserError(f"{len(overlap)} evaluation prompts are also training prompts: use held-out sets for --eval-*")
    lm = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
    base_fp = lm.fingerprint
    key = cfg.training_key(base_fp)
    before = _evaluate(lm.model, lm.tokenizer, cfg, eval_harmful, eval_benign)
    lm, train_summary = _train_or_reuse(cfg, lm, mix, key)
    after = _evaluate(lm.model, lm.tokenizer, cfg, eval_harmful, eval_benign)
    results = {
        "model": {"base": cfg.model, "base_fingerprint": base_fp, "aligned_fingerprint": model_fingerprint(lm.model)},
        "training": train_summary,
        "data": {
            "train": {"source": mix.source, "examples": len(mix), "sha256": mix.fingerprint()},
            "eval_harmful": {"source": eval_harmful.source, "examples": len(eval_harmful)},
            "eval_benign": {"source": eval_benign.source, "examples": len(eval_benign)},
        },
        "before": before,
        "after": after,
        "verdicts": alignment_verdicts(before, after),
        "judge": cfg.judge,
        "seconds": round(time.time() - t0, 3),
    }
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        if cfg.cache:
            _copy_tree(cache_dir() / "aligned" / key / "model", run.path / "model")
        else:
            lm.model.save_pretrained(run.path / "model", safe_serialization=True)
            lm.tokenizer.save_pretrained(run.path / "model")
        run.write_yaml("config.yaml", cfg.model_dump())
        run.write_json("results.json", results)
        markdown = render(results, run.path)
        write_report_files(run.path, markdown, report_title(markdown, "align"))
        run.write_json(
            "manifest.json",
            manifest(
                command="align",
                seed=cfg.seed,
                started=t0,
                device=lm.model.device,
                model={"name": cfg.model, "fingerprint": base_fp},
                data=results["data"],
            ),
        )
    return run.out


def render(results: dict[str, Any], run_dir: Path) -> str:
    """The Markdown report of an align run from its results alone (it has no plots to draw into ``run_dir``)."""
    return align_report(results)


def align_report(results: dict[str, Any]) -> str:
    """A readable Markdown report of an alignment run."""
    b, a, t = results["before"], results["after"], results["training"]

    def cell(d: dict[str, Any]) -> str:
        return str(Proportion.from_dict(d))

    rows = [
        ["refusal on held-out harmful", cell(b["refusal"]), cell(a["refusal"])],
        ["over-refusal on held-out benign", cell(b["overrefusal"]), cell(a["overrefusal"])],
        ["coherent compliance on harmful", cell(b["coherent_compliance"]), cell(a["coherent_compliance"])],
    ]
    v = results["verdicts"]
    up, over = v["refusal_up"], v["overrefusal_change"]
    lo, hi = up["comparison"]["ci95"]
    olo, ohi = over["ci95"]
    cache = f" (reused from the cache {t['from_cache']})" if t.get("from_cache") else ""
    return "\n".join(
        [
            f"# Safety alignment of {results['model']['base']}",
            "",
            f"{t['steps']} steps, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}, "
            f"{100 * t['trainable']['share']:.1f}% of parameters trained{cache}.",
            "",
            markdown_table(["measure (95% Wilson interval)", "before", "after"], rows),
            "",
            f"Refusal went up by {100 * up['comparison']['difference']:+.1f} points (95% interval "
            f"{100 * lo:+.1f} to {100 * hi:+.1f}): **{up['verdict']}**. Over-refusal changed by "
            f"{100 * over['difference']:+.1f} points ({100 * olo:+.1f} to {100 * ohi:+.1f}): {over['direction']}.",
            "",
            f"Judge `{results['judge']}`; {a['refusal']['n']} harmful and {a['overrefusal']['n']} benign held-out "
            f"prompts. The aligned model is in `model/`. Took {results['seconds']:.1f} s. "
            + judge_line(results["judge"]),
            "",
        ]
    )
