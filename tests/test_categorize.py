"""Categorisation rules as pure functions on known score vectors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssah.categorize import (
    CATEGORIES,
    NORMALIZATIONS,
    categorize,
    check_shares,
    expected_random_jaccard,
    normalization_scope,
    normalize_scores,
    parse_shares,
    ranking_domains,
)
from ssah.errors import UserError
from ssah.units import GroupShape, UnitSpace


def flat_space(n: int, groups: int = 1) -> UnitSpace:
    per = n // groups
    return UnitSpace([GroupShape(i, "mlp", per) for i in range(groups)])


def members(cats, name: str) -> set[int]:
    return set(cats[name].indices().tolist())


def test_ssah_rule_on_known_scores() -> None:
    space = flat_space(10)
    # units 0,1: needed for neither; 2: safety only; 3: utility only; the rest both.
    s = torch.tensor([0.0, 0.1, 9.0, 1.0, 5, 5, 5, 5, 5, 5], dtype=torch.float64)
    u = torch.tensor([0.0, 0.1, 1.0, 9.0, 5, 5, 5, 5, 5, 5], dtype=torch.float64)
    cats = categorize(s, u, space=space, rule="ssah", shares={"ru": 0.2, "scu": 0.1, "ucu": 0.1}, normalization="none")
    assert members(cats, "RU") == {0, 1}
    assert members(cats, "SCU") == {2}
    assert members(cats, "UCU") == {3}
    assert members(cats, "CU") == set(range(4, 10))
    summary = cats.summary()
    assert summary["categories"]["SCU"] == {"count": 1, "fraction": 0.1}
    assert summary["rule"] == "ssah" and summary["normalization"] == "none"


def test_mean_normalization_makes_scales_comparable() -> None:
    space = flat_space(4)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    u = 1000 * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    raw = categorize(s, u, space=space, shares={"ru": 0, "scu": 0.25, "ucu": 0}, normalization="none")
    norm = categorize(s, u, space=space, shares={"ru": 0, "scu": 0.25, "ucu": 0}, normalization="mean")
    assert members(raw, "SCU") == {3}  # highest s - u is the last one either way
    assert members(norm, "SCU") == {3}
    # without normalisation the sum ranking is dominated by the utility scale
    raw_ru = categorize(s, u, space=space, shares={"ru": 0.25, "scu": 0, "ucu": 0}, normalization="none")
    rank_ru = categorize(s, u, space=space, shares={"ru": 0.25, "scu": 0, "ucu": 0}, normalization="rank")
    assert members(raw_ru, "RU") == {3}
    assert members(rank_ru, "RU") == {0}  # ranks tie at 1.0 for all; stable order picks the first


def test_set_difference_rules() -> None:
    space = flat_space(8)
    s = torch.tensor([8, 7, 6, 5, 4, 3, 2, 1], dtype=torch.float64)
    u = torch.tensor([1, 8, 2, 7, 3, 6, 4, 5], dtype=torch.float64)
    wei = categorize(s, u, space=space, rule="wei-set-difference", shares={"q": 0.25, "p": 0.25})
    # top-2 safety = {0,1}; top-2 utility = {1,3}
    assert members(wei, "SCU") == {0} and members(wei, "UCU") == {3}
    assert members(wei, "CU") == {1} and members(wei, "RU") == {2, 4, 5, 6, 7}
    prune = categorize(s, u, space=space, rule="pruning-sets", shares={"sparsity": 0.5})
    # pruned under safety = {4..7}; pruned under utility = {0,2,4,6}
    assert members(prune, "SCU") == {0, 2} and members(prune, "UCU") == {5, 7}
    assert members(prune, "RU") == {4, 6} and members(prune, "CU") == {1, 3}


def test_per_module_ranking_spreads_categories_over_modules() -> None:
    space = flat_space(20, groups=2)
    s = torch.cat([torch.linspace(0, 1, 10), torch.linspace(100, 101, 10)]).double()
    u = torch.ones(20, dtype=torch.float64)
    glob = categorize(s, u, space=space, shares={"scu": 0.2, "ucu": 0, "ru": 0}, ranking="global", normalization="none")
    per = categorize(s, u, space=space, shares={"scu": 0.2, "ucu": 0, "ru": 0}, ranking="per-module")
    assert members(glob, "SCU") == {16, 17, 18, 19}
    assert members(per, "SCU") == {8, 9, 18, 19}


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(4, 60),
    seed=st.integers(0, 10_000),
    rule=st.sampled_from(["ssah", "pruning-sets", "wei-set-difference"]),
    ranking=st.sampled_from(["global", "per-module"]),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_categories_partition_the_units(n: int, seed: int, rule: str, ranking: str, normalization: str) -> None:
    space = flat_space(2 * n, groups=2)
    g = torch.Generator().manual_seed(seed)
    s, u = torch.rand(2 * n, generator=g, dtype=torch.float64), torch.rand(2 * n, generator=g, dtype=torch.float64)
    cats = categorize(s, u, space=space, rule=rule, ranking=ranking, normalization=normalization)
    total = torch.zeros(2 * n, dtype=torch.long)
    for c in CATEGORIES:
        total += cats[c].mask.long()
    assert torch.equal(total, torch.ones(2 * n, dtype=torch.long))
    again = categorize(s, u, space=space, rule=rule, ranking=ranking, normalization=normalization)
    assert all(cats[c] == again[c] for c in CATEGORIES)
    if rule == "ssah" and ranking == "global":
        assert len(cats["RU"]) == round(0.148 * 2 * n)


def test_share_validation_messages() -> None:
    assert parse_shares("scu=0.02, ru=0.2") == {"scu": 0.02, "ru": 0.2}
    with pytest.raises(UserError, match="name=fraction"):
        parse_shares("scu")
    with pytest.raises(UserError, match="outside 0..1"):
        check_shares("ssah", {"scu": 1.5})
    with pytest.raises(UserError, match="sum to .* past 1"):
        check_shares("ssah", {"scu": 0.5, "ucu": 0.4, "ru": 0.3})
    with pytest.raises(UserError, match="takes shares q, p"):
        check_shares("wei-set-difference", {"scu": 0.1})
    with pytest.raises(UserError, match="unknown rule"):
        check_shares("magic", None)


def test_transition_matrix_and_chance_jaccard() -> None:
    space = flat_space(10)
    g = torch.Generator().manual_seed(0)
    a = categorize(torch.rand(10, generator=g).double(), torch.rand(10, generator=g).double(), space=space)
    b = categorize(torch.rand(10, generator=g).double(), torch.rand(10, generator=g).double(), space=space)
    m = a.transition(b)
    assert m.shape == (4, 4)
    assert m.sum(dim=1).tolist() == [len(a[c]) for c in CATEGORIES]
    assert m.sum(dim=0).tolist() == [len(b[c]) for c in CATEGORIES]
    assert expected_random_jaccard(10, 10) == 1.0
    assert 0 < expected_random_jaccard(100, 10_000) < 0.01


# -- normalisation --------------------------------------------------------------------------------------------------


def _two_scales() -> tuple[UnitSpace, torch.Tensor, torch.Tensor]:
    """Two modules with the same pattern, the second at 100 times the magnitude."""
    space = flat_space(20, groups=2)
    s = torch.cat([torch.arange(10.0), 100 * torch.arange(10.0)]).double()
    u = torch.cat([torch.arange(9.0, -1, -1), 100 * torch.arange(9.0, -1, -1)]).double()
    return space, s, u


@pytest.mark.parametrize(
    ("normalization", "scu"),
    [
        ("mean", {18, 19}),  # one global mean: the large module takes every SCU
        ("none", {18, 19}),
        ("module-mean", {9, 19}),  # per module: each module's top unit
        ("zscore", {9, 19}),
        ("rank", {9, 19}),
    ],
)
def test_per_module_normalisations_stop_magnitude_choosing_the_module(normalization: str, scu: set[int]) -> None:
    space, s, u = _two_scales()
    cats = categorize(s, u, space=space, shares={"scu": 0.1, "ucu": 0, "ru": 0}, normalization=normalization)
    assert members(cats, "SCU") == scu
    summary = cats.summary()
    assert summary["normalization"] == normalization
    assert summary["normalization_scope"] == normalization_scope(normalization)
    assert summary["ranking_domains"] == "all units"


def test_zscore_and_rank_are_computed_within_each_module() -> None:
    space, s, _ = _two_scales()
    z = normalize_scores(s, space, "zscore", "global")
    for part in (z[:10], z[10:]):
        assert part.mean().abs() < 1e-12 and (part.std(unbiased=False) - 1).abs() < 1e-12
    assert torch.allclose(z[:10], z[10:])
    r = normalize_scores(s, space, "rank", "global")
    assert r[:10].tolist() == r[10:].tolist() == [i / 9 for i in range(10)]
    g = normalize_scores(s, space, "global-rank", "global")
    assert g.max() == 1.0 and g[:10].max() < g[10:].max()
    m = normalize_scores(s, space, "mean", "global")
    assert torch.allclose(m, s / s.mean())
    const = normalize_scores(torch.ones(20, dtype=torch.float64), space, "zscore", "global")
    assert torch.equal(const, torch.zeros(20, dtype=torch.float64))  # no spread: centred, not divided by 0
    scopes = ["domain", "module", "module", "module", "domain", "none"]
    assert [normalization_scope(n) for n in NORMALIZATIONS] == scopes


def _head_space() -> UnitSpace:
    """Two layers of 4 heads of 16 channels and 64 MLP neurons each, at head granularity."""
    shapes = [GroupShape(layer, kind, *dims) for layer in (0, 1) for kind, dims in (("attn", (4, 16)), ("mlp", (64,)))]
    return UnitSpace(shapes, "head")


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_head_granularity_never_ranks_heads_against_neurons(normalization: str) -> None:
    space = _head_space()
    g = torch.Generator().manual_seed(0)
    s, u = torch.rand(space.total, generator=g).double(), torch.rand(space.total, generator=g).double()
    heads = torch.zeros(space.total, dtype=torch.bool)
    for layer in (0, 1):
        heads[space.group_slice(layer, "attn")] = True
    s[heads] *= 16  # a head sums 16 channels: far larger raw scores than a neuron
    shares = {"scu": 0.25, "ucu": 0.25, "ru": 0.25}
    cats = categorize(s, u, space=space, granularity="head", shares=shares, normalization=normalization)
    for c in CATEGORIES[:2] + CATEGORIES[3:]:  # the shares hold in each kind separately
        assert int((cats[c].mask & heads).sum()) == 2, c  # round(0.25 * 8 heads)
        assert int((cats[c].mask & ~heads).sum()) == 32, c  # round(0.25 * 128 neurons)
    assert cats.summary()["ranking_domains"] == "attention heads and MLP neurons separately"
    domains = ranking_domains(space, "global")
    assert [int(d.numel()) for d in domains] == [8, 128] and bool(heads[domains[0]].all())
    assert len(ranking_domains(space, "per-module")) == 4
    assert len(ranking_domains(flat_space(20, groups=2), "global")) == 1  # neurons only: one domain


def test_unknown_normalization_names_the_choices() -> None:
    space, s, u = _two_scales()
    with pytest.raises(UserError, match="unknown normalization 'median': use one of mean, module-mean, zscore"):
        categorize(s, u, space=space, normalization="median")
    with pytest.raises(UserError, match="unknown ranking"):
        ranking_domains(space, "local")


@pytest.mark.parametrize("normalization", ["zscore", "rank"])
def test_cli_units_takes_every_normalization_and_records_it(normalization: str, tmp_path, capsys, user_error) -> None:
    import json

    from ssah.cli import main

    out = tmp_path / normalization
    args = ["units", "tiny-random-llama", "--limit", "2", "--no-progress", "--granularity", "head"]
    assert main([*args, "--normalization", normalization, "--out", str(out)]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["normalization"] == normalization and res["normalization_scope"] == "module"
    assert res["ranking_domains"] == "attention heads and MLP neurons separately"
    assert sum(v["count"] for v in res["categories"].values()) == res["model"]["units_total"]
    user_error([*args, "--normalization", "median", "--out", str(tmp_path / "bad")], "unknown normalization 'median'")


def test_saved_normalization_round_trips_and_old_rank_files_read_as_global_rank(tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ssah.categorize import load_categorization

    space, s, u = _two_scales()
    space = UnitSpace(list(space.shapes), "neuron", "fp-of-a-test-model")  # saved unit files name their model
    for normalization in ("rank", "zscore", "global-rank"):
        path = tmp_path / f"{normalization}.safetensors"
        categorize(s, u, space=space, normalization=normalization).save(path)
        assert load_categorization(path, space).normalization == normalization
    # a file from before per-module ranks: same content, no normalization_scope in its metadata
    with safe_open(str(tmp_path / "rank.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["normalization_scope"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert load_categorization(tmp_path / "old.safetensors", space).normalization == "global-rank"
