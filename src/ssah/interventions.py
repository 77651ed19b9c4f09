"""Interventions on units that are undone on exit: ablation, exact freezing and training only some units.

Ablation replaces a unit's input channel by a pre-hook on its reader (``o_proj`` / ``down_proj``) rather than by
editing weights, so the model's parameters stay bit-identical and an ablation can be applied and undone in a loop
over conditions without reloading or copying the model. Two modes:

- ``zero``: the channel reads 0, so its reader column contributes nothing.
- ``mean``: FLAP-style (An et al. 2024, "Fluctuation-based adaptive structured pruning", baseline bias
  compensation): the channel reads its calibration mean, so the reader's output gets ``W[:, j] * mean_j`` in
  place of ``W[:, j] * x_j``. That is the same function as FLAP's pruned layer (removed column, its mean folded
  into the output bias); substituting the mean at the input keeps it one elementwise ``where`` and leaves the
  weights untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssah.arch import ArchAdapter, UnitGroup, get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.hooks import attach
from ssah.moe import ExpertHook, routed_experts
from ssah.stats import UnitStatistics
from ssah.unit_slices import (
    GQA_MODES,
    GqaMode,
    SliceDim,
    SliceReport,
    check_gqa_mode,
    fill_slices,
    like_param,
    local_tensor,
    space_of,
    unit_param_masks,
    unit_param_slices,
    unit_param_slices_and_report,
)
from ssah.units import UnitSet

__all__ = [
    "ABLATION_MODES",
    "GQA_MODES",
    "AblationMode",
    "FrozenUnits",
    "GqaMode",
    "SliceReport",
    "UnitDeltas",
    "ablate",
    "channel_means",
    "check_ablation_mode",
    "check_gqa_mode",
    "freeze_units",
    "like_param",
    "local_tensor",
    "space_of",
    "train_only_units",
    "trainable_share",
    "unit_param_masks",
    "unit_param_slices",
    "unit_param_slices_and_report",
]

AblationMode = Literal["zero", "mean"]
ABLATION_MODES: tuple[AblationMode, ...] = ("zero", "mean")


def check_ablation_mode(mode: str) -> AblationMode:
    """``mode`` if it is an ablation mode, else :class:`UserError` naming the modes."""
    if mode not in ABLATION_MODES:
        raise UserError(f"unknown ablation mode {mode!r}: use one of {', '.join(ABLATION_MODES)}")
    return mode  # type: ignore[return-value]


def channel_means(stats: UnitStatistics) -> dict[str, torch.Tensor]:
    """Per group key, the calibration mean of every input channel (float64, on CPU): the ``means`` of a
    ``mean`` ablation. Channel level, so at head granularity each channel of an ablated head gets its own mean."""
    return {key: s.mean.detach().to("cpu", torch.float64).clone() for key, s in stats.groups.items()}


@contextmanager
def ablate(
    model: nn.Module,
    units: UnitSet,
    *,
    mode: str = "zero",
    means: Mapping[str, torch.Tensor] | None = None,
    adapter: ArchAdapter | None = None,
) -> Iterator[None]:
    """Replace the given units' input channels while the block runs: by 0 (``zero``) or by their calibration
    mean (``mean``, FLAP's bias compensation; ``means`` from :func:`channel_means`). Reversible, shapes kept,
    weights untouched; ablations nest (the inner one's hooks run after the outer one's)."""
    mode = check_ablation_mode(mode)
    adapter = adapter or get_adapter(model)
    if space_of(model, units.space.granularity, adapter) != units.space:
        raise UnitFileError(f"unit set {units.name!r} was made for a model with another unit layout")
    if mode == "mean" and means is None:
        raise UserError("mean ablation needs the calibration means: pass means=channel_means(statistics)")
    hooks: dict[str, Any] = {}
    fused: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    masks = units.channel_masks()
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        fill = _fill(g, mask, mode, means)
        if g.fused and g.expert is not None:
            # fused experts: the channel is replaced in the expert's own computation, for its routed tokens only
            fused.setdefault(g.reader_module, {})[g.expert] = (mask, fill)
        else:
            hooks[g.reader_module] = _replace_hook(mask, fill)
    expert_hooks = {name: _expert_replace_hook(per_expert) for name, per_expert in fused.items()}
    with attach(model, pre=hooks), routed_experts(model, expert_hooks):
        yield


def _fill(g: UnitGroup, mask: torch.Tensor, mode: str, means: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The values ablated channels of ``g`` read: 0, or their calibration means (float64, CPU)."""
    if mode != "mean":
        return torch.zeros(g.size, dtype=torch.float64)
    assert means is not None
    mean = means.get(g.key)
    if mean is None or tuple(mean.shape) != (g.size,):
        raise UserError(
            f"the calibration means have no {g.size} channel means for {g.key}: "
            "compute them on this model with channel_means(statistics)"
        )
    return torch.where(mask, mean.detach().to("cpu", torch.float64), 0.0)


class _Placed:
    """A mask and fill moved and cast once per (device, dtype): hooks run on every forward of every ablated
    reader (each generated token), and a dispatched model spans several devices."""

    def __init__(self, mask: torch.Tensor, fill: torch.Tensor) -> None:
        self.mask, self.fill = mask, fill
        self._placed: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor]] = {}

    def replace(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._placed:
            self._placed[key] = (self.mask.to(x.device), self.fill.to(x.device, x.dtype))
        where, value = self._placed[key]
        return torch.where(where, value, x)


def _replace_hook(mask: torch.Tensor, fill: torch.Tensor) -> Any:
    """A reader pre-hook that replaces the masked channels of its input by ``fill``."""
    placed = _Placed(mask, fill)

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (placed.replace(args[0]), *args[1:])

    return hook


def _expert_replace_hook(per_expert: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> ExpertHook:
    """A fused-experts hook that replaces the masked channels of each listed expert's down-projection input."""
    placed = {e: _Placed(mask, fill) for e, (mask, fill) in per_expert.items()}

    def hook(expert: int, _tokens: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
        return placed[expert].replace(h) if expert in placed else None

    return hook


class FrozenUnits:
    """Keeps the given units' reader columns and writer rows bit-identical during training (AdamW weight decay too).

    Two parts, because either alone is not exact: a post-accumulate-grad hook on each affected parameter zeroes
    the gradient of the frozen entries (so they do not take part in the update's gradient signal and Adam's
    moments stay zero there), and :meth:`restore`, called right after each ``optimizer.step()``, copies the saved
    values back (weight decay and momentum still move entries whose gradient is zero). Post-accumulate-grad
    hooks also fire on FSDP2-sharded parameters (``tensor.register_hook`` does not); build this after sharding,
    every rank then works on its local shard. Use as a context manager to remove the hooks on exit.

    ``masks`` maps parameter names to bool masks of the full parameter shape (True = frozen).
    """

    def __init__(
        self, model: nn.Module, slices: dict[str, tuple[SliceDim, torch.Tensor]], report: SliceReport | None = None
    ) -> None:
        self.report = report  # what the frozen slices cover (set by freeze_units)
        self.masks: dict[str, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._flat: dict[str, torch.Tensor] = {}  # flat indices of frozen entries in the local shard
        self._saved: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self.frozen_parameters = 0
        for name, (dim, idx) in slices.items():
            param = model.get_parameter(name)
            if param.device.type == "meta":
                raise UserError(
                    f"cannot freeze units of {name}: its weights are offloaded (CPU / disk) by the device map; "
                    "train with a device map that keeps every weight on a GPU, or with FSDP2"
                )
            local = local_tensor(param.detach())
            mask = fill_slices(torch.zeros(param.shape, dtype=torch.bool, device=local.device), dim, idx)
            self.masks[name] = mask
            flat = local_tensor(like_param(mask, param)).reshape(-1).nonzero().flatten()
            self._params[name] = param
            self._flat[name] = flat
            self._saved[name] = local.reshape(-1).index_select(0, flat).clone()
            self.frozen_parameters += int(mask.sum())
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_hook(flat)))

    @staticmethod
    def _grad_hook(flat: torch.Tensor) -> Any:
        """A hook that zeroes the frozen entries of the parameter's (accumulated, local) gradient in place."""

        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            grad = local_tensor(param.grad)
            if grad.is_contiguous():
                grad.view(-1).index_fill_(0, flat, 0)
            else:  # unusual gradient layouts: slower, same result
                keep = torch.ones(grad.numel(), dtype=torch.bool, device=grad.device).index_fill_(0, flat, False)
                grad.mul_(keep.view(grad.shape).to(grad.dtype))

        return hook

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved frozen values back; call right after every ``optimizer.step()``."""
        for name, param in self._params.items():
            local = local_tensor(param.detach())
            local.view(-1).index_copy_(0, self._flat[name], self._saved[name])

    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest ``|current - saved|`` over the frozen entries (0.0 when exact; the local shard under FSDP2)."""
        drift = 0.0
        for name, param in self._params.items():
            now = local_tensor(param.detach()).reshape(-1).index_select(0, self._flat[name])
            if now.numel():
                drift = max(drift, float((now.double() - self._saved[name].double()).abs().max()))
        return drift

    def remove(self) -> None:
        """Remove the gradient hooks (the parameters keep their current values)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FrozenUnits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FrozenUnits({self.frozen_parameters} entries in {len(self.masks)} parameters)"


def freeze_units(
    model: nn.Module, units: UnitSet, *, adapter: ArchAdapter | None = None, gqa: str = "any"
) -> FrozenUnits:
    """Freeze the units' reader columns and writer rows exactly: gradient masking plus a snapshot that
    :meth:`FrozenUnits.restore` copies back after each optimizer step. An empty set freezes nothing.

    ``gqa`` (``any`` | ``strict``) says when a shared GQA value row is frozen; ``.report`` says what was frozen.
    """
    slices, report = unit_param_slices_and_report(model, units, adapter=adapter, gqa=gqa)
    return FrozenUnits(model, slices, report)


class _SliceDelta(nn.Module):
    """Parametrization ``W -> W + delta`` on the slices ``idx`` along ``dim``; only ``delta`` is trainable.

    For a fused expert slice (``dim = (0, d)``) the experts and dim ``d`` are merged into one dim (moved first)
    and ``delta`` holds one row per (expert, channel) entry of ``idx``."""

    idx: torch.Tensor  # a buffer

    def __init__(self, param: torch.Tensor, dim: SliceDim, idx: torch.Tensor) -> None:
        super().__init__()
        self.dim = dim
        if isinstance(dim, tuple):
            rest = [n for i, n in enumerate(param.shape) if i not in dim]
            shape = [int(idx.numel()), *rest]
        else:
            shape = list(param.shape)
            shape[dim] = int(idx.numel())
        self.register_buffer("idx", idx.to(param.device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=param.dtype, device=param.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.dim, tuple):
            return weight.index_add(self.dim, self.idx, self.delta)
        d = self.dim[1]
        moved = weight.movedim(d, 1)  # [E, C, rest...]
        merged = moved.reshape(moved.shape[0] * moved.shape[1], *moved.shape[2:]).index_add(0, self.idx, self.delta)
        return merged.reshape(moved.shape).movedim(1, d)


class UnitDeltas:
    """Train only the given units: every model parameter is frozen; each affected parameter gets a trainable
    delta for its unit slices only (``torch.nn.utils.parametrize``), so optimizer state is proportional to the
    trained units.

    The delta of a parameter with slices ``(dim, idx)`` has the parameter's shape with ``dim`` cut to
    ``len(idx)`` and starts at zero, so the model computes exactly what it did before training. Entries outside
    the slices cannot change: no gradient reaches them and no optimizer holds them. While parametrized, the
    state_dict keys of affected weights carry ``parametrizations.<name>.original``; :meth:`merge` bakes the
    deltas in and gives back a plain model with the original keys (and the original ``requires_grad`` flags).
    """

    def __init__(
        self, model: nn.Module, slices: dict[str, tuple[SliceDim, torch.Tensor]], report: SliceReport | None = None
    ) -> None:
        self.model = model
        self.report = report  # what the trained slices cover (set by train_only_units)
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        # every (module, attribute) that holds each affected parameter: shared parameters are parametrized
        # everywhere with one delta, so all their users see the same trained weight
        holders: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for attr, p in module.named_parameters(recurse=False):
                holders.setdefault(id(p), []).append((module, attr))
        self._sites: list[tuple[torch.Tensor, _SliceDelta, list[tuple[nn.Module, str]]]] = []
        self._order: dict[int, list[str]] = {}  # parameter order of each parametrized module, for merge
        for name, (dim, idx) in slices.items():
            param = model.get_parameter(name)
            delta = _SliceDelta(param, dim, idx)
            for module, _attr in holders[id(param)]:
                self._order.setdefault(id(module), list(module._parameters))
            sites = holders[id(param)]
            for module, attr in sites:
                parametrize.register_parametrization(module, attr, delta)
            self._sites.append((param, delta, sites))
        self.trainable_parameters = sum(d.delta.numel() for _, d, _ in self._sites)

    def parameters(self) -> list[nn.Parameter]:
        """The deltas, for the optimizer."""
        return [d.delta for _, d, _ in self._sites]

    @torch.no_grad()
    def merge(self) -> None:
        """Bake the deltas into the weights and remove the parametrizations (idempotent).

        Afterwards the model is a plain model again: ``save_pretrained`` works, state_dict keys are the original
        ones, the parameters are the original Parameter objects with their original ``requires_grad``.
        """
        for param, delta, sites in self._sites:
            merged = delta(param.detach())
            for module, attr in sites:
                order = self._order[id(module)]
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                # removal re-adds the parameter last; put it back in place so state_dict keys keep their order
                params = dict(module._parameters)
                module._parameters.clear()
                module._parameters.update({k: params[k] for k in order if k in params})
                module._parameters.update(params)
            param.copy_(merged)
        self._sites.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, p.requires_grad))

    def __repr__(self) -> str:
        return f"UnitDeltas({self.trainable_parameters} trainable entries in {len(self._sites)} parameters)"


def train_only_units(
    model: nn.Module, units: UnitSet, *, adapter: ArchAdapter | None = None, gqa: str = "any"
) -> UnitDeltas:
    """Freeze the whole model and give the units' reader columns and writer rows trainable deltas.

    ``gqa`` (``any`` | ``strict``) says when a shared GQA value row trains; ``.report`` says what trains.
    Raises :class:`UserError` when the set is empty (nothing would train).
    """
    if len(units) == 0:
        raise UserError(f"no units to train: unit set {units.name!r} is empty; choose a non-empty category or share")
    slices, report = unit_param_slices_and_report(model, units, adapter=adapter, gqa=gqa)
    return UnitDeltas(model, slices, report)


def trainable_share(model: nn.Module) -> dict[str, int | float]:
    """``{"trainable": n, "total": N, "share": n / N}`` over the model's parameters.

    ``trainable`` counts parameters with ``requires_grad`` (the deltas of :class:`UnitDeltas` included);
    ``total`` counts the model's own parameters once (tied ones once, deltas not at all), so the share of a
    units-only run is the trained unit entries over the model size.
    """
    deltas = {id(m.delta) for m in model.modules() if isinstance(m, _SliceDelta)}
    trainable = total = 0
    for p in model.parameters():
        if id(p) not in deltas:
            total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total, "share": trainable / total if total else 0.0}
