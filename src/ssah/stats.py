"""Streaming per-channel statistics of unit activations, gathered by forward pre-hooks.

Nothing is stored per token: each batch is reduced to count, mean, M2 (sum of squared deviations) and
sum |x| in float64 (the sum of squares, hence each channel's L2 norm, follows as M2 + n * mean^2) and merged
with Chan's parallel formula, so statistics of batches, of data halves and of processes merge exactly. Only
tokens selected by the current count mask are counted (never padding).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ssah.arch import ArchAdapter, UnitGroup
from ssah.hooks import attach
from ssah.moe import RoutedRows, routed_experts
from ssah.units import UnitSet, UnitSpace


@dataclass
class RunningStats:
    """Count, mean, M2 and sum |x| of one group's channels, mergeable across batches and processes."""

    count: int
    mean: torch.Tensor  # float64 [C]
    m2: torch.Tensor  # float64 [C]
    abs_sum: torch.Tensor  # float64 [C]

    @classmethod
    def zeros(cls, channels: int, device: torch.device | str = "cpu") -> RunningStats:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0, z.clone(), z.clone(), z.clone())

    @classmethod
    def of(cls, x: torch.Tensor) -> RunningStats:
        """Statistics of a [N, C] block of activations (two-pass within the block, in float64)."""
        x = x.to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return cls.zeros(x.shape[1], x.device)
        mean = x.mean(dim=0)
        return cls(n, mean, (x - mean).square().sum(dim=0), x.abs().sum(dim=0))

    def merge(self, other: RunningStats) -> RunningStats:
        """Chan et al.'s pairwise combination: exact for any split of the data."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + delta.square() * (self.count * other.count / n)
        return RunningStats(n, mean, m2, self.abs_sum + other.abs_sum.to(self.abs_sum.device))

    def update(self, x: torch.Tensor) -> None:
        """Fold a [N, C] block of activations into the running statistics, in place."""
        merged = self.merge(RunningStats.of(x))
        self.count, self.mean, self.m2, self.abs_sum = merged.count, merged.mean, merged.m2, merged.abs_sum

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (0 when nothing was counted)."""
        return self.m2 / self.count if self.count else torch.zeros_like(self.m2)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x| per channel (0 when nothing was counted)."""
        return self.abs_sum / self.count if self.count else torch.zeros_like(self.abs_sum)

    @property
    def square_sum(self) -> torch.Tensor:
        """Sum of x^2 per channel over the counted tokens: M2 + n * mean^2 (no extra statistic needed)."""
        return self.m2 + self.count * self.mean.square()

    @property
    def l2_norm(self) -> torch.Tensor:
        """L2 norm of each channel over all counted tokens, ||X_j||_2 (Wanda's activation norm)."""
        return self.square_sum.clamp_min(0.0).sqrt()

    def to(self, device: torch.device | str) -> RunningStats:
        return RunningStats(self.count, self.mean.to(device), self.m2.to(device), self.abs_sum.to(device))


@dataclass
class UnitStatistics:
    """Statistics of every unit group over one data set: activations and, optionally, reader-weight gradients.

    Gradients are of the per-example loss L_e (mean response-token cross-entropy of example e), over the
    ``grad_examples`` examples that have at least one response token:
    ``grad_sum`` is the set gradient sum_e dL_e/dW of each reader weight (shape of the weight, float64), and
    ``example_sum`` is sum_e sum_i |W * dL_e/dW| per unit (float64 ``[channels]``; per-example gradients taken
    before the absolute value, so they cannot cancel).
    """

    groups: dict[str, RunningStats]
    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_e dL_e/dW of each reader weight
    grad_tokens: int = 0  # response tokens whose loss went into the gradients
    examples: int = 0
    data_hashes: list[str] = field(default_factory=list)
    example_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_e sum_i |W * dL_e/dW| per unit
    grad_examples: int = 0  # examples whose loss went into the gradients

    @property
    def tokens(self) -> int:
        """Tokens counted (by every group but routed experts, which count only the tokens routed to them)."""
        return max(v.count for v in self.groups.values()) if self.groups else 0

    def routed_tokens(self) -> dict[str, int]:
        """Per routed-expert group key (``layers.L.expert.E``), the number of tokens routed to it and counted."""
        return {k: v.count for k, v in self.groups.items() if is_routed_key(k)}

    def unscored(self, min_routed_tokens: int) -> list[str]:
        """Routed-expert group keys with fewer than ``min_routed_tokens`` counted tokens: too few to score."""
        return [k for k, n in self.routed_tokens().items() if n < min_routed_tokens]

    @property
    def data_hash(self) -> str:
        """Hash of the data that went in (order of merged parts kept)."""
        if len(self.data_hashes) == 1:
            return self.data_hashes[0]
        return hashlib.sha256("+".join(self.data_hashes).encode()).hexdigest()

    def merge(self, other: UnitStatistics) -> UnitStatistics:
        """Statistics of the union of the two data sets."""
        if self.groups.keys() != other.groups.keys():
            raise ValueError("cannot merge statistics of different models")
        grads = (
            {k: self.grad_sum[k] + other.grad_sum[k] for k in self.grad_sum} if self.grad_sum and other.grad_sum else {}
        )
        per_example = (
            {k: self.example_sum[k] + other.example_sum[k] for k in self.example_sum}
            if self.example_sum and other.example_sum
            else {}
        )
        both = bool(grads or per_example)
        return UnitStatistics(
            {k: v.merge(other.groups[k]) for k, v in self.groups.items()},
            grads,
            self.grad_tokens + other.grad_tokens if both else 0,
            self.examples + other.examples,
            self.data_hashes + other.data_hashes,
            per_example,
            self.grad_examples + other.grad_examples if both else 0,
        )

    def all_reduce(self) -> UnitStatistics:
        """Merge the statistics of every process of an initialised ``torch.distributed`` group (others: no-op)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        parts: list[Any] = [None] * dist.get_world_size()
        cpu = UnitStatistics(
            {k: v.to("cpu") for k, v in self.groups.items()},
            {k: v.cpu() for k, v in self.grad_sum.items()},
            self.grad_tokens,
            self.examples,
            self.data_hashes,
            {k: v.cpu() for k, v in self.example_sum.items()},
            self.grad_examples,
        )
        dist.all_gather_object(parts, cpu)
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p)
        merged.data_hashes = self.data_hashes  # every process read the same data set, sharded
        return merged


class ActivationRecorder:
    """Forward pre-hooks on every reader module that fold the selected tokens' inputs into ``RunningStats``.

    Use as a context manager; call ``set_mask`` with the [B, T] count mask before each forward pass.
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, groups: Sequence[UnitGroup] | None = None) -> None:
        self.model = model
        self.groups = list(groups if groups is not None else adapter.groups())
        self.stats: dict[str, RunningStats] = {}
        self._rows: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None
        self._routed = RoutedRows(self.groups)
        self._stack: Iterator[None] | None = None

    def set_mask(self, mask: torch.Tensor) -> None:
        """Select the tokens of the next forward pass to count ([B, T] bool)."""
        self._flat = mask.reshape(-1).to(torch.bool)
        self._rows = self._flat.nonzero().flatten()

    def _selected(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of the given token rows (into the flattened batch) the count mask selects."""
        if self._flat is None:
            raise RuntimeError("ActivationRecorder.set_mask must be called before each forward pass")
        return self._flat.to(tokens.device)[tokens]

    def _expert_hook(self, keys: dict[int, str]) -> Any:
        """A fused-experts hook: fold each expert's routed, selected tokens into that expert's statistics."""

        def hook(expert: int, tokens: torch.Tensor, h: torch.Tensor) -> None:
            self.stats[keys[expert]].update(h[self._selected(tokens)].detach())

        return hook

    def _list_expert_hook(self, g: UnitGroup) -> Any:
        """A module-list expert's reader pre-hook: fold the selected ones of the tokens routed to it."""

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            self.stats[g.key].update(flat[self._selected(self._routed.rows[g.reader_module])].detach())

        return hook

    def _hook(self, key: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            rows = self._rows
            if rows is None:
                raise RuntimeError("ActivationRecorder.set_mask must be called before each forward pass")
            flat = x.reshape(-1, x.shape[-1])
            self.stats[key].update(flat.index_select(0, rows.to(flat.device)).detach())

        return hook

    @contextmanager
    def recording(self) -> Iterator[ActivationRecorder]:
        """Attach the hooks (removed again on exit, also on errors)."""
        device = next(self.model.parameters()).device
        for g in self.groups:
            self.stats.setdefault(g.key, RunningStats.zeros(g.size, device))
        pre = self._routed.pre_hooks(self.model, self.groups)
        fused: dict[str, dict[int, str]] = {}
        for g in self.groups:
            if g.fused and g.expert is not None:
                fused.setdefault(g.reader_module, {})[g.expert] = g.key
            elif g.expert is not None:
                pre[g.reader_module] = self._list_expert_hook(g)
            else:
                pre[g.reader_module] = self._hook(g.key)
        hooks = {name: self._expert_hook(keys) for name, keys in fused.items()}
        with attach(self.model, pre=pre), routed_experts(self.model, hooks):
            yield self


MIN_ROUTED_TOKENS = 16
"""Default minimum of counted tokens routed to an expert for its channels to be scored (settable per call)."""


def routed_tokens_metadata(statistics: Mapping[str, UnitStatistics]) -> str:
    """Each calibration set's routed-token count per expert group, as the JSON a unit file's metadata records
    (``{"safety": {"layers.0.expert.3": 41, ...}, ...}``; sets and keys sorted, so the bytes are reproducible)."""
    import json

    counts = {name: dict(sorted(st.routed_tokens().items())) for name, st in sorted(statistics.items())}
    return json.dumps(counts, separators=(",", ":"))


def is_routed_key(key: str) -> bool:
    """Whether a group key names one routed expert's channels (``layers.L.expert.E``)."""
    return ".expert." in key


def mask_unscored(
    values: Mapping[str, torch.Tensor], statistics: UnitStatistics, min_routed_tokens: int
) -> dict[str, torch.Tensor]:
    """``values`` (per group key) with every unit of an expert that saw fewer than ``min_routed_tokens`` counted
    tokens set to NaN: unscored, never scored as zero (categories and controls leave NaN units out)."""
    low = set(statistics.unscored(min_routed_tokens))
    return {k: torch.full_like(v, float("nan")) if k in low else v for k, v in values.items()}


def unscored_units(space: UnitSpace, statistics: UnitStatistics, min_routed_tokens: int) -> UnitSet:
    """The units of experts with fewer than ``min_routed_tokens`` counted tokens (``exclude`` them from controls)."""
    mask = torch.zeros(space.total, dtype=torch.bool)
    low = set(statistics.unscored(min_routed_tokens))
    for sh in space.shapes:
        if sh.key in low:
            mask[space.group_slice(sh.layer, sh.kind, sh.expert)] = True
    return UnitSet(space, mask, f"unscored(<{min_routed_tokens} routed tokens)")


def reader_gradients(adapter: ArchAdapter, groups: Sequence[UnitGroup]) -> Mapping[str, torch.Tensor | None]:
    """The current ``.grad`` of each group's reader weight, by group key."""
    return {g.key: adapter.reader_weight(g).grad for g in groups}
