"""The measurement core: proportions, comparisons, the verdict rule, selections, stratified controls, weights."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import measured
from ssah.data import Example
from ssah.errors import UserError
from ssah.evaluate import Sample
from ssah.measure import (
    ControlDistribution,
    Proportion,
    answer_accuracy,
    answered,
    check_seeds,
    compare,
    compare_measured,
    compare_stored,
    over_seeds,
    parse_selection,
    random_control,
    restored_weights,
    select,
    stored_measurement,
    t95,
    verdict,
    weights_digest,
)
from ssah.units import GroupShape, UnitSet, UnitSpace


def _space() -> UnitSpace:
    # 3 layers, attention 8 channels, MLP 12 neurons: 60 units
    shapes = []
    for layer in range(3):
        shapes += [GroupShape(layer, "attn", 8), GroupShape(layer, "mlp", 12)]
    return UnitSpace(shapes, "neuron")


# -- proportions ----------------------------------------------------------------------------------------------
def test_proportion_wilson_matches_known_values() -> None:
    p = Proportion(0, 10)
    lo, hi = p.ci95
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)  # Wilson upper bound at 0/10
    assert Proportion(0, 3).ci95[0] == 0.0 and Proportion(3, 3).ci95[1] == 1.0  # exact at the ends
    lo, hi = Proportion(5, 10).ci95
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert Proportion(3, 4).to_dict()["k"] == 3 and Proportion.from_dict(Proportion(3, 4).to_dict()) == Proportion(3, 4)
    assert Proportion.of([True, False, True, True]) == Proportion(3, 4)


@pytest.mark.parametrize(("k", "n"), [(-1, 5), (6, 5), (0, 0), (1.5, 4), (True, 3)])
def test_proportion_rejects_bad_counts(k: object, n: object) -> None:
    with pytest.raises(UserError):
        Proportion(k, n)  # type: ignore[arg-type]


def test_control_distribution_widens_with_seed_spread() -> None:
    tight = ControlDistribution((Proportion(10, 40), Proportion(10, 40), Proportion(10, 40)))
    spread = ControlDistribution((Proportion(0, 40), Proportion(10, 40), Proportion(20, 40)))
    assert tight.rate == pytest.approx(spread.rate)
    assert spread.ci95[1] - spread.ci95[0] > tight.ci95[1] - tight.ci95[0]
    assert spread.range95[1] > spread.ci95[1]  # a single new draw varies more than the mean
    assert tight.to_dict()["seeds"] == 3 and tight.to_dict()["n"] == 40  # prompts per draw, not 120
    with pytest.raises(UserError):
        ControlDistribution(())


def test_t_quantiles_are_monotone() -> None:
    assert t95(1) > t95(2) > t95(4) > t95(30) > 1.96
    assert t95(11) == t95(10)  # conservative between table rows


# -- comparisons and the verdict rule --------------------------------------------------------------------------
def test_compare_directions() -> None:
    assert compare(Proportion(30, 32), Proportion(2, 32)).direction == "higher"
    assert compare(Proportion(2, 32), Proportion(30, 32)).direction == "lower"
    c = compare(Proportion(16, 32), Proportion(15, 32))
    assert c.direction == "no difference" and c.ci95[0] < c.difference < c.ci95[1]
    assert c.difference == pytest.approx(1 / 32)


def test_newcombe_interval_matches_published_example() -> None:
    # Newcombe (1998), method 10, example (h): 56/70 vs 48/80 -> difference 0.2, 95% CI 0.0524 to 0.3339
    c = compare(Proportion(56, 70), Proportion(48, 80))
    assert c.difference == pytest.approx(0.2)
    assert c.ci95[0] == pytest.approx(0.0524, abs=2e-3) and c.ci95[1] == pytest.approx(0.3339, abs=2e-3)


def test_verdict_reproduced() -> None:
    v = verdict(compare(Proportion(28, 32), Proportion(3, 32)), "higher")
    assert v.verdict == "reproduced" and v.n_needed is None


def test_verdict_not_reproduced_other_way() -> None:
    v = verdict(compare(Proportion(3, 32), Proportion(28, 32)), "higher")
    assert v.verdict == "not reproduced" and "other way" in v.reason


def test_verdict_not_reproduced_narrow_around_zero() -> None:
    v = verdict(compare(Proportion(500, 10000), Proportion(505, 10000)), "higher", margin=0.05)
    assert v.verdict == "not reproduced" and "within" in v.reason


def test_verdict_inconclusive_says_n_needed() -> None:
    c = compare(Proportion(10, 32), Proportion(7, 32))
    v = verdict(c, "higher")
    assert v.verdict == "inconclusive" and v.n_needed is not None and v.n_needed > 32
    # with that many items per side the half-width is about the observed difference
    half = (c.ci95[1] - c.ci95[0]) / 2
    assert v.n_needed == math.ceil(32 * (half / abs(c.difference)) ** 2)


def test_verdict_against_a_control_distribution() -> None:
    controls = ControlDistribution(tuple(Proportion(k, 32) for k in (2, 4, 3, 5, 3)))
    assert verdict(compare(Proportion(28, 32), controls), "higher").verdict == "reproduced"
    wild = ControlDistribution(tuple(Proportion(k, 32) for k in (0, 30, 2)))
    assert verdict(compare(Proportion(20, 32), wild), "higher").verdict == "inconclusive"


def test_verdict_lower_direction_and_bad_input() -> None:
    c = compare(Proportion(1, 40), Proportion(20, 40))
    assert verdict(c, "lower").verdict == "reproduced"
    assert verdict(c, "higher").verdict == "not reproduced"
    with pytest.raises(UserError):
        verdict(c, "up")  # type: ignore[arg-type]


# -- selections ------------------------------------------------------------------------------------------------
def _sets(space: UnitSpace) -> dict[str, UnitSet]:
    labels = torch.arange(space.total) % 4  # 15 units each
    names = ("SCU", "UCU", "CU", "RU")
    return {n: UnitSet(space, labels == i, n) for i, n in enumerate(names)}


def test_selection_shares_of_all_units_vs_of_category() -> None:
    space = _space()
    sets = _sets(space)
    ranking = torch.arange(space.total, dtype=torch.float64)  # higher index = more safety-critical
    sel = select(sets, ranking, "SCU,CU@10%")
    assert sel.counts == {"SCU": 15, "CU@10%": 6}  # 10% of all 60 units, taken from CU
    cu_taken = sel.units.mask & sets["CU"].mask
    assert cu_taken.nonzero().flatten().tolist() == [38, 42, 46, 50, 54, 58]  # the top-ranked CU units
    sel_cu = select(sets, ranking, "CU@20%cu")
    assert sel_cu.counts == {"CU@20%cu": 3}  # 20% of the 15 CU units
    assert select(sets, ranking, "CU@100%").counts == {"CU@100%": 15}  # capped at the category's size
    assert sel.summary()["share_of_units"] == pytest.approx(21 / 60)


@pytest.mark.parametrize("spec", ["CU@150%", "XYZ@1%", "CU@0", "CU@6%ru", "", "CU@-3%", "SCU;CU"])
def test_selection_bad_specs(spec: str) -> None:
    with pytest.raises(UserError):
        parse_selection(spec)


def test_parse_selection_forms() -> None:
    items = parse_selection("scu, CU@0.06, RU@50%ru")
    assert [(i.category, i.share, i.of) for i in items] == [
        ("SCU", None, "all"),
        ("CU", 0.06, "all"),
        ("RU", 0.5, "category"),
    ]


# -- controls --------------------------------------------------------------------------------------------------
def test_stratified_control_keeps_count_per_layer_and_kind() -> None:
    space = _space()
    target = torch.zeros(space.total, dtype=torch.bool)
    target[space.group_slice(2, "mlp")] = torch.tensor([True] * 5 + [False] * 7)
    target[space.group_slice(0, "attn").start] = True
    units = UnitSet(space, target, "SCU")
    for seed in range(5):
        ctl = random_control(units, seed)
        assert ctl.units.counts_by_group() == units.counts_by_group()
        assert ctl.counts == {"2.mlp": 5, "0.attn": 1}
    assert random_control(units, 3).units == random_control(units, 3).units  # reproducible
    assert random_control(units, 3).units != random_control(units, 4).units
    loose = random_control(units, 0, strata="none")
    assert len(loose.units) == len(units) and loose.counts == {"all": 6}
    excl = random_control(units, 1, exclude=units)
    assert not (excl.units.mask & units.mask).any()


def test_control_matched_on_score_quantile() -> None:
    space = _space()
    scores = torch.arange(space.total, dtype=torch.float64)
    target = torch.zeros(space.total, dtype=torch.bool)
    sl = space.group_slice(1, "mlp")
    target[sl.stop - 3 : sl.stop] = True  # the top 3 scores of that module
    units = UnitSet(space, target, "top")
    ctl = random_control(units, 0, match_scores=scores, bins=2, exclude=units)
    picked = ctl.units.mask.nonzero().flatten()
    assert picked.numel() == 3 and all(sl.stop - 6 <= int(i) < sl.stop - 3 for i in picked)  # same top half


def test_control_errors() -> None:
    space = _space()
    units = UnitSet(space, torch.ones(space.total, dtype=torch.bool), "all")
    with pytest.raises(UserError):
        random_control(units, 0, strata="diagonal")
    with pytest.raises(UserError):
        random_control(units, 0, exclude=units)
    with pytest.raises(UserError):
        random_control(units, -1)
    with pytest.raises(UserError):
        check_seeds(2, quick=True)
    with pytest.raises(UserError):
        check_seeds(0, quick=True)
    assert check_seeds(3, quick=True) == 3
    with pytest.raises(UserError):
        check_seeds(4, quick=False)


# -- weights ---------------------------------------------------------------------------------------------------
def test_restored_weights_undoes_training_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    before = weights_digest(model)
    with restored_weights(model):
        model[0].weight.requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        assert weights_digest(model) != before
    assert weights_digest(model) == before
    assert model[0].weight.requires_grad is False and model[1].weight.grad is None


def test_restored_weights_on_error() -> None:
    model = torch.nn.Linear(3, 3)
    before = weights_digest(model)
    with pytest.raises(RuntimeError), restored_weights(model):
        with torch.no_grad():
            model.weight.add_(1)
        raise RuntimeError("boom")
    assert weights_digest(model) == before


def test_stability_summary_decides_beyond_chance() -> None:
    from ssah.categorize import categorize
    from ssah.measure import stability_summary

    space = _space()
    g = torch.Generator().manual_seed(0)
    s, u = (
        torch.rand(space.total, generator=g, dtype=torch.float64),
        torch.rand(space.total, generator=g, dtype=torch.float64),
    )
    shares = {"scu": 0.1, "ucu": 0.1, "ru": 0.1}
    a = categorize(s, u, space=space, shares=shares, normalization="none")
    same = stability_summary(a, a)
    assert same["SCU"]["jaccard"] == 1.0 and same["SCU"]["verdict"]["verdict"] == "reproduced"
    s2, u2 = (
        torch.rand(space.total, generator=g, dtype=torch.float64),
        torch.rand(space.total, generator=g, dtype=torch.float64),
    )
    other = stability_summary(a, categorize(s2, u2, space=space, shares=shares, normalization="none"))
    assert other["SCU"]["verdict"]["verdict"] != "reproduced"  # independent scores: nothing beyond chance
    assert other["SCU"]["found_again"]["n"] == len(a["SCU"])


def test_stored_rates_read_back_as_the_core_objects() -> None:
    p, dist = measured(3, 10), ControlDistribution((measured(1, 10), measured(2, 10, start=4), measured(4, 10)))
    assert stored_measurement(p.to_dict()) == p and stored_measurement(p.to_dict()).outcomes == p.outcomes
    back = stored_measurement(dist.to_dict())
    assert isinstance(back, ControlDistribution) and back.draws == dist.draws and back.outcomes == dist.outcomes
    # an effect far above a distribution of controls is 'higher'; the stored form decides as the objects do,
    # paired on the prompts
    high = measured(10, 10)
    assert compare_stored(high.to_dict(), dist.to_dict()) == compare_measured(high, dist)
    assert compare_stored(high.to_dict(), dist.to_dict()).direction == "higher"
    assert compare_stored(high.to_dict(), dist.to_dict()).method.startswith("paired")


def test_over_seeds_keeps_every_draw_and_summarises_the_rest() -> None:
    rows = [
        {"seed": s, "asr": Proportion(k, 20).to_dict(), "perplexity": ppl, "kl": {"reply": {"mean": kl}}, "tag": "x"}
        for s, k, ppl, kl in ((0, 2, 10.0, 0.1), (1, 4, 12.0, 0.3), (2, 9, 11.0, 0.2))
    ]
    rows[2]["overrefusal"] = Proportion(1, 5).to_dict()  # only one seed has it: not a distribution
    out = over_seeds(rows)
    assert out["seeds"] == [0, 1, 2] and "overrefusal" not in out and "tag" not in out
    assert [d["k"] for d in out["asr"]["draws"]] == [2, 4, 9] and out["asr"]["seeds"] == 3
    assert out["asr"]["rate"] == pytest.approx(15 / 60)
    assert out["perplexity"] == {"mean": 11.0, "min": 10.0, "max": 12.0, "values": [10.0, 12.0, 11.0]}
    assert out["kl"]["reply"]["mean"] == pytest.approx(0.2) and out["kl"]["reply"]["max"] == 0.3


def test_answer_accuracy_counts_only_examples_with_a_reference() -> None:
    assert answered("The total is 1,250 apples.", "1250") and not answered("about twelve", "1250")
    assert answered("PARIS is the capital", "paris")
    examples = [Example(prompt="q1", answer="4"), Example(prompt="q2", answer=None), Example(prompt="q3", answer="7")]
    outputs = ["4", "x", "8"]
    samples = [Sample("b", e.prompt, o, False, True, None) for e, o in zip(examples, outputs, strict=True)]
    acc = answer_accuracy(examples, samples)
    assert acc == Proportion(1, 2)
    assert answer_accuracy(examples[1:2], samples[1:2]) is None
    with pytest.raises(ValueError):
        answer_accuracy(examples, samples[:2])  # replies must pair with examples one to one
