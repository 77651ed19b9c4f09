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
from ssah.judges import judge_line
from ssah.measure import Proportion
from ssah.models import LoadedModel, load_model
from ssah.probe import (
    METHODS,
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
    separation,
    separation_verdict,
    token_values,
)
from ssah.report import markdown_table
from ssah.runs import RunDir, check_output_folder, manifest, set_seed

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
    limit: int = Field(50, ge=MIN_PROMPTS, description="Prompts of each set, spread over the file.")
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
    bootstrap: int = Field(1000, ge=50, description="Bootstrap resamples (at least 50).")
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


def _spread(prompts: PromptSet, n: int) -> PromptSet:
    """``n`` examples evenly spaced over the set (built-in sets are grouped by category, so the first ``n`` would
    cover only a few categories); the whole set when it is not larger."""
    if n >= len(prompts):
        return prompts
    picks = np.unique(np.linspace(0, len(prompts) - 1, n).round().astype(int))
    return PromptSet(f"{prompts.name}[spread {n}]", prompts.source, tuple(prompts.examples[i] for i in picks))


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
        sets.append(_spread(ps, cfg.limit))
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


def layer_ranges(layers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


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
    for method in methods:
        gaps[method], est[method] = {}, []
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
            v = separation_verdict(a.reps - b.reps, later, level=level)
            sep[method] = {**s, "verdict": v["verdict"], "decision": v}
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


def run_probe(cfg: ProbeConfig) -> Path:
    """Measure the model (and ``compare``), analyse, and write the run folder; returns its path.

    ``cfg.threads`` sets torch's CPU threads for the run (restored afterwards): on a CPU shared by many processes
    one thread avoids the synchronisation stalls of several (measured here: 8x faster on a loaded 2-core machine).
    """
    cfg.check()
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


def _run(cfg: ProbeConfig) -> Path:
    t0 = time.time()
    check_output_folder(cfg.out, cfg.overwrite)
    set_seed(cfg.seed)
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
        measures.append(
            measure_model(
                lm.model,
                lm.tokenizer,
                harmful.prompts(),
                harmless.prompts(),
                openers=openers,
                system=cfg.system,
                token_steps=cfg.token_steps,
                token_prompts=cfg.token_prompts,
                forced_prefix=cfg.forced_prefix,
                batch_size=cfg.batch_size,
                progress=cfg.progress,
                desc=f"probe {label}",
            )
        )
        seconds[label] = round(time.time() - t, 3)
    analysis = analyse(
        measures,
        labels,
        openers,
        cfg.methods,
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
        level=cfg.level,
        token_layer=cfg.token_layer,
    )
    if analysis["tokens"]:
        analysis["tokens"]["forced_prefix"] = cfg.forced_prefix
        analysis["tokens"]["replies"] = _replies(measures, labels, cfg.judge, harmful)
    results: dict[str, Any] = {
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
        },
        "seconds": {
            "load": round(sum(lm.load_seconds for lm in models), 3),
            "measure": seconds,
            "total": round(time.time() - t0, 3),
        },
    }
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        report = render(results, run.path)
        results["seconds"]["total"] = round(time.time() - t0, 3)
        run.write_yaml("config.yaml", cfg.model_dump())
        run.write_json("results.json", results)
        run.write_text("report.md", report)
        run.write_json(
            "manifest.json",
            manifest(
                command="probe",
                seed=cfg.seed,
                started=t0,
                device=models[0].model.device,
                model={"name": cfg.model, "fingerprint": models[0].fingerprint}
                | ({"compare": cfg.compare, "compare_fingerprint": models[1].fingerprint} if len(models) > 1 else {}),
                data=results["data"],
            ),
        )
    return run.out


# --- report and plots ------------------------------------------------------------------------------------------------


def _fmt(mean: float, lo: float, hi: float) -> str:
    return f"{mean:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _at(d: dict[str, Any], i: int) -> str:
    return _fmt(d["mean"][i], d["lo"][i], d["hi"][i])


