"""Mixture-of-experts units on tiny random models built in code: both expert layouts (fused 3D parameters and a
ModuleList of MLPs), routed-token statistics against a brute-force routing, unscored experts, controls per expert,
ablation, freezing and training only expert channels, and hybrid models' uncovered layers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssah.arch import get_adapter
from ssah.interventions import ablate, channel_means, freeze_units, space_of, train_only_units, unit_param_masks
from ssah.measure import random_control
from ssah.moe import routed_experts
from ssah.stats import ActivationRecorder, UnitStatistics, mask_unscored, unscored_units
from ssah.tiny import MODULE_LIST_FAMILY, TINY_HYBRID_FAMILIES, TINY_MOE_FAMILIES, build_tiny_model
from ssah.units import UnitSet, UnitSpace, load_unit_sets, save_unit_sets

LAYOUTS = ("qwen3_moe", MODULE_LIST_FAMILY)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 11), generator=g)
    mask = torch.rand(3, 11, generator=g) > 0.3
    return ids, mask


def _record(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> UnitStatistics:
    rec = ActivationRecorder(model, get_adapter(model))
    with torch.no_grad(), rec.recording():
        rec.set_mask(mask)
        model(ids)
    return UnitStatistics(dict(rec.stats))


@pytest.mark.parametrize("family", (*TINY_MOE_FAMILIES, MODULE_LIST_FAMILY))
def test_expert_groups_and_routed_forward(family: str) -> None:
    model, _ = build_tiny_model(family)
    adapter = get_adapter(model)
    groups = adapter.groups()
    experts = [g for g in groups if g.kind == "expert"]
    assert experts and adapter.is_moe and adapter.uncovered == []
    assert all(g.fused == (family != MODULE_LIST_FAMILY) for g in experts)
    assert {g.key for g in experts} == {f"layers.{g.layer}.expert.{g.expert}" for g in experts}
    for g in experts:  # the reader slice is one expert's down-projection, channels along reader.dim
        assert adapter.reader_weight(g).shape[g.reader.dim] == g.size
        assert adapter.group(g.layer, "expert", g.expert) is g
    ids, _ = _batch()
    with torch.no_grad():
        reference = model(ids).logits
        names = {g.reader_module for g in experts if g.fused}
        with routed_experts(model, dict.fromkeys(names, lambda e, t, h: None)):
            looped = model(ids).logits
    torch.testing.assert_close(looped, reference, atol=1e-5, rtol=1e-5)
    assert all("forward" not in vars(model.get_submodule(n)) for n in names)  # the class's forward is back


def _brute_force(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Each counted token's down-projection input for each expert it is routed to, by running the router and the
    expert MLPs by hand on the MoE blocks' inputs."""
    inputs: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    handles = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out: dict[str, list[torch.Tensor]] = {}
    counted = mask.reshape(-1)
    for i, layer in enumerate(layers):
        x = inputs[i].reshape(-1, inputs[i].shape[-1])
        _, _, chosen = layer.mlp.gate(x)
        experts = layer.mlp.experts
        for t in range(x.shape[0]):
            for e in chosen[t].tolist():
                if not counted[t]:
                    continue
                if isinstance(experts, torch.nn.ModuleList):
                    mlp = experts[e]
                    h = F.silu(mlp.gate_proj(x[t])) * mlp.up_proj(x[t])
                else:
                    gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                    h = F.silu(gate) * up
                out.setdefault(f"layers.{i}.expert.{e}", []).append(h.detach().double())
    return out


