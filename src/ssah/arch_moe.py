"""Unit groups of mixture-of-experts blocks and of dense MLPs found by structure, for :mod:`ssah.arch`.

Two storage layouts of routed experts are supported:

- *fused* (transformers 5, ``@use_experts_implementation``): one experts module holds 3D parameters, experts
  along dim 0 — ``down_proj`` ``[E, hidden, I]`` (``[E, I, hidden]`` when ``is_transposed``, as gpt-oss) and
  ``gate_up_proj`` ``[E, 2I, hidden]`` (gate and up concatenated, or interleaved when ``is_concatenated`` is
  false), with optional ``*_bias`` ``[E, ...]``; no module per expert, so a unit's reader is the slice
  ``down_proj[e]`` along the channel dim;
- *module list* (older transformers, remote code): ``experts`` is an ``nn.ModuleList`` of MLPs, each with its
  own ``down_proj`` (or ``w2``) ``nn.Linear``, exactly like a dense MLP.

Shared experts (``shared_expert``, ``shared_experts``, ``shared_mlp``) are dense MLPs whose channels are units
of kind ``shared_expert``. A layer's MLP-like module is found by name among the layout's candidates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssah.errors import ModelError
from ssah.unit_groups import Kind, ParamSlice, UnitGroup

SHARED_EXPERT_NAMES: tuple[str, ...] = ("shared_expert", "shared_experts", "shared_mlp")
# Sequence mixers that are neither attention nor MLP (state-space, linear attention, short convolutions).
MIXER_NAMES: tuple[str, ...] = ("mamba", "linear_attn", "conv", "short_conv", "mixer")

# (reader, ((writer, map), ...)) of the dense MLP naming schemes, tried in order.
_MLP_SCHEMES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("down_proj", (("gate_proj", "same"), ("up_proj", "same"))),
    ("w2", (("w1", "same"), ("w3", "same"))),
    ("output_linear", (("input_linear", "same"), ("input_linear", "second_half"))),
)


def _maybe(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _rows(map_key: str, channels: torch.Tensor, size: int) -> torch.Tensor:
    """Output rows of a writer that produce each channel: same row, second half of [gate | up], or interleaved."""
    return {
        "same": lambda: channels.clone(),
        "second_half": lambda: channels + size,
        "even": lambda: 2 * channels,
        "odd": lambda: 2 * channels + 1,
    }[map_key]()


def mlp_group(model: nn.Module, name: str, layer: int, kind: Kind, **extra: Any) -> UnitGroup | None:
    """The units of the dense MLP module ``name`` (down_proj / w2 / output_linear reader), or None when it has
    none of the known readers. Only ``gate_proj`` may be missing (non-gated MLPs)."""
    for reader_rel, writer_specs in _MLP_SCHEMES:
        reader: Any = _maybe(model, f"{name}.{reader_rel}")
        if not isinstance(reader, nn.Linear):
            continue
        size = int(reader.weight.shape[1])
        channels = torch.arange(size, dtype=torch.int64)
        writers: list[ParamSlice] = []
        for rel, map_key in writer_specs:
            mod: Any = _maybe(model, f"{name}.{rel}")
            if not isinstance(mod, nn.Linear):
                continue
            index = _rows(map_key, channels, size)
            if int(index.max()) >= mod.weight.shape[0]:
                raise ModelError(f"{name}.{rel} has {mod.weight.shape[0]} output features, too few for {size} units")
            writers.append(ParamSlice(f"{name}.{rel}.weight", 0, index))
            if mod.bias is not None:
                writers.append(ParamSlice(f"{name}.{rel}.bias", 0, index))
        reader_name = f"{name}.{reader_rel}"
        return UnitGroup(
            layer, kind, size, reader_name, ParamSlice(f"{reader_name}.weight", 1, channels), tuple(writers), **extra
        )
    return None


def is_moe(model: nn.Module, name: str) -> bool:
    """Whether the MLP-like module ``name`` routes tokens to experts (it has an ``experts`` submodule)."""
    return _maybe(model, f"{name}.experts") is not None


def moe_groups(model: nn.Module, name: str, layer: int) -> list[UnitGroup]:
    """The shared-expert group (if any, inside the MoE block ``name`` or beside it in its decoder block) and one
    group per routed expert of the MoE block ``name``."""
    groups: list[UnitGroup] = []
    block = name.rpartition(".")[0]
    for shared in [f"{name}.{s}" for s in SHARED_EXPERT_NAMES] + [f"{block}.{s}" for s in SHARED_EXPERT_NAMES]:
        if _maybe(model, shared) is not None:
            g = mlp_group(model, shared, layer, "shared_expert")
            if g is None:
                raise ModelError(f"{shared} is a shared expert without a down-projection ssah knows")
            groups.append(g)
            break
    experts: Any = model.get_submodule(f"{name}.experts")
    if isinstance(experts, nn.ModuleList):
        for e in range(len(experts)):
            g = mlp_group(model, f"{name}.experts.{e}", layer, "expert", expert=e, moe_module=name)
            if g is None:
                raise ModelError(f"expert {name}.experts.{e} has no down-projection ssah knows (down_proj, w2)")
            groups.append(g)
        return groups
    down = getattr(experts, "down_proj", None)
    if not (isinstance(down, nn.Parameter) and down.dim() == 3 and hasattr(experts, "has_gate")):
        raise ModelError(
            f"{name}.experts ({type(experts).__name__}) stores its experts in a layout ssah does not know: "
            "neither a ModuleList of MLPs nor transformers' fused 3D experts"
        )
    return groups + _fused_groups(experts, f"{name}.experts", layer, name)


def _fused_groups(experts: Any, name: str, layer: int, moe_module: str) -> list[UnitGroup]:
    """One group per expert of a fused experts module (slices of its 3D parameters)."""
    transposed = bool(getattr(experts, "is_transposed", False))
    down = experts.down_proj
    reader_dim = 0 if transposed else 1  # per expert: [I, hidden] when transposed, else [hidden, I]
    size = int(down.shape[1 + reader_dim])
    channels = torch.arange(size, dtype=torch.int64)
    if experts.has_gate:
        writer = "gate_up_proj"
        maps = ("same", "second_half") if getattr(experts, "is_concatenated", True) else ("even", "odd")
    else:
        writer, maps = "up_proj", ("same",)
    out_dim = 1 if transposed else 0  # per expert: [hidden, out] when transposed, else [out, hidden]
    weight = getattr(experts, writer)
    bias = getattr(experts, f"{writer}_bias", None) if getattr(experts, "has_bias", False) else None
    groups = []
    for e in range(int(down.shape[0])):
        writers: list[ParamSlice] = []
        for m in maps:
            index = _rows(m, channels, size)
            if int(index.max()) >= weight.shape[1 + out_dim]:
                raise ModelError(f"{name}.{writer} has too few output features for {size} units per expert")
            writers.append(ParamSlice(f"{name}.{writer}", out_dim, index, e))
            if bias is not None:
                writers.append(ParamSlice(f"{name}.{writer}_bias", 0, index, e))
        reader = ParamSlice(f"{name}.down_proj", reader_dim, channels, e)
        groups.append(
            UnitGroup(layer, "expert", size, name, reader, tuple(writers), expert=e, fused=True, moe_module=moe_module)
        )
    return groups


def mixer_description(model: nn.Module, block: str) -> str:
    """What mixes tokens in a block without a supported attention (``mamba (JambaMambaMixer)``), for reports."""
    for child in MIXER_NAMES:
        mod = _maybe(model, f"{block}.{child}")
        if mod is not None:
            return f"{child} ({type(mod).__name__})"
    return "no attention module ssah knows"
