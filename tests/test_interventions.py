"""Interventions on units: ablation (zero and FLAP-style mean), exact freezing and training only units
(parameter slices, GQA sharing, gradient masks, restore, deltas, merge)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.utils import parametrize

from ssah.arch import ParamSlice, get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.interventions import (
    SliceReport,
    ablate,
    channel_means,
    freeze_units,
    space_of,
    train_only_units,
    trainable_share,
    unit_param_masks,
    unit_param_slices,
    unit_param_slices_and_report,
)
from ssah.stats import ActivationRecorder, UnitStatistics
from ssah.tiny import build_tiny_model
from ssah.units import UnitSet, UnitSpace

FAMILIES = ("llama", "gpt2", "phi3", "gpt_neox")

# Hand-picked units: two attention channels in different query heads of one KV group (llama-like: 4 heads of
# 16 channels, 2 KV heads) and two MLP neurons.
PICKED = [(0, "attn", 5), (0, "attn", 20), (1, "mlp", 3), (1, "mlp", 100)]
ATTN = {5, 20}
MLP = {3, 100}

# What the picked units own, written out by hand per family (prefix of the blocks, then name -> (dim, indices)).
EXPECTED: dict[str, dict[str, tuple[int, set[int]]]] = {
    "llama": {
        "model.layers.0.self_attn.o_proj.weight": (1, ATTN),
        "model.layers.0.self_attn.v_proj.weight": (0, {5, 4}),  # channel 20 = head 1 -> KV head 0, row 4
        "model.layers.1.mlp.down_proj.weight": (1, MLP),
        "model.layers.1.mlp.gate_proj.weight": (0, MLP),
        "model.layers.1.mlp.up_proj.weight": (0, MLP),
    },
    "phi3": {
        "model.layers.0.self_attn.o_proj.weight": (1, ATTN),
        "model.layers.0.self_attn.qkv_proj.weight": (0, {96 + 5, 96 + 4}),  # after q (64) and k (32) rows
        "model.layers.1.mlp.down_proj.weight": (1, MLP),
        "model.layers.1.mlp.gate_up_proj.weight": (0, MLP | {128 + 3, 128 + 100}),  # gate rows and up rows
    },
    "gpt2": {  # Conv1D weights are [in, out]
        "transformer.h.0.attn.c_proj.weight": (0, ATTN),
        "transformer.h.0.attn.c_attn.weight": (1, {128 + 5, 128 + 20}),  # no GQA: v after q, k
        "transformer.h.0.attn.c_attn.bias": (0, {128 + 5, 128 + 20}),
        "transformer.h.1.mlp.c_proj.weight": (0, MLP),
        "transformer.h.1.mlp.c_fc.weight": (1, MLP),
        "transformer.h.1.mlp.c_fc.bias": (0, MLP),
    },
    "gpt_neox": {  # query_key_value rows are [head, (q, k, v), head_dim]
        "gpt_neox.layers.0.attention.dense.weight": (1, ATTN),
        "gpt_neox.layers.0.attention.query_key_value.weight": (0, {32 + 5, 48 + 32 + 4}),
        "gpt_neox.layers.0.attention.query_key_value.bias": (0, {32 + 5, 48 + 32 + 4}),
        "gpt_neox.layers.1.mlp.dense_4h_to_h.weight": (1, MLP),
        "gpt_neox.layers.1.mlp.dense_h_to_4h.weight": (0, MLP),
        "gpt_neox.layers.1.mlp.dense_h_to_4h.bias": (0, MLP),
    },
}


def _model(family: str) -> torch.nn.Module:
    model, _ = build_tiny_model(family)
    return model  # eval mode: no dropout, so forward passes are deterministic


def _picked(model: torch.nn.Module) -> UnitSet:
    return UnitSet.from_units(space_of(model), PICKED, name="picked")  # type: ignore[arg-type]


def _inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 8), generator=g)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    """One step on a toy loss: the sum of the logits."""
    model(x).logits.sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- slices and masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_slices_of_hand_picked_units(family: str) -> None:
    model = _model(family)
    slices = unit_param_slices(model, _picked(model))
    got = {name: (dim, set(idx.tolist())) for name, (dim, idx) in slices.items()}
    assert got == EXPECTED[family]
    for _dim, idx in slices.values():
        assert idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)


@pytest.mark.parametrize("family", FAMILIES)
def test_slices_follow_the_adapters_param_slices(family: str) -> None:
    model = _model(family)
    units = _picked(model)
    slices = unit_param_slices(model, units)
    masks = units.channel_masks()
    expected: dict[str, set[int]] = {}
    for g in get_adapter(model).groups():
        chosen = masks[g.key].nonzero().flatten()
        if len(chosen) == 0:
            continue
        for s in (g.reader, *g.writers):
            expected.setdefault(s.name, set()).update(s.index[chosen].tolist())
    assert {k: set(v[1].tolist()) for k, v in slices.items()} == expected
    readers = unit_param_slices(model, units, writers=False)
    writers = unit_param_slices(model, units, readers=False)
    assert set(readers) | set(writers) == set(slices) and not set(readers) & set(writers)


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_have_parameter_shapes_and_mark_the_slices(family: str) -> None:
    model = _model(family)
    units = _picked(model)
    slices = unit_param_slices(model, units)
    masks = unit_param_masks(model, units)
    assert set(masks) == set(slices)
    for name, mask in masks.items():
        param = model.get_parameter(name)
        dim, idx = slices[name]
        assert mask.shape == param.shape and mask.dtype == torch.bool and mask.device == param.device
        per_index = mask.movedim(dim, 0).reshape(mask.shape[dim], -1)
        assert per_index[idx].all() and not per_index[[i for i in range(mask.shape[dim]) if i not in idx]].any()


def test_gqa_shared_v_row_belongs_to_every_unit_that_reads_it() -> None:
    model = _model("llama")
    space = space_of(model)
    head0 = unit_param_slices(model, UnitSet.from_units(space, [(0, "attn", 0)]))
    head1 = unit_param_slices(model, UnitSet.from_units(space, [(0, "attn", 16)]))  # same KV head
    v = "model.layers.0.self_attn.v_proj.weight"
    assert head0[v][1].tolist() == head1[v][1].tolist() == [0]


def test_head_granularity_expands_to_channels() -> None:
    model = _model("llama")
    units = UnitSet.from_units(space_of(model, "head"), [(0, "attn", 1)])
    slices = unit_param_slices(model, units)
    assert slices["model.layers.0.self_attn.o_proj.weight"][1].tolist() == list(range(16, 32))
    assert slices["model.layers.0.self_attn.v_proj.weight"][1].tolist() == list(range(16))  # KV head 0


def test_empty_set_has_no_slices_and_foreign_set_is_refused() -> None:
    model = _model("llama")
    assert unit_param_slices(model, UnitSet.empty(space_of(model))) == {}
    other = UnitSpace(space_of(model).shapes[:2])  # a one-layer model's layout
    with pytest.raises(UnitFileError):
        unit_param_slices(model, UnitSet.full(other))


def test_parameter_sliced_along_two_dims_is_a_value_error() -> None:
    model = _model("llama")
    adapter = get_adapter(model)
    groups = adapter.groups()
    attn, mlp = groups[0], groups[3]  # layer 0 attention, layer 1 MLP: both hold picked units
    bad = dataclasses.replace(mlp, writers=(ParamSlice(attn.reader.name, 0, mlp.reader.index % 64),))
    adapter._groups = [*groups[:3], bad]
    with pytest.raises(ValueError, match="two dims|dims 1 and 0"):
        unit_param_slices(model, _picked(model), adapter=adapter)


# -- freezing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_slices_stay_bit_identical_under_adamw_weight_decay(family: str) -> None:
    model = _model(family)
    units = _picked(model)
    before = _snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = _inputs()
    with freeze_units(model, units) as frozen:
        assert frozen.frozen_parameters == sum(int(m.sum()) for m in frozen.masks.values()) > 0
        for _ in range(5):
            model(x).logits.sum().backward()
            for name, mask in frozen.masks.items():  # the hook zeroed the frozen gradient entries
                assert not model.get_parameter(name).grad[mask].any()
            opt.step()
            frozen.restore()
            opt.zero_grad(set_to_none=True)
        assert frozen.max_drift() == 0.0
    for name, mask in frozen.masks.items():
        now = model.get_parameter(name).detach()
        assert torch.equal(now[mask], before[name][mask]), name
        assert (now[~mask] != before[name][~mask]).any(), name  # the rest of the parameter trained
    assert all(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())  # training happened


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_restore_weight_decay_moves_frozen_entries(family: str) -> None:
    """The restore step is what makes freezing exact: skipping it lets weight decay drift (the test can fail)."""
    model = _model(family)
    before = _snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = _inputs()
    with freeze_units(model, _picked(model)) as frozen:
        for _ in range(5):
            _step(model, opt, x)
        assert frozen.max_drift() > 0.0
        name, mask = next(iter(frozen.masks.items()))
        assert not torch.equal(model.get_parameter(name).detach()[mask], before[name][mask])
        frozen.restore()
        assert frozen.max_drift() == 0.0


def test_without_weight_decay_gradient_mask_alone_is_exact() -> None:
    """With zero gradients and no decay, Adam leaves the frozen entries alone: the hooks do mask the gradient."""
    model = _model("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    with freeze_units(model, _picked(model)) as frozen:
        for _ in range(3):
            _step(model, opt, _inputs())
        assert frozen.max_drift() == 0.0


def test_remove_detaches_the_gradient_hooks() -> None:
    model = _model("llama")
    frozen = freeze_units(model, _picked(model))
    frozen.remove()
    model(_inputs()).logits.sum().backward()
    name, mask = next(iter(frozen.masks.items()))
    assert model.get_parameter(name).grad[mask].abs().sum() > 0


def test_freezing_an_empty_set_is_a_no_op() -> None:
    model = _model("llama")
    frozen = freeze_units(model, UnitSet.empty(space_of(model)))
    assert frozen.masks == {} and frozen.frozen_parameters == 0 and frozen.max_drift() == 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = _snapshot(model)
    _step(model, opt, _inputs())
    frozen.restore()
    assert all(not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters())


# -- training only units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_only_units_train_and_merge_gives_a_plain_model(family: str, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = _model(family)
    units = _picked(model)
    masks = unit_param_masks(model, units)
    keys = list(model.state_dict())
    total = sum(p.numel() for p in model.parameters())
    before = _snapshot(model)
    x = _inputs()
    logits0 = model(x).logits.detach()

    deltas = train_only_units(model, units)
    assert torch.equal(model(x).logits.detach(), logits0)  # zero deltas: same function
    assert deltas.trainable_parameters == sum(int(m.sum()) for m in masks.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(".delta"))
    opt = torch.optim.AdamW(deltas.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        _step(model, opt, x)
    assert sum(s["exp_avg"].numel() for s in opt.state.values()) == deltas.trainable_parameters
    share = trainable_share(model)
    assert share["trainable"] == deltas.trainable_parameters
    assert share["total"] == total
    logits_trained = model(x).logits.detach()

    for name, mask in masks.items():  # parametrized weights: only the unit slices moved
        module_name, _, attr = name.rpartition(".")
        now = getattr(model.get_submodule(module_name), attr).detach()
        assert torch.equal(now[~mask], before[name][~mask]), name
        assert (now[mask] != before[name][mask]).all(), name

    deltas.merge()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x).logits.detach(), logits_trained)
    after = model.state_dict()
    for key, value in before.items():
        if key in masks:
            assert torch.equal(after[key][~masks[key]], value[~masks[key]]) and not torch.equal(after[key], value)
        else:
            assert torch.equal(after[key], value), key
    assert trainable_share(model)["share"] == 1.0  # requires_grad flags are back

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model.eval()
    assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-6)


def test_training_an_empty_set_is_a_user_error() -> None:
    model = _model("llama")
    with pytest.raises(UserError, match="no units to train: "):
        train_only_units(model, UnitSet.empty(space_of(model), name="RU"))
    assert trainable_share(model)["share"] == 1.0  # nothing was frozen


# -- trainable share -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma ties its embeddings: counted once
def test_trainable_share(family: str) -> None:
    model = _model(family)
    total = sum(p.numel() for p in model.parameters())
    assert trainable_share(model) == {"trainable": total, "total": total, "share": 1.0}
    embed = model.get_input_embeddings().weight
    embed.requires_grad_(False)
    share = trainable_share(model)
    assert share["trainable"] == total - embed.numel() and share["total"] == total
    assert share["share"] == pytest.approx((total - embed.numel()) / total)
    deltas = train_only_units(model, _picked(model))
    share = trainable_share(model)
    assert share == {"trainable": deltas.trainable_parameters, "total": total, "share": share["share"]}
    assert share["share"] == pytest.approx(deltas.trainable_parameters / total)


# -- GQA: shared value rows ----------------------------------------------------------------------------------------
# Tiny llama: 4 query heads of 16 channels over 2 KV heads, so channels c and c + 16 (c < 16) share v row c.

V0 = "model.layers.0.self_attn.v_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"


def _attn(model: torch.nn.Module, channels: list[int], granularity: str = "neuron") -> UnitSet:
    return UnitSet.from_units(space_of(model, granularity), [(0, "attn", c) for c in channels])  # type: ignore[misc]


def test_gqa_any_takes_a_shared_row_and_counts_the_neighbours_it_touches() -> None:
    model = _model("llama")
    slices, report = unit_param_slices_and_report(model, _picked(model), gqa="any")
    assert slices[V0][1].tolist() == [4, 5]
    assert report.gqa == "any"
    assert (report.shared_rows_touched, report.shared_rows_taken, report.shared_rows_partial) == (2, 2, 2)
    assert report.outside_channels == 2  # channels 21 and 4 share rows 5 and 4 without being in the set
    assert report.inside_channels_without_row == 0
    assert report.units == 4 and report.units_total == space_of(model).total
    assert report.parameters == sum(int(m.sum()) for m in unit_param_masks(model, _picked(model)).values())
    assert report.parameters_total == sum(p.numel() for p in model.parameters())
    assert report.as_dict()["parameter_share"] == pytest.approx(report.parameters / report.parameters_total)


def test_gqa_strict_takes_a_shared_row_only_when_all_its_channels_are_in_the_set() -> None:
    model = _model("llama")
    slices, report = unit_param_slices_and_report(model, _picked(model), gqa="strict")
    assert V0 not in slices  # rows 4 and 5 are each read by one channel outside the set
    assert slices[O0][1].tolist() == [5, 20]  # readers are never shared
    assert (report.shared_rows_taken, report.outside_channels, report.inside_channels_without_row) == (0, 0, 2)
    both = unit_param_slices_and_report(model, _attn(model, [5, 21, 20]), gqa="strict")
    assert both[0][V0][1].tolist() == [5]  # 5 and 21 complete row 5; row 4 still lacks channel 4
    assert (both[1].shared_rows_touched, both[1].shared_rows_taken, both[1].shared_rows_partial) == (2, 1, 1)
    assert both[1].inside_channels_without_row == 1 and both[1].outside_channels == 0
    # heads: query heads 0 and 1 together own KV head 0, either alone owns none of it under strict
    head0 = unit_param_slices(model, _attn(model, [0], "head"), gqa="strict")
    heads01 = unit_param_slices(model, _attn(model, [0, 1], "head"), gqa="strict")
    assert V0 not in head0 and heads01[V0][1].tolist() == list(range(16))
    assert unit_param_slices(model, _attn(model, [0], "head"), gqa="any")[V0][1].tolist() == list(range(16))


def test_gqa_report_is_empty_without_shared_rows_and_unknown_mode_is_refused() -> None:
    model = _model("gpt2")  # no GQA: every value row has one reader
    any_, report = unit_param_slices_and_report(model, _picked(model), gqa="any")
    strict, _ = unit_param_slices_and_report(model, _picked(model), gqa="strict")
    assert {k: v[1].tolist() for k, v in any_.items()} == {k: v[1].tolist() for k, v in strict.items()}
    assert report.shared_rows_touched == report.outside_channels == report.inside_channels_without_row == 0
    with pytest.raises(UserError, match="unknown gqa mode 'some'"):
        unit_param_slices(model, _picked(model), gqa="some")


@pytest.mark.parametrize("gqa", ["any", "strict"])
def test_freeze_gqa_modes_decide_whether_the_shared_row_moves(gqa: str) -> None:
    model = _model("llama")
    before = _snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with freeze_units(model, _attn(model, [5]), gqa=gqa) as frozen:
        assert isinstance(frozen.report, SliceReport) and frozen.report.gqa == gqa
        assert frozen.report.parameters == frozen.frozen_parameters
        for _ in range(3):
            _step(model, opt, _inputs())
            frozen.restore()
    v_row = model.get_parameter(V0).detach()[5]
    assert torch.equal(model.get_parameter(O0).detach()[:, 5], before[O0][:, 5])  # the reader is frozen either way
    assert torch.equal(v_row, before[V0][5]) == (gqa == "any")
    assert frozen.report.outside_channels == (1 if gqa == "any" else 0)


@pytest.mark.parametrize("gqa", ["any", "strict"])
def test_train_only_gqa_modes_decide_whether_the_shared_row_trains(gqa: str) -> None:
    model = _model("llama")
    before = _snapshot(model)
    deltas = train_only_units(model, _attn(model, [5]), gqa=gqa)
    assert deltas.report is not None and deltas.report.parameters == deltas.trainable_parameters
    opt = torch.optim.AdamW(deltas.parameters(), lr=1e-2)
    for _ in range(3):
        _step(model, opt, _inputs())
    deltas.merge()
    after = model.state_dict()
    assert not torch.equal(after[O0][:, 5], before[O0][:, 5])
    assert torch.equal(after[V0][5], before[V0][5]) == (gqa == "strict")
    assert deltas.report.outside_channels == (1 if gqa == "any" else 0)
    assert deltas.report.inside_channels_without_row == (1 if gqa == "strict" else 0)


# -- ablation -----------------------------------------------------------------------------------------------------


def _calibrate(model: torch.nn.Module, seed: int = 3) -> UnitStatistics:
    """Channel statistics of every unit group on a few random token sequences (all tokens counted)."""
    x = _inputs(seed)
    recorder = ActivationRecorder(model, get_adapter(model))
    with torch.no_grad(), recorder.recording():
        recorder.set_mask(torch.ones(x.shape, dtype=torch.bool))
        model(x)
    return UnitStatistics(recorder.stats)


def _logits(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs(seed)).logits


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_channel_means_are_the_calibration_means_per_group() -> None:
    model = _model("llama")
    stats = _calibrate(model)
    means = channel_means(stats)
    assert set(means) == {g.key for g in get_adapter(model).groups()}
    assert means["layers.0.attn"].dtype == torch.float64 and means["layers.0.attn"].shape == (64,)
    assert torch.equal(means["layers.1.mlp"], stats.groups["layers.1.mlp"].mean)


def test_mean_ablation_of_a_constant_channel_is_exactly_the_unablated_model() -> None:
    model = _model("gpt2")
    j = 7
    with torch.no_grad():  # MLP neuron j of layer 1 reads gelu(0.7) on every token: a constant channel
        model.transformer.h[1].mlp.c_fc.weight[:, j] = 0.0
        model.transformer.h[1].mlp.c_fc.bias[j] = 0.7
    means = channel_means(_calibrate(model))
    assert means["layers.1.mlp"][j] != 0.0
    units = UnitSet.from_units(space_of(model), [(1, "mlp", j)])
    base = _logits(model)
    with ablate(model, units, mode="mean", means=means):
        assert torch.equal(_logits(model), base)
    with ablate(model, units, mode="zero"):
        assert not torch.equal(_logits(model), base)  # zeroing a channel whose mean is not zero shifts the output


def test_mean_ablation_folds_the_channel_means_into_the_output_like_flap() -> None:
    """Head granularity under GQA: o_proj's output equals the kept columns on the kept channels plus
    W[:, j] * mean_j for every channel j of the ablated head (FLAP's bias compensation), each with its own mean."""
    model = _model("llama")
    means = channel_means(_calibrate(model))
    units = UnitSet.from_units(space_of(model, "head"), [(0, "attn", 1)])  # query head 1 = channels 16..31
    removed = torch.zeros(64, dtype=torch.bool)
    removed[16:32] = True
    assert means["layers.0.attn"][16:32].unique().numel() == 16  # distinct means per channel
    seen: dict[str, torch.Tensor] = {}
    o_proj = model.model.layers[0].self_attn.o_proj
    pre = o_proj.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach().clone()))
    post = o_proj.register_forward_hook(lambda _m, _a, y: seen.__setitem__("y", y.detach().clone()))
    try:
        with ablate(model, units, mode="mean", means=means):
            _logits(model)
    finally:
        pre.remove()
        post.remove()
    w = o_proj.weight.detach().double()
    x = seen["x"].double()
    expected = x[..., ~removed] @ w[:, ~removed].T + w[:, removed] @ means["layers.0.attn"][removed]
    assert torch.allclose(seen["y"].double(), expected, atol=1e-5)
    assert not torch.allclose(seen["y"].double(), x[..., ~removed] @ w[:, ~removed].T, atol=1e-5)  # the bias matters


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_leaves_weights_bit_identical_and_removes_its_hooks(mode: str) -> None:
    model = _model("llama")
    means = channel_means(_calibrate(model))
    before, hooks, base = _snapshot(model), _hooks(model), _logits(model)
    with ablate(model, _picked(model), mode=mode, means=means):
        assert not torch.equal(_logits(model), base)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _hooks(model) == hooks and torch.equal(_logits(model), base)
    with pytest.raises(RuntimeError), ablate(model, _picked(model), mode=mode, means=means):
        raise RuntimeError("boom")
    assert _hooks(model) == hooks