@pytest.mark.parametrize("family", LAYOUTS)
def test_routed_statistics_match_brute_force(family: str) -> None:
    model, _ = build_tiny_model(family)
    ids, mask = _batch(1)
    stats = _record(model, ids, mask)
    expected = _brute_force(model, ids, mask)
    routed = stats.routed_tokens()
    assert sum(routed.values()) == 2 * int(mask.sum()) * 2  # top-2 routing, 2 layers
    for key, n in routed.items():
        rows = expected.get(key, [])
        assert n == len(rows)
        if rows:
            block = torch.stack(rows)
            torch.testing.assert_close(stats.groups[key].mean, block.mean(0), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(stats.groups[key].var, block.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert stats.tokens == int(mask.sum())  # attention counts every counted token


def test_both_layouts_give_the_same_statistics() -> None:
    ids, mask = _batch(2)
    fused = _record(build_tiny_model("qwen3_moe")[0], ids, mask)
    listed = _record(build_tiny_model(MODULE_LIST_FAMILY)[0], ids, mask)
    assert fused.groups.keys() == listed.groups.keys()
    for key, s in fused.groups.items():
        assert s.count == listed.groups[key].count
        torch.testing.assert_close(s.mean, listed.groups[key].mean, atol=1e-5, rtol=1e-4)


def test_chan_merge_of_routed_statistics_is_exact() -> None:
    model, _ = build_tiny_model("qwen3_moe")
    ids, mask = _batch(3)
    whole = _record(model, ids, mask)
    halves = _record(model, ids[:2], mask[:2]).merge(_record(model, ids[2:], mask[2:]))
    for key, s in whole.groups.items():
        assert s.count == halves.groups[key].count
        # float32 forwards of other batch shapes differ in the last bits; the merge itself is exact
        torch.testing.assert_close(s.m2, halves.groups[key].m2, atol=1e-6, rtol=1e-5)


def test_unscored_experts_are_nan_and_kept_out_of_controls() -> None:
    model, _ = build_tiny_model("qwen3_moe")
    ids, mask = _batch(4)
    stats = _record(model, ids, mask)
    routed = stats.routed_tokens()
    threshold = sorted(routed.values())[len(routed) // 2]
    low = stats.unscored(threshold)
    assert low and all(routed[k] < threshold for k in low)
    values = mask_unscored(
        {k: torch.ones(v.mean.shape[0], dtype=torch.float64) for k, v in stats.groups.items()}, stats, threshold
    )
    assert all(bool(values[k].isnan().all()) == (k in low) for k in values)
    space = space_of(model)
    flat = space.join(values)
    unscored = unscored_units(space, stats, threshold)
    assert torch.equal(unscored.mask, flat.isnan())
    members = UnitSet(
        space, ~flat.isnan() & (torch.rand(space.total, generator=torch.Generator().manual_seed(0)) < 0.1)
    )
    for seed in range(5):
        control = random_control(members, seed, match_scores=flat)
        assert not bool((control.units.mask & unscored.mask).any())
        control = random_control(members, seed, exclude=unscored)
        assert not bool((control.units.mask & unscored.mask).any())


def test_controls_keep_the_count_per_expert() -> None:
    model, _ = build_tiny_model("qwen2_moe")
    space = space_of(model)
    picked = torch.zeros(space.total, dtype=torch.bool)
    for sh in space.shapes:  # units concentrated in expert 1 of each layer and in the shared expert
        if sh.expert == 1 or sh.kind == "shared_expert":
            picked[space.group_slice(sh.layer, sh.kind, sh.expert)][:5] = True
    units = UnitSet(space, picked, "SCU")
    control = random_control(units, 7, exclude=units)
    assert control.counts == {"0.shared_expert": 5, "0.expert.1": 5, "1.shared_expert": 5, "1.expert.1": 5}
    assert control.units.counts_by_group() == units.counts_by_group()


def test_unit_file_records_experts(tmp_path: Any) -> None:
    model, _ = build_tiny_model("qwen2_moe")
    groups = get_adapter(model).groups()
    space = UnitSpace.from_groups(groups, "neuron", "fp", "tiny")
    rows = space.structure()
    assert [1, "expert", 32, 1, 3] in rows and [0, "shared_expert", 48, 1] in rows
    assert space.flat_index(1, "expert", 4, 3) == space.group_slice(1, "expert", 3).start + 4
    assert space.expert_of(space.flat_index(1, "expert", 4, 3)) == 3
    units = UnitSet.from_units(space, [(0, "attn", 1), (1, "expert", 4, 3)], "SCU")
    save_unit_sets(tmp_path / "u.safetensors", {"SCU": units}, {"routed_tokens": json.dumps({"x": 1})})
    loaded = load_unit_sets(tmp_path / "u.safetensors", space)["SCU"]
    assert loaded == units
    head = UnitSpace.from_groups(groups, "head", "fp", "tiny")  # experts stay neurons at head granularity
    assert head.shape(1, "expert", 3).size == 32


def _expert_units(model: Any, layer: int, expert: int, channels: slice) -> UnitSet:
    space = space_of(model)
    mask = torch.zeros(space.total, dtype=torch.bool)
    mask[space.group_slice(layer, "expert", expert)][channels] = True
    return UnitSet(space, mask, "x")


@pytest.mark.parametrize("family", LAYOUTS)
def test_zero_ablation_of_an_expert_equals_zeroed_weights(family: str) -> None:
    model, _ = build_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, _ = _batch(5)
    units = _expert_units(model, 0, 2, slice(None))
    with torch.no_grad():
        with ablate(model, units, mode="zero"):
            ablated = model(ids).logits
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # undone, bit-identical
        plain = model(ids).logits
        for name, mask in unit_param_masks(model, units, writers=False).items():
            model.get_parameter(name).masked_fill_(mask, 0.0)
        zeroed = model(ids).logits
    assert not torch.allclose(ablated, plain)
    torch.testing.assert_close(ablated, zeroed, atol=1e-5, rtol=1e-5)


def test_mean_ablation_is_the_same_on_both_layouts() -> None:
    ids, mask = _batch(6)
    outs = []
    for family in LAYOUTS:
        model, _ = build_tiny_model(family)
        means = channel_means(_record(model, ids, mask))
        units = _expert_units(model, 1, 0, slice(0, 20))
        with torch.no_grad(), ablate(model, units, mode="mean", means=means):
            outs.append(model(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", (*LAYOUTS, "gpt_oss"))
def test_frozen_expert_slices_survive_an_optimizer_step(family: str) -> None:
    model, _ = build_tiny_model(family)
    units = _expert_units(model, 0, 1, slice(3, 9))
    masks = unit_param_masks(model, units)
    ids, _ = _batch(7)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with freeze_units(model, units) as frozen:
        model(ids, labels=ids).loss.backward()
        opt.step()
        frozen.restore()
        assert frozen.max_drift() == 0.0
    for name, mask in masks.items():
        now = model.get_parameter(name).detach()
        assert torch.equal(now[mask], before[name][mask])  # frozen entries bit-identical
        assert not torch.equal(now[~mask], before[name][~mask])  # the rest trained
    assert len(masks) >= 2  # the reader and a writer of the expert


@pytest.mark.parametrize("family", LAYOUTS)
def test_train_only_expert_channels(family: str) -> None:
    model, _ = build_tiny_model(family)
    units = _expert_units(model, 1, 3, slice(0, 4))
    masks = unit_param_masks(model, units)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, _ = _batch(8)
    with torch.no_grad():
        start = model(ids).logits
    deltas = train_only_units(model, units)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, start, atol=0, rtol=0)  # deltas start at zero
    opt = torch.optim.SGD(deltas.parameters(), lr=0.5)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    deltas.merge()
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, old in before.items():
        mask = masks.get(name)
        if mask is None:
            assert torch.equal(after[name].detach(), old), name
        else:
            assert torch.equal(after[name].detach()[~mask], old[~mask])
            assert not torch.equal(after[name].detach()[mask], old[mask])
    assert deltas.report is not None and deltas.report.units == 4


@pytest.mark.parametrize("family", TINY_HYBRID_FAMILIES)
def test_hybrid_models_report_uncovered_layers(family: str) -> None:
    model, _ = build_tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.uncovered and all(line.startswith("layers.0.attn: ") for line in adapter.uncovered)
    assert any(g.kind == "attn" for g in adapter.groups())
    ids, mask = _batch(9)
    stats = _record(model, ids[:, :6], mask[:, :6])
    assert set(stats.groups) == {g.key for g in adapter.groups()}


@pytest.mark.parametrize(("family", "mode"), [("qwen3_moe", "zero"), (MODULE_LIST_FAMILY, "zero"), ("gpt_oss", "mean")])
def test_folded_expert_ablation_equals_the_hook(family: str, mode: str) -> None:
    from ssah.export import fold_ablation, needs_reader_bias

    model, _ = build_tiny_model(family)
    ids, mask = _batch(10)
    means = channel_means(_record(model, ids, mask))
    units = _expert_units(model, 0, 3, slice(2, 12))
    assert needs_reader_bias(model, units) == (family != "gpt_oss")  # gpt-oss experts carry down_proj biases
    with torch.no_grad():
        with ablate(model, units, mode=mode, means=means):
            hooked = model(ids).logits
        fold_ablation(model, units, mode=mode, means=means)
        folded = model(ids).logits
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-4)


def test_metrics_score_expert_channels_from_routed_statistics() -> None:
    from ssah.scoring import compute_scores

    model, _ = build_tiny_model("qwen3_moe")
    ids, mask = _batch(11)
    stats = _record(model, ids, mask)
    space = space_of(model)
    scores = compute_scores(model, stats, "fluctuation", space)
    down = model.model.layers[1].mlp.experts.down_proj[2].detach().double()  # [hidden, I]
    expected = stats.groups["layers.1.expert.2"].var * down.norm(dim=0).square()
    torch.testing.assert_close(scores.values["layers.1.expert.2"], expected)
    wanda = compute_scores(model, stats, "wanda", space).values["layers.1.expert.2"]
    torch.testing.assert_close(wanda, stats.groups["layers.1.expert.2"].l2_norm * down.abs().sum(dim=0))
    masked = mask_unscored(scores.values, stats, 10**6)  # every routed expert below the minimum
    assert all(bool(v.isnan().all()) == (".expert." in k) for k, v in masked.items())


def test_routed_token_counts_for_the_unit_file() -> None:
    from ssah.stats import routed_tokens_metadata

    model, _ = build_tiny_model("qwen3_moe")
    ids, mask = _batch(12)
    stats = _record(model, ids, mask)
    counts = json.loads(routed_tokens_metadata({"utility": stats, "safety": stats}))
    assert list(counts) == ["safety", "utility"] and counts["safety"] == stats.routed_tokens()
    assert all(".expert." in k for k in counts["safety"])


def test_a_partition_leaves_unscored_units_out(tmp_path: Any) -> None:
    from ssah.errors import UnitFileError
    from ssah.units import PARTITION, UNSCORED

    model, _ = build_tiny_model("qwen3_moe")
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron", "fp", "tiny")
    low = torch.zeros(space.total, dtype=torch.bool)
    low[space.group_slice(1, "expert", 3)] = True
    rest = torch.arange(space.total) % 4
    sets = {c: UnitSet(space, (rest == i) & ~low, c) for i, c in enumerate(PARTITION)}
    save_unit_sets(tmp_path / "u.safetensors", {**sets, UNSCORED: UnitSet(space, low, UNSCORED)})
    assert load_unit_sets(tmp_path / "u.safetensors", space)[UNSCORED].mask.equal(low)
    save_unit_sets(tmp_path / "bad.safetensors", sets)  # the unscored units in no category and no unscored set
    with pytest.raises(UnitFileError, match="none or several"):
        load_unit_sets(tmp_path / "bad.safetensors", space)
