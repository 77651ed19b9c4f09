"""Scoring metrics against direct computations on stored activations (which the real code never stores)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssah.arch import get_adapter
from ssah.data import Example, PromptSet, collate, encode_set
from ssah.errors import UnitFileError, UserError
from ssah.scoring import Scores, collect_statistics, compute_scores, score_units
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
        norms = adapter.reader_weight(g).detach().double().norm(dim=0)
        expected = {
            "fluctuation": x.var(0, unbiased=False) * norms**2,
            "wanda": x.abs().mean(0) * norms,
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


def test_taylor_matches_autograd(tiny_llama) -> None:
    model, tok = tiny_llama
    data = small_set(3)
    scores = score_units(model, tok, data, metric="taylor", batch_size=2, progress=False)
    adapter = get_adapter(model)
    enc = encode_set(tok, data)
    batch = collate(enc, tok.pad_token_id)
    g = adapter.groups()[2]
    w = adapter.reader_weight(g)
    grad = torch.autograd.grad(
        F.cross_entropy(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].flatten(0, 1),
            batch["labels"][:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        ),
        w,
    )[0]
    n = int((batch["labels"][:, 1:] != -100).sum())
    expected = (w.detach() * grad).double().abs().sum(dim=0) / n
    assert torch.allclose(scores.values[g.key], expected, rtol=1e-4, atol=1e-12)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    with pytest.raises(UserError, match="needs a response"):
        score_units(model, tok, small_set(2, responses=False), metric="taylor", progress=False)


def test_scores_roundtrip_and_wrong_model(tiny_llama, tmp_path) -> None:
    model, tok = tiny_llama
    s = score_units(model, tok, small_set(2), progress=False)
    path = tmp_path / "s.safetensors"
    s.save(path)
    back = Scores.load(path, s.space)
    assert back.metric == "fluctuation" and back.tokens == s.tokens and torch.equal(back.flat(), s.flat())
    with pytest.raises(UnitFileError, match="another unit layout"):
        Scores.load(path, UnitSpace([GroupShape(0, "mlp", 3)]))


def test_stats_can_be_rescored_with_another_metric(tiny_llama) -> None:
    model, tok = tiny_llama
    stats = collect_statistics(model, tok, small_set(3), progress=False)
    space = score_units(model, tok, small_set(1), progress=False).space
    f = compute_scores(model, stats, "fluctuation", space)
    w = compute_scores(model, stats, "wanda", space)
    assert f.tokens == w.tokens and not torch.equal(f.flat(), w.flat())
    with pytest.raises(UserError, match="unknown metric"):
        compute_scores(model, stats, "snipe", space)
