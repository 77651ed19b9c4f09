"""`ssah direction`: the refusal-direction baseline (Arditi et al. 2024) on the prompts ssah measures neurons on.

The harmful and harmless sets are each split three ways (seeded shuffle, disjoint): *train* prompts give the
difference-in-means candidates, *validation* prompts choose one (``ssah.direction.select_direction``: bypass,
induce and KL scores), *test* prompts measure it. On the test split every condition is measured by
``measure.measure_condition`` (ASR, coherent compliance, over-refusal on the benign set) and by
``evaluate.kl_divergence`` (KL on the harmless test prompts against one reference): the baseline, the direction
ablated at every layer, random directions of the same norm ablated the same way (one per seed), the orthogonalised
weights, and activation addition at the chosen layer (refusal of harmless prompts) against random additions of the
same norm at the same layer. Verdicts come from ``measure.verdict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssah import measure
from ssah.config import ModelRunConfig
from ssah.data import PromptSet, load_prompts
from ssah.direction import (
    KL_MAX,
    MAX_LAYER_SHARE,
    ablated_direction,
    added_direction,
    candidate_directions,
    last_logprobs,
    orthogonalized,
    random_direction,
    save_direction,
    select_direction,
)
from ssah.errors import UserError
from ssah.evaluate import EvalData, kl_divergence, kl_reference
from ssah.generate import GenerationConfig
from ssah.judges import JUDGE_KINDS, get_judge, judge_line, registered_judges
from ssah.models import load_model
from ssah.report import markdown_table
from ssah.runs import RunDir, check_output_folder, manifest, set_seed

FULL = {"train": 40, "val": 24, "limit": 32, "max_new_tokens": 64, "seeds": 5, "layer_step": 1}
QUICK = {"train": 24, "val": 12, "limit": 16, "max_new_tokens": 32, "seeds": 3, "layer_step": 2}
RATES = ("asr", "coherent_compliance", "overrefusal", "harmless_refusal")
NAMES = {
    "asr": "ASR",
    "coherent_compliance": "coherent compliance",
    "overrefusal": "over-refusal",
    "harmless_refusal": "refusal of harmless",
}


class DirectionConfig(ModelRunConfig):
    """Everything `ssah direction` needs; options left at None take the full-run or ``quick`` value."""

    out: str = "runs/direction"
    quick: bool = False
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:benign"
    benign: str = "builtin:borderline"  # over-refusal (safe prompts that look unsafe)
    judge: str = "keyword:ssah"
    train: int | None = None
    val: int | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    seeds: int | None = None
    layer_step: int | None = None
    positions: int | None = None
    kl_max: float = KL_MAX
    max_layer_share: float = MAX_LAYER_SHARE
    kl_tokens: int = 16
    batch_size: int = 16
    system: str | None = None

    def resolved(self) -> dict[str, Any]:
        """The settings in force: explicit values, else the quick or full-run defaults."""
        base = QUICK if self.quick else FULL
        return {k: getattr(self, k) if getattr(self, k) is not None else v for k, v in base.items()}

    def generation(self) -> GenerationConfig:
        g = GenerationConfig(
            max_new_tokens=self.resolved()["max_new_tokens"],
            seed=self.seed,
            batch_size=self.batch_size,
            system=self.system,
        )
        g.check()
        return g

    def check(self) -> None:
        """Validate everything that needs neither data nor model (nothing is written before this passes)."""
        r = self.resolved()
        for key in ("train", "val", "limit", "layer_step", "kl_tokens", "batch_size"):
            value = r.get(key, getattr(self, key, None))
            if value is not None and value < 1:
                raise UserError(f"{key} must be at least 1, got {value}")
        if self.positions is not None and self.positions < 1:
            raise UserError(f"positions must be at least 1, got {self.positions}")
        if not 0 < self.max_layer_share <= 1 or not self.kl_max > 0:
            raise UserError("max_layer_share must be in (0, 1] and kl_max above 0 (the paper: 0.8 and 0.1)")
        measure.check_seeds(r["seeds"], quick=self.quick)
        self.generation()
        kind = self.judge.split(":", 1)[0]
        if kind == "keyword" or (kind not in JUDGE_KINDS and kind not in registered_judges()):
            get_judge(self.judge)
        check_output_folder(self.out, self.overwrite)


def split3(ps: PromptSet, sizes: tuple[int, int, int], seed: int) -> tuple[PromptSet, PromptSet, PromptSet]:
    """Three disjoint parts of ``ps`` (train, validation, test) of the given sizes after a seeded shuffle (the
    built-in sets are ordered by category); a one-line error when the set is too small."""
    need = sum(sizes)
    if len(ps) < need:
        raise UserError(
            f"the {ps.name} set {ps.source} has {len(ps)} prompts but train + validation + test need {need}: "
            "pass a larger set or smaller --train / --val / --limit"
        )
    order = np.random.default_rng(seed).permutation(len(ps))
    parts, at = [], 0
    for what, n in zip(("train", "val", "test"), sizes, strict=True):
        picks = tuple(ps.examples[int(i)] for i in order[at : at + n])
        parts.append(PromptSet(f"{ps.name}[{what}]", ps.source, picks))
        at += n
    return parts[0], parts[1], parts[2]


def _spread(ps: PromptSet, n: int) -> PromptSet:
    if n >= len(ps):
        return ps
    return PromptSet(ps.name, ps.source, tuple(ps.examples[int(i * len(ps) / n)] for i in range(n)))


def _prompts(ps: PromptSet) -> list[str]:
    return [ex.prompt for ex in ps]


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Random controls over their seeds: each rate a ControlDistribution, KL the mean of the seeds' means."""
    out: dict[str, Any] = {"seeds": [r["seed"] for r in rows]}
    for key in RATES:
        if all(key in r for r in rows):
            draws = tuple(measure.Proportion.from_dict(r[key]) for r in rows)
            out[key] = measure.ControlDistribution(draws).to_dict()
    for part in ("first", "reply"):
        means = [r["kl"][part]["mean"] for r in rows]
        out.setdefault("kl", {})[part] = {"mean": float(np.mean(means)), "min": min(means), "max": max(means)}
    return out


