"""SCU stability across safety calibration sets (`ssah units --compare-safety`): the overlap against stratified
random sets of the same count, decided by the one verdict rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssah.data import load_prompts
from ssah.errors import DataError, UserError
from ssah.recipes.units.report import render
from ssah.recipes.units.run import UnitsConfig, overlap_across_safety_sets, run_units, safety_specs
from ssah.units import UnitSet, UnitSpace


def _cfg(tmp_path: Path, **kw) -> UnitsConfig:
    base = {"model": "tiny-random-llama", "out": str(tmp_path / "units"), "limit": 6, "max_length": 128}
    return UnitsConfig.build({**base, "progress": False, **kw})


class _Cats(dict):
    """Stands in for a categorisation: category -> UnitSet and the unit space (what the overlap reads)."""

    space: UnitSpace


def _space() -> UnitSpace:
    from ssah.units import GroupShape

    shapes = [GroupShape(layer, kind, 40) for layer in range(3) for kind in ("attn", "mlp")]
    return UnitSpace(shapes, "neuron", "fp", "m")


def _set(space: UnitSpace, idx: list[int]) -> UnitSet:
    mask = torch.zeros(space.total, dtype=torch.bool)
    mask[idx] = True
    return UnitSet(space, mask, "x")


def _cats(space: UnitSpace, scu: list[int]) -> _Cats:
    empty = _set(space, [])
    cats = _Cats(SCU=_set(space, scu), UCU=empty, CU=empty, RU=empty)
    cats.space = space
    return cats


def test_identical_scu_sets_are_stable_beyond_stratified_chance() -> None:
    space = _space()
    scu = list(range(0, 20)) + list(range(40, 60))  # half of layer 0's attn and mlp
    res = overlap_across_safety_sets({"a": _cats(space, scu), "b": _cats(space, scu)}, seeds=5)
    (pair,) = res["pairs"]
    assert pair["found_again"]["k"] == pair["found_again"]["n"] == 40
    # stratified: random units in the same cells find about half of them again, far above the unstratified 40/240
    assert 0.3 < pair["stratified_control"]["rate"] < 0.7
    assert pair["unstratified_chance"]["rate"] == pytest.approx(40 / 240)
    assert pair["verdict"]["verdict"] == "reproduced" and pair["verdict"]["expected"] == "higher"
    assert res["seeds"] == 5 and "stratified" in res["control"]


def test_scu_in_the_same_cells_but_other_units_are_not_stable() -> None:
    space = _space()
    a = list(range(0, 20)) + list(range(40, 60))
    b = list(range(20, 40)) + list(range(60, 80))  # same layer and kind, none shared
    pair = overlap_across_safety_sets({"a": _cats(space, a), "b": _cats(space, b)}, seeds=5)["pairs"][0]
    assert pair["found_again"]["k"] == 0
    assert pair["verdict"]["verdict"] == "not reproduced"  # below the stratified control


def test_compare_safety_specs_and_bad_settings(tmp_path: Path) -> None:
    assert safety_specs(_cfg(tmp_path)) == []
    cfg = _cfg(tmp_path, compare_safety="builtin:harmful, builtin:safety")
    with pytest.raises(UserError, match="twice"):
        cfg.check()


def test_compared_sets_are_cut_to_the_main_sets_size_evenly() -> None:
    data = load_prompts("builtin:harmful")  # 150, sorted by category (15 each)
    cut = data.spread(30)
    assert len(cut) == 30 and [ex.prompt for ex in cut] == [data[5 * i].prompt for i in range(30)]
    assert {ex.category for ex in cut} == {ex.category for ex in data}
    assert data.spread(500) is data and data.spread(None) is data
    assert cut.name == data.name and cut.source.endswith("(30 evenly spaced of 150)")
    with pytest.raises(DataError, match="at least 1"):
        data.spread(0)


def test_units_run_compares_safety_sets_and_reports_them(tmp_path: Path) -> None:
    # builtin:harmful has no responses: a second safety set that differs from builtin:safety (prompts only)
    result = run_units(_cfg(tmp_path, compare_safety="builtin:harmful"))
    out, res = result.out, result.results
    assert res == json.loads((out / "results.json").read_text())
    cal = res["calibration_sets"]
    assert [s["spec"] for s in cal["sets"]] == ["builtin:safety", "builtin:harmful"]
    assert all(s["examples"] == 6 for s in cal["sets"])
    assert "(6 evenly spaced of 150)" in cal["sets"][1]["source"]  # 6 of 150, spread over the whole set
    (pair,) = cal["pairs"]
    assert (pair["a"], pair["b"]) == ("builtin:safety", "builtin:harmful")
    assert pair["verdict"]["verdict"] in {"reproduced", "not reproduced", "inconclusive"}
    assert pair["found_again"]["n"] == cal["sets"][0]["scu"] == res["categories"]["SCU"]["count"]
    md = render(res, out)
    assert "## Stability across safety calibration sets" in md and "builtin:safety -> builtin:harmful" in md


def test_bad_compare_spec_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="nope"):
        run_units(_cfg(tmp_path, compare_safety="builtin:nope"))
    assert not (tmp_path / "units").exists()


def test_scu_with_another_safety_set_equals_a_full_categorisation_with_it(tiny_llama) -> None:
    """Only the safety pass is rerun for a compared set: the result is the categorisation `find_units` makes."""
    from ssah.models import load_model
    from ssah.recipes.units.run import categorize_model, categorize_with_safety_set

    lm = load_model("tiny-random-llama")
    cfg = UnitsConfig.build({"model": "tiny-random-llama", "limit": 5, "max_length": 64, "progress": False})
    safety, other, utility = (
        load_prompts(n, limit=5) for n in ("builtin:safety", "builtin:harmful", "builtin:utility")
    )
    found = categorize_model(lm, safety, utility, cfg)
    fast = categorize_with_safety_set(lm, other, found, cfg)
    full = categorize_model(lm, other, utility, cfg).categorization
    for c in ("SCU", "UCU", "CU", "RU"):
        assert torch.equal(fast[c].mask, full[c].mask), c
    assert not torch.equal(fast["SCU"].mask, found.categorization["SCU"].mask)  # the safety set matters
