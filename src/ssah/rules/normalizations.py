"""The built-in score normalisations. Safety and utility scores are normalised before the sum and difference, so
that the two scales are comparable (and, for the per-module normalisations, so that modules of different magnitude
are too):

| normalization | value | computed over |
| --- | --- | --- |
| ``mean`` | x / mean(x) | the ranking domain (the paper: "divide by the mean over all units") |
| ``module-mean`` | x / mean(x) | each (layer, kind) module |
| ``zscore`` | (x - mean) / std | each (layer, kind) module |
| ``rank`` | rank / (n - 1), in [0, 1] | each (layer, kind) module |
| ``global-rank`` | rank / (n - 1) | the ranking domain |
| ``none`` | x | - |
"""

from __future__ import annotations

import torch

from ssah.rules.base import register_normalization


def by_mean(x: torch.Tensor) -> torch.Tensor:
    m = x.mean()
    return x / m if m > 0 else x


def zscore(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean()
    std = x.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=x.dtype)
    return centred / std if std > 0 else centred


def ranks(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[torch.sort(x, stable=True).indices] = torch.arange(x.numel(), dtype=x.dtype)
    return out / max(x.numel() - 1, 1)


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


register_normalization("mean", by_mean, scope="domain", about="x / mean(x) over the ranking domain")
register_normalization("module-mean", by_mean, scope="module", about="x / mean(x) per layer-kind module")
register_normalization("zscore", zscore, scope="module", about="(x - mean) / std per layer-kind module")
register_normalization("rank", ranks, scope="module", about="rank / (n - 1) per layer-kind module")
register_normalization("global-rank", ranks, scope="domain", about="rank / (n - 1) over the ranking domain")
register_normalization("none", unchanged, scope="none", about="raw scores")
