"""`ssah units`: score every unit on a safety and a utility set and split them into SCU / UCU / CU / RU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from ssah.arch import get_adapter
from ssah.categorize import (
    CATEGORIES,
    NORMALIZATIONS,
    RANKINGS,
    Categorization,
    categorize,
    check_shares,
    expected_random_jaccard,
)
from ssah.config import ModelRunConfig
from ssah.data import PromptSet, load_prompts
from ssah.errors import UserError
from ssah.htmlreport import report_title, write_report_files
from ssah.models import LoadedModel, load_model
from ssah.report import markdown_table, plot_units_by_layer
from ssah.runs import RunDir, check_output_folder, manifest, set_seed
from ssah.scoring import Scores, check_metric, collect_statistics, compute_scores
from ssah.stats import UnitStatistics
from ssah.units import GRANULARITIES, UnitSpace

REGIONS: tuple[str, ...] = ("prompt+response", "response", "prompt", "all")


class UnitsConfig(ModelRunConfig):
    """Everything `ssah units` needs."""

    out: str = "runs/units"
    safety: str = "builtin:safety"
    utility: str = "builtin:utility"
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = None
    metric: str = "fluctuation"
    rule: str = "ssah"
    shares: dict[str, float] = Field(default_factory=dict)
    normalization: str = "mean"  # one of categorize.NORMALIZATIONS (mean, module-mean, zscore, rank, global-rank, none)
    ranking: str = "global"
    granularity: str = "neuron"
    tokens: str = "prompt+response"
    batch_size: int = 8
    max_length: int = 512
    system: str | None = None
    stability: bool = False

    def check(self) -> None:
        """Cheap validation, done before any data or model is loaded (the output folder included)."""
        self.check_settings()
        check_output_folder(self.out, self.overwrite)

    def check_settings(self) -> None:
        """Validate the scoring and categorisation settings (for in-memory use, where no folder is written)."""
        check_metric(self.metric)
        check_shares(self.rule, self.shares)
        for value, allowed, what in (
            (self.normalization, NORMALIZATIONS, "normalization"),
            (self.ranking, RANKINGS, "ranking"),
            (self.granularity, GRANULARITIES, "granularity"),
            (self.tokens, REGIONS, "tokens"),
        ):
            if value not in allowed:
                raise UserError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
        if self.batch_size < 1 or self.max_length < 8:
            raise UserError("batch_size must be at least 1 and max_length at least 8")
        if self.limit is not None and self.limit < 2 and self.stability:
            raise UserError("--stability splits each set in two halves: use --limit 2 or more")


def _stats(lm: LoadedModel, data: PromptSet, cfg: UnitsConfig, desc: str) -> UnitStatistics:
    return collect_statistics(
        lm.model,
        lm.tokenizer,
        data,
        region=cfg.tokens,
        batch_size=cfg.batch_size,  # type: ignore[arg-type]
        max_length=cfg.max_length,
        system=cfg.system,
        gradients=cfg.metric == "taylor",
        progress=cfg.progress,
        desc=desc,
    )


@dataclass
class UnitsOutcome:
    """Scores and categories of one model on one pair of calibration sets, in memory."""

    categorization: Categorization
    safety: Scores
    utility: Scores
    stability: dict[str, Any] | None = None


def categorize_model(lm: LoadedModel, safety: PromptSet, utility: PromptSet, cfg: UnitsConfig) -> UnitsOutcome:
    """Score a loaded model's units on the two sets and categorise them with ``cfg``'s settings (no files written).

    The experiments (ablation, attribute transfer, protected fine-tuning, budget) call this on a model they
    already hold in memory; ``cfg.out`` is ignored. ``cfg.stability`` also categorises each half of the data.
    """
    cfg.check_settings()
    adapter = get_adapter(lm.model)
    neuron_space = UnitSpace.from_groups(adapter.groups(), "neuron", lm.fingerprint, lm.name)
    space = UnitSpace.from_groups(adapter.groups(), cfg.granularity, lm.fingerprint, lm.name)  # type: ignore[arg-type]
    halves: list[list[UnitStatistics]] = []
    full: list[UnitStatistics] = []
    for data in (safety, utility):
        parts = data.split(2) if cfg.stability else [data]
        # Statistics merge exactly, so the halves needed for --stability cost no extra pass over the data.
        stats = [
            _stats(lm, p, cfg, f"{data.name} {i + 1}/{len(parts)}" if len(parts) > 1 else data.name)
            for i, p in enumerate(parts)
        ]
        halves.append(stats)
        merged = stats[0]
        for part in stats[1:]:
            merged = merged.merge(part)
        full.append(merged)

    def scores(stats: UnitStatistics, data: PromptSet) -> Scores:
        return compute_scores(
            lm.model, stats, cfg.metric, neuron_space, dataset=data.source, region=cfg.tokens, adapter=adapter
        )

    s_scores, u_scores = scores(full[0], safety), scores(full[1], utility)
    options: dict[str, Any] = {
        "rule": cfg.rule,
        "shares": cfg.shares,
        "normalization": cfg.normalization,
        "ranking": cfg.ranking,
        "granularity": cfg.granularity,
        "space": space,
    }
    cats = categorize(s_scores, u_scores, **options)
    stability = None
    if cfg.stability:
        a = categorize(scores(halves[0][0], safety), scores(halves[1][0], utility), **options)
        b = categorize(scores(halves[0][1], safety), scores(halves[1][1], utility), **options)
        stability = _stability(a, b)
    return UnitsOutcome(cats, s_scores, u_scores, stability)


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
    lm = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )
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
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        run.write_yaml("config.yaml", cfg.model_dump())
        s_scores.save(run.file("scores/safety.safetensors"))
        u_scores.save(run.file("scores/utility.safetensors"))
        cats.save(
            run.file("units.safetensors"),
            {"metric": cfg.metric, "safety_data": safety.fingerprint(), "utility_data": utility.fingerprint()},
        )
        run.write_json("results.json", results)
        markdown = render(results, run.path)
        write_report_files(run.path, markdown, report_title(markdown, "units"))
        run.write_json(
            "manifest.json",
            manifest(
                command="units",
                seed=cfg.seed,
                started=t0,
                device=lm.model.device,
                model={"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint},
                data={
                    "safety": {"source": safety.source, "sha256": safety.fingerprint(), "examples": len(safety)},
                    "utility": {"source": utility.source, "sha256": utility.fingerprint(), "examples": len(utility)},
                },
            ),
        )
    return run.out


def _stability(a: Categorization, b: Categorization) -> dict[str, Any]:
    """Jaccard overlap of each category between the two halves' categorisations, with the chance level."""
    out: dict[str, Any] = {"method": "categorise each disjoint half of both calibration sets, compare the sets"}
    n = a.space.total
    for c in CATEGORIES:
        k = (len(a[c]) + len(b[c])) // 2
        out[c] = {"jaccard": round(a[c].jaccard(b[c]), 4), "chance": round(expected_random_jaccard(k, n), 4)}
    out["jaccard_scu"] = out["SCU"]["jaccard"]
    return out


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Redraw a units run's plots into ``run_dir/plots`` from its results alone and return its Markdown report."""
    summary = {"categories": results["categories"], "by_layer": results["by_layer"]}
    title = f"{results['model']['name']}: units by layer"
    plot_units_by_layer(summary, Path(run_dir) / "plots" / "units_by_layer.png", title=title)
    return units_report(results)


