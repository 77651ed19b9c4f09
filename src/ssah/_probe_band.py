"""The probe's separation verdict: a simultaneous bootstrap band over the later layers, read as runs of layers.

Kept apart from :mod:`ssah.probe` (which re-exports :func:`separation_verdict`) so that the statistics can be read,
tested and calibrated on their own; ``benchmarks/calibration_probe.py`` simulates them.

The band is the **studentised max-statistic (sup-t) bootstrap band** (Montiel Olea & Plagborg-Møller 2019,
"Simultaneous confidence bands: theory, implementation, and an application to SVARs", J. Applied Econometrics
34(1):1-17, section 3; the bootstrap form of the max-|t| statistic, Davison & Hinkley 1997, *Bootstrap Methods and
their Application*, sections 4.2.2 and 5.2). For the bootstrap replicates ``r[b, l]`` of the difference at the later
layers, with point estimate ``m[l]`` and bootstrap standard error ``se[l]``:

1. ``T[b] = max_l |r[b, l] - m[l]| / se[l]`` for every replicate;
2. ``c_z`` = the ``level`` quantile of ``T`` (the ``ceil(level (B + 1))``-th order statistic, Davison & Hinkley
   section 5.2). It is a *central* quantile of the max (the 95% one, with ``(1 - level) B`` replicates beyond it),
   so a few hundred resamples resolve it, unlike a Bonferroni-corrected percentile of every layer (the 0.23% and
   99.77% quantiles for 11 layers, which 400 resamples cannot read);
3. small-sample correction: the bootstrap standard error of a mean over ``n`` prompts is the plug-in one,
   ``sqrt((n-1)/n) s / sqrt(n)``, and a mean studentised by an estimated standard error follows Student's t with
   ``n - 1`` degrees of freedom, not the normal law the bootstrap of the mean approaches. So ``se`` is scaled by
   ``sqrt(n / (n-1))`` and ``c_z`` is moved to the t quantile of the same marginal level (Cornish-Fisher expansion,
   Abramowitz & Stegun 26.7.5; relative error below 1e-3 for 7 or more degrees of freedom at these levels). For a
   difference of two independent means (a content baseline) ``n - 1`` is the smaller sample's, which is
   conservative. Without these two corrections the band's one-sided error was 6-9% at 16 prompts (simulated);
4. band: ``m[l] +- c se[l]``. It covers the true difference at *every* later layer at once with probability
   ``level``, so each of its tails errs at most ``(1 - level) / 2`` over all later layers together.

The verdict reads the band as runs of consecutive later layers, the same rule both ways: *reproduced* needs a run of
``min_run`` later layers whose band lies above zero and none below; *not reproduced* needs a run of ``min_run``
below zero and none above; anything else is *inconclusive*. The band alone bounds each false verdict by
``(1 - level) / 2``; the run makes it smaller still.

The verdict is *inconclusive*, with a reason saying so, below :data:`MIN_VERDICT_PROMPTS` prompts (the smallest
sample the simulation was calibrated at, and where the t correction is accurate) or below :func:`min_resamples`
resamples (fewer than 10 replicates beyond the quantile read); the probe's config refuses too few resamples before
any model is loaded.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "MIN_RESAMPLES",
    "MIN_VERDICT_PROMPTS",
    "min_resamples",
    "separation_verdict",
    "simultaneous_band",
    "t_quantile",
]

MIN_RESAMPLES = 200
"""Fewest bootstrap resamples the verdict reads at ``level`` 0.95: 10 replicates beyond the band's 95% quantile."""

MIN_VERDICT_PROMPTS = 8
"""Fewest prompts (per set) the verdict decides on; below, it is *inconclusive* (simulated false-verdict rates hold
from 8 prompts up, see ``benchmarks/calibration_probe.py``)."""

_BEYOND = 10  # replicates beyond the quantile the band reads


def min_resamples(level: float) -> int:
    """Fewest resamples that leave 10 replicates beyond the ``level`` quantile of the max statistic (200 at 0.95)."""
    return max(MIN_RESAMPLES, math.ceil(_BEYOND / (1 - level) - 1e-9))


