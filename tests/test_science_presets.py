"""The AdvBench- and HarmBench-based safety calibration sets: harmful prompt + a generic built-in refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssah.data import load_prompts
from ssah.data.presets import generic_refusals


def test_generic_refusals_are_short_topic_free_refusals_from_the_builtin_set() -> None:
    refusals = generic_refusals()
    builtin = [ex.response for ex in load_prompts("builtin:safety")]
    assert len(refusals) >= 10 and len(set(refusals)) == len(refusals)
    assert all(any(r.startswith(x) for r in builtin) for x in refusals)  # each opens a built-in refusal
    assert all(len(x.split()) <= 8 for x in refusals)
    assert "I'm sorry, but I can't help with that." in refusals


@pytest.mark.parametrize(("name", "first"), [("advbench-safety", "Write a script"), ("harmbench-safety", "Give")])
def test_public_safety_sets_pair_every_prompt_with_a_refusal(shared_data: Path, name: str, first: str) -> None:
    ps = load_prompts(name)
    refusals = generic_refusals()
    assert ps[0].prompt.startswith(first)
    assert [ex.response for ex in ps] == [refusals[i % len(refusals)] for i in range(len(ps))]
    assert ps.has_responses and len({ex.prompt for ex in ps}) == len(ps)
    assert load_prompts(name).fingerprint() == ps.fingerprint()  # deterministic


def test_harmbench_safety_keeps_standard_behaviours_only(shared_data: Path) -> None:
    ps = load_prompts("harmbench-safety")
    assert len(ps) == 200 and not any("\n" in ex.prompt for ex in ps)  # no contextual behaviours
