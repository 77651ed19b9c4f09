"""Parameter slices of units: which entries of which weights each unit reads and writes, as masks and index
slices, with a report of what they cover (GQA sharing included); the basis of freezing and of training only some
units (:mod:`ssah.interventions`).

A slice is ``(dim, index)`` along one dim of a parameter, or, for a fused expert parameter (experts stacked along
dim 0, e.g. ``down_proj`` ``[E, hidden, I]``), ``((0, dim), index)`` along the experts and ``dim`` together:
entry ``e * shape[dim] + j`` is channel ``j`` of expert ``e`` (:func:`fill_slices` makes a mask of either).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn

from ssah.arch import ArchAdapter, ParamSlice, get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.units import UnitSet, UnitSpace

GqaMode = Literal["any", "strict"]
GQA_MODES: tuple[GqaMode, ...] = ("any", "strict")
SliceDim = int | tuple[int, int]


def space_of(model: nn.Module, granularity: str = "neuron", adapter: ArchAdapter | None = None) -> UnitSpace:
    """The unit space of a model at the given granularity (no fingerprint)."""
    adapter = adapter or get_adapter(model)
    return UnitSpace.from_groups(adapter.groups(), granularity)  # type: ignore[arg-type]


def check_gqa_mode(mode: str) -> GqaMode:
    """``mode`` if it is a GQA sharing mode, else :class:`UserError` naming the modes."""
    if mode not in GQA_MODES:
        raise UserError(f"unknown gqa mode {mode!r}: use one of {', '.join(GQA_MODES)}")
    return mode  # type: ignore[return-value]


# -- Parameter slices of units: the basis of freezing and of training only some units ----------------------------
#
# A unit owns its reader column (the slice of o_proj / down_proj that consumes its channel) and its writer rows
# (the v / gate / up rows, or slices of fused projections, and their bias entries, that produce the channel).
# Under grouped-query attention one v row is shared by the query heads of a KV group (the adapter's writer index
# maps several channels to one row). ``gqa="any"`` gives such a row to a unit set as soon as ANY channel that
# shares it is in the set: freezing the set also keeps the row fixed for its neighbours, training the set also
# moves it for them. ``gqa="strict"`` gives the row only when ALL channels that share it are in the set: the
# set's other channels then keep (or lose) their value row. Either way :class:`SliceReport` counts what was shared.


@dataclass(frozen=True)
class SliceReport:
    """What a unit set's parameter slices cover: shares of units and parameters, and GQA sharing.

    A *shared row* is a writer row (a value row under GQA) that several channels read. ``outside_channels``
    counts channels outside the set whose shared row was taken anyway (``any``: they stay fixed with a frozen
    set, or move with a trained one); ``inside_channels_without_row`` counts channels of the set whose shared row
    was left out (``strict``). Rows are counted once per group, whatever number of parameters (weight, bias)
    hold them.
    """

    gqa: str
    units: int
    units_total: int
    parameters: int  # entries in the slices (each tied parameter once)
    parameters_total: int
    shared_rows_touched: int  # shared rows read by at least one channel of the set
    shared_rows_taken: int  # of those, rows in the slices
    shared_rows_partial: int  # of those, rows read by channels both in and outside the set
    outside_channels: int
    inside_channels_without_row: int

    @property
    def unit_share(self) -> float:
        return self.units / self.units_total if self.units_total else 0.0

    @property
    def parameter_share(self) -> float:
        return self.parameters / self.parameters_total if self.parameters_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields in order, each share right after its total."""
        shares = {
            "units_total": ("unit_share", self.unit_share),
            "parameters_total": ("parameter_share", self.parameter_share),
        }
        out: dict[str, Any] = {}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
            if f.name in shares:
                out[shares[f.name][0]] = shares[f.name][1]
        return out


