"""The training loop on accelerate: :func:`train_model` fine-tunes a model in memory.

The loss is the cross-entropy of the response tokens only (``collate``'s labels), summed over every micro-batch
of an optimizer step and divided by the number of response tokens in that step, so gradient accumulation and
data parallelism give the gradient of one large batch. AdamW with a ``transformers.get_scheduler`` schedule,
seeded by ``accelerate.utils.set_seed``; frozen units are kept bit-identical by gradient masking plus
:meth:`~ssah.interventions.FrozenUnits.restore` after every optimizer step (which also undoes AdamW's weight
decay there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from ssah.data import Encoded, PromptSet, collate, encode_set
from ssah.errors import DataError, UserError
from ssah.interventions import FrozenUnits, freeze_units
from ssah.runs import atomic_write_text
from ssah.training.checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_dirs,
    load_checkpoint,
    read_step_log,
    save_checkpoint,
)
from ssah.training.config import TrainConfig
from ssah.training.data_plan import DataPlan
from ssah.training.distributed import (
    ShardedModel,
    decoder_blocks,
    fsdp_requested,
    full_tensor,
    make_accelerator,
)
from ssah.training.loss import response_loss
from ssah.training.results import TrainResult
from ssah.training.trainable import Trainable, prepare_trainable
from ssah.training.unit_specs import unit_set_digest
from ssah.units import UnitSet

log = logging.getLogger(__name__)

# our schedule names -> transformers.get_scheduler's (each with linear warmup over ``warmup`` steps)
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def train_model(
    model: nn.Module,
    tokenizer: Any,
    data: PromptSet,
    cfg: TrainConfig,
    *,
    freeze: UnitSet | None = None,
    only: UnitSet | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on the response tokens of ``data`` and return what happened.

    ``freeze`` keeps a unit set bit-identical, ``only`` trains just a unit set, ``cfg.lora`` trains LoRA adapters
    (then merged); none of them trains every parameter. The specs ``cfg.freeze`` / ``cfg.only`` are not read
    here: pass the resolved sets (:func:`ssah.training.resolve_unit_spec`). With ``run_dir``, the main process
    appends each optimizer step to ``train_log.jsonl`` there and writes checkpoints every ``cfg.checkpoint_every``
    steps into ``checkpoints/``; with ``cfg.resume`` training continues from the newest of them. ``on_step`` is
    called with each step's log record (after the step's checkpoint, if any). The returned model is plain
    (saveable with ``save_pretrained``) and in the training mode it had before. With ``cfg.fsdp`` (or an FSDP2
    accelerate launch) and several processes, an FSDP2-sharded twin of the model trains and every rank's ``model``
    receives the gathered trained weights at the end (a run that fails midway leaves ``model`` as it was).
    """
    _check_inputs(data, cfg, freeze, only)
    t0 = time.time()
    set_seed(cfg.seed)
    encoded, skipped, pad_id = _encode(tokenizer, data, cfg)
    device = next(model.parameters()).device
    accelerator = make_accelerator("bf16" if cfg.bf16 else "no", cpu=device.type == "cpu")
    world = accelerator.num_processes
    if skipped and accelerator.is_main_process:
        log.warning("%d examples have no response token within max-length %d and are skipped", skipped, cfg.max_length)
    plan = DataPlan(
        encoded,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=cfg.seed,
        world=world,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
    )
    shard = fsdp_requested(cfg) and world > 1
    if fsdp_requested(cfg) and not shard:
        log.info("FSDP2 shards across several processes; a single process trains unsharded")
    settings = _resume_settings(cfg, data, len(encoded), world, shard, freeze, only)
    blocks = decoder_blocks(model) if shard else []
    was_training = model.training
    tr = prepare_trainable(model, cfg, freeze, only)
    had_forward = "forward" in tr.model.__dict__
    run: _Run | None = None
    ok = False
    try:
        run = _setup(tr, cfg, plan, accelerator, blocks if shard else None, freeze, encoded, pad_id)
        trainable, frozen = run.trainable(), run.frozen
        records, resumed_from = _steps(run, Path(run_dir) if run_dir is not None else None, settings, progress, on_step)
        drift = run.finish()
        ok = True
    finally:
        if run is not None and run.frozen is not None:
            run.frozen.remove()
        run = None  # drops a sharded twin (the caller's model holds the trained values)
        # accelerate's mixed precision patches the instance's forward (autocast): give back the class's own
        if not had_forward:
            tr.model.__dict__.pop("forward", None)
        tr.model.__dict__.pop("_original_forward", None)
        # ... and forget it was prepared: accelerate skips (no autocast patch) a model that carries the mark, so a
        # second run on the same model would silently train without its mixed precision
        tr.model.__dict__.pop("_is_accelerate_prepared", None)
        trained = tr.finish(ok)
        trained.train(was_training)
    slice_report = frozen.report if frozen is not None else tr.report
    return TrainResult(
        model=trained,
        mode=cfg.mode,
        steps=plan.total_steps,
        total_steps=plan.total_steps,
        losses=[r["loss"] for r in records],
        seconds=time.time() - t0,
        trainable=trainable,
        tokens=sum(r["tokens"] for r in records),
        response_tokens=sum(r["response_tokens"] for r in records),
        examples=len(encoded),
        skipped=skipped,
        epochs=plan.epoch_of(plan.total_steps),
        resumed_from=resumed_from,
        frozen_max_drift=drift,
        unit_slices=slice_report.as_dict() if slice_report is not None else None,
        log=records,
        fsdp=shard,
    )


