"""Importance scores per unit, from streaming statistics and the reader weights.

Metrics (all raw and non-negative, one value per channel):
- ``fluctuation`` (FLAP): variance of the unit's input over calibration tokens x squared norm of its reader column;
- ``wanda``: mean |x| of the unit's input x norm of its reader column;
- ``magnitude``: norm of the reader column (data-free);
- ``taylor`` (SNIP-like): sum over the reader column of |W * dL/dW|, L the response-token loss, per token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ssah.arch import ArchAdapter, get_adapter
from ssah.data import PromptSet, TokenRegion, batches, collate, encode_set
from ssah.errors import UnitFileError, UserError
from ssah.modelutil import model_device, pad_id
from ssah.stats import ActivationRecorder, RunningStats, UnitStatistics
from ssah.units import UnitSpace

Metric = Literal["fluctuation", "wanda", "magnitude", "taylor"]
METRICS: tuple[Metric, ...] = ("fluctuation", "wanda", "magnitude", "taylor")
SCORE_FILE_FORMAT = "ssah.scores/1"


def check_metric(metric: str) -> Metric:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    return metric  # type: ignore[return-value]


@dataclass
class Scores:
    """Raw per-channel importance scores of every unit group, with what produced them."""

    space: UnitSpace  # neuron granularity
    values: dict[str, torch.Tensor]  # group key -> float64 [channels], non-negative
    metric: str
    tokens: int
    data_hash: str
    dataset: str = ""
    region: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def flat(self) -> torch.Tensor:
        """All scores as one vector in the space's flat order."""
        return self.space.join(self.values)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as safetensors (one float64 vector per group key) with metadata, atomically."""
        path = Path(path)
        meta = {
            "format": SCORE_FILE_FORMAT,
            "metric": self.metric,
            "tokens": str(self.tokens),
            "data_hash": self.data_hash,
            "dataset": self.dataset,
            "region": self.region,
            "structure_hash": self.space.structure_hash,
            "structure": json.dumps(self.space.structure(), separators=(",", ":")),
            "model_fingerprint": self.space.model_fingerprint or "",
            "model_name": self.space.model_name or "",
            **self.meta,
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({k: v.contiguous() for k, v in self.values.items()}, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], space: UnitSpace) -> Scores:
        """Read a score file and check it belongs to the model of ``space``."""
        path = Path(path)
        if not path.is_file():
            raise UnitFileError(f"score file {path} not found: pass a scores/*.safetensors written by `ssah units`")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != SCORE_FILE_FORMAT:
                raise UnitFileError(
                    f"{path} is not an ssah score file; pass a scores/*.safetensors written by `ssah units`"
                )
            if meta["structure_hash"] != space.structure_hash:
                raise UnitFileError(
                    f"{path} was computed on a model with another unit layout; score this model instead"
                )
            values = {k: f.get_tensor(k) for k in space.group_keys()}
        known = ("format", "metric", "tokens", "data_hash", "dataset", "region", "structure_hash", "structure")
        return cls(
            space,
            values,
            meta["metric"],
            int(meta["tokens"]),
            meta["data_hash"],
            meta.get("dataset", ""),
            meta.get("region", ""),
            {k: v for k, v in meta.items() if k not in known},
        )


def collect_statistics(
    model: nn.Module,
    tokenizer: object,
    data: PromptSet,
    *,
    region: TokenRegion = "prompt+response",
    batch_size: int = 8,
    max_length: int | None = 512,
    system: str | None = None,
    gradients: bool = False,
    progress: bool = True,
    desc: str | None = None,
    adapter: ArchAdapter | None = None,
) -> UnitStatistics:
    """One pass over ``data``: streaming activation statistics of every unit (and reader gradients if asked).

    With ``gradients`` the summed gradient of the response-token cross-entropy with respect to each reader
    weight is accumulated too (for the taylor metric); otherwise the pass runs under ``torch.no_grad``.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if gradients and not data.has_responses:
        raise UserError(
            f"the taylor metric needs a response for every example, and {data.name!r} lacks some; "
            "use a data set with a response column or another metric"
        )
    adapter = adapter or get_adapter(model)
    groups = adapter.groups()
    pad = pad_id(tokenizer)
    encoded = encode_set(tokenizer, data, system=system, max_length=max_length)
    order = batches(encoded, batch_size)
    device = model_device(model)
    recorder = ActivationRecorder(model, adapter, groups)
    grad_sum: dict[str, torch.Tensor] = {}
    grad_tokens = 0

    readers = [adapter.reader_weight(g) for g in groups]
    saved_flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        if gradients:
            for p in model.parameters():
                p.requires_grad_(False)
            for w in readers:
                w.requires_grad_(True)
                w.grad = None
        with recorder.recording(), torch.set_grad_enabled(gradients):
            for idx in tqdm(order, desc=desc or f"statistics: {data.name}", disable=not progress, unit="batch"):
                batch = collate([encoded[i] for i in idx], pad, region=region, padding_side="right")
                batch = {k: v.to(device) for k, v in batch.items()}
                recorder.set_mask(batch["count_mask"])
                out = _forward(model, batch, all_logits=gradients)
                if gradients:
                    logits = out.logits[:, :-1].float()
                    labels = batch["labels"][:, 1:]
                    loss = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                    )
                    loss.backward()
                    grad_tokens += int((labels != -100).sum())
                del out
        if gradients:
            for g, w in zip(groups, readers, strict=True):
                grad_sum[g.key] = (w.grad if w.grad is not None else torch.zeros_like(w)).detach().to(torch.float64)
                w.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(saved_flags.get(id(p), p.requires_grad))  # offloading swaps Parameter objects
        model.train(was_training)
    stats = {k: v.to("cpu") for k, v in recorder.stats.items()}
    return UnitStatistics(
        stats, {k: v.cpu() for k, v in grad_sum.items()}, grad_tokens, len(data), [data.fingerprint()]
    )


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], *, all_logits: bool) -> Any:
    """Forward pass; without a loss only the last position's logits are computed (statistics need none, and the
    vocabulary projection of every token would cost time and hundreds of MB per batch)."""
    kwargs: dict[str, Any] = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "use_cache": False,
    }
    if not all_logits:
        try:
            return model(**kwargs, logits_to_keep=1)
        except TypeError:  # a model class without logits_to_keep
            pass
    return model(**kwargs)