def _shared_rows(index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: how many channels read its row, how many of them are in ``mask``, and the row's group id."""
    rows, inverse, counts = torch.unique(index, return_inverse=True, return_counts=True)
    inside = torch.zeros(rows.numel(), dtype=torch.int64).index_add_(0, inverse, mask.to(torch.int64))
    return counts[inverse], inside[inverse], inverse


def unit_param_slices_and_report(
    model: nn.Module,
    units: UnitSet,
    *,
    adapter: ArchAdapter | None = None,
    readers: bool = True,
    writers: bool = True,
    gqa: str = "any",
) -> tuple[dict[str, tuple[SliceDim, torch.Tensor]], SliceReport]:
    """Parameter name -> (dim, sorted unique int64 indices along dim) owned by the given units, and the
    :class:`SliceReport` of what they hold.

    Readers contribute columns (rows of GPT-2 ``Conv1D`` weights), writers contribute v / gate / up rows,
    fused qkv / gate_up slices and bias entries; slices of one parameter are merged across groups (a fused
    ``gate_up_proj`` appears once, with gate and up rows). ``gqa`` says when a value row shared under
    grouped-query attention belongs to the set (``any`` / ``strict``, see above). Names are those of
    ``model.named_parameters()``, which lists a tied or shared parameter once. Raises ``ValueError`` when one
    parameter would need slices along two dims (no supported layout does), :class:`UnitFileError` when the set
    belongs to another model, :class:`UserError` for an unknown ``gqa``.
    """
    gqa = check_gqa_mode(gqa)
    adapter = adapter or get_adapter(model)
    if space_of(model, units.space.granularity, adapter) != units.space:
        raise UnitFileError(f"unit set {units.name!r} was made for a model with another unit layout")
    masks = units.channel_masks()
    params = dict(model.named_parameters())
    parts: dict[str, tuple[SliceDim, list[torch.Tensor]]] = {}
    touched = taken = partial = outside = without = 0
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        if readers:
            _add_slice(parts, *_encode(params, g.reader, g.reader.index[mask]))
        if not writers:
            continue
        counted = False  # every writer of a group maps channels to rows the same way: count the sharing once
        for s in g.writers:
            sharers, inside, row_id = _shared_rows(s.index, mask)
            shared = sharers > 1
            keep = mask & (~shared | (inside == sharers)) if gqa == "strict" else mask
            _add_slice(parts, *_encode(params, s, s.index[keep]))
            if counted or not bool(shared.any()):
                continue
            counted = True
            rows_in = torch.unique(row_id[mask & shared])
            rows_taken = torch.unique(row_id[keep & shared])
            touched += int(rows_in.numel())
            taken += int(rows_taken.numel())
            partial += int(torch.unique(row_id[mask & shared & (inside < sharers)]).numel())
            taken_rows = torch.zeros(int(row_id.max()) + 1, dtype=torch.bool)
            taken_rows[rows_taken] = True
            outside += int((~mask & taken_rows[row_id]).sum())
            without += int((mask & shared & ~taken_rows[row_id]).sum())
    slices = {name: (dim, torch.unique(torch.cat(idx)).to(torch.int64)) for name, (dim, idx) in parts.items()}
    slices = {name: s for name, s in slices.items() if s[1].numel()}
    report = SliceReport(
        gqa=gqa,
        units=len(units),
        units_total=units.space.total,
        parameters=sum(int(idx.numel()) * _entries_per_index(params[n], d) for n, (d, idx) in slices.items()),
        parameters_total=sum(p.numel() for p in params.values()),
        shared_rows_touched=touched,
        shared_rows_taken=taken,
        shared_rows_partial=partial,
        outside_channels=outside,
        inside_channels_without_row=without,
    )
    return slices, report


def _encode(params: dict[str, nn.Parameter], s: ParamSlice, idx: torch.Tensor) -> tuple[str, SliceDim, torch.Tensor]:
    """(name, dim, index) of a slice in the full parameter: a fused expert slice along dims (0, dim + 1), its
    entries numbered ``expert * channels + channel``."""
    if s.expert is None:
        return s.name, s.dim, idx
    d = s.dim + 1
    return s.name, (0, d), s.expert * int(params[s.name].shape[d]) + idx


def _entries_per_index(param: torch.Tensor, dim: SliceDim) -> int:
    """Parameter entries one index of a slice along ``dim`` holds."""
    along = param.shape[dim[0]] * param.shape[dim[1]] if isinstance(dim, tuple) else param.shape[dim]
    return param.numel() // along


def fill_slices(mask: torch.Tensor, dim: SliceDim, idx: torch.Tensor, value: bool = True) -> torch.Tensor:
    """Set the entries of the slices ``idx`` along ``dim`` (an int, or ``(0, d)`` of a fused expert parameter) of
    the bool tensor ``mask`` to ``value``, in place; returns ``mask``."""
    idx = idx.to(mask.device)
    if not isinstance(dim, tuple):
        return mask.index_fill_(dim, idx, value)
    moved = mask.movedim(dim[1], 1)
    merged = moved.reshape(moved.shape[0] * moved.shape[1], -1).clone().index_fill_(0, idx, value)
    mask.copy_(merged.reshape(moved.shape).movedim(1, dim[1]))
    return mask


def _add_slice(
    parts: dict[str, tuple[SliceDim, list[torch.Tensor]]], name: str, dim: SliceDim, idx: torch.Tensor
) -> None:
    """Collect ``idx`` along ``dim`` of parameter ``name`` (one dim per parameter)."""
    d, lst = parts.setdefault(name, (dim, []))
    if d != dim:
        raise ValueError(f"parameter {name} has unit slices along dims {d} and {dim}")
    lst.append(idx)


def unit_param_slices(model: nn.Module, units: UnitSet, **options: Any) -> dict[str, tuple[SliceDim, torch.Tensor]]:
    """Parameter name -> (dim, sorted unique int64 indices along dim) owned by the given units; the options are
    those of :func:`unit_param_slices_and_report` (``adapter``, ``readers``, ``writers``, ``gqa``)."""
    return unit_param_slices_and_report(model, units, **options)[0]


def unit_param_masks(model: nn.Module, units: UnitSet, **kw: Any) -> dict[str, torch.Tensor]:
    """Parameter name -> bool mask of the parameter's shape (on its device), True on the units' slices.

    Keyword arguments go to :func:`unit_param_slices` (``adapter``, ``readers``, ``writers``).
    """
    out: dict[str, torch.Tensor] = {}
    for name, (dim, idx) in unit_param_slices(model, units, **kw).items():
        param = model.get_parameter(name)
        out[name] = fill_slices(torch.zeros(param.shape, dtype=torch.bool, device=param.device), dim, idx)
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def like_param(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` laid out like ``param``: sharded the same way when ``param`` is a DTensor (no communication:
    every rank holds the same full mask), else ``mask`` itself."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return mask
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]
