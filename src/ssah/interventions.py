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
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssah.arch import ArchAdapter, get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.hooks import attach
from ssah.stats import UnitStatistics
from ssah.units import UnitSet, UnitSpace

AblationMode = Literal["zero", "mean"]
ABLATION_MODES: tuple[AblationMode, ...] = ("zero", "mean")
GqaMode = Literal["any", "strict"]
GQA_MODES: tuple[GqaMode, ...] = ("any", "strict")


def space_of(model: nn.Module, granularity: str = "neuron", adapter: ArchAdapter | None = None) -> UnitSpace:
    """The unit space of a model at the given granularity (no fingerprint)."""
    adapter = adapter or get_adapter(model)
    return UnitSpace.from_groups(adapter.groups(), granularity)  # type: ignore[arg-type]


def check_ablation_mode(mode: str) -> AblationMode:
    """``mode`` if it is an ablation mode, else :class:`UserError` naming the modes."""
    if mode not in ABLATION_MODES:
        raise UserError(f"unknown ablation mode {mode!r}: use one of {', '.join(ABLATION_MODES)}")
    return mode  # type: ignore[return-value]


def check_gqa_mode(mode: str) -> GqaMode:
    """``mode`` if it is a GQA sharing mode, else :class:`UserError` naming the modes."""
    if mode not in GQA_MODES:
        raise UserError(f"unknown gqa mode {mode!r}: use one of {', '.join(GQA_MODES)}")
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
    masks = units.channel_masks()
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        if mode == "mean":
            assert means is not None
            mean = means.get(g.key)
            if mean is None or tuple(mean.shape) != (g.size,):
                raise UserError(
                    f"the calibration means have no {g.size} channel means for {g.key}: "
                    "compute them on this model with channel_means(statistics)"
                )
            fill = torch.where(mask, mean.detach().to("cpu", torch.float64), 0.0)
        else:
            fill = torch.zeros(g.size, dtype=torch.float64)
        # mask and fill move to each reader's input device in the hook: a dispatched model spans several devices
        removed = mask

        # the hook runs on every forward of every ablated reader (each generated token): move and cast the mask
        # and fill once per device and dtype, not on each call
        placed: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(
            _m: nn.Module,
            args: tuple[Any, ...],
            removed: torch.Tensor = removed,
            fill: torch.Tensor = fill,
            placed: dict[tuple[Any, Any], tuple[torch.Tensor, torch.Tensor]] = placed,
        ) -> tuple[Any, ...]:
            x = args[0]
            key = (x.device, x.dtype)
            if key not in placed:
                placed[key] = (removed.to(x.device), fill.to(x.device, x.dtype))
            where, value = placed[key]
            return (torch.where(where, value, x), *args[1:])

        hooks[g.reader_module] = hook
    with attach(model, pre=hooks):
        yield


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
) -> tuple[dict[str, tuple[int, torch.Tensor]], SliceReport]:
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
    parts: dict[str, tuple[int, list[torch.Tensor]]] = {}
    touched = taken = partial = outside = without = 0
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        if readers:
            _add_slice(parts, g.reader.name, g.reader.dim, g.reader.index[mask])
        if not writers:
            continue
        counted = False  # every writer of a group maps channels to rows the same way: count the sharing once
        for s in g.writers:
            sharers, inside, row_id = _shared_rows(s.index, mask)
            shared = sharers > 1
            keep = mask & (~shared | (inside == sharers)) if gqa == "strict" else mask
            _add_slice(parts, s.name, s.dim, s.index[keep])
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
    params = dict(model.named_parameters())
    report = SliceReport(
        gqa=gqa,
        units=len(units),
        units_total=units.space.total,
        parameters=sum(int(idx.numel()) * (params[n].numel() // params[n].shape[d]) for n, (d, idx) in slices.items()),
        parameters_total=sum(p.numel() for p in params.values()),
        shared_rows_touched=touched,
        shared_rows_taken=taken,
        shared_rows_partial=partial,
        outside_channels=outside,
        inside_channels_without_row=without,
    )
    return slices, report


def _add_slice(parts: dict[str, tuple[int, list[torch.Tensor]]], name: str, dim: int, idx: torch.Tensor) -> None:
    """Collect ``idx`` along ``dim`` of parameter ``name`` (one dim per parameter)."""
    d, lst = parts.setdefault(name, (dim, []))
    if d != dim:
        raise ValueError(f"parameter {name} has unit slices along dims {d} and {dim}")
    lst.append(idx)


def unit_param_slices(model: nn.Module, units: UnitSet, **options: Any) -> dict[str, tuple[int, torch.Tensor]]:
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
        mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        out[name] = mask.index_fill_(dim, idx.to(param.device), True)
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
        self, model: nn.Module, slices: dict[str, tuple[int, torch.Tensor]], report: SliceReport | None = None
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
            mask = torch.zeros(param.shape, dtype=torch.bool, device=local.device)
            mask.index_fill_(dim, idx.to(local.device), True)
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
    """Parametrization ``W -> W + delta`` on the slices ``idx`` along ``dim``; only ``delta`` is trainable."""

    idx: torch.Tensor  # a buffer

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

    def __init__(
        self, model: nn.Module, slices: dict[str, tuple[int, torch.Tensor]], report: SliceReport | None = None
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
