"""Pure aggregations of the core on constructed inputs, with exact expected values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssah.errors import UserError
from ssah.intervals import wilson_bounds, wilson_interval
from ssah.interventions import SliceReport
from ssah.measure import ControlDistribution, Proportion, compare, t95, verdict
from ssah.probe import MethodValues, Openers, _pair_gaps, gap_steps, later_layers


# -- intervals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857, Table I (Wilson score, method 3) and common textbook values
    [(81, 263, 0.2553, 0.3662), (0, 10, 0.0, 0.2775), (1, 10, 0.0179, 0.4042), (5, 10, 0.2366, 0.7634)],
)
def test_wilson_matches_published_values(k: int, n: int, low: float, high: float) -> None:
    interval = wilson_interval(k, n)
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert wilson_bounds(k, n) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_wilson_is_exact_at_the_ends_and_refuses_bad_counts() -> None:
    assert wilson_bounds(0, 7)[0] == 0.0 and wilson_bounds(7, 7)[1] == 1.0
    for k, n in ((-1, 3), (4, 3), (0, 0)):
        with pytest.raises(UserError, match="0 <= k <= n"):
            wilson_bounds(k, n)


# -- control distributions --------------------------------------------------------------------------------------
def test_control_distribution_of_spread_draws_exact() -> None:
    spread = ControlDistribution((Proportion(0, 40), Proportion(10, 40), Proportion(20, 40)))
    assert spread.rate == pytest.approx(0.25)
    assert spread.sd == pytest.approx(0.25)  # sqrt((0.25^2 + 0 + 0.25^2) / 2)
    # draws without per-prompt outcomes (old runs): the t interval of the seed rates (t95(2) = 4.303) is wider
    # than one draw's Wilson interval and is cut at 0
    assert spread.ci95 == (0.0, pytest.approx(0.25 + 4.303 * 0.25 / math.sqrt(3)))
    assert spread.range95 == (0.0, 1.0)  # one more draw: 0.25 +- 4.303 * 0.25 * sqrt(4/3), cut to [0, 1]
    assert spread.n == 40  # prompts per draw, never 120 (a prompt is not counted once per seed)


def test_control_distribution_of_equal_draws_exact() -> None:
    tight = ControlDistribution((Proportion(10, 40),) * 3)
    assert tight.sd == 0.0
    assert tight.ci95 == pytest.approx(wilson_bounds(10, 40))  # no spread: one draw's Wilson interval
    # the binomial floor: sd = sqrt(p (1 - p) / n) with p = 0.25 and n = 40 draws per seed
    half = t95(2) * math.sqrt(0.25 * 0.75 / 40) * math.sqrt(1 + 1 / 3)
    assert tight.range95 == (0.0, pytest.approx(0.25 + half))
    assert tight.to_dict()["seeds"] == 3 and tight.to_dict()["sd"] == 0.0


# -- result dictionaries ------------------------------------------------------------------------------------------
def test_slice_report_dict_puts_each_share_after_its_total() -> None:
    report = SliceReport(
        gqa="strict",
        units=3,
        units_total=12,
        parameters=30,
        parameters_total=120,
        shared_rows_touched=2,
        shared_rows_taken=1,
        shared_rows_partial=1,
        outside_channels=0,
        inside_channels_without_row=1,
    )
    assert list(report.as_dict().items()) == [
        ("gqa", "strict"),
        ("units", 3),
        ("units_total", 12),
        ("unit_share", 0.25),
        ("parameters", 30),
        ("parameters_total", 120),
        ("parameter_share", 0.25),
        ("shared_rows_touched", 2),
        ("shared_rows_taken", 1),
        ("shared_rows_partial", 1),
        ("outside_channels", 0),
        ("inside_channels_without_row", 1),
    ]
    empty = SliceReport("any", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert empty.unit_share == 0.0 and empty.parameter_share == 0.0


def test_verdict_dict_has_the_comparison_last() -> None:
    v = verdict(compare(Proportion(30, 40), Proportion(10, 40)), "higher")
    d = v.to_dict()
    assert list(d) == ["verdict", "expected", "reason", "n_needed", "comparison"]
    assert d["verdict"] == "reproduced" and d["expected"] == "higher" and d["n_needed"] is None
    assert d["comparison"] == v.comparison.to_dict()
    assert d["comparison"]["difference"] == pytest.approx(0.5)


# -- probe aggregations ------------------------------------------------------------------------------------------
def test_gap_steps_and_later_layers() -> None:
    assert gap_steps(0) == []
    assert gap_steps(5) == [1, 2, 4, 5]
    assert gap_steps(64) == [1, 2, 4, 8, 16, 32, 64]
    assert gap_steps(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert later_layers(30) == list(range(20, 31))  # the last third of 30 blocks
    assert later_layers(2) == [2] and later_layers(1) == [1]


def test_pair_gaps_and_method_gap_exact() -> None:
    openers = Openers(refusal=("No", "Never"), compliance=("Sure",))
    # d[prompt, opener, layer]: 2 harmful then 2 harmless prompts, openers No, Never, Sure; 2 layers
    d = np.array(
        [
            [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]],
            [[1.0, 0.0], [1.0, 0.0], [3.0, 2.0]],
            [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]],
            [[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]],
        ]
    )
    # pair (No, Sure): harmful Sure - No = [[4, 7], [2, 2]] -> mean [3, 4.5]; harmless [[1, 1], [1, 1]] -> [1, 1]
    # pair (Never, Sure): harmful [[2, 5], [2, 2]] -> [2, 3.5]; harmless [[1, 1], [-1, -1]] -> [0, 0]
    assert _pair_gaps(d, openers, 2, baseline=False).tolist() == [[3.0, 4.5], [2.0, 3.5]]
    assert _pair_gaps(d, openers, 2, baseline=True).tolist() == [[2.0, 3.5], [2.0, 3.5]]
    values = MethodValues("contrast", np.array([[1.0, 2.0], [3.0, 6.0]]), np.array([[1.0, 1.0]]), baseline=True)
    assert values.gap.tolist() == [1.0, 3.0]
    assert MethodValues("openers", values.harmful, values.harmless, baseline=False).gap.tolist() == [2.0, 4.0]
