"""Calibration of the probe's separation verdict (``ssah.probe.separation_verdict``) by simulation.

Two models are measured on the same prompts (paired): per prompt and later layer each has a gap value. Their
difference is simulated as a prompt random effect (a share ``prompt_effect`` of its variance, the same at every
layer) plus an AR(1) series over the later layers (correlation ``rho`` between adjacent layers), with unit variance,
plus the true difference ``effect`` (in standard deviations of the per-prompt difference) at every later layer. The
two models also share a common per-prompt component (the prompts' own gap), which pairing cancels. ``noise``
``skewed`` draws the prompt effect from a centred exponential (a skewed sample mean) instead of a normal.

Every simulated data set goes through the recipe's own statistics (``ssah.recipes.probe.run.analyse``): shared
resampling indices from ``bootstrap_indices``, ``estimate`` on each model, then ``separation_verdict`` on
``a.reps - b.reps`` with the point difference and the number of prompts. 11 later layers (those of a 30-block model)
are simulated; the earlier layers play no part in the verdict. The fewer resamples of a scenario are the first
rows of the same index matrix (rows are independent draws), and one data set serves every effect size (``effect``
added to model ``a``'s values, which shifts its mean and every bootstrap replicate by ``effect`` exactly), so
scenarios differ only in what they vary.

Per scenario: under the null (``effect`` 0) the rates of a false *reproduced* and a false *not reproduced*, each
promised at most ``(1 - level) / 2`` = 2.5%; under an alternative the power (rate of *reproduced*) and the rate of
the wrong *not reproduced*. ``mc_se`` is the Monte Carlo standard error of the row: for a null row at the larger of
its false rates and the nominal 2.5% (so a rate within ``0.025 + 2 mc_se`` is consistent with the promise), for an
alternative at its power; ``mc_se_false_reproduced``, ``mc_se_false_not_reproduced`` and ``mc_se_power`` give each
rate's own (``None`` where the rate is not defined).

    python benchmarks/calibration_probe.py          # the full grid, 1000 simulated data sets per scenario (minutes)
    python benchmarks/calibration_probe.py --quick  # a small grid (16 prompts), about 15 s
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any, NamedTuple

import numpy as np

from ssah.probe import bootstrap_indices, estimate, separation_verdict

LATER = 11  # later layers of a 30-block model (ssah.probe.later_layers(30))
NOMINAL = 0.025  # each false verdict's promised rate: (1 - level) / 2 at level 0.95
LEVEL = 0.95
PROMPT_EFFECT = 0.3  # share of the per-prompt difference's variance that is the same at every later layer


class Grid(NamedTuple):  # not a dataclass: loaded by file path (importlib), the module may not be in sys.modules
    """The scenarios simulated: every combination, each effect size (in sd of the per-prompt difference)."""

    prompts: tuple[int, ...]
    resamples: tuple[int, ...]
    rho: tuple[float, ...]
    noise: tuple[str, ...]
    effects: tuple[float, ...]


FULL = Grid((8, 16, 50), (200, 400, 1000), (0.5, 0.9), ("normal", "skewed"), (0.3, 0.6, 1.0))
QUICK = Grid((16,), (200, 400), (0.5, 0.9), ("normal",), (0.6,))


def _ar1(rng: np.random.Generator, n: int, rho: float) -> np.ndarray:
    """``(n, LATER)`` standard-normal AR(1) series over the later layers (correlation ``rho`` between neighbours)."""
    e = rng.standard_normal((n, LATER))
    out = np.empty_like(e)
    out[:, 0] = e[:, 0]
    s = math.sqrt(1 - rho**2)
    for layer in range(1, LATER):
        out[:, layer] = rho * out[:, layer - 1] + s * e[:, layer]
    return out


def simulate(rng: np.random.Generator, n: int, rho: float, noise: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt gap values ``(n, LATER)`` of models ``a`` and ``b`` on the same prompts, equal in expectation;
    ``a - b`` has unit variance at every layer."""
    u = rng.exponential(size=(n, 1)) - 1.0 if noise == "skewed" else rng.standard_normal((n, 1))
    diff = math.sqrt(PROMPT_EFFECT) * u + math.sqrt(1 - PROMPT_EFFECT) * _ar1(rng, n, rho)
    shared = 0.2 + 0.5 * rng.standard_normal((n, 1)) + 0.5 * _ar1(rng, n, 0.9)  # the prompts' own gap
    return shared + diff, shared


Counts = dict[tuple[int, float], dict[str, int]]


