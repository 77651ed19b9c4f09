"""logits_at: logits only where they are read, equal to the full pass there, whatever the model class supports."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssah.inference import logits_at


class _NoKeep(torch.nn.Module):
    """A model class whose forward takes no ``logits_to_keep`` (older or custom code)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class _IgnoresTensor(_NoKeep):
    """Takes ``logits_to_keep`` but computes every position when it is a tensor."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: Any = 0) -> Any:
        keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("wrap", [None, _NoKeep, _IgnoresTensor])
def test_logits_at_equals_the_full_pass_at_the_kept_positions(tiny_llama: Any, batch: Any, wrap: Any) -> None:
    model = tiny_llama[0].eval()
    with torch.no_grad():
        full = model(**batch).logits
        m = model if wrap is None else wrap(model)
        cols = torch.tensor([2, 5, 6])
        for keep, want in ((1, full[:, -1:]), (4, full[:, -4:]), (cols, full[:, cols])):
            got = logits_at(m, keep, **batch)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_logits_at_projects_only_the_kept_positions(tiny_llama: Any, batch: Any) -> None:
    model = tiny_llama[0].eval()
    widths: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    try:
        with torch.no_grad():
            logits_at(model, torch.tensor([0, 3]), **batch)
            logits_at(model, 1, **batch)
    finally:
        handle.remove()
    assert widths == [2, 1]
    with pytest.raises(ValueError, match="at least 1"):
        logits_at(model, 0, **batch)
