"""The prompt as the unit: paired comparisons (ssah.compare_prompts), random controls as prompts x seeds tables,
and the verdict's "prompts needed to decide"."""

from __future__ import annotations

import random

import pytest

import ssah
from ssah.errors import UserError
from ssah.intervals import wilson_bounds, wilson_cc_bounds
from ssah.measure import ControlDistribution, Proportion, compare, compare_measured, prompts_digest, verdict
from ssah.paired import newcombe_paired


def flags(k: int, n: int, start: int = 0) -> list[bool]:
    """``k`` true flags among ``n``, starting at ``start`` (wrapping)."""
    return [((i - start) % n) < k for i in range(n)]


def test_public_api() -> None:
    assert ssah.compare_prompts is ssah.measure.compare_prompts
    c = ssah.compare_prompts(flags(60, 100), flags(50, 100))
    assert ssah.verdict(c, "higher").verdict in ("reproduced", "inconclusive", "not reproduced")


def test_repeated_seeds_do_not_count_a_prompt_twice() -> None:
    """5 identical draws of 50/100 on the same prompts are one draw's worth of evidence: the control's interval is
    one draw's Wilson interval ([0.404, 0.596]), not the pooled [0.456, 0.544] of 500 prompts."""
    draw = Proportion.of(flags(50, 100), "p")
    five = ControlDistribution((draw,) * 5)
    assert five.ci95 == pytest.approx(wilson_bounds(50, 100))
    assert five.ci95[0] < 0.41 and five.ci95[1] > 0.59
    effect = flags(61, 100, start=30)  # overlaps the control's prompts partly
    one = ssah.compare_prompts(effect, flags(50, 100))
    many = ssah.compare_prompts(effect, [flags(50, 100)] * 5)
    assert many.ci95 == pytest.approx(one.ci95)
    assert many.n_control == one.n_control == 100


def test_seeds_that_disagree_widen_the_interval() -> None:
    effect = flags(60, 100)
    same = ssah.compare_prompts(effect, [flags(40, 100, s) for s in (0, 0, 0, 0)])
    spread = ssah.compare_prompts(effect, [flags(k, 100, s) for k, s in ((20, 0), (60, 7), (30, 3), (50, 11))])
    assert same.difference == pytest.approx(spread.difference)
    assert spread.ci95[1] - spread.ci95[0] > same.ci95[1] - same.ci95[0]
    assert "seed-variance" in spread.method


def test_pairing_tightens_a_correlated_comparison() -> None:
    """The same prompts answered the same way in both arms but for 10: paired is far tighter than unpaired."""
    control = flags(40, 100)
    effect = flags(50, 100)  # every control success is an effect success
    paired = ssah.compare_prompts(effect, control)
    unpaired = compare(Proportion.of(effect), Proportion.of(control))
    assert paired.difference == pytest.approx(unpaired.difference) == pytest.approx(0.1)
    assert paired.ci95[0] > 0 > unpaired.ci95[0]  # paired decides, unpaired cannot
    assert verdict(paired, "higher").verdict == "reproduced"


def test_newcombe_paired_reduces_to_the_unpaired_interval_without_correlation() -> None:
    """With Newcombe's corrected correlation at 0 (ad - bc <= n/2), method 10 paired equals the hybrid score."""
    a, b, c, d = 10, 10, 10, 10  # ad - bc = 0
    lo, hi = newcombe_paired(a, b, c, d, corrected=False)  # method 10: plain Wilson intervals
    ref = compare(Proportion(a + b, 40), Proportion(a + c, 40))
    assert (lo, hi) == pytest.approx(ref.ci95)


@pytest.mark.parametrize(
    ("k", "n", "plain", "corrected"),
    [  # Newcombe 1998 ("Two-sided confidence intervals for the single proportion"), Table II, methods 3 and 4
        (81, 263, (0.2553, 0.3662), (0.2535, 0.3682)),
        (15, 148, (0.0624, 0.1605), (0.0598, 0.1644)),
        (0, 20, (0.0, 0.1611), (0.0, 0.2005)),
        (1, 29, (0.0061, 0.1718), (0.0018, 0.1963)),
    ],
)
def test_wilson_intervals_match_the_published_table(k, n, plain, corrected) -> None:
    assert wilson_bounds(k, n) == pytest.approx(plain, abs=5e-5)
    assert wilson_cc_bounds(k, n) == pytest.approx(corrected, abs=5e-5)


def test_newcombe_paired_properties() -> None:
    lo, hi = newcombe_paired(0, 0, 0, 20)  # nobody yes in either arm
    assert lo < 0 < hi and lo == pytest.approx(-hi)
    lo, hi = newcombe_paired(0, 20, 0, 0)  # everyone yes in arm 1 only
    assert 0.7 < lo < 1 and hi == pytest.approx(1.0)
    with pytest.raises(UserError):
        newcombe_paired(0, 0, 0, 0)


def test_stored_rates_pair_on_their_prompts() -> None:
    h = prompts_digest(["a", "b", "c", "d"])
    e = Proportion.of([True, True, False, True], h)
    back = Proportion.from_dict(e.to_dict())
    assert back.outcomes == e.outcomes and back.prompts == h
    assert compare_measured(e, Proportion.of([False, True, False, True], h)).method.startswith("paired")
    other = Proportion.of([False, True, False, True], prompts_digest(["a", "b", "c", "x"]))
    with pytest.raises(UserError, match="same prompts"):
        compare_measured(e, other)
    with pytest.raises(UserError, match="no per-prompt outcomes"):
        compare_measured(e, Proportion(2, 4))
    with pytest.raises(UserError, match="same prompts"):
        ssah.compare_prompts([True, False], [True, False, True])
    with pytest.raises(UserError, match="different numbers of prompts"):
        ssah.compare_prompts([True, False], [[True, False], [True]])


def test_stored_outcomes_must_match_their_counts() -> None:
    with pytest.raises(UserError, match="outcomes"):
        Proportion(3, 4, (True, False, False, False))
    with pytest.raises(UserError, match="string of 0 and 1"):
        Proportion.from_dict({"k": 1, "n": 2, "outcomes": "1x"})
    assert Proportion.of([True, False]).complement().outcomes == (False, True)


def test_n_needed_counts_the_way_a_small_difference_is_decided() -> None:
    """53 vs 50 of 100 with margin 5 points: deciding needs a half-width of max(|d|, margin - |d|) = 3 points,
    about 2,100 prompts per side (the old target, the margin, printed 739)."""
    v = verdict(compare(Proportion(53, 100), Proportion(50, 100)), "higher")
    assert v.verdict == "inconclusive"
    assert 1900 < v.n_needed < 2300


def test_compare_prompts_finds_a_planted_effect_and_not_a_null() -> None:
    rng = random.Random(0)
    ease = [rng.random() for _ in range(200)]
    control = [[rng.random() < e * 0.6 for e in ease] for _ in range(3)]
    effect = [rng.random() < min(1.0, e * 0.6 + 0.3) for e in ease]
    assert verdict(ssah.compare_prompts(effect, control), "higher").verdict == "reproduced"
    null = [rng.random() < e * 0.6 for e in ease]
    assert verdict(ssah.compare_prompts(null, control), "higher").verdict != "reproduced"