def test_zero_and_mean_ablation_differ_when_the_mean_is_not_zero() -> None:
    model = _model("llama")
    means = channel_means(_calibrate(model))
    units = _picked(model)
    with ablate(model, units, mode="zero"):
        zero = _logits(model)
    with ablate(model, units, mode="mean", means=means):
        mean = _logits(model)
    assert not torch.equal(zero, mean)
    zeros = {k: torch.zeros_like(v) for k, v in means.items()}
    with ablate(model, units, mode="mean", means=zeros):  # a zero mean is zero ablation
        assert torch.equal(_logits(model), zero)


def test_nested_ablations_compose_and_unwind() -> None:
    model = _model("llama")
    means = channel_means(_calibrate(model))
    space = space_of(model)
    a = UnitSet.from_units(space, [(0, "attn", 5), (1, "mlp", 3)])
    b = UnitSet.from_units(space, [(0, "attn", 40), (1, "mlp", 100)])
    with ablate(model, a, mode="mean", means=means):
        outer = _logits(model)
        with ablate(model, b, mode="zero"):
            nested = _logits(model)
        assert torch.equal(_logits(model), outer)
    # one ablation of a | b whose means are zero on b's channels computes the same
    mixed = {k: v.clone() for k, v in means.items()}
    for key, m in b.channel_masks().items():
        mixed[key][m] = 0.0
    with ablate(model, a | b, mode="mean", means=mixed):
        assert torch.equal(_logits(model), nested)
    assert not torch.equal(nested, outer)


