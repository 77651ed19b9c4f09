"""benchmarks/calibration_probe.py, small and seeded: the probe verdict's false rates hold their promise."""

from __future__ import annotations

from helpers import benchmark


def test_probe_verdict_false_rates_within_the_promise_and_power_is_reported() -> None:
    bench = benchmark("calibration_probe")
    reps = 300
    rows = bench.probe_rows(reps=reps, seed=0, quick=True)
    null = [r for r in rows if r["effect"] == 0]
    alt = [r for r in rows if r["effect"] > 0]
    assert {(r["resamples"], r["rho"]) for r in null} == {(200, 0.5), (200, 0.9), (400, 0.5), (400, 0.9)}
    assert len(alt) == len(null) and all(r["prompts"] == 16 and r["later_layers"] == 11 for r in rows)
    for r in null:
        assert r["power"] is None and r["mc_se"] > 0 and r["reps"] == reps
        for rate in ("false_reproduced", "false_not_reproduced"):
            assert r[rate] <= 0.025 + 2 * r["mc_se"], (rate, r)
    for r in alt:
        assert r["false_reproduced"] is None and r["false_not_reproduced"] <= 0.025 + 2 * r["mc_se_power"]
        assert 0.1 < r["power"] < 1 and r["mc_se"] > 0  # an effect of 0.6 sd at 16 prompts: detectable, not always


def test_main_prints_a_markdown_table(capsys) -> None:
    rows = benchmark("calibration_probe").main(["--quick", "--reps", "20", "--seed", "1"])
    out = capsys.readouterr().out
    assert out.count("\n| 16 |") == len(rows) == 8 and "false not reproduced" in out and "Largest false rate" in out
