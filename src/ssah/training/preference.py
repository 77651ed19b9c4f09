"""The preference step: DPO with trl's ``DPOTrainer``, under the same unit masks as every other fine-tune.

:func:`preference_step` trains a model in place on :class:`~ssah.training.pairs.Pair` s, like
:func:`~ssah.training.train_model` does on examples, and with the same trainable sets
(:func:`~ssah.training.trainable.prepare_trainable`): every parameter (optionally not the embeddings), all but a
frozen unit set (bit-identical: the gradient hooks of :func:`ssah.interventions.freeze_units` plus ``restore``
after every optimizer step, from a ``TrainerCallback``), only a unit set (per-unit deltas, merged at the end) or
LoRA adapters (merged at the end; trl then takes the reference from the adapter-free model).

The library does the preference part: trl's DPOTrainer (``loss_type="sigmoid"``, the DPO loss), with the
reference a frozen copy of the policy taken before the first step (trl's default; precomputing the reference
log-probabilities instead would run the reference over every pair, also those the steps never reach; under LoRA
trl takes the reference from the adapter-free model, no copy). ssah hands it what it owns: the optimizer over
exactly the parameters the trainable set names (so a units-only run updates the deltas and nothing else), the
pairs already tokenized the way the SFT step formats its examples (chat template, system prompt, BOS:
:func:`~ssah.training.pairs.encode_pair`; the one trainer method overridden is ``_prepare_dataset``, which is why
trl is pinned), and the callback that restores frozen units. What the trainer patches on the model (its fused
LM-head forward, accelerate's autocast, the pad token in the configs) is undone before the model is handed back.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from ssah.config import Section
from ssah.errors import DataError, UserError
from ssah.training.config import TrainConfig
from ssah.training.pairs import Pair, encode_pair
from ssah.training.results import TrainResult
from ssah.training.trainable import Trainable, prepare_trainable
from ssah.units import UnitSet

METHODS = ("sft", "dpo", "sft+dpo")
Method = Annotated[
    Literal["sft", "dpo", "sft+dpo"],
    Field(
        description="How the model is aligned: sft (safety SFT on the mix), dpo (a preference step on pairs built "
        "from the mix: refusal over the model's own compliant reply for harmful requests, the answer over a refusal "
        "for safe ones) or sft+dpo (SFT, then the preference step)."
    ),
]


class DpoSection(Section):
    """The settings of the preference step (``--method dpo`` or ``sft+dpo``); the trainable set, weight decay,
    gradient clipping, system prompt and maximum length are the fine-tune's own (``train``, ``max_length``)."""

    title = "Preference step (DPO)"
    beta: float = Field(0.1, gt=0, description="DPO's beta: how strongly the policy is held to the reference.")
    steps: int = Field(30, ge=1, description="Optimizer steps of the preference step.")
    lr: float = Field(5e-6, gt=0, description="Learning rate of the preference step (AdamW, constant).")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_new_tokens: int = Field(
        64, ge=1, description="Length of the model's own replies to the harmful requests (the rejected side)."
    )


def uses_dpo(method: str) -> bool:
    """Whether a method has a preference step."""
    return method in ("dpo", "sft+dpo")


def _trainer_class() -> type:
    """trl's DPOTrainer taking ssah's tokenized pairs as they are (imported on first use: trl takes seconds)."""
    from trl import DPOTrainer

    class SsahDPOTrainer(DPOTrainer):  # type: ignore[misc]
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            # the pairs arrive as prompt_ids / chosen_ids / rejected_ids from encode_pair: formatted exactly as
            # the SFT step formats its examples, and already without prompts that fill max_length
            return dataset

    return SsahDPOTrainer


def _callback(frozen: Any, records: list[dict[str, Any]]) -> Any:
    """Restores frozen units after every optimizer step and keeps each step's log record."""
    from transformers import TrainerCallback

    class Masks(TrainerCallback):  # type: ignore[misc]
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if frozen is not None:
                frozen.restore()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                keep = ("loss", "learning_rate", "grad_norm", "rewards/margins", "rewards/accuracies")
                records.append({"step": state.global_step, **{k: float(logs[k]) for k in keep if k in logs}})

    return Masks()


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """transformers' deprecation notes about trl's own settings (``gradient_checkpointing``) are not the user's;
    without ``progress`` no progress bars from trl or datasets either."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        if progress:
            yield
        else:
            with _no_bars():
                yield


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    import datasets

    before = os.environ.get("TQDM_DISABLE")
    was = datasets.is_progress_bar_enabled()
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
        if was:
            datasets.enable_progress_bars()


def _encode_pairs(tokenizer: Any, pairs: Sequence[Pair], cfg: TrainConfig) -> tuple[list[dict[str, list[int]]], int]:
    from ssah.data.chat import bos_to_add

    bos_id = bos_to_add(tokenizer)
    rows = [encode_pair(tokenizer, p, system=cfg.system, max_length=cfg.max_length, bos_id=bos_id) for p in pairs]
    kept = [r for r in rows if r is not None]
    if not kept:
        raise DataError(
            f"no preference pair keeps a reply token within max-length {cfg.max_length}: raise --max-length"
        )
    return kept, len(rows) - len(kept)


def _dpo_args(cfg: TrainConfig, dpo: DpoSection, out: str, cpu: bool, progress: bool) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out,
        max_steps=dpo.steps,
        per_device_train_batch_size=dpo.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=dpo.lr,
        max_grad_norm=cfg.max_grad_norm or 0.0,  # 0: no clipping, as max_grad_norm=None in the SFT step
        beta=dpo.beta,
        loss_type=["sigmoid"],
        max_length=cfg.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,  # trl turns it on by default: slower, and nothing here needs the memory
        bf16=cfg.bf16,
        use_cpu=cpu,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def _optimizer(named: dict[str, nn.Parameter], cfg: TrainConfig, dpo: DpoSection) -> tuple[Any, Any]:
    """AdamW over exactly what the trainable set trains (the deltas of a units-only run, the adapters of LoRA),
    constant learning rate, as the SFT step's optimizer."""
    import torch
    from transformers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(list(named.values()), lr=dpo.lr, weight_decay=cfg.weight_decay)
    return optimizer, get_scheduler("constant", optimizer)


