"""Importance scores per unit, from streaming statistics and the reader weights.

Unit j of a group is input channel j of its reader weight W (column j of an ``nn.Linear`` weight ``[out, in]``,
row j of a GPT-2 ``Conv1D``). The metrics (``fluctuation``, ``wanda``, ``snip``, ``taylor``, ``magnitude`` and any
registered one) live in :mod:`ssah.metrics`, one file each with its formula; this module runs the calibration pass
they read (:func:`collect_statistics`), applies a metric to every group (:func:`compute_scores`) and stores the
result (:class:`Scores`).

Gradient metrics need gradients of the reader weights only: every other parameter has ``requires_grad`` off
during the pass (restored after), and each reader's gradient is folded into running sums as soon as backward
reaches its layer and then freed. ``snip`` keeps one float64 number per unit; ``taylor`` keeps the set gradient,
one float32 (or wider: the weight's dtype promoted to float32) copy of every reader weight, float64 on return.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import align_module_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ssah.arch import ArchAdapter, UnitGroup, get_adapter
from ssah.data import PromptSet, TokenRegion, batches, collate, encode_set
from ssah.data.chat import context_length
from ssah.errors import UnitFileError, UserError
from ssah.inference import label_columns, logits_at, model_device, pad_id
from ssah.metrics import GRADIENT_MODES, METRICS, GradientMode, ScoreInputs, check_metric
from ssah.safefiles import save_safetensors
from ssah.stats import ActivationRecorder, UnitStatistics
from ssah.units import UnitSpace

__all__ = [
    "GRADIENT_MODES",
    "METRICS",
    "SCORE_FILE_FORMAT",
    "GradientMode",
    "Scores",
    "check_metric",
    "collect_statistics",
    "compute_scores",
    "gradient_mode",
    "response_loss",
    "score_units",
]

SCORE_FILE_FORMAT = "ssah.scores/1"


def gradient_mode(metric: str) -> GradientMode:
    """The gradients :func:`collect_statistics` must collect for ``metric`` (as the metric registered them)."""
    return METRICS.get(metric).gradients


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

    def metadata(self) -> dict[str, str]:
        """The file metadata: a function of the scores alone (no time, host or process), keys sorted."""
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
            **{str(k): str(v) for k, v in self.meta.items()},
        }
        return dict(sorted(meta.items()))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as safetensors (one float64 vector per group key) with :meth:`metadata`, atomically."""
        path = Path(path)
        tensors = {k: self.values[k].detach().to("cpu", torch.float64).contiguous() for k in sorted(self.values)}
        save_safetensors(tensors, path, self.metadata())  # canonical header: identical scores, identical bytes

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
    gradients: GradientMode | bool = "none",
    progress: bool = True,
    desc: str | None = None,
    adapter: ArchAdapter | None = None,
) -> UnitStatistics:
    """One pass over ``data``: streaming activation statistics of every unit (and reader gradients if asked).

    ``gradients`` (see :func:`gradient_mode`): ``"set"`` accumulates the set gradient sum_e dL_e/dW of every
    reader weight (taylor), ``"example"`` the per-example sums sum_e sum_i |W * dL_e/dW| per unit (snip),
    ``"both"`` (or ``True``) both; L_e is example e's mean response-token cross-entropy. Without gradients the
    pass runs under ``torch.no_grad``.
    """
    mode: GradientMode = "both" if gradients is True else "none" if gradients is False else gradients
    if mode not in GRADIENT_MODES:
        raise UserError(f"unknown gradient mode {mode!r}: use one of {', '.join(GRADIENT_MODES)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if mode != "none" and not data.has_responses:
        raise UserError(
            f"gradient metrics (snip, taylor) need a response for every example, and {data.name!r} lacks some; "
            "use a data set with a response column or another metric"
        )
    adapter = adapter or get_adapter(model)
    groups = adapter.groups()
    pad = pad_id(tokenizer)
    encoded = encode_set(tokenizer, data, system=system, max_length=max_length, context=context_length(model))
    order = batches(encoded, batch_size)
    device = model_device(model)
    recorder = ActivationRecorder(model, adapter, groups)
    readers = _ReaderGradients(model, adapter, groups, mode) if mode != "none" else None
    grad_tokens = grad_examples = 0

    was_training = model.training
    model.eval()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_restore_training(model, was_training))
        if readers is not None:
            stack.enter_context(readers.active())
        stack.enter_context(recorder.recording())
        stack.enter_context(torch.set_grad_enabled(mode != "none"))
        for idx in tqdm(order, desc=desc or f"statistics: {data.name}", disable=not progress, unit="batch"):
            batch = collate([encoded[i] for i in idx], pad, region=region, padding_side="right")
            batch = {k: v.to(device) for k, v in batch.items()}
            recorder.set_mask(batch["count_mask"])
            if readers is None:
                _forward(model, batch, keep=1)
                continue
            loss, n_examples, n_tokens = response_loss(model, batch)
            if n_examples:
                loss.backward()
            grad_examples += n_examples
            grad_tokens += n_tokens
            del loss
    grad_sum, example_sum = readers.results() if readers is not None else ({}, {})
    stats = {k: v.to("cpu") for k, v in recorder.stats.items()}
    return UnitStatistics(stats, grad_sum, grad_tokens, len(data), [data.fingerprint()], example_sum, grad_examples)


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Forward ``batch`` and return the sum over examples of each one's mean response-token cross-entropy.

    Also returns the number of examples with at least one response token (the others add nothing) and the
    number of response tokens. Per-example means, as in Wei et al.'s code (one example per step, the
    ``labels=`` loss of transformers), so that a long response does not outweigh a short one. Logits are
    computed only at positions that predict a response token in some row of the batch (prompt positions need
    none: with a vocabulary of 50k-130k the full logits would dominate the memory of the pass).
    """
    targets = batch["labels"][:, 1:]
    positions = label_columns(targets)
    if positions.numel() == 0:  # still run the forward: the activation statistics count this batch
        _forward(model, batch, keep=1)
        return torch.zeros(()), 0, 0
    logits = _forward(model, batch, keep=positions)
    targets = targets[:, positions]
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counts = (targets != -100).sum(dim=1)
    keep = counts > 0
    loss = (per_token.sum(dim=1)[keep] / counts[keep]).sum()
    return loss, int(keep.sum()), int(counts.sum())


@contextlib.contextmanager
def _restore_training(model: nn.Module, was_training: bool) -> Iterator[None]:
    try:
        yield
    finally:
        model.train(was_training)


class _ReaderGradients:
    """Reader-weight gradients of a scoring pass, folded per layer into running sums as backward reaches it.

    While active, only the reader weights require gradients (every other parameter's flag is restored on exit),
    so backward stops at the first reader and no other weight gradient is ever allocated. Each reader's
    ``.grad`` is folded into the set sum (``"set"``) by a post-accumulate hook and freed at once. The per-example
    sums (``"example"``) come from the reader's input x and output gradient g, captured by a forward hook and a
    tensor hook: for a linear map y = x W^T the gradient of example e is dL_e/dW = g_e^T x_e (rows of other
    examples carry no gradient of L_e), so one batched backward gives every example's gradient without a
    backward per example; it is reduced to sum_i |W * dL_e/dW| per unit right away (one [out, in] product at
    a time). Hand-written because torch.func's per-sample gradients would need the whole model functional.
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, groups: Sequence[UnitGroup], mode: GradientMode):
        self.model = model
        self.mode = mode
        self.groups = list(groups)
        self.weights = {g.key: adapter.reader_weight(g) for g in self.groups}
        self.set_sum: dict[str, torch.Tensor] = {}
        self.example_sum: dict[str, torch.Tensor] = {}
        if mode in ("example", "both"):
            for g in self.groups:
                module = model.get_submodule(g.reader_module)
                if not isinstance(module, (nn.Linear, Conv1D)):
                    raise UserError(
                        f"the snip metric needs linear readers, and {g.reader_module} is a "
                        f"{type(module).__name__}; use the taylor metric for this model"
                    )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        flags = {p: p.requires_grad for p in self.model.parameters()}
        saved = {k: w.grad for k, w in self.weights.items()}
        handles: list[Any] = []
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for g in self.groups:
                w = self.weights[g.key]
                w.requires_grad_(True)
                w.grad = None
                handles.append(w.register_post_accumulate_grad_hook(self._fold_set(g)))
                if self.mode in ("example", "both"):
                    module = self.model.get_submodule(g.reader_module)
                    handles.append(module.register_forward_hook(self._capture(g)))
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for k, w in self.weights.items():
                w.grad = saved[k]

    def _fold_set(self, g: UnitGroup) -> Any:
        def hook(w: torch.Tensor) -> None:
            if self.mode in ("set", "both") and w.grad is not None:
                acc = self.set_sum.get(g.key)
                if acc is None:
                    # float32 or wider: half the memory of float64 for a sum of a few hundred batch gradients
                    self.set_sum[g.key] = w.grad.detach().to(torch.promote_types(w.dtype, torch.float32))
                else:
                    acc += w.grad.detach()
            w.grad = None  # per-layer accumulation: the weight gradient is freed as soon as it is folded

        return hook

    def _capture(self, g: UnitGroup) -> Any:
        w = self.weights[g.key]
        dim = g.reader.dim  # 1: nn.Linear [out, in]; 0: Conv1D [in, out]

        def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            x = args[0].detach()

            def grad_hook(grad: torch.Tensor) -> None:
                self._fold_examples(g.key, w, dim, x, grad)

            output.register_hook(grad_hook)

        return forward_hook

    def _fold_examples(self, key: str, w: torch.Tensor, dim: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        dtype = torch.promote_types(w.dtype, torch.float32)
        weight = w.detach().to(dtype)
        weight = weight if dim == 1 else weight.T  # [out, in] either way
        xs = x.reshape(x.shape[0], -1, x.shape[-1])
        gs = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        with torch.no_grad():
            for e in range(xs.shape[0]):  # one [out, in] gradient at a time
                per_example = gs[e].to(dtype).T @ xs[e].to(dtype)  # dL_e/dW in [out, in]
                total += (weight * per_example).abs().sum(dim=0).to(torch.float64)
        acc = self.example_sum.get(key)
        self.example_sum[key] = total if acc is None else acc + total

    def results(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Set-gradient sums (shape of each weight) and per-example sums (per unit), float64 on the CPU."""
        grads = {}
        per_unit = {}
        for g in self.groups:
            w = self.weights[g.key]
            if self.mode in ("set", "both"):
                grads[g.key] = self.set_sum.get(g.key, torch.zeros(w.shape)).to("cpu", torch.float64)
            if self.mode in ("example", "both"):
                v = self.example_sum.get(g.key, torch.zeros(w.shape[g.reader.dim], dtype=torch.float64))
                per_unit[g.key] = v.cpu()[g.reader.index]
        return grads, per_unit


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], *, keep: int | torch.Tensor) -> torch.Tensor:
    """Forward pass with logits only at ``keep`` (statistics need none: ``keep=1``); see :func:`logits_at`."""
    return logits_at(model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


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
    """Turn statistics into raw per-channel scores with the reader weights of ``model`` (formulas: ``ssah.metrics``)."""
    scorer = METRICS.get(metric)
    adapter = adapter or get_adapter(model)
    if scorer.gradients in ("set", "both") and not statistics.grad_sum:
        raise UserError(f"the {metric} metric needs the set gradient: collect statistics with gradients='set'")
    if scorer.gradients in ("example", "both") and not statistics.example_sum:
        raise UserError(f"the {metric} metric needs per-example gradients: collect statistics with gradients='example'")
    examples = max(statistics.grad_examples, 1)
    values: dict[str, torch.Tensor] = {}
    for g in adapter.groups():
        with align_module_device(adapter.module(g.reader_module)):  # offloaded readers hold meta tensors
            v = scorer.score(ScoreInputs(adapter, g, statistics, examples))
            values[g.key] = v.cpu().clamp_min(0.0)
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
        gradients=gradient_mode(metric),
        progress=progress,
        adapter=adapter,
    )
    return compute_scores(model, stats, metric, space, dataset=data.source, region=region, adapter=adapter)
