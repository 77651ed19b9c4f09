"""Localisation methods: the set each picks from constructed evidence, the budget met exactly, user registration,
the stratified control per cell, and evidence computed from a tiny model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssah.arch import get_adapter
from ssah.data.prompt_sets import Example, PromptSet
from ssah.errors import UserError
from ssah.localizers import LOCALIZERS, Evidence, budget_units, register_localizer, top_k
from ssah.localizers.contrast import standardised_difference
from ssah.localizers.model_evidence import ModelEvidence
from ssah.measure import random_control
from ssah.units import UnitSet, UnitSpace


@pytest.fixture(scope="module")
def space(tiny_model: Any) -> UnitSpace:
    model, _ = tiny_model("llama")
    return UnitSpace.from_groups(get_adapter(model).groups(), "neuron")


def test_builtins_are_registered_in_order() -> None:
    assert list(LOCALIZERS) == ["ssah", "wei-snip", "wei-wanda", "activation-contrast", "aligned-vs-base", "random"]
    with pytest.raises(UserError, match="activation-contrast"):
        LOCALIZERS.get("no-such-method")


def test_ssah_takes_top_safety_minus_utility_outside_ru(space: UnitSpace) -> None:
    n = space.total
    ev = Evidence(space)
    s, u = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 1, torch.ones(n)
    s[[3, 7, 11]] = 50.0  # clearly safety-only units
    ev.put(("scores", "fluctuation", "safety"), s)
    ev.put(("scores", "fluctuation", "utility"), u)
    units = LOCALIZERS.get("ssah")(ev, 3)
    assert sorted(units.indices().tolist()) == [3, 7, 11]
    assert len(LOCALIZERS.get("ssah")(ev, 40)) == 40


def test_wei_set_difference_skips_top_utility_units(space: UnitSpace) -> None:
    n = space.total
    ev = Evidence(space)
    s = torch.arange(n, 0, -1, dtype=torch.float64)  # unit 0 most important for safety, then 1, ...
    u = torch.zeros(n, dtype=torch.float64)
    u[[0, 2]] = 10.0  # units 0 and 2 are top utility units: excluded from the safety set ...
    top_p = round(0.05 * n)
    assert top_p > 2
    u[n - (top_p - 2) :] = 5.0  # ... with the last units, which fill the rest of the top-p utility share
    ev.put(("scores", "snip", "safety"), s)
    ev.put(("scores", "snip", "utility"), u)
    units = LOCALIZERS.get("wei-snip")(ev, 4)
    picked = sorted(units.indices().tolist())
    assert 0 not in picked and 2 not in picked
    assert picked == [1, 3, 4, 5]


def test_activation_contrast_ignores_units_large_everywhere(space: UnitSpace) -> None:
    n = space.total
    ev = Evidence(space)
    m_harm, m_safe = torch.zeros(n), torch.zeros(n)
    v = torch.ones(n)
    m_harm[5], m_safe[5] = 1000.0, 999.0  # large on every prompt, small standardised difference vs unit 9 ...
    v[5] = 1e4
    m_harm[9], m_safe[9] = 2.0, -2.0  # ... which separates harmful from harmless prompts
    for key, value in {("mean", "aligned", "harmful"): m_harm, ("mean", "aligned", "harmless"): m_safe}.items():
        ev.put(key, value)
    ev.put(("var", "aligned", "harmful"), v)
    ev.put(("var", "aligned", "harmless"), v)
    assert LOCALIZERS.get("activation-contrast")(ev, 1).indices().tolist() == [9]
    zero = torch.zeros(3)
    assert standardised_difference(torch.ones(3), zero, zero, zero).tolist() == [0.0, 0.0, 0.0]


def test_random_is_seeded_and_exact(space: UnitSpace) -> None:
    ev = Evidence(space)
    fn = LOCALIZERS.get("random")
    a, b, c = fn(ev, 17, 0), fn(ev, 17, 0), fn(ev, 17, 1)
    assert a == b and a != c and len(a) == 17


def test_budgets_and_missing_evidence(space: UnitSpace) -> None:
    assert budget_units(0.5, space) == round(0.5 * space.total)
    with pytest.raises(UserError, match="outside"):
        budget_units(0.0, space)
    with pytest.raises(UserError, match="budget"):
        LOCALIZERS.get("random")(Evidence(space), space.total + 1)
    with pytest.raises(UserError, match="put it first"):
        LOCALIZERS.get("ssah")(Evidence(space), 3)


def test_a_method_that_misses_the_budget_is_a_bug(space: UnitSpace) -> None:
    register_localizer("test-short", lambda ev, k, seed: UnitSet.from_indices(ev.space, list(range(k - 1))))
    with pytest.raises(RuntimeError, match="budget"):
        LOCALIZERS.get("test-short")(Evidence(space), 5)


def test_user_method_through_the_same_call(space: UnitSpace) -> None:
    def last_units(ev: Evidence, k: int, seed: int) -> UnitSet:
        return top_k(torch.arange(ev.space.total, dtype=torch.float64), k, ev.space, name="last")

    register_localizer("test-last-units", last_units, about="the last k units")
    assert "test-last-units" in LOCALIZERS
    got = LOCALIZERS.get("test-last-units")(Evidence(space), 2).indices().tolist()
    assert got == [space.total - 2, space.total - 1]
    with pytest.raises(UserError):
        register_localizer("ssah", last_units)  # a built-in cannot be replaced


def test_stratified_control_keeps_each_cell(space: UnitSpace) -> None:
    ev = Evidence(space)
    ev.put(("scores", "fluctuation", "safety"), torch.rand(space.total, generator=torch.Generator().manual_seed(1)))
    ev.put(("scores", "fluctuation", "utility"), torch.rand(space.total, generator=torch.Generator().manual_seed(2)))
    units = LOCALIZERS.get("ssah")(ev, 30)
    for seed in range(3):
        control = random_control(units, seed).units
        assert control.counts_by_group() == units.counts_by_group()
        assert len(control) == 30


def test_model_evidence_on_a_tiny_model(tiny_model: Any) -> None:
    model, tok = tiny_model("llama")
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron")

    def prompts(name: str, responses: bool) -> PromptSet:
        examples = tuple(Example(f"{name} {i}?", "Sure." if responses else "") for i in range(4))
        return PromptSet(name, f"memory:{name}", examples)

    data = {
        "safety": prompts("safety", True),
        "utility": prompts("utility", True),
        "harmful": prompts("harmful", False),
        "harmless": prompts("harmless", False),
    }
    ev = Evidence(space, ModelEvidence(model, tok, space, data, progress=False))
    for name in ("ssah", "wei-wanda", "activation-contrast"):
        assert len(LOCALIZERS.get(name)(ev, 6)) == 6
    assert ev.has(("scores", "fluctuation", "safety")) and ev.has(("var", "aligned", "harmless"))
    with pytest.raises(UserError, match="--base"):
        LOCALIZERS.get("aligned-vs-base")(ev, 6)


def test_aligned_vs_base_reads_both_models_on_harmful_prompts(space: UnitSpace) -> None:
    n = space.total
    ev = Evidence(space)
    aligned, base = torch.zeros(n), torch.zeros(n)
    aligned[[4, 8]] = 3.0  # these units moved with alignment
    ev.put(("mean", "aligned", "harmful"), aligned)
    ev.put(("mean", "base", "harmful"), base)
    ev.put(("var", "aligned", "harmful"), torch.ones(n))
    ev.put(("var", "base", "harmful"), torch.ones(n))
    loc = LOCALIZERS.get("aligned-vs-base")
    assert loc.needs_base and sorted(loc(ev, 2).indices().tolist()) == [4, 8]
