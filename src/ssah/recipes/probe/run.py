"""`ssah probe`: the reasoning-direction probe of the paper (Figs. 2-4) and confound-controlled variants.

One model alone, or a probed model (typically the aligned one) against ``--compare`` (typically the unaligned one):
per layer and per method the gap between the refusal-continued and the compliance-continued query (positive =
leaning to refuse), with a bootstrap interval over prompts, the spread over opener phrasings, the same followed
token by token while the model replies (greedy, and forced to start with a compliance prefix), and a verdict on
which methods separate the two models at which layers. See :mod:`ssah.probe` for the measures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from ssah.config import ModelRunConfig, Out
from ssah.data import PromptSet, load_prompts
from ssah.data.probe_prompts import COMPLIANCE_OPENERS, FORCED_PREFIX, REFUSAL_OPENERS
from ssah.errors import UserError
from ssah.fields import Columns, CommaList, Count, JudgeSpec, System
from ssah.measure import Proportion
from ssah.models import LoadedModel, load_model
from ssah.probe import (
    METHODS,
    MIN_RESAMPLES,
    MIN_VERDICT_PROMPTS,
    MODES,
    Directions,
    Estimate,
    ModelMeasures,
    Openers,
    bootstrap_indices,
    estimate,
    fit_directions,
    later_layers,
    measure_model,
    method_values,
    min_resamples,
    separation,
    separation_verdict,
    token_values,
)
from ssah.protocol import Clock, Experiment, execute
from ssah.provenance import held_out
from ssah.recipes.probe import RECIPE
from ssah.results import RunResult
from ssah.runs import check_output_folder

NONE = ("", "none", "no", "off")
MIN_PROMPTS = 4
MODEL_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")
MODE_STYLES = {"greedy": "-", "forced": "--"}


class ProbeConfig(ModelRunConfig):
    """Everything `ssah probe` needs (full-run sizes by default; ``--config quick`` for a small run)."""

    placement = True  # honours device_map / max_memory / offload_folder (see ModelRunConfig)
    out: Out = "runs/probe"
    compare: str | None = Field(
        None, description="A second model to compare with (e.g. the unaligned one); same tokenizer."
    )
    label: str | None = Field(None, description="Name of MODEL in the report (default: from its path).")
    compare_label: str | None = Field(None, description="Name of the --compare model in the report.")
    harmful: str = Field("builtin:harmful", description="Harmful queries: builtin:NAME, a preset or a file.")
    harmless: str = Field(
        "builtin:benign", description="Harmless queries of the content baseline: builtin:NAME, a preset or a file."
    )
    columns: Columns = Field(default_factory=dict)
    limit: int = Field(
        50,
        ge=MIN_PROMPTS,
        description=f"Prompts of each set, spread over the file (at least {MIN_PROMPTS}; with fewer than "
        f"{MIN_VERDICT_PROMPTS} the separation verdict is inconclusive).",
    )
    methods: CommaList = Field(
        default_factory=lambda: list(METHODS), description=f"Comma list of probe methods: {','.join(METHODS)}."
    )
    refusal_openers: list[str] = Field(
        default_factory=lambda: list(REFUSAL_OPENERS),
        description="A refusal opener (repeatable; the first is the naive probe's).",
        json_schema_extra={"flag": "--refusal-opener"},
    )
    compliance_openers: list[str] = Field(
        default_factory=lambda: list(COMPLIANCE_OPENERS),
        description="A compliance opener (repeatable; the first is the naive probe's).",
        json_schema_extra={"flag": "--compliance-opener"},
    )
    forced_prefix: str = Field(
        FORCED_PREFIX, description="Compliance prefix forced at the start of the reply for per-token tracking."
    )
    token_steps: int = Field(16, ge=0, description="Generated tokens followed per reply (0 = off).")
    token_prompts: Count = Field(16, description="Harmful and harmless prompts followed token by token.")
    token_layer: int | None = Field(None, description="Layer of the per-token plot (default 3/4 depth).")
    bootstrap: int = Field(
        1000,
        ge=MIN_RESAMPLES,
        description=f"Bootstrap resamples (at least {MIN_RESAMPLES}: the verdict's band reads the 95% quantile of a "
        "max statistic and needs 10 replicates beyond it; more at a higher --level).",
    )
    level: float = Field(0.95, gt=0.5, lt=1, description="Interval level.")
    batch_size: Count = Field(32, description="Queries per forward pass.")
    system: System = None
    judge: JudgeSpec = "keyword:ssah"
    threads: Count | None = Field(
        None, description="CPU threads for torch (1 is fastest on a CPU shared by many processes)."
    )

    def openers(self) -> Openers:
        return Openers(tuple(self.refusal_openers), tuple(self.compliance_openers))

    def check(self) -> None:
        """Raise a one-line UserError for settings that cannot run (before any model is loaded)."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown probe method {unknown[0]!r}: use some of {', '.join(METHODS)}")
        if not self.methods:
            raise UserError(f"no probe method chosen: pass --methods with some of {', '.join(METHODS)}")
        self.openers().check()
        need = min_resamples(self.level)
        if self.bootstrap < need:
            raise UserError(
                f"--bootstrap {self.bootstrap} is too few for --level {self.level:g}: the verdict's band needs at "
                f"least {need} resamples (10 beyond its quantile); pass --bootstrap {need} or more"
            )
        check_output_folder(self.out, self.overwrite)


