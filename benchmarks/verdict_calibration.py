"""The verdict rule's own error rates, measured by simulation through the real code.

A verdict says *reproduced* when the 95% interval of the difference to the control excludes zero in the published
direction, so a false *reproduced* should happen at most 2.5% of the time. This script checks that promise for
every kind of comparison ssah makes:

- **baseline**: an effect against a fixed condition on the same prompts (one outcome per prompt each), through
  ``ssah.compare_prompts`` and ``ssah.verdict``;
- **random control**: an effect against a random control measured on the same prompts with 3, 5 or 10 seeds
  (a prompts x seeds table), same functions;
- **probe**: the probe's simultaneous band over the later layers (``benchmarks/calibration_probe.py``, through
  ``ssah.probe``'s verdict).

Simulated world: prompts differ in how easily they flip (a prompt effect on the logit scale, sd ``prompt_sd``),
random controls differ in strength (a seed effect, sd ``seed_sd``), outcomes are 0/1 per prompt. Under the null
the effect's rate on every prompt equals the control's mean over all possible seeds (exactly, by Gauss-Hermite
quadrature), so any *reproduced* is false. At a true difference of +margin (5 points) any *not reproduced* is
false. Power is the rate of *reproduced* at true differences of 10, 20 and 30 points. ``mc_se`` is the Monte Carlo
standard error of a 2.5% rate at that many repetitions.

Run: ``python benchmarks/verdict_calibration.py`` (about 15 minutes on 2 cores; ``--quick`` about 2 minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import ssah
from ssah.measure import verdict

MARGIN = 0.05
POWER_AT = (0.10, 0.20, 0.30)
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(24)


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _mixed(logit: np.ndarray, seed_sd: float) -> np.ndarray:
    """E_u[expit(logit + u)] for u ~ N(0, seed_sd^2): a prompt's rate averaged over all possible seeds."""
    if seed_sd == 0:
        return _expit(logit)
    u = math.sqrt(2.0) * seed_sd * _GH_X
    return (_expit(logit[..., None] + u) * _GH_W).sum(-1) / math.sqrt(math.pi)


def _population_rate(mu: float, prompt_sd: float, seed_sd: float, shift: float = 0.0) -> float:
    """The population rate E_b E_u expit(mu + shift + b + u), b ~ N(0, prompt_sd^2)."""
    b = math.sqrt(2.0) * prompt_sd * _GH_X
    return float((_mixed(mu + shift + b, seed_sd) * _GH_W).sum() / math.sqrt(math.pi))


def _base_logit(rate: float, prompt_sd: float, seed_sd: float) -> float:
    """mu whose population rate is ``rate`` (bisection)."""
    lo, hi = -12.0, 12.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _population_rate(mid, prompt_sd, seed_sd) < rate else (lo, mid)
    return (lo + hi) / 2


def _shift_for(diff: float, mu: float, prompt_sd: float, seed_sd: float) -> float:
    """The effect's logit shift whose population rate is the control's plus ``diff``."""
    target = _population_rate(mu, prompt_sd, seed_sd) + diff
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _population_rate(mu, prompt_sd, seed_sd, mid) < target else (lo, mid)
    return (lo + hi) / 2


def _verdicts(
    rng: np.random.Generator, *, prompts: int, seeds: int, prompt_sd: float, seed_sd: float, mu: float,
    shift: float, reps: int,
) -> dict[str, int]:  # fmt: skip
    """Counts of each verdict (and of intervals excluding zero downwards) over ``reps`` simulated experiments."""
    counts = {"reproduced": 0, "not reproduced": 0, "inconclusive": 0, "reverse": 0}
    for _ in range(reps):
        b = rng.normal(0.0, prompt_sd, prompts)
        u = rng.normal(0.0, seed_sd, seeds) if seeds > 1 else np.zeros(1)
        control = rng.random((seeds, prompts)) < _expit(mu + b[None, :] + u[:, None])
        effect = rng.random(prompts) < _mixed(mu + shift + b, seed_sd if seeds > 1 else 0.0)
        ctl = control[0].tolist() if seeds == 1 else control.tolist()
        v = verdict(ssah.compare_prompts(effect.tolist(), ctl), "higher", margin=MARGIN)
        counts[v.verdict] += 1
        counts["reverse"] += v.comparison.ci95[1] < 0
    return counts