def units_report(results: dict[str, Any]) -> str:
    """A short readable Markdown report of a units run."""
    m = results["model"]
    rows = [
        [c, v["count"], f"{100 * v['fraction']:.2f}%", results["by_kind"][c]["attn"], results["by_kind"][c]["mlp"]]
        for c, v in results["categories"].items()
    ]
    lines = [
        f"# Units of {m['name']}",
        "",
        f"Model family `{m['family']}`, {m['layers']} layers, {m['units_total']} units ({results['granularity']} "
        f"granularity), fingerprint `{m['fingerprint']}`.",
        f"Metric `{results['metric']}`, rule `{results['rule']}` with shares {results['shares']}, "
        f"normalisation `{results['normalization']}`, ranking `{results['ranking']}`.",
        f"Tokens counted ({results['token_region']}): safety {results['tokens']['safety']}, "
        f"utility {results['tokens']['utility']}.",
        "",
        markdown_table(["category", "units", "share", "attention", "MLP"], rows),
        "",
        "![units by layer](plots/units_by_layer.png)",
        "",
    ]
    st = results.get("stability")
    if st:
        lines += [
            "## Stability across disjoint halves of the calibration data",
            "",
            markdown_table(
                ["category", "Jaccard", "chance level"], [[c, st[c]["jaccard"], st[c]["chance"]] for c in CATEGORIES]
            ),
            "",
        ]
    lines.append(
        f"Took {results['seconds']['total']:.1f} s (model load {results['seconds']['load_model']:.1f} s, "
        f"scoring {results['seconds']['scoring']:.1f} s)."
    )
    return "\n".join(lines) + "\n"
