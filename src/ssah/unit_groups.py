"""The unit groups of a model, as the architecture adapters describe them: which weights each unit reads and writes.

A *unit* is one input channel of an attention output projection (``attn``), of a dense MLP down-projection
(``mlp``), of a shared expert's down-projection (``shared_expert``) or of one routed expert's down-projection
(``expert``, one group per expert). Kept apart from :mod:`ssah.arch` so that the mixture-of-experts adapter
(:mod:`ssah.arch_moe`) and the units can share these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["attn", "mlp", "shared_expert", "expert"]
KINDS: tuple[Kind, ...] = ("attn", "mlp")  # the kinds of a dense model
ALL_KINDS: tuple[Kind, ...] = ("attn", "mlp", "shared_expert", "expert")
EXPERT_KINDS: tuple[Kind, ...] = ("shared_expert", "expert")


def group_key(layer: int, kind: str, expert: int | None = None) -> str:
    """``layers.{layer}.{kind}``, or ``layers.{layer}.expert.{expert}`` for one routed expert's channels."""
    return f"layers.{layer}.{kind}" if expert is None else f"layers.{layer}.{kind}.{expert}"


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Slices of one parameter owned by units: unit i owns ``param.select(dim, index[i])``, or, for a fused
    expert parameter (``expert`` set: experts stacked along dim 0), ``param[expert].select(dim, index[i])``.

    A fused parameter can appear in several slices of one group (e.g. ``gate_up_proj`` once for the gate rows
    and once for the up rows). Equality is identity (the index is a tensor).
    """

    name: str  # parameter name exactly as in model.named_parameters()
    dim: int  # relative to param[expert] when expert is set
    index: torch.Tensor  # int64, shape [group.size], on CPU
    expert: int | None = None


@dataclass(frozen=True, eq=False)
class UnitGroup:
    """All units of one kind in one block (one expert of a block for ``expert``). Equality is identity."""

    layer: int
    kind: Kind
    size: int  # number of channels (= units at neuron granularity)
    # name in model.named_modules(): for a module reader, the last dim of its forward input are the unit
    # channels; for fused experts (``fused``), the experts module whose per-expert computation is wrapped
    reader_module: str
    reader: ParamSlice  # the reader weight, index = arange(size)
    writers: tuple[ParamSlice, ...]  # weights and biases (when present) that produce the channels
    head_dim: int | None = None  # attn only
    num_heads: int | None = None  # attn only (query heads)
    num_kv_heads: int | None = None  # attn only
    expert: int | None = None  # routed experts: the expert's index in its layer
    fused: bool = False  # routed experts stored as 3D parameters (no module per expert)
    moe_module: str | None = None  # routed experts: the MoE block (router + experts) the tokens enter

    @property
    def key(self) -> str:
        """``layers.{layer}.{kind}`` (``layers.{layer}.expert.{e}``), the name of the group in unit and score files."""
        return group_key(self.layer, self.kind, self.expert)
