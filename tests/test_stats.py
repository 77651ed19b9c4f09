"""Streaming statistics: exact merges, only selected tokens counted, hooks removed, reduction across processes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssah.arch import get_adapter
from ssah.stats import ActivationRecorder, RunningStats, UnitStatistics


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_chan_merge_equals_direct_statistics(sizes: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 7 for n in sizes]
    run = RunningStats.zeros(5)
    for b in blocks:
        run.update(b)
    x = torch.cat(blocks)
    assert run.count == x.shape[0]
    if x.shape[0]:
        assert torch.allclose(run.mean, x.mean(0))
        assert torch.allclose(run.var, x.var(0, unbiased=False))
        assert torch.allclose(run.mean_abs, x.abs().mean(0))
        # Wanda's ||X_j||_2 from the same statistics: sum x^2 = M2 + n * mean^2
        assert torch.allclose(run.square_sum, x.square().sum(0))
        assert torch.allclose(run.l2_norm, x.norm(dim=0))
    else:
        assert torch.equal(run.var, torch.zeros(5, dtype=torch.float64))


def test_l2_norm_is_accurate_for_large_offsets() -> None:
    """M2 + n * mean^2 in float64 keeps the norm exact to about 1e-12 even when the mean dwarfs the spread."""
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-3 + 1e3
    run = RunningStats.zeros(3)
    for block in x.split(7):
        run.update(block.float())  # activations arrive in the model's dtype
    assert torch.allclose(run.l2_norm, x.float().double().norm(dim=0), rtol=1e-12)


def test_gradient_sums_merge() -> None:
    part = {"g": RunningStats.of(torch.ones(2, 3))}
    a = UnitStatistics(part, {"g": torch.ones(2, 3)}, 5, 2, ["a"], {"g": torch.tensor([1.0, 2.0, 3.0])}, 2)
    b = UnitStatistics(part, {"g": torch.ones(2, 3)}, 4, 1, ["b"], {"g": torch.tensor([0.5, 0.5, 0.5])}, 1)
    m = a.merge(b)
    assert m.grad_examples == 3 and m.grad_tokens == 9 and m.examples == 3
    assert torch.equal(m.example_sum["g"], torch.tensor([1.5, 2.5, 3.5]))
    assert torch.equal(m.grad_sum["g"], torch.full((2, 3), 2.0))
    plain = UnitStatistics(part, examples=1, data_hashes=["c"])
    assert not a.merge(plain).example_sum and a.merge(plain).grad_examples == 0


def test_recorder_counts_only_masked_tokens(tiny_llama) -> None:
    model, _ = tiny_llama
    adapter = get_adapter(model)
    g = adapter.groups()[1]
    ids = torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[2, 5:] = True
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(g.reader_module).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    rec = ActivationRecorder(model, adapter)
    try:
        with torch.no_grad(), rec.recording():
            rec.set_mask(mask)
            model(input_ids=ids)
    finally:
        handle.remove()
    selected = seen[0][mask].to(torch.float64)
    st_ = rec.stats[g.key]
    assert st_.count == int(mask.sum()) == selected.shape[0]
    assert torch.allclose(st_.mean, selected.mean(0))
    assert torch.allclose(st_.var, selected.var(0, unbiased=False))


def test_hooks_removed_also_on_error(tiny_llama) -> None:
    model, _ = tiny_llama
    adapter = get_adapter(model)
    rec = ActivationRecorder(model, adapter)
    before = sum(len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), rec.recording():
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before + len(adapter.groups())
        raise RuntimeError("boom")
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before


def test_recorder_requires_mask(tiny_llama) -> None:
    model, _ = tiny_llama
    rec = ActivationRecorder(model, get_adapter(model))
    with torch.no_grad(), rec.recording(), pytest.raises(RuntimeError, match="set_mask"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def _worker(rank: int, world: int, port: int, blocks: list[torch.Tensor], results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rs = RunningStats.of(blocks[rank])
        stats = UnitStatistics({"g": rs}, examples=1, data_hashes=["d"])
        merged = stats.all_reduce()
        results[rank] = (merged.groups["g"].count, merged.groups["g"].mean, merged.groups["g"].var, merged.examples)
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_two_processes() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = torch.Generator().manual_seed(3)
    blocks = [
        torch.randn(7, 4, generator=g, dtype=torch.float64),
        torch.randn(4, 4, generator=g, dtype=torch.float64) + 2,
    ]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, port, blocks, results), nprocs=2, join=True)
    x = torch.cat(blocks)
    for rank in (0, 1):
        count, mean, var, examples = results[rank]
        assert count == 11 and examples == 2
        assert torch.allclose(mean, x.mean(0)) and torch.allclose(var, x.var(0, unbiased=False))