def _check_inputs(data: PromptSet, cfg: TrainConfig, freeze: UnitSet | None, only: UnitSet | None) -> None:
    """The unit sets and data a run can train on (the config has validated itself)."""
    if freeze is not None and only is not None:
        raise UserError("give either a unit set to freeze or one to train, not both")
    if cfg.lora is not None and (freeze is not None or only is not None):
        raise UserError("LoRA trains adapters, not units: drop the unit set, or drop LoRA")
    if len(data) == 0:
        raise DataError(f"the training set {data.name!r} is empty: pass a data set with at least one example")
    if not data.has_responses:
        missing = sum(1 for ex in data if not ex.response)
        raise DataError(
            f"training needs a response for every example, and {missing} of {len(data)} in {data.name!r} lack one: "
            "use a data set with a response column (or --column response=NAME)"
        )
    if only is not None and len(only) == 0:
        raise UserError(f"no units to train: unit set {only.name!r} is empty; choose a non-empty category or share")


def _resume_settings(
    cfg: TrainConfig, data: PromptSet, examples: int, world: int, shard: bool, *sets: UnitSet | None
) -> dict[str, Any]:
    """What a checkpoint must have been written with to be resumed: the config's training settings, the data,
    the launch and the unit sets (``freeze``, ``only``)."""
    freeze, only = sets
    return {
        **cfg.settings(),
        "fsdp": shard,
        "data_sha256": data.fingerprint(),
        "examples": examples,
        "world_size": world,
        "freeze_units": unit_set_digest(freeze),
        "only_units": unit_set_digest(only),
    }