def _reset_accelerate() -> None:
    """In a single process, forget an earlier Accelerator's precision (the SFT step's), which the Trainer's own
    Accelerator would otherwise refuse to change."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState().num_processes == 1:
        AcceleratorState._reset_state()


def _make_trainer(tr: Trainable, reference: Any, tokenizer: Any, rows: list[Any], args: Any, optimizers: Any) -> Any:
    """The DPO trainer of a run (quiet unless ``args`` shows progress)."""
    from datasets import Dataset

    trainer = _trainer_class()(
        model=tr.model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=copy.deepcopy(tokenizer),  # the trainer may set its pad token
        optimizers=optimizers,
    )
    if args.disable_tqdm:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it would print every step's log
    return trainer


def preference_step(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    cfg: TrainConfig,
    dpo: DpoSection,
    *,
    freeze: UnitSet | None = None,
    only: UnitSet | None = None,
    progress: bool = False,
) -> TrainResult:
    """DPO on ``pairs`` in place: ``model`` (the policy, and before its first step the reference) moves toward
    each ``chosen`` and away from each ``rejected``. ``freeze`` keeps a unit set bit-identical, ``only`` trains
    just a unit set, ``cfg.lora`` trains LoRA adapters; ``cfg.freeze_embeddings``, ``weight_decay``,
    ``max_grad_norm``, ``system``, ``max_length``, ``seed`` and ``bf16`` are read from ``cfg``, the rest from
    ``dpo``. Returns what happened; ``losses`` are the DPO losses of the steps."""
    if freeze is not None and only is not None:
        raise UserError("give either a unit set to freeze or one to train, not both")
    if cfg.lora is not None and (freeze is not None or only is not None):
        raise UserError("LoRA trains adapters, not units: drop the unit set, or drop LoRA")
    if not pairs:
        raise DataError("the preference step needs at least one pair")
    t0 = time.time()
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    rows, skipped = _encode_pairs(tokenizer, pairs, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    configs: Any = model  # a transformers model: the trainer writes its pad token into both configs
    pads = (getattr(configs.config, "pad_token_id", None), getattr(configs.generation_config, "pad_token_id", None))
    reference = copy.deepcopy(model).eval() if cfg.lora is None else None  # before any delta or hook is added
    tr = prepare_trainable(model, cfg, freeze, only)
    # the trainer's fused LM-head forward and accelerate's autocast are set on the instance: taken off at the end
    own_forward = {id(m): "forward" in m.__dict__ for m in (model, tr.model)}
    records: list[dict[str, Any]] = []
    frozen = None
    ok = False
    try:
        _reset_accelerate()
        with tempfile.TemporaryDirectory(prefix="ssah-dpo-") as out, _quiet(progress):
            args = _dpo_args(cfg, dpo, out, device.type == "cpu", progress)
            trainer = _make_trainer(tr, reference, tokenizer, rows, args, _optimizer(tr.named, cfg, dpo))
            if freeze is not None:  # on the parameters the optimizer updates (accelerate keeps them on one device)
                from ssah.interventions import freeze_units

                frozen = freeze_units(model, freeze, gqa=cfg.gqa)
            trainer.add_callback(_callback(frozen, records))
            state = trainer.train().global_step
            epochs = float(trainer.state.epoch or 0.0)
        drift = frozen.max_drift() if frozen is not None else None
        params = tr.params - (frozen.frozen_parameters if frozen is not None else 0)
        trainable: dict[str, int | float] = {"params": params, "total": tr.total}
        ok = True
    finally:
        if frozen is not None:
            frozen.remove()
        for m in (model, tr.model):
            if not own_forward[id(m)]:
                m.__dict__.pop("forward", None)
            m.__dict__.pop("_original_forward", None)
            m.__dict__.pop("_is_accelerate_prepared", None)
        configs.config.pad_token_id, configs.generation_config.pad_token_id = pads
        trained = tr.finish(ok)
        trained.train(was_training)
    trainable["share"] = trainable["params"] / trainable["total"] if trainable["total"] else 0.0
    slice_report = frozen.report if frozen is not None else tr.report
    lengths = [len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    return TrainResult(
        model=trained,
        mode=cfg.mode,
        steps=state,
        total_steps=dpo.steps,
        losses=[r["loss"] for r in records],
        seconds=time.time() - t0,
        trainable=trainable,
        tokens=sum(lengths),
        response_tokens=sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
        examples=len(rows),
        skipped=skipped,
        epochs=epochs,
        frozen_max_drift=drift,
        unit_slices=slice_report.as_dict() if slice_report is not None else None,
        log=records,
    )