def test_ablation_bad_input_is_a_user_error() -> None:
    model = _model("llama")
    with pytest.raises(UserError, match="unknown ablation mode 'half'"), ablate(model, _picked(model), mode="half"):
        pass
    with pytest.raises(UserError, match="needs the calibration means"), ablate(model, _picked(model), mode="mean"):
        pass
    short = {"layers.0.attn": torch.zeros(3)}
    with pytest.raises(UserError, match="layers.0.attn"), ablate(model, _picked(model), mode="mean", means=short):
        pass
    assert _hooks(model) == 0


# -- GQA through training: TrainConfig.gqa, results and `ssah train --gqa` -----------------------------------------


@pytest.mark.parametrize(("mode", "gqa"), [("freeze", "strict"), ("only", "any")])
def test_train_model_passes_gqa_and_reports_the_unit_slices(mode: str, gqa: str) -> None:
    from ssah.data import Example, PromptSet
    from ssah.training import TrainConfig, train_model

    model, tok = build_tiny_model("llama")
    before = _snapshot(model)
    data = PromptSet("toy", "memory", (Example("Say hello.", "Hello there!"), Example("Say bye.", "Bye now.")))
    cfg = TrainConfig(model="tiny-random-llama", lr=1e-2, batch_size=2, max_steps=2, gqa=gqa)
    units = _attn(model, [5])
    res = train_model(model, tok, data, cfg, progress=False, **{mode: units})
    report = res.summary()["unit_slices"]
    assert report["gqa"] == gqa and report["units"] == 1
    assert report["unit_share"] == pytest.approx(1 / space_of(model).total)
    moved = not torch.equal(model.state_dict()[V0][5], before[V0][5])
    if mode == "freeze":  # strict: the shared row is not frozen, so it trains
        assert report["outside_channels"] == 0 and report["inside_channels_without_row"] == 1 and moved
        assert res.trainable["params"] == res.trainable["total"] - report["parameters"]
    else:  # any: the shared row trains with the set, for channel 21 too
        assert report["outside_channels"] == 1 and moved
        assert res.trainable["params"] == report["parameters"]
    with pytest.raises(UserError, match="unknown gqa 'most'"):
        TrainConfig.build({"model": "tiny-random-llama", "gqa": "most"})


