"""The one hook manager: attach forward (pre-)hooks by module name and always remove them, also on errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]
PostHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@contextmanager
def attach(
    model: nn.Module,
    pre: Mapping[str, PreHook] | None = None,
    post: Mapping[str, PostHook] | None = None,
) -> Iterator[None]:
    """Register forward pre-hooks and hooks on named submodules for the duration of the block."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, fn in (pre or {}).items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(fn))
        for name, fn in (post or {}).items():
            handles.append(model.get_submodule(name).register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