def _encode(tokenizer: Any, data: PromptSet, cfg: TrainConfig) -> tuple[list[Encoded], int, int]:
    """The examples that keep a response token within ``max_length``, how many were skipped, the pad id."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    encoded_all = encode_set(tokenizer, data, system=cfg.system, max_length=cfg.max_length)
    encoded = [e for e in encoded_all if any(e.response_mask)]
    if not encoded:
        raise DataError(
            f"no example of {data.name!r} keeps a response token within max-length {cfg.max_length}: "
            "raise --max-length or shorten the prompts"
        )
    return encoded, len(encoded_all) - len(encoded), pad_id


@dataclass
class _Run:
    """Everything the steps of a run share once the optimizer exists."""

    cfg: TrainConfig
    plan: DataPlan
    accelerator: Any
    tr: Trainable
    named: dict[str, nn.Parameter]  # what the optimizer updates (the sharded parameters under FSDP2)
    wrapped: nn.Module  # what the forward pass runs: accelerate's wrapper or the FSDP2 twin
    optimizer: Any
    opt_loader: Any  # what a checkpoint's optimizer state loads into
    scheduler: Any
    sharded: ShardedModel | None
    frozen: FrozenUnits | None
    encoded: list[Encoded]
    pad_id: int

    def trainable(self) -> dict[str, int | float]:
        params = self.tr.params - (self.frozen.frozen_parameters if self.frozen is not None else 0)
        return {"params": params, "total": self.tr.total, "share": params / self.tr.total if self.tr.total else 0.0}

    def finish(self) -> float | None:
        """After the last step: the largest drift of a frozen weight, and the FSDP2 values written back."""
        self.accelerator.wait_for_everyone()
        drift = self.frozen.max_drift() if self.frozen is not None else None
        if self.sharded is not None:
            if drift is not None:  # each rank saw its own shards
                drift = float(
                    self.accelerator.reduce(torch.tensor([drift], device=self.accelerator.device), "max").max()
                )
            self.sharded.write_back()
        return drift


def _setup(
    tr: Trainable,
    cfg: TrainConfig,
    plan: DataPlan,
    accelerator: Any,
    blocks: Sequence[nn.Module] | None,
    freeze: UnitSet | None,
    encoded: list[Encoded],
    pad_id: int,
) -> _Run:
    """Optimizer, schedule and the model as it trains: prepared by accelerate, or (``blocks`` given) an FSDP2
    twin sharded per block; then the freeze hooks on the parameters it updates."""
    # imported here: transformers.optimization pulls in peft through trainer_utils (seconds), only a run pays
    from transformers.optimization import get_scheduler

    named, sharded = tr.named, None
    if blocks is not None:
        sharded = ShardedModel(tr.model, tr.named, blocks, accelerator.device)
        named = sharded.named
    optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        _SCHEDULERS[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup, num_training_steps=plan.total_steps
    )
    if sharded is not None:
        wrapped, opt_loader = sharded.module, sharded.optimizer_loader(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(tr.model, optimizer)
        opt_loader = optimizer
    frozen = None
    if freeze is not None:  # after accelerate wrapped or FSDP2 sharded the model: on the parameters it trains
        frozen = freeze_units(
            wrapped if sharded is not None else accelerator.unwrap_model(wrapped), freeze, gqa=cfg.gqa
        )
    return _Run(
        cfg, plan, accelerator, tr, named, wrapped, optimizer, opt_loader, scheduler, sharded, frozen, encoded, pad_id
    )


def _resume(run: _Run, run_path: Path | None, settings: dict[str, Any]) -> tuple[int, int | None, list[dict[str, Any]]]:
    """Where the run starts: the newest checkpoint's step when resuming (its state loaded), and the step log
    up to there (rewritten by the main process)."""
    start, resumed_from, history = 0, None, []
    ckpts = checkpoint_dirs(run_path) if run_path is not None and run.cfg.resume else []
    if ckpts:
        state = load_checkpoint(ckpts[-1], run.named, run.opt_loader, run.scheduler, settings)
        start = resumed_from = int(state["step"])
    if run_path is not None:
        history = read_step_log(run_path / "train_log.jsonl", start)
        if run.accelerator.is_main_process:
            run_path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_path / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    run.accelerator.wait_for_everyone()
    return start, resumed_from, history


def _steps(
    run: _Run,
    run_path: Path | None,
    settings: dict[str, Any],
    progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
) -> tuple[list[dict[str, Any]], int | None]:
    """Every optimizer step from the start (or the resumed checkpoint) on: the step log and the resumed step."""
    start, resumed_from, records = _resume(run, run_path, settings)
    main = run.accelerator.is_main_process
    run.wrapped.train()
    log_file = open(run_path / "train_log.jsonl", "a", encoding="utf-8") if run_path and main else None  # noqa: SIM115
    bar = _progress(run.plan.total_steps, start, progress and main)
    try:
        for step in range(start, run.plan.total_steps):
            record = _train_step(run, step)
            records.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            every = run.cfg.checkpoint_every
            if run_path is not None and every and record["step"] % every == 0:
                _checkpoint(run, run_path, record["step"], settings)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if on_step is not None:
                on_step(record)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    return records, resumed_from


def _checkpoint(run: _Run, run_path: Path, step: int, settings: dict[str, Any]) -> None:
    """Write the checkpoint of ``step`` (under FSDP2 gathered by every rank, written by the main one)."""
    tensors: Mapping[str, torch.Tensor] = run.named
    opt_state: Any = run.optimizer
    if run.sharded is not None:
        tensors, opt_state = run.sharded.gather(), run.sharded.optimizer_state(run.optimizer)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        per_epoch = run.plan.steps_per_epoch
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "epoch": step // per_epoch,
            "step_in_epoch": step % per_epoch,
            "settings": settings,
        }
        save_checkpoint(run_path, step, tensors, opt_state, run.scheduler, state, keep_all=run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step over its micro-batches; returns the step's log record.

    Under FSDP2 the model is not prepared by accelerate: gradient sync, backward, mixed precision and clipping go
    through torch directly.
    """
    t0 = time.perf_counter()
    plan, cfg, accelerator, model = run.plan, run.cfg, run.accelerator, run.wrapped
    fsdp = run.sharded is not None
    micro = plan.step(step)
    response_tokens = sum(plan.response_tokens[i] for mb in micro for idx in mb for i in idx)
    tokens = sum(plan.lengths[i] for mb in micro for idx in mb for i in idx)
    device = accelerator.device
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        batch = collate([run.encoded[i] for i in mb[accelerator.process_index]], run.pad_id, padding_side="right")
        batch = {k: v.to(device) for k, v in batch.items() if k != "count_mask"}
        # gradients are synchronised across processes once per optimizer step, on its last micro-batch
        last = j == len(micro) - 1
        if fsdp:
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
            sync = accelerator.autocast() if cfg.bf16 else contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            ce, _ = response_loss(model, batch)
            # the token-weighted mean over the whole step (all micro-batches, all ranks: DDP and FSDP2 average
            # gradients over ranks)
            loss = ce * plan.world / response_tokens
            if fsdp:
                loss.backward()
            else:
                accelerator.backward(loss)
        ce_sum += ce.detach().double()
    grad_norm = _clip(run)
    lr = float(run.optimizer.param_groups[0]["lr"])
    run.optimizer.step()
    if run.frozen is not None:
        run.frozen.restore()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if plan.world > 1:
        ce_sum = accelerator.reduce(ce_sum, reduction="sum")
    return {
        "step": step + 1,
        "epoch": round(plan.epoch_of(step + 1), 4),
        "loss": float(ce_sum) / response_tokens,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "response_tokens": response_tokens,
        "step_seconds": round(time.perf_counter() - t0, 4),
    }


def _clip(run: _Run) -> float | None:
    """Clip the gradient norm to ``max_grad_norm``; returns the norm before clipping (None without clipping)."""
    if run.cfg.max_grad_norm is None:
        return None
    params = list(run.named.values())
    if run.sharded is not None:  # the norm of sharded gradients is a DTensor
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm))
    else:
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.max_grad_norm)
    return float(norm) if norm is not None else None
