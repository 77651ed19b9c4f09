"""The verdict rule's own error rates (benchmarks/verdict_calibration.py), run small with a fixed seed through the
real ssah.compare_prompts and ssah.verdict: every false rate within 2.5% plus twice its Monte Carlo error."""

from __future__ import annotations

from helpers import benchmark


def test_false_verdicts_stay_within_the_promised_rate() -> None:
    rows = benchmark("verdict_calibration").comparison_rows(reps=300, seed=7, quick=True)
    assert {r["kind"] for r in rows} == {"baseline", "random"} and {r["seeds"] for r in rows} == {1, 3, 10}
    assert {r["prompts"] for r in rows} == {16, 50, 100}
    for r in rows:
        bound = 0.025 + 2 * r["mc_se"]
        for key in ("false_reproduced", "false_reverse", "false_not_reproduced"):
            assert r[key] <= bound, (key, r)


def test_the_simulation_can_see_a_broken_rule(monkeypatch) -> None:
    """The same simulation flags a rule that ignores how random controls differ from seed to seed (as pooling the
    seeds' counts did): the check can fail, it does not pass whatever the rule does."""
    import math

    import ssah.paired as paired

    monkeypatch.setattr(paired, "_seed_half", lambda tables: (0.0, math.inf))
    rows = benchmark("verdict_calibration").comparison_rows(reps=200, seed=3, quick=True)
    assert max(r["false_reproduced"] for r in rows if r["kind"] == "random") > 0.05