def plot_gap_by_layer(results: dict[str, Any], path: Path) -> Path:
    """One panel per method: the gap per layer of every model with its shaded interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["gaps"])
    cols = 2 if len(methods) > 1 else 1
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 2.9 * rows + 0.5), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for k, (label, row) in enumerate(results["gaps"][method].items()):
            g = row["gap"]
            x = np.arange(len(g["mean"]))
            color = MODEL_COLORS[k % len(MODEL_COLORS)]
            ax.plot(x, g["mean"], color=color, label=label, lw=1.6)
            ax.fill_between(x, g["lo"], g["hi"], color=color, alpha=0.2, lw=0)
        ax.axhline(0, color="0.4", lw=0.7)
        if method == "logit-lens" and len(x) > 2:  # the embedding layer read through the head dwarfs the rest
            inner = [v for row in results["gaps"][method].values() for k in ("lo", "hi") for v in row["gap"][k][1:]]
            pad = 0.1 * (max(inner) - min(inner) + 1e-9)
            ax.set_ylim(min([*inner, 0.0]) - pad, max([*inner, 0.0]) + pad)
            ax.annotate("layer 0 off scale", (0, 1), xycoords="axes fraction", fontsize=7, va="top", color="0.4")
        info = results["methods"][method]
        ax.set_title(f"{method}: {info['label']}", fontsize=9)
        ax.set_xlabel("layer (0 = embeddings)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle("refusal-minus-compliance gap by layer (positive = leaning to refuse), shaded: bootstrap interval")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


TOKEN_PANELS = (
    ("gap", "paper's gap at layer {layer} (harmful)"),
    ("gap-contrast", "paper's gap at layer {layer}, harmful - harmless"),
    ("direction", "refusal direction at layer {layer}, harmful - harmless"),
    ("logodds", "next-token refusal log-odds (harmful)"),
)


def plot_gap_by_token(results: dict[str, Any], path: Path) -> Path:
    """Per-token curves: the paper's gap, its content-subtracted version, the refusal direction and the next-token
    refusal log-odds, per model (colour) and mode (greedy solid, forced prefix dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tk = results["tokens"]
    fig, axes = plt.subplots(2, 2, figsize=(12.4, 6.6), squeeze=False)
    labels = [m["label"] for m in results["models"]]
    for ax, (key, title) in zip(axes.flat, TOKEN_PANELS, strict=True):
        for mode, per_model in tk["modes"].items():
            for k, label in enumerate(labels):
                row = per_model.get(label, {}).get(key)
                if row is None:
                    continue
                x = np.array(tk["gap_steps"] if key.startswith("gap") else range(len(row["mean"])))
                color = MODEL_COLORS[k % len(MODEL_COLORS)]
                ax.plot(
                    x,
                    row["mean"],
                    MODE_STYLES.get(mode, "-"),
                    color=color,
                    label=f"{label}, {mode}",
                    lw=1.5,
                    marker="o" if key.startswith("gap") else None,
                    ms=3,
                )
                ax.fill_between(x, row["lo"], row["hi"], color=color, alpha=0.12, lw=0)
        if tk.get("forced_tokens"):
            ax.axvline(tk["forced_tokens"], color="0.5", ls=":", lw=0.9)
        ax.axhline(0, color="0.4", lw=0.7)
        ax.set_title(title.format(layer=tk["layer"]), fontsize=9)
        ax.set_xlabel("generated tokens (0 = end of the query; dotted: end of the forced prefix)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick_layers(layers: int) -> list[int]:
    return sorted({0, 1, round(layers / 4), round(layers / 2), round(3 * layers / 4), layers - 1, layers})


def render(results: dict[str, Any], run_dir: Path) -> str:
    """(Re)draw the plots into ``run_dir/plots/`` from ``results`` alone and return the Markdown report."""
    run_dir = Path(run_dir)
    plot_gap_by_layer(results, run_dir / "plots" / "gap_by_layer.png")
    if results.get("tokens"):
        plot_gap_by_token(results, run_dir / "plots" / "gap_by_token.png")
    labels = [m["label"] for m in results["models"]]
    layers = results["layers"]
    level = results["settings"]["level"]
    pct = f"{100 * level:g}%"
    d = results["data"]
    lines = [
        f"# Reasoning-direction probe: {' vs '.join(f'`{x}`' for x in labels)}",
        "",
        f"{d['harmful']['examples']} harmful prompts (`{d['harmful']['source']}`) and {d['harmless']['examples']} "
        f"harmless prompts (`{d['harmless']['source']}`), spread over each file; "
        f"{len(results['openers']['refusal'])} refusal and {len(results['openers']['compliance'])} compliance "
        f"openers; {layers} blocks (layer 0 = embeddings). Gap > 0 means the query's state leans to refusing. "
        f"Intervals: {pct} percentile bootstrap over prompts ({results['settings']['bootstrap']} resamples). "
        f"Took {results['seconds']['total']:.1f} s.",
        "",
    ]
    for m in results["models"]:
        lines.append(f"- `{m['label']}` ({m['role']}): `{m['name']}`, {m['family']}, fingerprint {m['fingerprint']}")
    lines.append("")
    lines += _verdict_section(results, labels, pct)
    lines += _confound_section(results, labels)
    lines += ["## Gap by layer", "", "![gap by layer](plots/gap_by_layer.png)", ""]
    picks = _pick_layers(layers)
    header = ["method", "model", *[f"layer {x}" for x in picks]]
    rows = []
    for method, per_model in results["gaps"].items():
        for label, row in per_model.items():
            rows.append([method, label, *[_at(row["gap"], x) for x in picks]])
    lines += [markdown_table(header, rows), ""]
    spread = [
        [
            method,
            label,
            f"{row['templates']['pairs']}",
            f"{row['templates']['min'][layers]:+.3g}",
            f"{row['templates']['max'][layers]:+.3g}",
            f"{row['templates']['sd'][layers]:.3g}",
        ]
        for method, per_model in results["gaps"].items()
        for label, row in per_model.items()
        if row.get("templates")
    ]
    if spread:
        lines += [
            f"Spread across opener templates (every refusal x compliance pair, prompt-mean gap at layer {layers}):",
            "",
            markdown_table(["method", "model", "pairs", "min", "max", "sd"], spread),
            "",
        ]
    if results.get("tokens"):
        lines += _token_section(results, labels)
    lines += ["## Methods", ""]
    for method, info in results["methods"].items():
        kind = "confound-controlled" if info["controlled"] else "not controlled for the ending word"
        lines.append(f"- `{method}` ({info['label']}; {kind}): {info['description']}.")
    notes = [f"{m['label']}: {n}" for m in results["models"] for n in m.get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines.append("")
    return "\n".join(lines)


def _verdict_section(results: dict[str, Any], labels: list[str], pct: str) -> list[str]:
    layers = results["layers"]
    later = results["later_layers"]
    if len(labels) < 2:
        return [
            "## Separation",
            "",
            "One model only: no separation verdict (pass `--compare MODEL` to compare an aligned with an unaligned "
            "model).",
            "",
        ]
    a, b = labels
    out = [
        "## Which methods separate the two models",
        "",
        f"Expected direction: `{a}` (probed) above `{b}` (compare). Verdict rule: the paired bootstrap interval of "
        f"the difference `{a}` - `{b}` at each later layer ({later[0]}-{later[-1]}), Bonferroni-corrected for the "
        f"{len(later)} later layers tested, must exclude zero upwards over a run of consecutive later layers "
        "(*reproduced*); any later layer excluding zero downwards is *not reproduced*; otherwise *inconclusive*.",
        "",
    ]
    rows = []
    for method, s in results["separation"].items():
        info = results["methods"][method]
        gap = results["gaps"][method]
        d = s["decision"]
        word = f"**{s['verdict']}**" if s["verdict"] == "reproduced" else s["verdict"]
        rows.append(
            [
                f"`{method}`" + ("" if info["controlled"] else " (uncontrolled)"),
                f"{word} (run {d['longest_run']}/{d['min_run']})",
                layer_ranges(s["higher"]),
                layer_ranges(s["lower"]),
                _at(gap[a]["gap"], layers),
                _at(gap[b]["gap"], layers),
            ]
        )
    out += [
        markdown_table(
            [
                "method",
                "verdict",
                f"layers {a} > {b}",
                f"layers {a} < {b}",
                f"{a} at layer {layers}",
                f"{b} at layer {layers}",
            ],
            rows,
        ),
        "",
    ]
    good = [m for m, s in results["separation"].items() if s["verdict"] == "reproduced"]
    controlled = [m for m in good if results["methods"][m]["controlled"]]
    if controlled:
        out.append(f"Confound-controlled methods that separate the models: {', '.join(f'`{m}`' for m in controlled)}.")
    else:
        out.append(
            "No confound-controlled method separates the two models in the expected direction: the paper's "
            "reasoning-direction effect did **not** reproduce here."
        )
    out.append("")
    return out


def _confound_section(results: dict[str, Any], labels: list[str]) -> list[str]:
    conf = results.get("confound") or {}
    if not conf:
        return []
    layers = results["layers"]
    out = ["## The paper's probe and its confound", ""]
    for label in labels:
        c = conf[label]
        e = c["embedding_gap"]
        out.append(
            f"- `{label}`: naive gap at the embedding layer {_fmt(e['mean'], e['lo'], e['hi'])}; gap > 0 at "
            f"{c['positive_layers']} of {layers + 1} layers ({c['positive_layers_ci']} with the interval above 0, "
            f"{c['negative_layers_ci']} below)."
        )
    emb = [conf[x]["embedding_gap"]["mean"] for x in labels]
    first = conf[labels[0]]
    holds = first["positive_layers_ci"] == layers + 1
    claim = (
        "The paper's claim for an aligned model (refusal version closer at every block) "
        + ("holds" if holds else "does **not** hold")
        + f" for `{labels[0]}`: interval above 0 at {first['positive_layers_ci']} of {layers + 1} layers."
    )
    if len(labels) > 1:
        other = conf[labels[1]]
        claim += f" For `{labels[1]}`: {other['positive_layers_ci']} of {layers + 1}."
    out += ["", claim]
    out.append("")
    if any(abs(v) > 1e-6 for v in emb):
        side = "compliance" if emb[0] < 0 else "refusal"
        out.append(
            f"At the embedding layer no token has seen any other, yet the naive gap is already "
            f"{', '.join(f'{v:+.3g}' for v in emb)} (the query's state nearer the {side} version): the comparison "
            "measures which word ends the prefix, not the model's intent, so a naive gap of either sign is no "
            "evidence of a reasoning direction on its own; the content-subtracted methods cancel this part (they "
            "are 0 at the embedding layer)."
        )
    else:
        out.append("The naive gap is 0 at the embedding layer here (openers end in the same token).")
    out.append("")
    return out


def _token_section(results: dict[str, Any], labels: list[str]) -> list[str]:
    tk = results["tokens"]
    out = [
        "## Token by token",
        "",
        f"The first {tk['prompts']} harmful and {tk['prompts']} harmless prompts followed for {tk['steps']} tokens: "
        f"greedy (the model's own reply) and forced (the reply starts with `{tk.get('forced_prefix', '')}`, "
        f"{tk['forced_tokens']} tokens, then greedy). Layer {tk['layer']} for the gap and the direction.",
        "",
        "![gap by token](plots/gap_by_token.png)",
        "",
    ]
    last = tk["steps"]
    f = min(tk["forced_tokens"], last)
    rows = []
    for mode, per_model in tk["modes"].items():
        for label in labels:
            row = per_model.get(label)
            if row is None:
                continue
            cells = [mode, label]
            for key in ("direction", "logodds"):
                if key in row:
                    cells.append(f"{_at(row[key], 0)} / {_at(row[key], f)} / {_at(row[key], last)}")
                else:
                    cells.append("-")
            rep = tk.get("replies", {}).get(mode, {}).get(label)
            cells.append(
                f"{100 * rep['refusal']['rate']:.0f}% [{100 * rep['refusal']['ci95'][0]:.0f}, "
                f"{100 * rep['refusal']['ci95'][1]:.0f}]"
                if rep
                else "-"
            )
            rows.append(cells)
    out += [
        markdown_table(
            [
                "mode",
                "model",
                f"direction (harmful - harmless) at step 0 / {f} / {last}",
                f"refusal log-odds (harmful) at step 0 / {f} / {last}",
                "replies judged refusals (Wilson 95%)",
            ],
            rows,
        ),
        "",
        "Replies were judged in memory (`"
        + results["settings"]["judge"]
        + "`) and are not stored. "
        + judge_line(results["settings"]["judge"])
        + " "
        "A curve that decays over the first tokens is the paper's point: the direction holds only for a few tokens.",
        "",
    ]
    return out
