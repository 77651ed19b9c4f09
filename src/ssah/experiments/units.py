"""`ssah units`: score every unit on a safety and a utility set and split them into SCU / UCU / CU / RU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from ssah.arch import get_adapter
from ssah.categorize import (
    CATEGORIES,
    DEFAULT_NORMALIZATION,
)
from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.errors import UserError
from ssah.fields import (
    AutoBatch,
    CategoryRule,
    Columns,
    Count,
    Granularity,
    MaxLength,
    Metric,
    Normalizations,
    Rankings,
    Shares,
    System,
    Tokens,
)
from ssah.measure import FoundUnits, check_unit_search, find_units
from ssah.models import LoadedModel, load_model
from ssah.plan import auto_scoring_batch_size, wants_auto_batch
from ssah.runs import RunDir, check_output_folder, manifest, set_seed, write_run
from ssah.units import UnitSpace


class UnitsConfig(ModelRunConfig):
    """Everything `ssah units` needs."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: Out = "runs/units"
    safety: str = Field("builtin:safety", description="Safety calibration set: builtin:NAME or a CSV/JSON/JSONL file.")
    utility: str = Field(
        "builtin:utility", description="Utility calibration set: builtin:NAME or a CSV/JSON/JSONL file."
    )
    columns: Columns = Field(default_factory=dict)
    limit: Count | None = Field(None, description="Use only the first N examples of each set.")
    metric: Metric = "fluctuation"
    rule: CategoryRule = "ssah"
    shares: Shares = Field(default_factory=dict)
    normalization: Normalizations = DEFAULT_NORMALIZATION
    ranking: Rankings = "global"
    granularity: Granularity = "neuron"
    tokens: Tokens = "prompt+response"
    batch_size: AutoBatch = 8
    max_length: MaxLength = 512
    system: System = None
    stability: bool = Field(False, description="Also report SCU overlap between two disjoint data halves.")

    def check(self) -> None:
        """Cheap validation, done before any data or model is loaded (the output folder included)."""
        self.check_settings()
        check_output_folder(self.out, self.overwrite)

    def check_settings(self) -> None:
        """Validate the scoring and categorisation settings (for in-memory use, where no folder is written)."""
        check_unit_search(self)
        if (self.batch_size != "auto" and self.batch_size < 1) or self.max_length < 8:
            raise UserError("batch_size must be at least 1 and max_length at least 8")
        if self.limit is not None and self.limit < 2 and self.stability:
            raise UserError("--stability splits each set in two halves: use --limit 2 or more")


def categorize_model(lm: LoadedModel, safety: PromptSet, utility: PromptSet, cfg: UnitsConfig) -> FoundUnits:
    """Score and categorise a loaded model's units with ``cfg``'s settings (no files written)."""
    cfg.check_settings()
    return find_units(lm, safety, utility, cfg)


def run_units(cfg: UnitsConfig) -> Path:
    """Run the recipe and write the run folder; returns its path."""
    t0 = time.time()
    cfg.check()
    set_seed(cfg.seed)
    safety = load_prompts(cfg.safety, columns=cfg.columns or None, limit=cfg.limit, name="safety")
    utility = load_prompts(cfg.utility, columns=cfg.columns or None, limit=cfg.limit, name="utility")
    for data in (safety, utility):
        if cfg.stability and len(data) < 2:
            raise UserError(f"--stability needs at least 2 examples in the {data.name} set, it has {len(data)}")
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
        "seconds": {
            "load_model": round(lm.load_seconds, 3),
            "scoring": round(score_seconds, 3),
            "total": round(time.time() - t0, 3),
        },
    }
    data = {ps.name: {"source": ps.source, "sha256": ps.fingerprint(), "examples": len(ps)} for ps in (safety, utility)}
    model = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint}
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        s_scores.save(run.file("scores/safety.safetensors"))
        u_scores.save(run.file("scores/utility.safetensors"))
        meta = {"metric": cfg.metric, "safety_data": safety.fingerprint(), "utility_data": utility.fingerprint()}
        cats.save(run.file("units.safetensors"), meta)
        mf = manifest(command="units", seed=cfg.seed, started=t0, device=lm.model.device, model=model, data=data)
        write_run(run, "units", config=cfg, results=results, manifest=mf)
    return run.out
