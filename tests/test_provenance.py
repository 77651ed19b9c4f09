"""Verdicts are computed on prompts that chose nothing: the held-out record, its refusal and its caveat."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssah.data import Example, PromptSet
from ssah.errors import UserError
from ssah.provenance import caveat, held_out
from ssah.runs import write_report


def _set(name: str, prompts: list[str]) -> PromptSet:
    return PromptSet(name, "test", tuple(Example(p) for p in prompts))


def test_disjoint_sets_are_recorded_with_their_digests() -> None:
    rec = held_out({"harmful": _set("h", ["a", "b"]), "benign": None}, {"calibration safety": ["c", "d"]})
    assert set(rec["evaluated"]) == {"harmful"} and rec["evaluated"]["harmful"]["prompts"] == 2
    assert len(rec["used"]["calibration safety"]["sha256"]) == 64 and rec["overlap"] == []
    assert caveat({"prompts": rec}) is None


def test_an_overlap_is_refused_in_one_line_or_forced_with_a_caveat() -> None:
    evaluated, used = {"harmful": _set("h", ["a", "b", "c"])}, {"calibration safety": _set("s", ["c", "x"])}
    with pytest.raises(UserError, match="1 of the 3 harmful prompts .* also calibration safety prompts") as e:
        held_out(evaluated, used)
    assert "\n" not in str(e.value) and "--eval-allow-overlap" in str(e.value)
    rec = held_out(evaluated, used, allow_overlap=True)
    assert rec["overlap"] == [{"evaluated": "harmful", "used": "calibration safety", "prompts": 1, "of": 3}]
    assert "1 of 3 harmful prompts are also calibration safety" in str(caveat({"prompts": rec}))


def test_the_report_carries_the_caveat_at_the_top(tmp_path: Path) -> None:
    rec = held_out({"harmful": ["a"]}, {"val": ["a"]}, allow_overlap=True)
    md, _ = write_report(tmp_path, "x", {"prompts": rec}, render=lambda results, folder: "# Title\n\nbody\n")
    lines = md.read_text().splitlines()
    assert lines[0] == "# Title" and lines[2].startswith("**Caveat: verdicts computed on prompts")
    clean, _ = write_report(
        tmp_path, "x", {"prompts": held_out({"h": ["a"]}, {"v": ["b"]})}, render=lambda r, f: "# T\n"
    )
    assert "Caveat" not in clean.read_text()


def test_ablate_refuses_to_evaluate_on_its_calibration_prompts(tmp_path: Path, user_error) -> None:
    out = str(tmp_path / "a")
    args = ["ablate", "tiny-random-llama", "--quick", "--out", out, "--eval-harmful", "builtin:safety"]
    user_error(args, "also calibration safety prompts")
