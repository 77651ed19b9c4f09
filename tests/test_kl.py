"""KL(original || edited) on harmless prompts: zero for the unedited model, positive and batch-independent for an
edit, computed against one reference, with an interval over prompts; an empty set is a one-line error."""

from __future__ import annotations

import pytest
import torch

from ssah.direction import ablated_direction
from ssah.errors import UserError
from ssah.evaluate import kl_divergence, kl_reference, kl_summary
from ssah.tiny import build_tiny_model

PROMPTS = ["How do I bake bread?", "Name a colour.", "Tell me about the sea, briefly please.", "Hi"]


def test_kl_is_zero_unedited_and_positive_when_edited():
    model, tok = build_tiny_model("llama", seed=5)
    ref = kl_reference(model, tok, PROMPTS, reply_tokens=4, batch_size=3)
    assert all(1 <= lp.shape[0] <= 4 for lp in ref.logprobs)
    same = kl_divergence(model, tok, ref)
    assert max(same.reply) < 1e-5 and max(same.first) < 1e-5
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with ablated_direction(model, r):
        edited = kl_divergence(model, tok, ref)
    assert min(edited.first) > 1e-6
    assert edited.tokens == sum(lp.shape[0] for lp in ref.logprobs)
    d = edited.to_dict()
    lo, hi = d["reply"]["ci95"]
    assert lo <= d["reply"]["mean"] <= hi and d["reply"]["n"] == len(PROMPTS)


def test_kl_does_not_depend_on_batching():
    model, tok = build_tiny_model("gpt2", seed=6)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    results = []
    for bs in (1, 4):
        ref = kl_reference(model, tok, PROMPTS, reply_tokens=3, batch_size=bs)
        with ablated_direction(model, r):
            results.append(kl_divergence(model, tok, ref).reply)
    assert results[0] == pytest.approx(results[1], rel=1e-3, abs=1e-6)


def test_kl_matches_a_direct_computation_at_the_first_position():
    model, tok = build_tiny_model("llama", seed=7)
    ref = kl_reference(model, tok, PROMPTS[:1], reply_tokens=2)
    from ssah.direction import last_logprobs

    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    p = last_logprobs(model, tok, PROMPTS[:1])
    with ablated_direction(model, r):
        q = last_logprobs(model, tok, PROMPTS[:1])
        got = kl_divergence(model, tok, ref).first[0]
    want = float((p.exp() * (p - q)).sum())
    assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_empty_harmless_set_is_a_user_error():
    model, tok = build_tiny_model("llama")
    with pytest.raises(UserError, match="harmless"):
        kl_reference(model, tok, [])
    with pytest.raises(UserError):
        kl_summary([])