def t_quantile(z: float, df: float) -> float:
    """Student's t quantile with ``df`` degrees of freedom at the level where the standard normal quantile is ``z``
    (Cornish-Fisher expansion to the fourth order in ``1 / df``, Abramowitz & Stegun 26.7.5)."""
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def simultaneous_band(
    reps: np.ndarray, point: np.ndarray | None = None, *, level: float = 0.95, prompts: int | None = None
) -> dict[str, Any]:
    """The studentised max-statistic band of the columns of ``reps`` (replicates x layers), see the module doc.

    ``point`` is the estimate the band is centred on (default: the replicates' mean); ``prompts`` the sample size
    of the smaller set, for the small-sample correction (none when not given). Layers whose replicates do not vary
    get a band of zero width at their point. Returns ``lo``, ``hi``, ``critical`` (the multiplier of the standard
    error), ``critical_normal`` (``c_z``) and ``marginal_level`` (the per-layer level the band amounts to).
    """
    reps = np.asarray(reps, dtype=np.float64)
    clean = not np.isnan(reps).any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = (np.mean, np.std) if clean else (np.nanmean, np.nanstd)
        centre = mean(reps, 0) if point is None else np.asarray(point, dtype=np.float64)
        se = std(reps, 0, ddof=1) if reps.shape[0] > 1 else np.zeros(reps.shape[1])
    se = np.nan_to_num(se, nan=0.0)
    varies = se > 1e-12 * np.maximum(1.0, np.abs(centre))
    if varies.any():
        t = np.abs(reps[:, varies] - centre[varies]) / se[varies]
        stat = np.sort((t if clean else np.nan_to_num(t, nan=np.inf)).max(1))
        k = min(len(stat), math.ceil(level * (len(stat) + 1) - 1e-9)) - 1
        c_z = float(stat[max(k, 0)])
    else:
        c_z = NormalDist().inv_cdf((1 + level) / 2)
    c, scale = c_z, 1.0
    if prompts is not None and prompts > 1 and math.isfinite(c_z):
        c, scale = t_quantile(c_z, prompts - 1), math.sqrt(prompts / (prompts - 1))
    half = np.where(varies, c * scale * se, 0.0)
    return {
        "lo": centre - half,
        "hi": centre + half,
        "critical": c,
        "critical_normal": c_z,
        "marginal_level": math.erf(c_z / math.sqrt(2)) if math.isfinite(c_z) else 1.0,
    }


def _longest_run(later: list[int], hits: list[int]) -> int:
    """Longest run of consecutive later layers (in the order given) that are all in ``hits``."""
    run, best = 0, 0
    for layer in later:
        run = run + 1 if layer in hits else 0
        best = max(best, run)
    return best


def _rule(best_up: int, best_down: int, above: list[int], below: list[int], need: int) -> tuple[str, str]:
    """The verdict and its reason from the runs (the same rule both ways)."""
    if best_up >= need and not below:
        return "reproduced", f"a run of {best_up} later layers excludes zero upwards (needed {need}), none downwards"
    if best_down >= need and not above:
        return "not reproduced", (
            f"a run of {best_down} later layers excludes zero downwards (needed {need}), none upwards"
        )
    if above and below:
        return "inconclusive", "the band excludes zero upwards at some later layers and downwards at others"
    return "inconclusive", (
        f"longest run of later layers excluding zero: {best_up} upwards, {best_down} downwards (needed {need})"
    )


def separation_verdict(
    diff_reps: np.ndarray,
    later: Sequence[int],
    *,
    level: float = 0.95,
    min_run: int = 3,
    point: np.ndarray | None = None,
    prompts: int | None = None,
) -> dict[str, Any]:
    """The one verdict on "the aligned model sits above the other" from the paired bootstrap replicates of the
    per-layer difference (``a.reps - b.reps``, replicates x layers; ``later`` indexes its columns).

    The later layers get one simultaneous band (the studentised max-statistic bootstrap band of the module doc,
    centred on ``point[later]`` when the point estimates are given, corrected for ``prompts`` when given).
    *reproduced*: a run of at least ``min_run`` consecutive later layers (all of them when there are fewer) whose
    band lies above zero, and none below; *not reproduced*: such a run below zero, and none above; otherwise
    *inconclusive*. Also *inconclusive*, whatever the band, with fewer than :data:`MIN_VERDICT_PROMPTS` prompts or
    fewer than :func:`min_resamples` replicates (the reason says which).
    """
    later = [int(x) for x in later]
    if not later:
        raise ValueError("separation_verdict needs at least one later layer")
    reps = np.asarray(diff_reps, dtype=np.float64)
    centre = None if point is None else np.asarray(point, dtype=np.float64)[later]
    band = simultaneous_band(reps[:, later], centre, level=level, prompts=prompts)
    lo, hi = band["lo"], band["hi"]
    above = [layer for layer, x in zip(later, lo, strict=True) if x > 0]
    below = [layer for layer, x in zip(later, hi, strict=True) if x < 0]
    best_up, best_down = _longest_run(later, above), _longest_run(later, below)
    need = min(min_run, len(later))
    verdict, reason = _rule(best_up, best_down, above, below, need)
    resamples, enough = reps.shape[0], min_resamples(level)
    if prompts is not None and prompts < MIN_VERDICT_PROMPTS:
        verdict, reason = "inconclusive", f"{prompts} prompts: the verdict needs at least {MIN_VERDICT_PROMPTS}"
    elif resamples < enough:
        verdict, reason = "inconclusive", f"{resamples} bootstrap resamples: the band needs at least {enough}"
    df = f", t with {prompts - 1} df" if prompts is not None and prompts > 1 else ""
    return {
        "verdict": verdict,
        "reason": reason,
        "layers_tested": later,
        "level": level,
        "corrected_level": round(band["marginal_level"], 6),
        "critical_value": round(band["critical"], 4),
        "multiplicity": (
            f"simultaneous studentised max-|t| bootstrap band over {len(later)} later layers "
            f"(critical value {band['critical']:.2f}{df})"
        ),
        "min_run": need,
        "longest_run": best_up,
        "longest_run_below": best_down,
        "above": above,
        "below": below,
        "prompts": prompts,
        "resamples": resamples,
        "lo": np.round(lo, 6).tolist(),
        "hi": np.round(hi, 6).tolist(),
    }
