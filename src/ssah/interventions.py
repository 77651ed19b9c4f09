"""Interventions on units that are undone on exit: ablation zeroes a unit's input channel by a pre-hook.

Ablating by pre-hook rather than by editing weights keeps the model's parameters untouched, so an ablation
can be applied and undone in a loop over conditions without reloading or copying the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssah.arch import ArchAdapter, get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.hooks import attach
from ssah.units import UnitSet, UnitSpace


def space_of(model: nn.Module, granularity: str = "neuron", adapter: ArchAdapter | None = None) -> UnitSpace:
    """The unit space of a model at the given granularity (no fingerprint)."""
    adapter = adapter or get_adapter(model)
    return UnitSpace.from_groups(adapter.groups(), granularity)  # type: ignore[arg-type]


@contextmanager
def ablate(model: nn.Module, units: UnitSet, *, adapter: ArchAdapter | None = None) -> Iterator[None]:
    """Zero the activations feeding the given units' readers while the block runs (reversible, shapes kept)."""
    adapter = adapter or get_adapter(model)
    if space_of(model, units.space.granularity, adapter) != units.space:
        raise UnitFileError(f"unit set {units.name!r} was made for a model with another unit layout")
    hooks: dict[str, Any] = {}
    masks = units.channel_masks()
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        keep = ~mask  # moved to each reader's input device in the hook: a dispatched model spans several devices

        def hook(_m: nn.Module, args: tuple[Any, ...], keep: torch.Tensor = keep) -> tuple[Any, ...]:
            x = args[0]
            return (x * keep.to(device=x.device, dtype=x.dtype), *args[1:])

        hooks[g.reader_module] = hook
    with attach(model, pre=hooks):
        yield


# -- Parameter slices of units: the basis of freezing and of training only some units ----------------------------
#
# A unit owns its reader column (the slice of o_proj / down_proj that consumes its channel) and its writer rows
# (the v / gate / up rows, or slices of fused projections, and their bias entries, that produce the channel).
# Under grouped-query attention one v row is shared by the query heads of a KV group: such a row belongs to the
# slices of a unit set as soon as ANY unit that shares it is in the set, so freezing a set freezes the shared row
# (it also stays fixed for the set's neighbours) and training a set trains it (it also moves for the neighbours).


def unit_param_slices(
    model: nn.Module,
    units: UnitSet,
    *,
    adapter: ArchAdapter | None = None,
    readers: bool = True,
    writers: bool = True,
) -> dict[str, tuple[int, torch.Tensor]]:
    """Parameter name -> (dim, sorted unique int64 indices along dim) owned by the given units.

    Readers contribute columns (rows of GPT-2 ``Conv1D`` weights), writers contribute v / gate / up rows,
    fused qkv / gate_up slices and bias entries; slices of one parameter are merged across groups (a fused
    ``gate_up_proj`` appears once, with gate and up rows). Names are those of ``model.named_parameters()``,
    which lists a tied or shared parameter once. Raises ``ValueError`` when one parameter would need slices
    along two dims (no supported layout does), :class:`UnitFileError` when the set belongs to another model.
    """
    adapter = adapter or get_adapter(model)
    if space_of(model, units.space.granularity, adapter) != units.space:
        raise UnitFileError(f"unit set {units.name!r} was made for a model with another unit layout")
    masks = units.channel_masks()
    parts: dict[str, tuple[int, list[torch.Tensor]]] = {}
    for g in adapter.groups():
        chosen = masks[g.key].nonzero().flatten()
        if chosen.numel() == 0:
            continue
        slices = ((g.reader,) if readers else ()) + (g.writers if writers else ())
        for s in slices:
            dim, idx = parts.setdefault(s.name, (s.dim, []))
            if dim != s.dim:
                raise ValueError(f"parameter {s.name} has unit slices along dims {dim} and {s.dim}")
            idx.append(s.index[chosen])
    return {name: (dim, torch.unique(torch.cat(idx)).to(torch.int64)) for name, (dim, idx) in parts.items()}


def unit_param_masks(model: nn.Module, units: UnitSet, **kw: Any) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the parameter's shape (on its device), True on the units' slices.

    Keyword arguments go to :func:`unit_param_slices` (``adapter``, ``readers``, ``writers``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, (dim, idx) in unit_param_slices(model, units, **kw).items():
        param = model.get_parameter(name)
        mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        out[name] = mask.index_fill_(dim, idx.to(param.device), True)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _like_param(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` laid out like ``param``: sharded the same way when ``param`` is a DTensor (no communication:
    every rank holds the same full mask), else ``mask`` itself."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return mask
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]


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

    def __init__(self, model: nn.Module, slices: dict[str, tuple[int, torch.Tensor]]) -> None:
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
            local = _local(param.detach())
            mask = torch.zeros(param.shape, dtype=torch.bool, device=local.device)
            mask.index_fill_(dim, idx.to(local.device), True)
            self.masks[name] = mask
            flat = _local(_like_param(mask, param)).reshape(-1).nonzero().flatten()
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
            grad = _local(param.grad)
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
            local = _local(param.detach())
            local.view(-1).index_copy_(0, self._flat[name], self._saved[name])

    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest ``|current - saved|`` over the frozen entries (0.0 when exact; the local shard under FSDP2)."""
        drift = 0.0
        for name, param in self._params.items():
            now = _local(param.detach()).reshape(-1).index_select(0, self._flat[name])
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


def freeze_units(model: nn.Module, units: UnitSet, *, adapter: ArchAdapter | None = None) -> FrozenUnits:
    """Freeze the units' reader columns and writer rows exactly: gradient masking plus a snapshot that
    :meth:`FrozenUnits.restore` copies back after each optimizer step. An empty set freezes nothing."""
    return FrozenUnits(model, unit_param_slices(model, units, adapter=adapter))


class _SliceDelta(nn.Module):
    """Parametrization ``W -> W + delta`` on the slices ``idx`` along ``dim``; only ``delta`` is trainable."""

    def __init__(self, param: torch.Tensor, dim: int, idx: torch.Tensor) -> None:
        super().__init__()
        shape = list(param.shape)
        shape[dim] = int(idx.numel())
        self.dim = dim
        self.register_buffer("idx", idx.to(param.device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=param.dtype, device=param.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_add(self.dim, self.idx, self.delta)


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

    def __init__(self, model: nn.Module, slices: dict[str, tuple[int, torch.Tensor]]) -> None:
        self.model = model
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


def train_only_units(model: nn.Module, units: UnitSet, *, adapter: ArchAdapter | None = None) -> UnitDeltas:
    """Freeze the whole model and give the units' reader columns and writer rows trainable deltas.

    Raises :class:`UserError` when the set is empty (nothing would train).
    """
    if len(units) == 0:
        raise UserError(f"no units to train: unit set {units.name!r} is empty; choose a non-empty category or share")
    return UnitDeltas(model, unit_param_slices(model, units, adapter=adapter))


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
