"""What a run trains: every parameter (optionally not the embeddings), per-unit deltas, or LoRA adapters.

Frozen units are not set here: their hooks go on the parameters the optimizer updates, after accelerate wrapped
or FSDP2 sharded the model (:func:`ssah.interventions.freeze_units`, called by the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from ssah.errors import UserError
from ssah.interventions import train_only_units
from ssah.training.config import TrainConfig
from ssah.units import UnitSet


@dataclass
class Trainable:
    """The model as trained (maybe a peft wrapper), what the optimizer updates, and how to finish."""

    model: nn.Module
    named: dict[str, nn.Parameter]
    params: int
    total: int
    finish: Callable[[bool], nn.Module]
    frozen: Any = None
    report: Any = None  # SliceReport of a units-only run


def prepare_trainable(model: nn.Module, cfg: TrainConfig, freeze: UnitSet | None, only: UnitSet | None) -> Trainable:
    """Set what trains (before accelerate wraps the model; freeze hooks are added after)."""
    total = sum(p.numel() for p in model.parameters())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    def restore_flags() -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))

    if only is not None:
        deltas = train_only_units(model, only, gqa=cfg.gqa)

        def finish_only(ok: bool) -> nn.Module:
            deltas.merge()
            return model

        named = {f"delta.{i}": p for i, p in enumerate(deltas.parameters())}
        return Trainable(model, named, deltas.trainable_parameters, total, finish_only, report=deltas.report)

    if cfg.lora is not None:
        from peft import get_peft_model  # only LoRA runs pay for importing peft

        for p in model.parameters():
            p.requires_grad_(False)
        try:
            peft_model = get_peft_model(model, cfg.lora.peft_config())  # type: ignore[arg-type]
        except ValueError as exc:
            raise UserError(f"LoRA cannot be applied: {str(exc).splitlines()[0]}; check --lora targets=...") from None
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

        def finish_lora(ok: bool) -> nn.Module:
            base = peft_model.merge_and_unload() if ok else peft_model.unload()
            restore_flags()
            return base  # type: ignore[no-any-return]

        return Trainable(peft_model, named, sum(p.numel() for p in named.values()), total, finish_lora)

    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.freeze_embeddings:
        get_emb = getattr(model, "get_input_embeddings", None)
        emb = get_emb() if callable(get_emb) else None
        if emb is None:
            raise UserError("this model has no input embeddings to freeze: drop --freeze-embeddings")
        # a tied output head shares this Parameter and stays frozen too
        cast(nn.Parameter, emb.weight).requires_grad_(False)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def finish_all(ok: bool) -> nn.Module:
        restore_flags()
        return model

    return Trainable(model, named, sum(p.numel() for p in named.values()), total, finish_all)