def scenarios(quick: bool) -> list[dict[str, Any]]:
    """The grid: kind (baseline / random control) x prompts x seeds x prompt and seed heterogeneity x base rate."""
    prompts = (16, 50, 100) if quick else (16, 50, 100, 400)
    rates = (0.1, 0.5)
    out: list[dict[str, Any]] = []
    for n, psd, rate in itertools.product(prompts, (0.0, 1.5), rates):
        out.append({"kind": "baseline", "prompts": n, "seeds": 1, "prompt_sd": psd, "seed_sd": 0.0, "rate": rate})
        for m in (3, 10) if quick else (3, 5, 10):
            out.append({"kind": "random", "prompts": n, "seeds": m, "prompt_sd": psd, "seed_sd": 0.5, "rate": rate})
    return out


def comparison_rows(*, reps: int, seed: int, quick: bool = False) -> list[dict[str, Any]]:
    """One row per scenario: false reproduced and false reverse under the null, false not reproduced at a true
    difference of +margin, power at :data:`POWER_AT` (skipped with ``quick``), with the Monte Carlo error."""
    rng = np.random.default_rng(seed)
    rows = []
    for sc in scenarios(quick):
        sd = sc["seed_sd"] if sc["seeds"] > 1 else 0.0
        mu = _base_logit(sc["rate"], sc["prompt_sd"], sd)
        kw = {"prompts": sc["prompts"], "seeds": sc["seeds"], "prompt_sd": sc["prompt_sd"], "seed_sd": sd, "mu": mu}
        null = _verdicts(rng, shift=0.0, reps=reps, **kw)
        at_margin = _verdicts(rng, shift=_shift_for(MARGIN, mu, sc["prompt_sd"], sd), reps=reps, **kw)
        row = {
            **sc,
            "reps": reps,
            "false_reproduced": null["reproduced"] / reps,
            "false_reverse": null["reverse"] / reps,
            "false_not_reproduced": at_margin["not reproduced"] / reps,
            "mc_se": math.sqrt(0.025 * 0.975 / reps),
        }
        for diff in () if quick else POWER_AT:
            alt = _verdicts(rng, shift=_shift_for(diff, mu, sc["prompt_sd"], sd), reps=max(reps // 4, 50), **kw)
            row[f"power_{round(diff * 100)}"] = alt["reproduced"] / max(reps // 4, 50)
        rows.append(row)
    return rows


def probe_rows(*, reps: int, seed: int, quick: bool = False) -> list[dict[str, Any]]:
    """The probe band's rows, from ``benchmarks/calibration_probe.py`` beside this file."""
    path = Path(__file__).with_name("calibration_probe.py")
    spec = importlib.util.spec_from_file_location("calibration_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.probe_rows(reps=reps, seed=seed, quick=quick))


def _table(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "reps"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) and not float(v).is_integer() else str(v) for v in r.values()]
        lines.append("| " + " | ".join(c for k, c in zip(r, cells, strict=True) if k != "reps") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2000, help="Simulated experiments per scenario and truth.")
    ap.add_argument("--probe-reps", type=int, default=1000, help="Simulated probe runs per scenario.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="A smaller grid and no power rows.")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = comparison_rows(reps=args.reps, seed=args.seed, quick=args.quick)
    probe = probe_rows(reps=args.probe_reps, seed=args.seed, quick=args.quick)
    print(f"Comparisons ({args.reps} simulated experiments per scenario; a false rate should be <= 0.025):\n")
    print(_table(rows))
    print(f"\nProbe band ({args.probe_reps} simulated runs per scenario):\n")
    print(_table(probe))
    worst = max(max(r["false_reproduced"], r["false_reverse"], r["false_not_reproduced"]) for r in rows)
    print(f"\nworst false rate over comparisons: {worst:.3f}; {time.time() - t0:.0f} s")
    return {"comparisons": rows, "probe": probe}


if __name__ == "__main__":
    main(sys.argv[1:])
