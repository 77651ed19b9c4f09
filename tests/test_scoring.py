"""Scoring metrics against direct computations on stored activations (which the real code never stores)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssah.arch import get_adapter
from ssah.data import Example, PromptSet, collate, encode_set
from ssah.errors import UnitFileError, UserError
from ssah.scoring import (
    METRICS,
    Scores,
    collect_statistics,
    compute_scores,
    gradient_mode,
    response_loss,
    score_units,
)
from ssah.units import GroupShape, UnitSpace


def small_set(n: int = 5, responses: bool = True) -> PromptSet:
    examples = tuple(
        Example(
            f"Question {i}: what is {i} plus {i * 3}?" + " Please." * (i % 3), f"It is {4 * i}." if responses else None
        )
        for i in range(n)
    )
    return PromptSet("toy", "memory:toy", examples)


def direct_activations(model, tok, data: PromptSet, region: str, key: str):
    """All selected-token inputs of one reader, concatenated (the reference the streaming code must match)."""
    adapter = get_adapter(model)
    g = next(g for g in adapter.groups() if g.key == key)
    enc = encode_set(tok, data, max_length=512)
    batch = collate(enc, tok.pad_token_id, region=region)
    seen = []
    h = model.get_submodule(g.reader_module).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        h.remove()
    return seen[0][batch["count_mask"]].double(), g, adapter, batch


@pytest.mark.parametrize("metric", ["fluctuation", "wanda", "magnitude"])
def test_activation_metrics_match_direct_computation(tiny_llama, metric: str) -> None:
    model, tok = tiny_llama
    data = small_set()
    scores = score_units(model, tok, data, metric=metric, batch_size=2, progress=False)
    for key in ("layers.0.attn", "layers.1.mlp"):
        x, g, adapter, batch = direct_activations(model, tok, data, "prompt+response", key)
        w = adapter.reader_weight(g).detach().double()  # nn.Linear [out, in]: unit j is column j
        norms = w.norm(dim=0)
        expected = {
            "fluctuation": x.var(0, unbiased=False) * norms**2,
            # Wanda (Sun et al. 2023): |W[i, j]| * ||X_j||_2 per weight, X_j over all counted tokens; summed over i
            "wanda": (w.abs() * x.norm(dim=0)[None, :]).sum(dim=0),
            "magnitude": norms,
        }[metric]
        assert torch.allclose(scores.values[key], expected, rtol=1e-5, atol=1e-10)
    assert scores.tokens == int(batch["count_mask"].sum())
    assert all(bool((v >= 0).all()) for v in scores.values.values())


def test_scores_do_not_depend_on_batching_or_padding(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(6)
    a = score_units(model, tok, data, batch_size=1, progress=False)
    b = score_units(model, tok, data, batch_size=4, progress=False)
    assert a.tokens == b.tokens
    assert torch.allclose(a.flat(), b.flat(), rtol=1e-4)


def test_token_regions(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(4)
    counts = {
        r: score_units(model, tok, data, region=r, progress=False).tokens
        for r in ("prompt+response", "response", "prompt", "all")
    }
    assert counts["prompt"] + counts["response"] == counts["prompt+response"] < counts["all"]
    assert counts["response"] > 0


def test_halves_merge_to_the_full_statistics(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(6)
    full = collect_statistics(model, tok, data, batch_size=3, progress=False)
    a, b = (collect_statistics(model, tok, part, batch_size=2, progress=False) for part in data.split(2))
    merged = a.merge(b)
    assert merged.tokens == full.tokens and merged.examples == 6
    for key, st in full.groups.items():
        assert torch.allclose(merged.groups[key].var, st.var, rtol=1e-5)


def _example_loss(model, batch):
    """Mean response-token cross-entropy of each row, summed over rows (the reference loss of the gradient metrics)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return sum(
        F.cross_entropy(logits[r], labels[r], ignore_index=-100)
        for r in range(labels.shape[0])
        if (labels[r] != -100).any()
    )


