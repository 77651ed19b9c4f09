"""Mixture-of-experts at run time: the tokens each routed expert sees, and a hook on each expert's channels.

Fused experts (transformers 5) have no module per expert, so no forward hook can see one expert's input. While
:func:`routed_experts` is active, each fused experts module runs a per-expert loop instead of its kernel (the
eager loop of transformers, written for every layout flag of ``@use_experts_implementation``: gate and up
concatenated or interleaved, transposed weights, biases, gated or not, a post-expert norm); before each expert's
down-projection the hooks get the expert's index, the rows of the tokens routed to it (into the flattened
``[batch * seq]`` input) and its down-projection input ``[tokens, channels]``, and may return a replacement.
Hooks nest; the original forward is back when the last one is removed.

Experts kept as a ``ModuleList`` receive copies of their tokens' rows; :class:`RoutedRows` finds which rows by
exact comparison with the MoE block's input, so the statistics of both layouts count the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssah.unit_groups import UnitGroup

# (expert, token rows [n], down-projection input [n, channels]) -> replacement input or None
ExpertHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]
_HOOKS = "_ssah_expert_hooks"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    y = x @ weight if transposed else F.linear(x, weight)
    return y + bias if bias is not None else y


def expert_input(module: Any, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The down-projection input of ``expert`` of a fused experts module for hidden states ``x`` ``[n, hidden]``."""
    transposed = bool(getattr(module, "is_transposed", False))
    name = "gate_up_proj" if module.has_gate else "up_proj"
    bias = getattr(module, f"{name}_bias")[expert] if getattr(module, "has_bias", False) else None
    h = _linear(x, getattr(module, name)[expert], bias, transposed)
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def expert_output(module: Any, expert: int, h: torch.Tensor) -> torch.Tensor:
    """The output of ``expert`` (before its routing weight) for down-projection input ``h``."""
    transposed = bool(getattr(module, "is_transposed", False))
    bias = module.down_proj_bias[expert] if getattr(module, "has_bias", False) else None
    y = _linear(h, module.down_proj[expert], bias, transposed)
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def _routing(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of a fused experts call, by position or by name."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    values = list(args[:3])
    for keys in names[len(values) :]:
        values.append(next(kwargs[k] for k in keys if k in kwargs))
    return values[0], values[1], values[2]


def routed_forward(module: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts module's output computed expert by expert, calling its hooks on each expert's channels."""
    hidden, index, weights = _routing(args, kwargs)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.zeros_like(flat)
    num = int(module.down_proj.shape[0])
    with torch.no_grad():
        routed = F.one_hot(index.reshape(flat.shape[0], -1).clamp(max=num), num_classes=num + 1).permute(2, 1, 0)
        hit = routed[:num].sum(dim=(-1, -2)).nonzero().flatten().tolist()
    top = weights.reshape(flat.shape[0], -1)
    for e in hit:
        slot, token = torch.where(routed[e])
        h = expert_input(module, e, flat[token])
        for hook in list(getattr(module, _HOOKS)):
            replaced = hook(e, token, h)
            h = replaced if replaced is not None else h
        y = expert_output(module, e, h) * top[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out.reshape(hidden.shape)


@contextmanager
def routed_experts(model: nn.Module, hooks: Mapping[str, ExpertHook]) -> Iterator[None]:
    """Run the named fused experts modules expert by expert while the block runs, with ``hooks`` (by experts
    module name) on each expert's down-projection input; undone on exit, also on errors."""
    added: list[tuple[nn.Module, ExpertHook]] = []
    try:
        for name, hook in hooks.items():
            module = model.get_submodule(name)
            if getattr(module, _HOOKS, None) is None:
                setattr(module, _HOOKS, [])
                module.forward = routed_forward.__get__(module)  # type: ignore[method-assign]
            getattr(module, _HOOKS).append(hook)
            added.append((module, hook))
        yield
    finally:
        for module, hook in reversed(added):
            stack = getattr(module, _HOOKS)
            stack.remove(hook)
            if not stack:
                delattr(module, _HOOKS)
                del module.forward  # the class's forward again


class RoutedRows:
    """The token rows each module-list expert received in the latest forward pass, found by exact comparison of
    its input rows with its MoE block's flattened input (experts get copies of their tokens' rows).

    Identical rows of several tokens are indistinguishable: such a row counts as selected when any of its
    tokens is (only exact duplicates of a hidden state can meet this, e.g. repeated padding).
    """

    def __init__(self, groups: Sequence[UnitGroup]) -> None:
        self.blocks = sorted({g.moe_module for g in groups if g.expert is not None and not g.fused} - {None})
        self._inputs: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}

    def pre_hooks(self, model: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, Any]:
        """Forward pre-hooks (module name -> hook) that record each block's input and each expert's token rows."""
        hooks: dict[str, Any] = {b: self._block_hook(b) for b in self.blocks if b is not None}
        for g in groups:
            if g.expert is not None and not g.fused and g.moe_module is not None:
                expert = f"{g.moe_module}.experts.{g.expert}"
                hooks[expert] = self._expert_hook(g.moe_module, g.reader_module)
        return hooks

    def _block_hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], *_: Any) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                self._inputs[name] = x.detach().reshape(-1, x.shape[-1])

        return hook

    def _expert_hook(self, block: str, reader: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            self.rows[reader] = match_rows(self._inputs[block], args[0].detach())

        return hook


def match_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each row of ``rows``, the index of an identical row of ``table`` (the first), int64 ``[len(rows)]``."""
    both = torch.cat([table, rows.to(table.dtype).reshape(-1, table.shape[-1])])
    _, inverse = torch.unique(both, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), -1, dtype=torch.int64, device=table.device)
    ids = torch.arange(table.shape[0], device=table.device)
    first.scatter_reduce_(0, inverse[: table.shape[0]], ids, reduce="amin", include_self=False)
    found = first[inverse[table.shape[0] :]]
    if bool((found < 0).any()):
        raise RuntimeError("an expert received a row that is not in its MoE block's input: unsupported routing")
    return found