def compute_scores(
    model: nn.Module,
    statistics: UnitStatistics,
    metric: str,
    space: UnitSpace,
    *,
    dataset: str = "",
    region: str = "",
    adapter: ArchAdapter | None = None,
) -> Scores:
    """Turn statistics into raw per-channel scores with the reader weights of ``model``."""
    metric = check_metric(metric)
    adapter = adapter or get_adapter(model)
    if metric == "taylor" and not statistics.grad_sum:
        raise UserError("the taylor metric needs gradients: collect statistics with gradients=True")
    values: dict[str, torch.Tensor] = {}
    for g in adapter.groups():
        st: RunningStats = statistics.groups[g.key]
        norms = adapter.reader_column_norms(g).to(torch.float64).cpu()
        if metric == "fluctuation":
            v = st.var * norms.square()
        elif metric == "wanda":
            v = st.mean_abs * norms
        elif metric == "magnitude":
            v = norms
        else:
            w = adapter.reader_weight(g).detach().to(torch.float64).cpu()
            prod = (w * statistics.grad_sum[g.key]).abs()
            v = prod.movedim(g.reader.dim, 0).reshape(g.size, -1).sum(dim=1) / max(statistics.grad_tokens, 1)
        values[g.key] = v.clamp_min(0.0)
    return Scores(space, values, metric, statistics.tokens, statistics.data_hash, dataset, region)


def score_units(
    model: nn.Module,
    tokenizer: object,
    data: PromptSet,
    *,
    metric: str = "fluctuation",
    region: TokenRegion = "prompt+response",
    batch_size: int = 8,
    max_length: int | None = 512,
    system: str | None = None,
    space: UnitSpace | None = None,
    progress: bool = True,
) -> Scores:
    """Score every unit of ``model`` on a calibration set with one streaming pass (the main scoring API)."""
    metric = check_metric(metric)
    adapter = get_adapter(model)
    space = space or UnitSpace.from_groups(adapter.groups())
    stats = collect_statistics(
        model,
        tokenizer,
        data,
        region=region,
        batch_size=batch_size,
        max_length=max_length,
        system=system,
        gradients=metric == "taylor",
        progress=progress,
        adapter=adapter,
    )
    return compute_scores(model, stats, metric, space, dataset=data.source, region=region, adapter=adapter)
