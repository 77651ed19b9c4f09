"""UnitSpace addressing, UnitSet algebra, and unit files tied to their model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ssah.arch import get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.units import GroupShape, UnitSet, UnitSpace, load_unit_sets, save_unit_sets


@pytest.fixture
def space() -> UnitSpace:
    shapes = [
        GroupShape(0, "attn", 8, 1),
        GroupShape(0, "mlp", 12, 1),
        GroupShape(1, "attn", 8, 1),
        GroupShape(1, "mlp", 12, 1),
    ]
    return UnitSpace(shapes, model_fingerprint="abc123", model_name="toy")


def test_flat_index_and_locate_roundtrip(space: UnitSpace) -> None:
    assert space.total == 40
    seen = set()
    for flat in range(space.total):
        layer, kind, index = space.locate(flat)
        assert space.flat_index(layer, kind, index) == flat
        seen.add((layer, kind, index))
    assert len(seen) == 40
    assert space.locate(8) == (0, "mlp", 0)
    assert space.locate(39) == (1, "mlp", 11)
    with pytest.raises(UserError, match="out of range"):
        space.flat_index(0, "attn", 8)
    with pytest.raises(UserError):
        space.locate(40)


def test_set_algebra(space: UnitSpace) -> None:
    a = UnitSet.from_indices(space, [0, 1, 2, 30], "A")
    b = UnitSet.from_indices(space, [2, 3, 30, 39], "B")
    assert len(a | b) == 6
    assert set((a & b).indices().tolist()) == {2, 30}
    assert set((a - b).indices().tolist()) == {0, 1}
    assert len(a ^ b) == 4
    assert len(~a) == 36
    assert a.jaccard(b) == pytest.approx(2 / 6)
    assert (0, "attn", 1) in a and (0, "attn", 3) not in a
    assert list(UnitSet.from_indices(space, [9], "x")) == [(0, "mlp", 1)]
    assert a.counts_by_layer() == [{"attn": 3, "mlp": 0}, {"attn": 0, "mlp": 1}]
    other = UnitSpace([GroupShape(0, "attn", 40, 1)])
    with pytest.raises(UserError, match="different unit spaces"):
        a | UnitSet.empty(other)


def test_random_like_is_reproducible_and_same_size(space: UnitSpace) -> None:
    a = UnitSet.from_indices(space, [0, 5, 9, 33], "A")
    r1, r2, r3 = a.random_like(seed=1), a.random_like(seed=1), a.random_like(seed=2)
    assert len(r1) == len(a) and r1 == r2 and r1 != r3
    pool = UnitSet.from_indices(space, list(range(20, 40)), "pool")
    assert len(a.random_like(seed=0, within=pool) - pool) == 0


def test_head_granularity_groups_channels(tiny_llama) -> None:
    model, _ = tiny_llama
    groups = get_adapter(model).groups()
    heads = UnitSpace.from_groups(groups, "head")
    neurons = UnitSpace.from_groups(groups, "neuron")
    attn = groups[0]
    assert heads.shape(0, "attn").size == attn.num_heads
    assert heads.shape(0, "mlp").size == neurons.shape(0, "mlp").size
    one_head = UnitSet.from_units(heads, [(0, "attn", 1)])
    chans = one_head.channel_masks()["layers.0.attn"]
    assert chans.nonzero().flatten().tolist() == list(range(attn.head_dim, 2 * attn.head_dim))
    values = torch.arange(attn.size, dtype=torch.float64)
    summed = heads.aggregate("layers.0.attn", values)
    assert summed[1] == values[attn.head_dim : 2 * attn.head_dim].sum()


def test_save_load_roundtrip_and_plain_safetensors(space: UnitSpace, tmp_path) -> None:
    a = UnitSet.from_indices(space, [0, 9, 39], "SCU")
    b = UnitSet.from_indices(space, [1, 2], "RU")
    path = tmp_path / "units.safetensors"
    save_unit_sets(path, {"SCU": a, "RU": b}, {"rule": "ssah"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert "SCU.layers.1.mlp" in keys and "RU.layers.0.attn" in keys
        assert f.get_tensor("SCU.layers.0.mlp").dtype == torch.bool
        assert f.get_tensor("SCU.layers.0.mlp").nonzero().flatten().tolist() == [1]
    loaded = load_unit_sets(path, space)
    assert loaded["SCU"] == a and loaded["RU"] == b
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left


def test_unit_file_for_another_model_is_a_clear_error(space: UnitSpace, tmp_path) -> None:
    path = tmp_path / "u.safetensors"
    save_unit_sets(path, {"SCU": UnitSet.from_indices(space, [3], "SCU")})
    other_weights = UnitSpace(space.shapes, model_fingerprint="zzz999", model_name="other")
    with pytest.raises(UnitFileError, match="another model.*--allow-other-weights"):
        load_unit_sets(path, other_weights)
    assert len(load_unit_sets(path, other_weights, allow_other_weights=True)["SCU"]) == 1
    other_layout = UnitSpace([GroupShape(0, "attn", 8, 1), GroupShape(0, "mlp", 16, 1)], model_fingerprint="abc123")
    with pytest.raises(UnitFileError, match="another unit layout"):
        load_unit_sets(path, other_layout)
    with pytest.raises(UnitFileError, match="not in"):
        load_unit_sets(path, space, names=["CU"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UnitFileError, match="not a safetensors"):
        load_unit_sets(bad, space)
