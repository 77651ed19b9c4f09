"""`ssah transfer`: attribute transfer (paper §4.2, Fig. 5) — how unit categories move when a model is fine-tuned.

The units of MODEL and of its fine-tuned version are categorised on the same calibration sets with the same
settings (:func:`~ssah.experiments.units.categorize_model`); the result is a 4x4 transition matrix SCU / UCU / CU /
RU before -> after, where the moved units sit (layer, attention vs MLP), the SCU overlap with its chance level,
and a control: the same categorisation on two disjoint halves of the calibration data of the *unchanged* model,
which shows how much moves by data noise alone. Without ``--finetuned`` a copy of MODEL is fine-tuned in memory
on ``--data`` (benign task data by default) with :func:`~ssah.train.train_model`.

The paper: "over half of the SCU became CU and part of CU became UCU". The report says whether that reproduced,
beyond the data-noise control.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, cast

from pydantic import Field
from transformers import PreTrainedModel

from ssah.arch import get_adapter
from ssah.categorize import CATEGORIES, Categorization, categorize, expected_random_jaccard
from ssah.config import ModelRunConfig
from ssah.data import PromptSet, load_prompts
from ssah.errors import UserError
from ssah.evaluate import wilson_interval
from ssah.experiments.units import UnitsConfig
from ssah.models import LoadedModel, load_model, model_fingerprint
from ssah.report import CATEGORY_COLORS, markdown_table
from ssah.runs import RunDir, check_output_folder, manifest, set_seed
from ssah.scoring import collect_statistics, compute_scores, gradient_mode
from ssah.stats import UnitStatistics
from ssah.train import TrainConfig, train_model
from ssah.units import UnitSpace

PAPER_CLAIM = "over half of the SCU became CU and part of the CU became UCU (paper §4.2, Fig. 5)"
# The transitions the paper names; the moved-units plot always shows them.
KEY_PAIRS: tuple[str, ...] = ("SCU->CU", "CU->UCU")
CONTROL_METHOD = (
    "the unchanged model categorised on two disjoint halves A and B of both calibration sets: what moves by "
    "data noise alone"
)
MATCHED_METHOD = (
    "half A on the model before fine-tuning -> half B on the model after: the fine-tune's moves plus the same "
    "data noise as the control, so the two compare like for like"
)
QUICK_LIMIT = 48
QUICK_STEPS = 8
DEFAULT_STEPS = 20


class TransferConfig(ModelRunConfig):
    """Everything `ssah transfer` needs: the fine-tuned model (or how to make one) and the categorisation."""

    out: str = "runs/transfer"
    dtype: str = "float32"
    finetuned: str | None = None
    # in-memory fine-tuning when ``finetuned`` is not given
    data: str = "builtin:task"
    steps: int | None = None  # default 20, quick 8
    lr: float = 2e-5
    train_batch_size: int = 8
    # categorisation, as in `ssah units`
    safety: str = "builtin:safety"
    utility: str = "builtin:utility"
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = None  # default: all examples; quick 48
    metric: str = "fluctuation"
    rule: str = "ssah"
    shares: dict[str, float] = Field(default_factory=dict)
    normalization: str = "mean"
    ranking: str = "global"
    granularity: str = "neuron"
    tokens: str = "prompt+response"
    batch_size: int = 8
    max_length: int = 512
    system: str | None = None
    control: bool = True
    quick: bool = False

    def effective_steps(self) -> int:
        return self.steps if self.steps is not None else (QUICK_STEPS if self.quick else DEFAULT_STEPS)

    def effective_limit(self) -> int | None:
        return self.limit if self.limit is not None else (QUICK_LIMIT if self.quick else None)

    def units_config(self) -> UnitsConfig:
        """The `ssah units` settings both models are categorised with."""
        return UnitsConfig(
            model=self.model,
            safety=self.safety,
            utility=self.utility,
            columns=self.columns,
            limit=self.effective_limit(),
            metric=self.metric,
            rule=self.rule,
            shares=self.shares,
            normalization=self.normalization,
            ranking=self.ranking,
            granularity=self.granularity,
            tokens=self.tokens,
            batch_size=self.batch_size,
            max_length=self.max_length,
            system=self.system,
            progress=self.progress,
        )

    def train_config(self) -> TrainConfig:
        """Settings of the in-memory fine-tune (used when no ``finetuned`` model is given)."""
        return TrainConfig(
            model=self.model,
            out=self.out,
            dtype=self.dtype,
            data=self.data,
            columns=self.columns,
            system=self.system,
            max_steps=self.effective_steps(),
            lr=self.lr,
            batch_size=self.train_batch_size,
            max_length=self.max_length,
            seed=self.seed,
            progress=self.progress,
        )

    def check(self) -> None:
        """Cheap validation before any data or model is loaded (the output folder included)."""
        self.units_config().check_settings()
        if self.finetuned is None:
            self.train_config().check_training()
        if self.effective_steps() < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        limit = self.effective_limit()
        if self.control and limit is not None and limit < 2:
            raise UserError("the data-noise control splits each calibration set in two: use --limit 2 or more")
        check_output_folder(self.out, self.overwrite)


# -- analysis ---------------------------------------------------------------------------------------------------
def transition_summary(before: Categorization, after: Categorization) -> dict[str, Any]:
    """Counts, row shares, overlaps and moved units between two categorisations of the same unit space."""
    if before.space != after.space:
        raise UserError("the two categorisations have different unit layouts: compare models of one architecture")
    counts = before.transition(after).tolist()
    rows = [sum(r) for r in counts]
    shares = [[c / rows[i] if rows[i] else 0.0 for c in r] for i, r in enumerate(counts)]
    n = before.space.total
    overlap = {}
    for c in CATEGORIES:
        k = (len(before[c]) + len(after[c])) // 2
        overlap[c] = {
            "jaccard": round(before[c].jaccard(after[c]), 4),
            "chance": round(expected_random_jaccard(k, n), 4),
        }
    pairs: dict[str, Any] = {}
    for i, a in enumerate(CATEGORIES):
        for j, b in enumerate(CATEGORIES):
            if i == j:
                continue
            k = counts[i][j]
            ci = wilson_interval(k, rows[i]) if rows[i] else None
            pairs[f"{a}->{b}"] = {
                "count": k,
                "share_of_before": round(shares[i][j], 4),
                "ci95": None if ci is None else {"low": round(ci.low, 4), "high": round(ci.high, 4)},
            }
    moved = n - sum(counts[i][i] for i in range(len(CATEGORIES)))
    return {
        "order": list(CATEGORIES),
        "counts": counts,
        "row_shares": [[round(x, 4) for x in r] for r in shares],
        "before": {c: rows[i] for i, c in enumerate(CATEGORIES)},
        "after": {c: sum(counts[i][j] for i in range(len(CATEGORIES))) for j, c in enumerate(CATEGORIES)},
        "units_total": n,
        "moved": moved,
        "moved_share": round(moved / n, 6) if n else 0.0,
        "pairs": pairs,
        "overlap": overlap,
    }


def moved_by_layer(before: Categorization, after: Categorization) -> dict[str, list[dict[str, int]]]:
    """For every category change with at least one unit (and the paper's key pairs), the moved units per layer."""
    out: dict[str, list[dict[str, int]]] = {}
    for a in CATEGORIES:
        for b in CATEGORIES:
            if a == b:
                continue
            moved = before[a] & after[b]
            key = f"{a}->{b}"
            if len(moved) or key in KEY_PAIRS:
                out[key] = [{"layer": i, **row} for i, row in enumerate(moved.counts_by_layer())]
    return out


def paper_comparison(
    transfer: dict[str, Any], control: dict[str, Any] | None, matched: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Did "over half of SCU became CU and part of CU became UCU" reproduce, beyond data noise?

    The share is read on the full-data transition. "Beyond noise" compares, at the same data noise, the
    fine-tune across data halves (half A before -> half B after, ``matched``) with the unchanged model across
    data halves (``control``): real transfer makes the first larger than the second.
    """

    def share(block: dict[str, Any] | None, pair: str) -> float | None:
        return None if block is None else block["pairs"][pair]["share_of_before"]

    out: dict[str, Any] = {"claim": PAPER_CLAIM}
    ok: dict[str, bool] = {}
    for pair, key in (("SCU->CU", "scu_to_cu"), ("CU->UCU", "cu_to_ucu")):
        main = transfer["pairs"][pair]
        c, m = share(control, pair), share(matched, pair)
        out[key] = main["share_of_before"]
        out[f"{key}_ci95"] = main["ci95"]
        out[f"control_{key}"] = c
        out[f"control_{key}_ci95"] = None if control is None else control["pairs"][pair]["ci95"]
        out[f"matched_{key}"] = m
        out[f"matched_{key}_ci95"] = None if matched is None else matched["pairs"][pair]["ci95"]
        big_enough = main["share_of_before"] > 0.5 if pair == "SCU->CU" else main["count"] > 0
        beyond = None if c is None or m is None else m > c
        out[f"{key}_beyond_noise"] = beyond
        # stricter: the matched share's 95% interval lies above the control's
        ci_m, ci_c = out[f"matched_{key}_ci95"], out[f"control_{key}_ci95"]
        out[f"{key}_clearly_beyond_noise"] = None if not (ci_m and ci_c) else ci_m["low"] > ci_c["high"]
        ok[key] = bool(big_enough and beyond is not False)
        out[f"{key}_reproduced"] = ok[key]
    out["reproduced"] = all(ok.values())
    return out


def categorize_with_halves(
    lm: LoadedModel, safety: PromptSet, utility: PromptSet, cfg: UnitsConfig, *, halves: bool
) -> tuple[Categorization, tuple[Categorization, Categorization] | None]:
    """Categorise a model on the full calibration sets and, with ``halves``, on each disjoint half of both.

    The same result as :func:`~ssah.experiments.units.categorize_model` for the full sets; the statistics of the
    halves merge exactly into those of the full sets, so the halves cost no extra pass over the data.
    """
    cfg.check_settings()
    adapter = get_adapter(lm.model)
    groups = adapter.groups()
    neuron = UnitSpace.from_groups(groups, "neuron", lm.fingerprint, lm.name)
    space = UnitSpace.from_groups(groups, cfg.granularity, lm.fingerprint, lm.name)  # type: ignore[arg-type]
    stats: list[list[UnitStatistics]] = []
    for data in (safety, utility):
        parts = data.split(2) if halves else [data]
        stats.append(
            [
                collect_statistics(
                    lm.model,
                    lm.tokenizer,
                    part,
                    region=cfg.tokens,  # type: ignore[arg-type]
                    batch_size=cfg.batch_size,
                    max_length=cfg.max_length,
                    system=cfg.system,
                    gradients=gradient_mode(cfg.metric),
                    progress=cfg.progress,
                    desc=f"{lm.name}: {data.name}" + (f" {i + 1}/2" if halves else ""),
                    adapter=adapter,
                )
                for i, part in enumerate(parts)
            ]
        )

    def cat(s_stats: UnitStatistics, u_stats: UnitStatistics) -> Categorization:
        s, u = (
            compute_scores(lm.model, st, cfg.metric, neuron, dataset=d.source, region=cfg.tokens, adapter=adapter)
            for st, d in ((s_stats, safety), (u_stats, utility))
        )
        return categorize(
            s,
            u,
            rule=cfg.rule,
            shares=cfg.shares,
            normalization=cfg.normalization,
            ranking=cfg.ranking,
            granularity=cfg.granularity,  # type: ignore[arg-type]
            space=space,
        )

    full = [st[0] if len(st) == 1 else st[0].merge(st[1]) for st in stats]
    whole = cat(full[0], full[1])
    if not halves:
        return whole, None
    return whole, (cat(stats[0][0], stats[1][0]), cat(stats[0][1], stats[1][1]))


# -- the recipe -------------------------------------------------------------------------------------------------
def _space(lm: LoadedModel, granularity: str) -> UnitSpace:
    return UnitSpace.from_groups(get_adapter(lm.model).groups(), granularity)  # type: ignore[arg-type]


def _load(spec: str, cfg: TransferConfig) -> LoadedModel:
    return load_model(
        spec,
        dtype=cfg.dtype,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )


def check_same_layout(base: LoadedModel, other: LoadedModel) -> None:
    """A fine-tuned model must have the base model's architecture and unit layout (else nothing compares)."""
    if base.family != other.family:
        raise UserError(
            f"the fine-tuned model {other.name!r} is a {other.family} model, {base.name!r} a {base.family} model: "
            "pass a fine-tune of the same architecture"
        )
    a, b = _space(base, "neuron"), _space(other, "neuron")
    if a != b:
        raise UserError(
            f"the fine-tuned model {other.name!r} has another unit layout ({b.total} units in {len(b.shapes)} groups, "
            f"{base.name!r} has {a.total} in {len(a.shapes)}): pass a fine-tune of the same model"
        )


def run_transfer(cfg: TransferConfig) -> Path:
    """Categorise MODEL and its fine-tune, compare, write the run folder; returns its path."""
    t0 = time.time()
    cfg.check()
    set_seed(cfg.seed)
    ucfg = cfg.units_config()
    limit = cfg.effective_limit()
    cols = cfg.columns or None
    safety = load_prompts(cfg.safety, columns=cols, limit=limit, name="safety")
    utility = load_prompts(cfg.utility, columns=cols, limit=limit, name="utility")
    if cfg.control:
        for data in (safety, utility):
            if len(data) < 2:
                raise UserError(f"the data-noise control needs 2 or more examples in the {data.name} set")
    train_data: PromptSet | None = None
    if cfg.finetuned is None:
        train_data = load_prompts(cfg.data, columns=cols, name="fine-tuning")
        if not train_data.has_responses:
            raise UserError(f"fine-tuning data {cfg.data} has no responses: pass a set with a response column")
    base = _load(cfg.model, cfg)
    t_load = time.time() - t0
    training: dict[str, Any] | None = None
    if cfg.finetuned is not None:
        ft = _load(cfg.finetuned, cfg)
        check_same_layout(base, ft)
    else:
        assert train_data is not None
        model = copy.deepcopy(base.model)
        result = train_model(model, base.tokenizer, train_data, cfg.train_config(), progress=cfg.progress)
        result.model.eval()
        trained = cast(PreTrainedModel, result.model)
        ft = LoadedModel(trained, base.tokenizer, f"{base.name} (fine-tuned in memory)", "memory")
        training = {
            **result.summary(),
            "data": {"source": train_data.source, "examples": len(train_data), "sha256": train_data.fingerprint()},
            "lr": cfg.lr,
            "batch_size": cfg.train_batch_size,
        }

    t_cat = time.time()
    before, base_halves = categorize_with_halves(base, safety, utility, ucfg, halves=cfg.control)
    after, ft_halves = categorize_with_halves(ft, safety, utility, ucfg, halves=cfg.control)
    transfer = transition_summary(before, after)
    by_layer = moved_by_layer(before, after)
    control = matched = None
    if base_halves is not None and ft_halves is not None:
        # the unchanged model on two disjoint halves of both sets: what moves by data noise alone ...
        control = {"method": CONTROL_METHOD, **transition_summary(base_halves[0], base_halves[1])}
        # ... and the same comparison across the fine-tune (half A before -> half B after): same data noise
        matched = {"method": MATCHED_METHOD, **transition_summary(base_halves[0], ft_halves[1])}
    cat_seconds = time.time() - t_cat
    fp_before, fp_after = base.fingerprint, model_fingerprint(ft.model)

    results: dict[str, Any] = {
        "model": {
            "name": base.name,
            "source": base.source,
            "fingerprint": fp_before,
            "family": base.family,
            "layers": get_adapter(base.model).num_layers,
            "units_total": before.space.total,
        },
        "finetuned": {
            "name": ft.name,
            "source": ft.source,
            "fingerprint": fp_after,
            "in_memory": cfg.finetuned is None,
            "same_weights": fp_before == fp_after,
            "training": training,
        },
        "categorization": {
            "metric": cfg.metric,
            "rule": before.rule,
            "shares": before.shares,
            "normalization": before.normalization,
            "ranking": before.ranking,
            "granularity": cfg.granularity,
            "token_region": cfg.tokens,
            "limit": limit,
            "examples": {"safety": len(safety), "utility": len(utility)},
            "data": {"safety": safety.source, "utility": utility.source},
        },
        "transition": transfer,
        "moved_by_layer": by_layer,
        "scu_overlap": transfer["overlap"]["SCU"],
        "control": control,
        "matched": matched,
        "paper": paper_comparison(transfer, control, matched),
        "quick": cfg.quick,
        "seed": cfg.seed,
        "seconds": {
            "load_models": round(t_load, 3),
            "fine_tune": training["seconds"] if training else 0.0,
            "categorize": round(cat_seconds, 3),
            "total": round(time.time() - t0, 3),
        },
    }
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        run.write_yaml("config.yaml", cfg.model_dump())
        before.save(run.file("units_before.safetensors"), {"metric": cfg.metric})
        after.save(run.file("units_after.safetensors"), {"metric": cfg.metric})
        results["seconds"]["total"] = round(time.time() - t0, 3)
        run.write_json("results.json", results)
        run.write_text("report.md", render(results, run.path))
        data_info = {
            "safety": {"source": safety.source, "sha256": safety.fingerprint(), "examples": len(safety)},
            "utility": {"source": utility.source, "sha256": utility.fingerprint(), "examples": len(utility)},
        }
        if train_data is not None:
            data_info["fine_tuning"] = {"source": train_data.source, "sha256": train_data.fingerprint()}
        run.write_json(
            "manifest.json",
            manifest(
                command="transfer",
                seed=cfg.seed,
                started=t0,
                device=base.model.device,
                model={"name": base.name, "source": base.source, "fingerprint": fp_before},
                data=data_info,
                finetuned={"name": ft.name, "source": ft.source, "fingerprint": fp_after},
            ),
        )
    return run.out


# -- plots and report -------------------------------------------------------------------------------------------
PANELS: tuple[tuple[str, str, str, str], ...] = (
    ("transition", "fine-tuning (full data)", "before", "after"),
    ("matched", "fine-tuning across data halves", "before, half A", "after, half B"),
    ("control", "control: unchanged model", "half A", "half B"),
)


def _heatmap(ax: Any, block: dict[str, Any], title: str, ylabel: str, xlabel: str) -> Any:
    import numpy as np

    shares = np.array(block["row_shares"], dtype=float)
    counts = block["counts"]
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    order = block["order"]
    ax.set_xticks(range(len(order)), order)
    ax.set_yticks(range(len(order)), [f"{c} ({block['before'][c]})" for c in order])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i in range(len(order)):
        for j in range(len(order)):
            color = "white" if shares[i, j] > 0.6 else "black"
            ax.text(
                j, i, f"{counts[i][j]}\n{100 * shares[i, j]:.1f}%", ha="center", va="center", fontsize=8, color=color
            )
    ax.set_title(title, fontsize=10)
    return im


def plot_transition(results: dict[str, Any], path: Path) -> Path:
    """Heat maps of the row shares (counts and shares annotated): the fine-tune, and with the control the
    fine-tune across data halves beside the unchanged model across the same halves (data noise alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PANELS if results.get(p[0])]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.9 * len(panels) + 1.0, 4.6), squeeze=False, layout="constrained"
    )
    im = None
    for ax, (key, title, ylabel, xlabel) in zip(axes[0], panels, strict=True):
        im = _heatmap(ax, results[key], title, ylabel, xlabel)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="share of the row", shrink=0.8)
    fig.suptitle(f"{results['model']['name']}: unit categories ({results['transition']['units_total']} units)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pairs_to_plot(results: dict[str, Any], most: int = 4) -> list[str]:
    by_layer = results["moved_by_layer"]
    counts = results["transition"]["pairs"]
    pairs = [p for p in KEY_PAIRS if p in by_layer]
    rest = sorted((p for p in by_layer if p not in pairs and counts[p]["count"] > 0), key=lambda p: -counts[p]["count"])
    return pairs + rest[: max(0, most - len(pairs))]


def plot_moved_by_layer(results: dict[str, Any], path: Path) -> Path:
    """One panel per category change: the moved units in each layer, attention and MLP side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs_to_plot(results)
    fig, axes = plt.subplots(len(pairs), 1, figsize=(11, 2.0 * len(pairs) + 0.6), sharex=True, squeeze=False)
    w = 0.4
    for ax, pair in zip(axes[:, 0], pairs, strict=True):
        rows = results["moved_by_layer"][pair]
        layers = [r["layer"] for r in rows]
        color = CATEGORY_COLORS.get(pair.split("->")[1], "#333333")
        ax.bar([x - w / 2 for x in layers], [r["attn"] for r in rows], width=w, color=color, alpha=0.55, label="attn")
        ax.bar([x + w / 2 for x in layers], [r["mlp"] for r in rows], width=w, color=color, label="MLP")
        ax.set_ylabel(f"{pair}\n({results['transition']['pairs'][pair]['count']})")
        ax.legend(loc="upper left", fontsize=7, ncol=2, frameon=False)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(f"{results['model']['name']}: units that changed category after fine-tuning, by layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci: dict[str, float] | None) -> str:
    return "" if not ci else f"[{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def _matrix_table(block: dict[str, Any], corner: str = "before \\ after") -> str:
    order = block["order"]
    rows = [
        [f"**{a}** ({block['before'][a]})"]
        + [f"{block['counts'][i][j]} ({_pct(block['row_shares'][i][j])})" for j in range(len(order))]
        for i, a in enumerate(order)
    ]
    rows.append(["(column total)"] + [str(block["after"][c]) for c in order])
    return markdown_table([corner, *order], rows)


def _verdict(results: dict[str, Any]) -> list[str]:
    p = results["paper"]
    lines = [
        f"The paper: {p['claim']}.",
        f"Here, on the full calibration data, {_pct(p['scu_to_cu'])} {_ci(p['scu_to_cu_ci95'])} of the SCU became CU "
        f"and {_pct(p['cu_to_ucu'])} {_ci(p['cu_to_ucu_ci95'])} of the CU became UCU (95% Wilson intervals).",
    ]
    if p.get("control_scu_to_cu") is not None:
        lines.append(
            f"At equal data noise (half A -> half B): with the fine-tune in between {_pct(p['matched_scu_to_cu'])} "
            f"{_ci(p['matched_scu_to_cu_ci95'])} of SCU went to CU and {_pct(p['matched_cu_to_ucu'])} "
            f"{_ci(p['matched_cu_to_ucu_ci95'])} of CU to UCU; the unchanged model alone moved "
            f"{_pct(p['control_scu_to_cu'])} {_ci(p['control_scu_to_cu_ci95'])} and {_pct(p['control_cu_to_ucu'])} "
            f"{_ci(p['control_cu_to_ucu_ci95'])}."
        )
        clear = [
            name
            for name, key in (("SCU -> CU", "scu_to_cu"), ("CU -> UCU", "cu_to_ucu"))
            if p.get(f"{key}_clearly_beyond_noise")
        ]
        lines.append(
            "The intervals separate (fine-tune above noise) for: " + ", ".join(clear) + "."
            if clear
            else "The fine-tune's intervals overlap the control's for both moves: not clearly more than data noise."
        )
    else:
        lines.append("No data-noise control was run (`--no-control`), so noise cannot be ruled out.")
    if p["reproduced"]:
        lines.append("**Reproduced**: over half of the SCU became CU and part of the CU became UCU, beyond data noise.")
    else:
        parts = []
        if not p["scu_to_cu_reproduced"]:
            parts.append(
                "fewer than half of the SCU became CU"
                if p["scu_to_cu"] <= 0.5
                else "SCU -> CU was no larger than data noise moves"
            )
        if not p["cu_to_ucu_reproduced"]:
            parts.append("no CU became UCU" if p["cu_to_ucu"] == 0 else "CU -> UCU was no larger than data noise moves")
        lines.append(f"**Not reproduced**: {'; '.join(parts)}.")
    return lines


def render(results: dict[str, Any], run_dir: Path) -> str:
    """(Re)draw the plots into ``run_dir/plots`` from ``results`` alone and return the Markdown report."""
    run_dir = Path(run_dir)
    plot_transition(results, run_dir / "plots" / "transition.png")
    plot_moved_by_layer(results, run_dir / "plots" / "moved_by_layer.png")
    m, ft, cat, tr = results["model"], results["finetuned"], results["categorization"], results["transition"]
    ctrl, matched = results.get("control"), results.get("matched")
    if ft["in_memory"]:
        t = ft["training"]
        how = (
            f"No fine-tuned model was given: a copy of `{m['name']}` was **fine-tuned in memory** on "
            f"`{t['data']['source']}` ({t['data']['examples']} examples) for {t['steps']} steps "
            f"(batch {t['batch_size']}, lr {t['lr']:g}, all parameters), loss {t['first_loss']:.3f} -> "
            f"{t['final_loss']:.3f}."
        )
    else:
        how = f"Fine-tuned model: `{ft['name']}` (fingerprint `{ft['fingerprint']}`)."
    lines = [f"# Attribute transfer: {m['name']}", "", how]
    if ft.get("same_weights"):
        lines += ["", "**Warning**: the fine-tuned model has the same weights as the base model; nothing can move."]
    lines += [
        "",
        f"Both models categorised on the same calibration sets (`{cat['data']['safety']}` {cat['examples']['safety']} "
        f"and `{cat['data']['utility']}` {cat['examples']['utility']} examples) with metric `{cat['metric']}`, rule "
        f"`{cat['rule']}` {cat['shares']}, normalisation `{cat['normalization']}`, ranking `{cat['ranking']}`, "
        f"{cat['granularity']} granularity, tokens `{cat['token_region']}`. {m['units_total']} units in "
        f"{m['layers']} layers.",
        "",
        "## Transition matrix (rows: before fine-tuning, columns: after; counts and row shares)",
        "",
        _matrix_table(tr),
        "",
        "![transition matrices](plots/transition.png)",
        "",
        f"{tr['moved']} units ({_pct(tr['moved_share'])}) changed category. SCU overlap before/after (Jaccard): "
        f"{results['scu_overlap']['jaccard']:.3f} (chance {results['scu_overlap']['chance']:.4f}).",
        "",
    ]
    head = ["category", "Jaccard before/after", "chance"]
    if ctrl and matched:
        head += ["before A / after B", "control: A / B (unchanged)"]
    rows = [
        [c, tr["overlap"][c]["jaccard"], tr["overlap"][c]["chance"]]
        + ([matched["overlap"][c]["jaccard"], ctrl["overlap"][c]["jaccard"]] if ctrl and matched else [])
        for c in tr["order"]
    ]
    lines += [markdown_table(head, rows), "", "## Compared with the paper", "", *_verdict(results), ""]
    if ctrl and matched:
        lines += [
            "## Data noise: the control",
            "",
            f"Control: {ctrl['method']}; {ctrl['moved']} units ({_pct(ctrl['moved_share'])}) changed category.",
            "",
            _matrix_table(ctrl, "half A \\ half B"),
            "",
            f"Matched: {matched['method']}; {matched['moved']} units ({_pct(matched['moved_share'])}) changed "
            "category.",
            "",
            _matrix_table(matched, "before, A \\ after, B"),
            "",
        ]
    pair_rows = []
    for pair in _pairs_to_plot(results, most=6):
        by_layer = results["moved_by_layer"][pair]
        attn, mlp = sum(r["attn"] for r in by_layer), sum(r["mlp"] for r in by_layer)
        top = sorted(by_layer, key=lambda r: -(r["attn"] + r["mlp"]))[:3]
        where = ", ".join(f"L{r['layer']} ({r['attn'] + r['mlp']})" for r in top if r["attn"] + r["mlp"] > 0)
        pair_rows.append([pair, attn + mlp, attn, mlp, where or "-"])
    lines += [
        "## Where the moved units sit",
        "",
        "![moved units by layer](plots/moved_by_layer.png)",
        "",
        markdown_table(["change", "units", "attention", "MLP", "most in layers"], pair_rows),
        "",
    ]
    s = results["seconds"]
    lines.append(
        f"Took {s['total']:.1f} s (model loads {s['load_models']:.1f} s, fine-tuning {s['fine_tune']:.1f} s, "
        f"categorisations {s['categorize']:.1f} s){' in quick mode' if results.get('quick') else ''}."
    )
    return "\n".join(lines) + "\n"