def load_probe_data(cfg: ProbeConfig) -> tuple[PromptSet, PromptSet]:
    """The harmful and harmless prompts (``limit`` of each, spread over the file); clear errors when missing."""
    sets = []
    for what, spec in (("harmful", cfg.harmful), ("harmless", cfg.harmless)):
        if spec is None or spec.strip().lower() in NONE:
            raise UserError(
                f"the probe needs {what} prompts (the {what} queries"
                + (" to probe" if what == "harmful" else " of the content baseline")
                + f"): pass --{what} builtin:NAME or a file"
            )
        ps = load_prompts(spec, columns=cfg.columns or None, name=what)
        if len(ps) < MIN_PROMPTS:
            raise UserError(f"the {what} set {spec!r} has {len(ps)} prompts: the probe needs at least {MIN_PROMPTS}")
        sets.append(ps.spread(cfg.limit))
    return sets[0], sets[1]


def _same_tokenizer(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and getattr(a, "chat_template", None) == getattr(b, "chat_template", None)


def _check_compare(cfg: ProbeConfig, models: list[LoadedModel]) -> None:
    """Methods that compare models in one residual space need one tokenizer and one shape."""
    if len(models) < 2:
        return
    a, b = models
    needs = [m for m in cfg.methods if METHODS[m].shared_space]
    if cfg.token_steps > 0:
        needs.append("per-token tracking")
    if not needs:
        return
    if not _same_tokenizer(a.tokenizer, b.tokenizer):
        raise UserError(
            f"{a.name} and {b.name} have different tokenizers, but {', '.join(needs)} needs the same one: compare "
            "models of one family (e.g. aligned vs as shipped), or drop those with --methods / --token-steps 0"
        )
    shape = [(m.model.config.num_hidden_layers, m.model.config.hidden_size) for m in models]
    if shape[0] != shape[1]:
        raise UserError(
            f"{a.name} and {b.name} differ in layers or hidden size ({shape[0]} vs {shape[1]}), but "
            f"{', '.join(needs)} needs one residual space: drop those with --methods / --token-steps 0"
        )


def short_label(spec: str) -> str:
    """A readable name for a model spec: a registry name or hub id as given, a folder by its last parts
    (``runs/aligned/model`` -> ``aligned/model``)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    parts = path.resolve().parts
    return "/".join(parts[-2:]) if parts[-1] == "model" and len(parts) > 1 else parts[-1]


def _labels(cfg: ProbeConfig) -> list[str]:
    first = cfg.label or short_label(cfg.model)
    if cfg.compare is None:
        return [first]
    second = cfg.compare_label or short_label(cfg.compare)
    return [first, second if second != first else f"{second} (compare)"]


def _templates(pairs: np.ndarray | None) -> dict[str, Any] | None:
    if pairs is None:
        return None
    return {
        "pairs": int(pairs.shape[0]),
        "min": np.round(pairs.min(0), 6).tolist(),
        "max": np.round(pairs.max(0), 6).tolist(),
        "sd": np.round(pairs.std(0), 6).tolist(),
    }


def analyse(
    measures: list[ModelMeasures],
    labels: list[str],
    openers: Openers,
    methods: list[str],
    *,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    token_layer: int | None = None,
) -> dict[str, Any]:
    """From raw measures of one or two models: per-method gaps with intervals, the separation of the first model
    from the second, the naive probe's confound and the per-token curves (all as plain JSON-ready data)."""
    first = measures[0]
    rng = np.random.default_rng(seed)
    idx_h = bootstrap_indices(first.n_harmful, n_boot, rng)
    idx_b = bootstrap_indices(first.n_harmless, n_boot, rng)
    need_dir = "direction" in methods or first.token_prompts > 0
    directions: Directions | None = None
    if need_dir:
        directions = fit_directions(
            [m.query_states[: m.n_harmful] for m in measures], [m.query_states[m.n_harmful :] for m in measures]
        )
    gaps: dict[str, dict[str, Any]] = {}
    est: dict[str, list[Estimate]] = {}
    prompts: dict[str, int] = {}  # the smaller sample behind each method's difference (the verdict's df)
    for method in methods:
        gaps[method], est[method] = {}, []
        baseline = METHODS[method].baseline
        prompts[method] = min(first.n_harmful, first.n_harmless) if baseline else first.n_harmful
        for label, m in zip(labels, measures, strict=True):
            v = method_values(m, method, openers, directions)
            e = estimate(v.harmful, idx_h, v.harmless if v.baseline else None, idx_b, level=level)
            est[method].append(e)
            gaps[method][label] = {
                "gap": e.as_dict(),
                "harmful": np.round(v.harmful.mean(0), 6).tolist(),
                "harmless": np.round(v.harmless.mean(0), 6).tolist(),
                "templates": _templates(v.pairs),
            }
    layers = first.layers
    later = later_layers(layers)
    sep: dict[str, Any] = {}
    if len(measures) == 2:
        for method in methods:
            a, b = est[method]
            s = separation(a, b, level=level)
            d = separation_verdict(a.reps - b.reps, later, level=level, point=a.mean - b.mean, prompts=prompts[method])
            sep[method] = {**s, "verdict": d["verdict"], "decision": d}
    confound: dict[str, Any] = {}
    if "naive" in methods:
        for label, e in zip(labels, est["naive"], strict=True):
            confound[label] = {
                "embedding_gap": {"mean": float(e.mean[0]), "lo": float(e.lo[0]), "hi": float(e.hi[0])},
                "positive_layers": int(np.sum(e.mean > 0)),
                "positive_layers_ci": int(np.sum(e.lo > 0)),
                "negative_layers_ci": int(np.sum(e.hi < 0)),
            }
    tokens: dict[str, Any] = {}
    if first.token_prompts > 0:
        layer = token_layer if token_layer is not None else round(0.75 * layers)
        tokens = _token_results(measures, labels, layer, directions, n_boot=n_boot, seed=seed, level=level)
    return {
        "layers": layers,
        "later_layers": later,
        "gaps": gaps,
        "separation": sep,
        "confound": confound,
        "tokens": tokens,
    }


def _token_results(
    measures: list[ModelMeasures],
    labels: list[str],
    layer: int,
    directions: Directions | None,
    *,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """Per-token curves (bootstrap over the tracked prompts) for every mode and model."""
    first = measures[0]
    rng = np.random.default_rng(seed + 1)
    m = first.token_prompts
    idx_h, idx_b = bootstrap_indices(m, n_boot, rng), bootstrap_indices(m, n_boot, rng)
    modes: dict[str, Any] = {}
    for mode in MODES:
        if mode not in first.token_states:
            continue
        modes[mode] = {}
        for label, meas in zip(labels, measures, strict=True):
            vals = token_values(meas, mode, layer, directions)
            gh, gb = vals["gap"]
            row = {
                "gap": estimate(gh, idx_h, level=level).as_dict(),
                "gap-contrast": estimate(gh, idx_h, gb, idx_b, level=level).as_dict(),
                "logodds": estimate(vals["logodds"][0], idx_h, level=level).as_dict(),
                "logodds-harmless": estimate(vals["logodds"][1], idx_b, level=level).as_dict(),
            }
            if "direction" in vals:
                dh, db = vals["direction"]
                row["direction"] = estimate(dh, idx_h, db, idx_b, level=level).as_dict()
            row["alive"] = np.round(meas.token_alive[mode][:m].mean(0), 4).tolist()
            modes[mode][label] = row
    return {
        "layer": layer,
        "steps": first.token_steps,
        "gap_steps": [0, *first.gap_steps],
        "prompts": m,
        "forced_tokens": first.forced_tokens,
        "modes": modes,
    }


def _replies(measures: list[ModelMeasures], labels: list[str], judge_spec: str, harmful: PromptSet) -> dict[str, Any]:
    """Refusal rate of the tracked harmful replies (greedy) and of the replies after the forced prefix (judged in
    memory: the replies themselves are never written)."""
    from ssah.judges import get_judge

    first = measures[0]
    m = first.token_prompts
    if m == 0:
        return {}
    judge = get_judge(judge_spec)
    prompts = harmful.prompts()[:m]
    out: dict[str, Any] = {}
    for mode in first.token_text:
        out[mode] = {}
        for label, meas in zip(labels, measures, strict=True):
            texts = meas.token_text[mode][:m]
            if not any(t.strip() for t in texts):
                continue
            refused = sum(v.refused for v in judge.judge(prompts, texts))
            out[mode][label] = {"refusal": Proportion(refused, m).to_dict()}
    return out


def run_probe(cfg: ProbeConfig) -> RunResult[ProbeConfig]:
    """Measure the model (and ``compare``), analyse, and write the run folder; returns its RunResult.

    ``cfg.threads`` sets torch's CPU threads for the run (restored afterwards): on a CPU shared by many processes
    one thread avoids the synchronisation stalls of several (measured here: 8x faster on a loaded 2-core machine).
    """
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return execute(RECIPE, cfg, probe_experiment)
    finally:
        torch.set_num_threads(before)


def probe_experiment(cfg: ProbeConfig, clock: Clock) -> Experiment:
    """Measure the model (and ``compare``) and analyse the gaps."""
    harmful, harmless = load_probe_data(cfg)
    from ssah.judges import get_judge

    get_judge(cfg.judge)  # a bad judge spec fails before any model is loaded
    specs = [cfg.model] + ([cfg.compare] if cfg.compare is not None else [])
    models = [load_model(s, **cfg.load_options()) for s in specs]
    _check_compare(cfg, models)
    layers = models[0].model.config.num_hidden_layers
    if cfg.token_layer is not None and not 0 <= cfg.token_layer <= layers:
        raise UserError(f"--token-layer must be between 0 and {layers} (0 = embeddings), got {cfg.token_layer}")
    labels = _labels(cfg)
    openers = cfg.openers()
    measures, seconds = [], {}
    for label, lm in zip(labels, models, strict=True):
        t = time.time()
        steps = {k: getattr(cfg, k) for k in ("token_steps", "token_prompts")}
        opts = {"system": cfg.system, "forced_prefix": cfg.forced_prefix, "batch_size": cfg.batch_size, **steps}
        m = measure_model(lm.model, lm.tokenizer, harmful.prompts(), harmless.prompts(), openers=openers, **opts,
                          progress=cfg.progress, desc=f"probe {label}")  # fmt: skip
        measures.append(m)
        seconds[label] = round(time.time() - t, 3)
    n_boot, level = cfg.bootstrap, cfg.level
    analysis = analyse(measures, labels, openers, cfg.methods, n_boot=n_boot, seed=cfg.seed, level=level,
                       token_layer=cfg.token_layer)  # fmt: skip
    if analysis["tokens"]:
        analysis["tokens"]["forced_prefix"] = cfg.forced_prefix
        analysis["tokens"]["replies"] = _replies(measures, labels, cfg.judge, harmful)
    results = _results(cfg, models, labels, measures, analysis, (harmful, harmless))
    # the direction method's directions are fitted on the other fold of these prompts (cross-fitting): nothing else
    # was chosen on them, so the record lists no used set
    results["prompts"] = held_out({"harmful": harmful, "harmless": harmless}, {})
    results["seconds"] = {"load": round(sum(lm.load_seconds for lm in models), 3), "measure": seconds, "total": 0.0}
    model = {"name": cfg.model, "fingerprint": models[0].fingerprint}
    if len(models) > 1:
        model |= {"compare": cfg.compare, "compare_fingerprint": models[1].fingerprint}
    return Experiment(results, model, results["data"], device=models[0].model.device)


def _results(
    cfg: ProbeConfig,
    models: list[LoadedModel],
    labels: list[str],
    measures: list[ModelMeasures],
    analysis: dict[str, Any],
    data: tuple[PromptSet, PromptSet],
) -> dict[str, Any]:
    """results.json of a probe run (without timings): the models, methods, analysis, openers, data, settings."""
    openers = cfg.openers()
    harmful, harmless = data
    return {
        "models": [
            {
                "label": label,
                "role": "probed" if k == 0 else "compare",
                "name": lm.name,
                "source": lm.source,
                "fingerprint": lm.fingerprint,
                "family": lm.family,
                "layers": lm.model.config.num_hidden_layers,
                "hidden": lm.model.config.hidden_size,
                "last_layer_normed": meas.last_layer_normed,
                "notes": meas.notes,
            }
            for k, (label, lm, meas) in enumerate(zip(labels, models, measures, strict=True))
        ],
        "methods": {
            m: {
                "label": METHODS[m].label,
                "description": METHODS[m].description,
                "controlled": METHODS[m].controlled,
                "baseline": METHODS[m].baseline,
            }
            for m in cfg.methods
        },
        **analysis,
        "openers": {
            "refusal": list(openers.refusal),
            "compliance": list(openers.compliance),
            "naive": [openers.refusal[0], openers.compliance[0]],
        },
        "data": {
            name: {"source": ps.source, "name": ps.name, "examples": len(ps), "sha256": ps.fingerprint()}
            for name, ps in (("harmful", harmful), ("harmless", harmless))
        },
        "settings": {
            "limit": cfg.limit,
            "token_steps": cfg.token_steps,
            "token_prompts": cfg.token_prompts,
            "bootstrap": cfg.bootstrap,
            "level": cfg.level,
            "distance": "cosine (1 - cos)",
            "system": cfg.system,
            "judge": cfg.judge,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "threads": torch.get_num_threads(),
            "direction_folds": 2,
            "verdict_min_prompts": MIN_VERDICT_PROMPTS,
        },
    }