def _per_unit(per_weight: torch.Tensor, g) -> torch.Tensor:
    return per_weight.movedim(g.reader.dim, 0).reshape(g.size, -1).double().sum(dim=1)


def test_response_loss_keeps_only_needed_logits(tiny_llama) -> None:
    """Logits only where a response token is predicted give the full-logits loss, also for a model class
    without ``logits_to_keep`` (it computes all logits and they are sliced)."""
    model, tok = tiny_llama

    class NoKeep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask, use_cache=False):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    batch = collate(encode_set(tok, small_set(4)), tok.pad_token_id)
    with torch.no_grad():
        expected = _example_loss(model, batch)
        for m in (model, NoKeep()):
            loss, examples, tokens = response_loss(m, batch)
            assert torch.allclose(loss, expected, rtol=1e-5)
            assert examples == 4 and tokens == int((batch["labels"] != -100).sum())
        no_response = dict(batch, labels=torch.full_like(batch["labels"], -100))
        assert response_loss(model, no_response)[1:] == (0, 0)


def test_taylor_is_the_set_gradient_score(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(3)
    scores = score_units(model, tok, data, metric="taylor", batch_size=2, progress=False)
    adapter = get_adapter(model)
    batch = collate(encode_set(tok, data), tok.pad_token_id)
    g = adapter.groups()[2]
    w = adapter.reader_weight(g)
    grad = torch.autograd.grad(_example_loss(model, batch), w)[0]
    expected = _per_unit((w.detach() * grad).abs(), g) / 3
    assert torch.allclose(scores.values[g.key], expected, rtol=1e-4, atol=1e-12)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with pytest.raises(UserError, match="need a response"):
        score_units(model, tok, small_set(2, responses=False), metric="taylor", progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear readers and GPT-2 Conv1D readers
def test_snip_equals_brute_force_per_example_gradients(family: str) -> None:
    """SNIP (Wei et al. 2024): mean over examples of sum_i |W * dL_e/dW|, one backward per example as reference."""
    from ssah.tiny import build_tiny_model

    model, tok = build_tiny_model(family)
    data = small_set(5)
    adapter = get_adapter(model)
    # batches of 3 with right padding: the per-example split inside a batch must be exact
    stats = collect_statistics(model, tok, data, batch_size=3, gradients="both", progress=False)
    space = UnitSpace.from_groups(adapter.groups())
    snip = compute_scores(model, stats, "snip", space)
    taylor = compute_scores(model, stats, "taylor", space)
    groups = adapter.groups()
    weights = [adapter.reader_weight(g) for g in groups]
    expected = {g.key: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for example in encode_set(tok, data):
        one = collate([example], tok.pad_token_id)
        grads = torch.autograd.grad(_example_loss(model, one), weights)
        for g, w, grad in zip(groups, weights, grads, strict=True):
            expected[g.key] += _per_unit((w.detach() * grad).abs(), g)
    assert stats.grad_examples == 5
    for g in groups:
        assert torch.allclose(snip.values[g.key], expected[g.key] / 5, rtol=1e-4, atol=1e-12)
        # per-example gradients do not cancel: snip >= the set-gradient score everywhere, and differs from it
        assert bool((snip.values[g.key] >= taylor.values[g.key] * (1 - 1e-6)).all())
        assert not torch.allclose(snip.values[g.key], taylor.values[g.key], rtol=1e-2)


def test_gradient_pass_touches_only_reader_weights(tiny_llama) -> None:
    """During the gradient pass only the reader weights require gradients (backward stops at the first one)."""
    model, tok = tiny_llama
    adapter = get_adapter(model)
    readers = {id(adapter.reader_weight(g)) for g in adapter.groups()}
    seen: list[set[int]] = []
    handle = model.register_forward_pre_hook(
        lambda m, a: seen.append({id(p) for p in m.parameters() if p.requires_grad})
    )
    try:
        score_units(model, tok, small_set(3), metric="snip", batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 2 and all(flags == readers for flags in seen)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_gradient_pass_restores_flags_and_grads(tiny_llama) -> None:
    model, tok = tiny_llama
    adapter = get_adapter(model)
    embed = model.get_input_embeddings().weight
    reader = adapter.reader_weight(adapter.groups()[1])
    kept = torch.full_like(reader, 7.0)
    try:
        embed.requires_grad_(False)
        reader.grad = kept
        score_units(model, tok, small_set(2), metric="taylor", batch_size=2, progress=False)
        assert not embed.requires_grad and reader.grad is kept
        assert all(p.requires_grad for p in model.parameters() if p is not embed)
        assert all(p.grad is None for p in model.parameters() if p is not reader)
    finally:
        embed.requires_grad_(True)
        reader.grad = None


def test_scores_roundtrip_and_wrong_model(tiny_llama, tmp_path) -> None:
    model, tok = tiny_llama
    s = score_units(model, tok, small_set(2), progress=False)
    path = tmp_path / "s.safetensors"
    s.save(path)
    back = Scores.load(path, s.space)
    assert back.metric == "fluctuation" and back.tokens == s.tokens and torch.equal(back.flat(), s.flat())
    with pytest.raises(UnitFileError, match="another unit layout"):
        Scores.load(path, UnitSpace([GroupShape(0, "mlp", 3)]))


def _header_and_data(path) -> tuple[dict, bytes]:
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_saved_scores_are_determined_by_the_inputs(tiny_llama, tmp_path) -> None:
    """Two scorings of the same data give the same metadata (sorted keys, no time) and the same tensor bytes.

    Byte identity of the whole file also needs a writer with a fixed metadata key order (safetensors' own
    ``save_file`` orders them at random); until then the header is compared as parsed JSON.
    """
    model, tok = tiny_llama
    a, b = (score_units(model, tok, small_set(3), metric="wanda", progress=False) for _ in range(2))
    assert a.metadata() == b.metadata() and list(a.metadata()) == sorted(a.metadata())
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    (ha, da), (hb, db) = _header_and_data(tmp_path / "a.safetensors"), _header_and_data(tmp_path / "b.safetensors")
    assert ha == hb and da == db
    assert ha["__metadata__"] == a.metadata()


def test_stats_can_be_rescored_with_every_metric(tiny_llama) -> None:
    model, tok = tiny_llama
    stats = collect_statistics(model, tok, small_set(3), gradients=True, progress=False)
    space = score_units(model, tok, small_set(1), progress=False).space
    scores = {m: compute_scores(model, stats, m, space) for m in METRICS}
    assert len({s.tokens for s in scores.values()}) == 1
    flat = [s.flat() for s in scores.values()]
    assert all(not torch.equal(x, y) for i, x in enumerate(flat) for y in flat[i + 1 :])
    assert {m: gradient_mode(m) for m in METRICS} == {
        "fluctuation": "none",
        "wanda": "none",
        "snip": "example",
        "taylor": "set",
        "magnitude": "none",
    }
    plain = collect_statistics(model, tok, small_set(3), progress=False)
    for metric in ("snip", "taylor"):
        with pytest.raises(UserError, match=f"the {metric} metric needs"):
            compute_scores(model, plain, metric, space)
    with pytest.raises(UserError, match="unknown metric"):
        compute_scores(model, stats, "snipe", space)
    with pytest.raises(UserError, match="unknown gradient mode"):
        collect_statistics(model, tok, small_set(1), gradients="all", progress=False)  # type: ignore[arg-type]


def test_gradient_statistics_of_halves_merge(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(4)
    full = collect_statistics(model, tok, data, batch_size=4, gradients=True, progress=False)
    a, b = (
        collect_statistics(model, tok, part, batch_size=1, gradients=True, progress=False) for part in data.split(2)
    )
    merged = a.merge(b)
    assert merged.grad_examples == full.grad_examples == 4 and merged.grad_tokens == full.grad_tokens
    for key in full.groups:
        assert torch.allclose(merged.example_sum[key], full.example_sum[key], rtol=1e-4)
        assert torch.allclose(merged.grad_sum[key], full.grad_sum[key], rtol=1e-4, atol=1e-6)