def _measured(v: dict[str, Any]) -> measure.Proportion | measure.ControlDistribution:
    if "draws" in v:
        return measure.ControlDistribution(tuple(measure.Proportion.from_dict(d) for d in v["draws"]))
    return measure.Proportion.from_dict(v)


def _verdict(effect: dict[str, Any], control: dict[str, Any], key: str, expected: str) -> dict[str, Any] | None:
    if key not in effect or key not in control:
        return None
    comp = measure.compare(_measured(effect[key]), _measured(control[key]))
    return measure.verdict(comp, expected).to_dict()  # type: ignore[arg-type]


def run_direction(cfg: DirectionConfig) -> Path:
    """Choose the refusal direction on the validation split and measure its interventions on the test split."""
    t0 = time.time()
    cfg.check()
    r = cfg.resolved()
    set_seed(cfg.seed)
    sizes = (r["train"], r["val"], r["limit"])
    harmful = load_prompts(cfg.harmful, name="harmful")
    harmless = load_prompts(cfg.harmless, name="harmless")
    if len(harmless) == 0 or len(harmful) == 0:
        raise UserError("the direction needs harmful and harmless prompts: pass non-empty --harmful / --harmless")
    h_train, h_val, h_test = split3(harmful, sizes, cfg.seed)
    b_train, b_val, b_test = split3(harmless, sizes, cfg.seed + 1)
    benign = None if cfg.benign.strip().lower() in ("", "none") else _spread(load_prompts(cfg.benign), r["limit"])
    lm = load_model(cfg.model, **cfg.load_options())
    model, tok = lm.model, lm.tokenizer
    judge = get_judge(cfg.judge, model=model, tokenizer=tok)
    gen = cfg.generation()
    before = measure.weights_digest(model)
    seconds: dict[str, float] = {}

    t = time.time()
    directions = candidate_directions(
        model, tok, _prompts(h_train), _prompts(b_train), positions=cfg.positions, system=cfg.system,
        batch_size=cfg.batch_size,
    )  # fmt: skip
    seconds["directions"] = time.time() - t
    t = time.time()
    sel = select_direction(
        model, tok, directions, _prompts(h_val), _prompts(b_val), system=cfg.system, batch_size=cfg.batch_size,
        kl_max=cfg.kl_max, max_layer_share=cfg.max_layer_share, layer_step=r["layer_step"], progress=cfg.progress,
    )  # fmt: skip
    seconds["selection"] = time.time() - t

    t = time.time()
    reference = kl_reference(
        model, tok, b_test, reply_tokens=cfg.kl_tokens, system=cfg.system, batch_size=cfg.batch_size
    )
    seconds["kl_reference"] = time.time() - t
    seeds = [cfg.seed + i for i in range(r["seeds"])]
    on_harmful = EvalData(harmful=h_test, benign=benign)
    on_harmless = EvalData(benign=b_test)
    Cond = tuple[str, str, int | None, Callable[[], contextlib.AbstractContextManager[Any]], EvalData]
    conditions: list[Cond] = [
        ("baseline", "baseline", None, contextlib.nullcontext, on_harmful),
        ("baseline (harmless)", "baseline-harmless", None, contextlib.nullcontext, on_harmless),
        ("direction ablation", "ablation", None, lambda: ablated_direction(model, sel.direction), on_harmful),
        ("orthogonalised weights", "orthogonalized", None, lambda: orthogonalized(model, sel.direction), on_harmful),
    ]
    for s in seeds:
        rnd = random_direction(sel.direction, s)
        conditions.append((f"random ablation seed {s}", "random", s, _bind(ablated_direction, model, rnd), on_harmful))
    conditions.append(
        ("direction addition", "addition", None, lambda: added_direction(model, sel.direction, sel.layer), on_harmless)
    )
    for s in seeds:
        rnd = random_direction(sel.direction, 10_000 + s)
        add = _bind(added_direction, model, rnd, sel.layer)
        conditions.append((f"random addition seed {s}", "addition-random", s, add, on_harmless))

    from tqdm.auto import tqdm

    rows: list[dict[str, Any]] = []
    kl_seconds = 0.0
    t = time.time()
    for name, group, seed, ctx, data in tqdm(conditions, desc="conditions", disable=not cfg.progress):
        with ctx():
            res = measure.measure_condition(model, tok, data, judge=judge, config=gen)
            kl = kl_divergence(model, tok, reference)
        kl_seconds += kl.seconds
        row: dict[str, Any] = {"name": name, "group": group, "seed": seed, "seconds": round(res.seconds, 3)}
        if data is on_harmful:
            row |= {k: v.to_dict() for k, v in res.rates().items()}
        elif res.overrefusal is not None:
            row["harmless_refusal"] = res.overrefusal.to_dict()
        row["kl"] = kl.to_dict(seed=cfg.seed)
        rows.append(row)
    seconds["evaluation"] = time.time() - t
    seconds["kl"] = kl_seconds

    # exactness of the orthogonalised weights against the hooks, on the harmless test prompts
    with ablated_direction(model, sel.direction):
        hooked = last_logprobs(model, tok, _prompts(b_test), system=cfg.system, batch_size=cfg.batch_size)
    with orthogonalized(model, sel.direction):
        edited = last_logprobs(model, tok, _prompts(b_test), system=cfg.system, batch_size=cfg.batch_size)
    exact = float((hooked - edited).abs().max())
    after = measure.weights_digest(model)
    if after != before:
        raise RuntimeError("an intervention was not undone: the model's weights changed")  # a bug, not input

    by = {x["group"]: x for x in rows if x["group"] not in ("random", "addition-random")}
    rnd_abl = _aggregate([x for x in rows if x["group"] == "random"])
    rnd_add = _aggregate([x for x in rows if x["group"] == "addition-random"])
    table: list[dict[str, Any]] = [
        {
            "condition": "baseline",
            "row": by["baseline"] | {"harmless_refusal": by["baseline-harmless"]["harmless_refusal"]},
        },
        {"condition": "direction ablation", "row": by["ablation"]},
        {"condition": f"random direction ablation ({len(seeds)} seeds)", "row": rnd_abl},
        {"condition": "orthogonalised weights", "row": by["orthogonalized"]},
        {"condition": f"direction addition (layer {sel.layer})", "row": by["addition"]},
        {"condition": f"random direction addition ({len(seeds)} seeds)", "row": rnd_add},
    ]
    base = table[0]["row"]
    verdicts = {
        "ablation_vs_random_asr": _verdict(by["ablation"], rnd_abl, "asr", "higher"),
        "ablation_vs_random_coherent": _verdict(by["ablation"], rnd_abl, "coherent_compliance", "higher"),
        "ablation_vs_baseline_asr": _verdict(by["ablation"], base, "asr", "higher"),
        "addition_vs_random_refusal": _verdict(by["addition"], rnd_add, "harmless_refusal", "higher"),
        "addition_vs_baseline_refusal": _verdict(by["addition"], base, "harmless_refusal", "higher"),
    }
    results: dict[str, Any] = {
        "model": {k: getattr(lm, k) for k in ("name", "source", "fingerprint", "family")},
        "settings": {
            **r,
            **cfg.model_dump(include={"quick", "judge", "kl_max", "max_layer_share", "kl_tokens", "positions"}),
            "seed_list": seeds,
            "generation": dataclasses.asdict(gen),
            "data": {
                ps.name: {"source": ps.source, "examples": len(ps)}
                for ps in (h_train, h_val, h_test, b_train, b_val, b_test, *([benign] if benign else []))
            },
        },
        "selection": sel.summary(),
        "conditions": rows,
        "table": table,
        "verdicts": {k: v for k, v in verdicts.items() if v is not None},
        "orthogonalization": {"max_abs_logprob_difference_vs_hooks": exact},
        "weights": {"sha256_before": before, "unchanged": after == before},
        "seconds": {"load_model": round(lm.load_seconds, 3), **{k: round(v, 3) for k, v in seconds.items()}},
    }
    with RunDir(cfg.out, overwrite=cfg.overwrite) as run:
        run.write_yaml("config.yaml", cfg.model_dump())
        save_direction(run.path, sel, fingerprint=lm.fingerprint, model_name=lm.name, directions=directions)
        results["seconds"]["total"] = round(time.time() - t0, 3)
        run.write_json("results.json", results)
        run.write_text("report.md", render(results, run.path))
        used = {ps.name: {"source": ps.source, "sha256": ps.fingerprint()} for ps in (harmful, harmless)}
        model_info = {k: results["model"][k] for k in ("name", "source", "fingerprint")}
        mf = manifest(command="direction", seed=cfg.seed, started=t0, device=model.device, data=used, model=model_info)
        run.write_json("manifest.json", mf)
    return run.out


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A zero-argument context factory (lambdas in a loop would all see the last seed)."""

    def make() -> Iterator[Any]:
        return fn(*args)  # type: ignore[no-any-return]

    return make  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _cell(entry: dict[str, Any], key: str) -> str:
    if key not in entry:
        return "-"
    v = entry[key]
    lo, hi = v["ci95"]
    seeds = f", {v['seeds']} seeds" if "draws" in v else ""
    return f"{_pct(v['rate'])} [{100 * lo:.0f}, {100 * hi:.0f}{seeds}]"


def _kl_cell(entry: dict[str, Any], part: str) -> str:
    k = entry["kl"][part]
    if "ci95" in k:
        return f"{k['mean']:.3g} [{k['ci95'][0]:.3g}, {k['ci95'][1]:.3g}]"
    return f"{k['mean']:.3g} (seeds {k['min']:.3g}..{k['max']:.3g})"


COLUMNS = "condition|ASR|coherent compliance|over-refusal|refusal of harmless|KL first token|KL reply"


def table_cells(t: dict[str, Any]) -> list[str]:
    e = t["row"]
    return [t["condition"], *(_cell(e, k) for k in RATES), _kl_cell(e, "first"), _kl_cell(e, "reply")]


def verdict_lines(results: dict[str, Any]) -> list[str]:
    """The verdicts in plain sentences (printed by the CLI, listed in the report)."""
    labels = {
        "ablation_vs_random_asr": ("direction ablation vs random-direction ablation, ASR", "random"),
        "ablation_vs_random_coherent": (
            "direction ablation vs random-direction ablation, coherent compliance",
            "random",
        ),
        "ablation_vs_baseline_asr": ("direction ablation vs baseline, ASR", "baseline"),
        "addition_vs_random_refusal": ("direction addition vs random addition, refusal of harmless prompts", "random"),
        "addition_vs_baseline_refusal": ("direction addition vs baseline, refusal of harmless prompts", "baseline"),
    }
    out = []
    for key, v in results["verdicts"].items():
        what, control = labels[key]
        c = v["comparison"]
        lo, hi = c["ci95"]
        extra = f"; about {v['n_needed']} prompts per side would decide it" if v.get("n_needed") else ""
        out.append(
            f"- {what}: {_pct(c['effect'])} vs {control} {_pct(c['control'])}, difference "
            f"{100 * c['difference']:+.1f} points [95% {100 * lo:+.1f}, {100 * hi:+.1f}] -> **{v['verdict']}** "
            f"(expected {v['expected']}: {v['reason']}{extra})"
        )
    return out


def render(results: dict[str, Any], run_dir: Path) -> str:
    """Draw ``plots/asr_vs_kl.png`` from ``results`` and return report.md."""
    _plot(results, Path(run_dir) / "plots")
    m, st, sel = results["model"], results["settings"], results["selection"]
    ch = sel["chosen"]
    filt = (
        f"it passed the filters (induce > 0, KL < {st['kl_max']})"
        if sel["passed_filter"]
        else f"**no candidate passed the filters** (induce > 0, KL < {st['kl_max']}): the best bypass was taken"
    )
    d = st["data"]
    npos = len({c["position"] for c in sel["candidates"]})
    lines = [
        f"# The refusal direction of {m['name']} (Arditi et al. 2024)",
        "",
        f"Difference-in-means directions at every block input and the last {npos} "
        f"post-instruction positions from {d['harmful[train]']['examples']} harmful and "
        f"{d['harmless[train]']['examples']} harmless training prompts; {len(sel['candidates'])} candidates scored on "
        f"{d['harmful[val]']['examples']} + {d['harmless[val]']['examples']} validation prompts (first-token refusal "
        f"log-odds; layers below {100 * st['max_layer_share']:.0f}% of the depth, layer step {st['layer_step']}). "
        f"Chosen: **layer {sel['layer']}, position {sel['position']}** (norm {sel['norm']:.3g}; bypass "
        f"{ch['bypass']:+.2f} vs baseline {sel['baseline']['harmful_refusal_score']:+.2f}, induce {ch['induce']:+.2f}, "
        f"KL {ch['kl']:.3g}); {filt}.",
        "",
        f"Test split: {d['harmful[test]']['examples']} harmful prompts (ASR), "
        f"{d['harmless[test]']['examples']} harmless prompts (refusal under addition; KL), greedy replies of "
        f"{st['generation']['max_new_tokens']} tokens. KL(original || edited) of next-token distributions on the "
        f"harmless test prompts, at the first reply position and averaged over the original model's greedy reply "
        f"({st['kl_tokens']} tokens, teacher-forced); mean over prompts [95% bootstrap interval]. Random controls: "
        f"directions of the same norm, ablated at every layer or added at layer {sel['layer']}, seeds "
        f"{st['seed_list']}." + (" Quick run (small sets: numbers are indicative)." if st["quick"] else ""),
        "",
        judge_line(st["judge"]),
        "",
        markdown_table(COLUMNS.split("|"), [table_cells(t) for t in results["table"]]),
        "",
        "![ASR against KL](plots/asr_vs_kl.png)",
        "",
        "## Verdicts",
        "",
        *verdict_lines(results),
        "",
        f"Orthogonalised weights against the hooks: largest difference of first-token log-probabilities "
        f"{results['orthogonalization']['max_abs_logprob_difference_vs_hooks']:.2g} (float rounding). Weights after "
        f"all conditions: {'bit-identical to before' if results['weights']['unchanged'] else 'CHANGED'}. "
        f"KL cost: {results['seconds']['kl']:.1f} s of {results['seconds']['evaluation']:.0f} s evaluation "
        f"(one teacher-forced forward per harmless prompt per condition); total {results['seconds']['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], folder: Path) -> None:
    """ASR against KL (reply) for every condition measured on harmful prompts (95% whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    first_seed = results["settings"]["seed_list"][0]
    colors = {"baseline": "#2ca02c", "ablation": "#d62728", "random": "#999999", "orthogonalized": "#ff7f0e"}
    for row in results["conditions"]:
        if "asr" not in row:
            continue
        a, k = row["asr"], row["kl"]["reply"]
        ax.errorbar(
            k["mean"], a["rate"],
            xerr=[[k["mean"] - k["ci95"][0]], [k["ci95"][1] - k["mean"]]],
            yerr=[[a["rate"] - a["ci95"][0]], [a["ci95"][1] - a["rate"]]],
            fmt="s" if row["group"] == "orthogonalized" else "o", color=colors.get(row["group"], "#1f77b4"),
            capsize=3, fillstyle="none" if row["group"] == "orthogonalized" else "full",
            markersize=6 if row["group"] == "ablation" else 9,
            label=None if row["group"] == "random" and row["seed"] != first_seed else
            "random directions" if row["group"] == "random" else row["name"],
        )  # fmt: skip
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(original || edited) on harmless prompts (reply mean)")
    ax.set_ylabel("ASR")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=7)
    name = Path(results["model"]["name"])
    ax.set_title(f"{name.parent.name + '/' if name.name == 'model' else ''}{name.name}: refusal direction")
    fig.tight_layout()
    fig.savefig(folder / "asr_vs_kl.png", dpi=110)
    plt.close(fig)
