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

from ssah.arch import ArchAdapter, get_adapter
from ssah.errors import UnitFileError
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
    device = next(model.parameters()).device
    masks = units.channel_masks()
    for g in adapter.groups():
        mask = masks[g.key]
        if not bool(mask.any()):
            continue
        keep = (~mask).to(device)

        def hook(_m: nn.Module, args: tuple[Any, ...], keep: torch.Tensor = keep) -> tuple[Any, ...]:
            x = args[0]
            return (x * keep.to(x.dtype), *args[1:])

        hooks[g.reader_module] = hook
    with attach(model, pre=hooks):
        yield
