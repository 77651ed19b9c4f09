"""Several processes: accelerate for one device and DDP, FSDP2 (``fully_shard``) for sharded training.

With ``fsdp`` a twin of the model that shares its parameters is cut by ``torch.distributed.fsdp.fully_shard`` per
decoder block and then at the root; gradients and AdamW state exist only as shards, the freeze hooks are placed
on the sharded parameters (after sharding), and at the end the full trained values are gathered back into the
caller's plain model.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, cast

import torch
from torch import nn

from ssah.arch import get_adapter
from ssah.errors import UserError
from ssah.interventions import like_param, local_tensor


class _ShardingChoice(Protocol):
    """What :func:`fsdp_requested` reads of a training config (a protocol, so this module needs no config import:
    the config module builds on the checkpoints module, which builds on this one)."""

    fsdp: bool


log = logging.getLogger(__name__)


def make_accelerator(mixed_precision: str, cpu: bool) -> Any:
    """An ``Accelerator``; in a single process an earlier one with other settings is replaced (accelerate keeps
    its state in a process-wide singleton that refuses a second precision otherwise)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        if PartialState().num_processes != 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def fsdp_requested(cfg: _ShardingChoice) -> bool:
    """Whether to shard with FSDP2: ``cfg.fsdp``, or a launch by ``accelerate launch --use_fsdp --fsdp_version 2``
    (or an accelerate config with FSDP2), which accelerate 1.15 itself ignores on CPUs."""
    if cfg.fsdp:
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() not in ("1", "true", "yes"):
        return False
    if os.environ.get("FSDP_VERSION", "1").strip() != "2":
        raise UserError(
            "ssah train shards with FSDP2 only: launch with --fsdp_version 2 (or fsdp_version: 2 in the config)"
        )
    return True


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective: every rank must call it), else the tensor itself."""
    gather = getattr(t, "full_tensor", None)
    return (gather() if callable(gather) else t).detach()


@torch.no_grad()
def copy_full_into(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``t``, or into this rank's shard of ``t`` when it is a DTensor (no communication)."""
    full = full.to(device=local_tensor(t.detach()).device, dtype=t.dtype)
    local_tensor(t.detach()).copy_(local_tensor(like_param(full, t)))


class ShardedModel:
    """An FSDP2-sharded twin of the model being trained.

    ``copy.deepcopy`` with every parameter in its memo gives a structural copy that shares the caller's Parameter
    objects; ``fully_shard`` (each decoder block, then the root) replaces them in the copy only, by DTensor shards
    of their values. The caller's model keeps its class, hooks and parameters (the full weights stay on each
    rank; gradients and AdamW state are sharded), and :meth:`write_back` gathers the trained values into it.
    ``named`` maps the keys of the trainable set to the sharded parameters.
    """

    def __init__(self, model: nn.Module, named: Mapping[str, nn.Parameter], blocks: Sequence[nn.Module], device: Any):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        module_names = {id(m): n for n, m in model.named_modules()}
        param_names = {id(p): n for n, p in model.named_parameters()}
        self.originals = dict(named)
        self.module: nn.Module = copy.deepcopy(model, {id(p): p for p in model.parameters()})
        mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(self.module.get_submodule(module_names[id(block)]), mesh=mesh)
        fully_shard(self.module, mesh=mesh)
        self.named = {k: cast(nn.Parameter, self.module.get_parameter(param_names[id(p)])) for k, p in named.items()}

    def gather(self) -> dict[str, torch.Tensor]:
        """The full values of the trainable tensors (collective)."""
        return {k: full_tensor(p) for k, p in self.named.items()}

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained values into the caller's parameters (collective)."""
        for k, full in self.gather().items():
            self.originals[k].copy_(full)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The optimizer's full state (collective; the values land on rank 0 only)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.module, optimizer, options=options)  # type: ignore[no-any-return]

    def optimizer_loader(self, optimizer: Any) -> Any:
        """An object whose ``load_state_dict(full_state)`` shards a full optimizer state into ``optimizer``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        module = self.module

        class _Loader:
            def load_state_dict(self, state: dict[str, Any]) -> None:
                options = StateDictOptions(full_state_dict=True)
                set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)

        return _Loader()


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks FSDP2 shards one by one (none when the architecture is unknown: the root only)."""
    try:
        adapter = get_adapter(model)
        return [adapter.block(i) for i in range(adapter.num_layers)]
    except Exception as exc:  # an unknown architecture still trains, sharded at the root only
        log.warning("FSDP2 shards the whole model as one unit: no decoder blocks found (%s)", exc)
        return []
