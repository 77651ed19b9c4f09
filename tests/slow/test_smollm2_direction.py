"""The refusal direction on the aligned SmolLM2 (about a minute on 2 cores): chosen on held-out prompts, ablating
it lowers the first-token refusal score of harmful prompts more than random directions of the same norm do, and the
exported orthogonalised folder (tied embeddings untied), loaded by plain transformers, equals the hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from ssah.data import load_prompts
from ssah.direction import (
    Selection,
    ablated_direction,
    fit_direction,
    last_logprobs,
    random_direction,
    refusal_scores,
    save_direction,
)
from ssah.export import export_model
from ssah.judges import opener_token_ids
from ssah.models import load_model

pytestmark = pytest.mark.slow


def test_direction_on_aligned_smollm2(aligned_smollm2: Path, tmp_path: Path) -> None:
    lm = load_model(str(aligned_smollm2), dtype="float32", device="cpu")
    harmful = [e.prompt for e in load_prompts("builtin:harmful")]
    harmless = [e.prompt for e in load_prompts("builtin:benign")]
    # on this 135M model every candidate that bypasses refusal has a first-token KL above the paper's 0.1 filter
    # (measured: README), so the filter is lifted here to test the mechanism
    sel: Selection = fit_direction(
        lm.model, lm.tokenizer, harmful[0:48:3], harmless[0:48:3], layer_step=4, positions=1, kl_max=2.0
    )
    test = harmful[1::10]
    refusal, compliance = opener_token_ids(lm.tokenizer)

    def score(ctx) -> float:
        with ctx:
            return float(refusal_scores(last_logprobs(lm.model, lm.tokenizer, test), refusal, compliance).mean())

    base = score(torch.no_grad())
    direction = score(ablated_direction(lm.model, sel.direction))
    randoms = [score(ablated_direction(lm.model, random_direction(sel.direction, s))) for s in range(3)]
    assert direction < min(randoms) and direction < base

    save_direction(tmp_path, sel, fingerprint=lm.fingerprint, model_name=str(aligned_smollm2))
    out = export_model(str(aligned_smollm2), tmp_path / "edited", orthogonalize=str(tmp_path), dtype="float32")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = None
    with ablated_direction(lm.model, sel.direction):
        want = last_logprobs(lm.model, lm.tokenizer, test[:4])
    got = last_logprobs(back, lm.tokenizer, test[:4])
    assert float((got - want).abs().max()) < 1e-3