def _tally(
    rng: np.random.Generator,
    n: int,
    rho: float,
    noise: str,
    resamples: tuple[int, ...],
    effects: tuple[float, ...],
    reps: int,
) -> Counts:
    """Verdict counts per (resamples, effect) over ``reps`` simulated data sets."""
    later = list(range(LATER))
    counts = {(b, d): {"reproduced": 0, "not reproduced": 0} for b in resamples for d in (0.0, *effects)}
    for _ in range(reps):
        a, b = simulate(rng, n, rho, noise)
        idx = bootstrap_indices(n, max(resamples), rng)  # shared by both models, as in the recipe
        ea, eb = estimate(a, idx, level=LEVEL), estimate(b, idx, level=LEVEL)
        diff, point = ea.reps - eb.reps, ea.mean - eb.mean
        for effect in (0.0, *effects):
            # estimate(a + effect, idx) is estimate(a, idx) shifted by effect (a mean), replicates and point alike
            for nb in resamples:
                v = separation_verdict(diff[:nb] + effect, later, level=LEVEL, point=point + effect, prompts=n)
                v = v["verdict"]
                if v in counts[nb, effect]:
                    counts[nb, effect][v] += 1
    return counts


def _se(p: float, reps: int) -> float:
    return math.sqrt(p * (1 - p) / reps)


def _row(scenario: dict[str, Any], effect: float, count: dict[str, int], reps: int) -> dict[str, Any]:
    rep, notrep = count["reproduced"] / reps, count["not reproduced"] / reps
    row: dict[str, Any] = {**scenario, "effect": effect, "reps": reps}
    null = effect == 0
    row |= {"false_reproduced": rep if null else None, "false_not_reproduced": notrep, "power": None if null else rep}
    row["mc_se"] = _se(max(rep, notrep, NOMINAL), reps) if null else _se(rep, reps)
    row["mc_se_false_reproduced"] = _se(rep, reps) if null else None
    row["mc_se_false_not_reproduced"] = _se(notrep, reps)
    row["mc_se_power"] = None if null else _se(rep, reps)
    return row


def probe_rows(*, reps: int, seed: int, quick: bool = False) -> list[dict[str, Any]]:
    """One row per (prompts, resamples, rho, noise, effect): the verdict's error rates (null, ``effect`` 0) or
    power (``effect`` > 0) over ``reps`` simulated data sets, with Monte Carlo standard errors (see the module doc).
    ``quick``: 16 prompts, 200 and 400 resamples, normal noise, one effect size."""
    grid = QUICK if quick else FULL
    effects = grid.effects
    rng = np.random.default_rng(seed)
    rows = []
    for n in grid.prompts:
        for rho in grid.rho:
            for noise in grid.noise:
                counts = _tally(rng, n, rho, noise, grid.resamples, effects, reps)
                for nb in grid.resamples:
                    scenario: dict[str, Any] = {"prompts": n, "resamples": nb, "rho": rho}
                    scenario |= {"prompt_effect": PROMPT_EFFECT}
                    scenario |= {"noise": noise, "later_layers": LATER}
                    for effect in (0.0, *effects):
                        rows.append(_row(scenario, effect, counts[nb, effect], reps))
    return sorted(rows, key=lambda r: (r["effect"] > 0, r["prompts"], r["resamples"], r["rho"], r["noise"]))


def _pct(p: float | None, se: float | None = None) -> str:
    if p is None:
        return "-"
    return f"{100 * p:.1f}%" + (f" ± {100 * se:.1f}" if se is not None else "")


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (rates with their Monte Carlo standard errors, in points)."""
    header = ["prompts", "resamples", "rho", "noise", "effect (sd)", "false reproduced", "false not reproduced"]
    header.append("power")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["prompts"]),
            str(r["resamples"]),
            f"{r['rho']:g}",
            r["noise"],
            f"{r['effect']:g}",
            _pct(r["false_reproduced"], r["mc_se_false_reproduced"]),
            _pct(r["false_not_reproduced"], r["mc_se_false_not_reproduced"]),
            _pct(r["power"], r["mc_se_power"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=None, help="simulated data sets per scenario (1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small grid: 16 prompts, 200/400 resamples")
    args = parser.parse_args(argv)
    reps = args.reps if args.reps is not None else 1000
    t = time.time()
    rows = probe_rows(reps=reps, seed=args.seed, quick=args.quick)
    print(
        f"Probe verdict calibration: {reps} simulated data sets per scenario, {LATER} later layers, level {LEVEL}, "
        f"prompt effect {PROMPT_EFFECT}, seed {args.seed}; each false rate is promised at most {NOMINAL:.1%} "
        "(± = Monte Carlo standard error, in points).\n"
    )
    print(table(rows))
    worst = max(max(r["false_reproduced"] or 0, r["false_not_reproduced"] or 0) for r in rows)
    print(f"\nLargest false rate: {worst:.2%}. Took {time.time() - t:.1f} s.")
    return rows


if __name__ == "__main__":
    main()