def test_cli_train_gqa_option_reaches_results(tmp_path, capsys, user_error) -> None:
    import json

    from ssah.categorize import categorize
    from ssah.cli import main
    from ssah.models import model_fingerprint

    model, _ = build_tiny_model("llama")
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron", model_fingerprint(model))
    g = torch.Generator().manual_seed(1)
    s, u = torch.rand(space.total, generator=g), torch.rand(space.total, generator=g)
    categorize(s, u, space=space, shares={"scu": 0.05, "ucu": 0.1, "ru": 0.2}).save(tmp_path / "units.safetensors")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w}!"}) + "\n" for w in ("hi", "yo")))
    common = ["train", "tiny-random-llama", "--data", str(data), "--freeze", f"{tmp_path / 'units.safetensors'}:SCU"]
    fast = ["--no-progress", "--max-steps", "1", "--batch-size", "2", "--max-length", "64"]
    assert main([*common, "--gqa", "strict", "--out", str(tmp_path / "ft"), *fast]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["unit_slices"]["gqa"] == "strict" and res["settings"]["gqa"] == "strict"
    assert res["unit_slices"]["units"] == res["freeze"]["units"] > 0
    user_error([*common, "--gqa", "half", "--out", str(tmp_path / "bad"), *fast], "unknown gqa 'half'")
