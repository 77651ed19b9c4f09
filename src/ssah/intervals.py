"""Confidence intervals of proportions (Wilson score), a leaf module that evaluation, the measurement core and the
judges' validation share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ssah.errors import UserError

__all__ = ["Z95", "Interval", "wilson_bounds", "wilson_cc_bounds", "wilson_interval"]

Z95 = 1.959963984540054
"""The two-sided 95% normal quantile."""


@dataclass
class Interval:
    """A confidence interval for a proportion (bounds in [0, 1])."""

    low: float
    high: float


def wilson_bounds(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Lower and upper Wilson score bounds of ``k`` successes in ``n`` trials; unlike the normal approximation they
    stay inside [0, 1] and are not empty at 0 or n successes, which small sets often have."""
    if n < 1 or not 0 <= k <= n:
        raise UserError(
            f"a proportion needs 0 <= k <= n and n >= 1, got k={k}, n={n}: pass counts from a non-empty set"
        )
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact ends at 0 and n successes (the formula leaves a rounding residue of about 1e-17 there)
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


def wilson_cc_bounds(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score bounds with continuity correction (Newcombe 1998, "Two-sided confidence intervals for the single
    proportion", Stat. Med. 17:857-872, method 4): slightly wider than :func:`wilson_bounds`, so that each tail
    keeps its 2.5% even where the plain score interval's tail runs a little over (measured in
    ``benchmarks/verdict_calibration.py``). ``k`` may be fractional (a mean over seeds)."""
    if n <= 0 or not 0 <= k <= n:
        raise UserError(
            f"a proportion needs 0 <= k <= n and n >= 1, got k={k}, n={n}: pass counts from a non-empty set"
        )
    p, z2 = k / n, z * z
    lo = 0.0
    if k > 0:
        lo = (2 * n * p + z2 - 1 - z * math.sqrt(max(z2 - 2 - 1 / n + 4 * p * (n * (1 - p) + 1), 0.0))) / (2 * (n + z2))
    hi = 1.0
    if k < n:
        hi = (2 * n * p + z2 + 1 + z * math.sqrt(max(z2 + 2 - 1 / n + 4 * p * (n * (1 - p) - 1), 0.0))) / (2 * (n + z2))
    return max(0.0, lo), min(1.0, hi)


def wilson_interval(k: int, n: int, z: float = 1.96) -> Interval:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% for ``z=1.96``)."""
    return Interval(*wilson_bounds(k, n, z))
