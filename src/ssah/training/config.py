"""The settings of a training run (:class:`TrainConfig`) and of its LoRA adapters (:class:`LoraSettings`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from ssah.config import BaseConfig, ModelRunConfig, Section
from ssah.errors import UserError
from ssah.interventions import GqaMode
from ssah.runs import check_output_folder
from ssah.training.checkpoints import partial_dir
from ssah.training.unit_specs import parse_unit_spec

if TYPE_CHECKING:
    from peft import LoraConfig

Schedule = Literal["linear", "cosine", "constant"]
# Settings that do not change what is trained: they may differ between a run and its resumption.
RESUME_FREE = frozenset({"out", "overwrite", "progress", "resume", "checkpoint_every", "keep_checkpoints", "device"})
_OFF = ("", "none", "no", "off")


class LoraSettings(BaseConfig):
    """The LoRA settings a user writes (``--lora r=8,alpha=16``, or a mapping in YAML); :meth:`peft_config`
    turns them into the ``peft.LoraConfig`` that is trained."""

    r: int = Field(8, ge=1, description="Rank of the adapters.")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator lora_alpha (default 2 * r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    targets: list[str] | None = Field(
        None, description="Module names to adapt (default every linear projection of the blocks, peft's all-linear)."
    )

    def peft_config(self) -> LoraConfig:
        """The ``peft.LoraConfig`` of these settings (the one place it is built)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha if self.alpha is not None else 2 * self.r,  # type: ignore[arg-type]
            lora_dropout=self.dropout,
            target_modules=self.targets or "all-linear",
            task_type="CAUSAL_LM",
        )


_LORA_KEYS = {"r": "r", "alpha": "alpha", "lora_alpha": "alpha", "dropout": "dropout", "lora_dropout": "dropout"}
_LORA_KEYS |= {"targets": "targets", "target_modules": "targets"}


def parse_lora(text: str) -> LoraSettings:
    """Parse ``r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj`` (or just ``8``) into :class:`LoraSettings`."""
    text = text.strip()
    if text.isdigit():
        return LoraSettings.build({"r": int(text)})
    values: dict[str, Any] = {}
    for item in (i for i in text.split(",") if i.strip()):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise UserError(
                f"bad LoRA setting {item.strip()!r}: write key=value, e.g. --lora r=8,alpha=16,dropout=0.05"
            )
        if key.lower() not in _LORA_KEYS:
            raise UserError(f"unknown LoRA setting {key!r}: use r, alpha, dropout, targets (e.g. r=8,alpha=16)")
        name = _LORA_KEYS[key.lower()]
        values[name] = [t for t in value.replace("|", "+").split("+") if t] if name == "targets" else value
    return LoraSettings.build(values)


class TrainSection(Section):
    """How a model is fine-tuned (AdamW through :func:`ssah.training.train_model`), declared once: `ssah train` has
    these options at top level; every recipe that fine-tunes in memory (align, budget, protect, transfer) has them
    under ``train``, with its own defaults (``train: TrainSection = TrainSection(lr=5e-5)``). How many steps is the
    recipe's own option (one count, or several in protect)."""

    title = "Training"
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch and process.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup: int = Field(0, ge=0, description="Linear warmup, in optimizer steps (transformers' convention).")
    schedule: Schedule = Field(
        "linear", description="Learning-rate schedule after warmup (transformers.get_scheduler)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (none: no clipping).")
    freeze_embeddings: bool = Field(False, description="Keep the input embeddings (and a tied head) fixed.")


class TrainConfig(TrainSection, ModelRunConfig):
    """Everything `ssah train` needs (and what :func:`ssah.training.train_model` reads).

    Without ``epochs`` and ``max_steps`` a run takes one epoch; with ``max_steps`` only it cycles through the data
    as often as needed; with both it stops at whichever comes first (:class:`ssah.training.DataPlan`).
    """

    out: str = Field("runs/train", description="Run folder to write; the trained model goes to OUT/model.")
    dtype: str = Field("float32", description="Weight dtype to load and train in (auto, float32, bfloat16, ...).")
    data: str = Field("builtin:task", description="Training data: builtin:NAME, a preset, hf:NAME or a file.")
    columns: dict[str, str] = Field(default_factory=dict, description="Column mapping, e.g. {prompt: goal}.")
    limit: int | None = Field(None, ge=1, description="Use only the first N examples.")
    system: str | None = Field(None, description="System prompt for every example.")
    freeze: str | None = Field(None, description="Units kept bit-identical: UNITS_FILE:SCU[,CU@6%].")
    only: str | None = Field(None, description="Train only these units: UNITS_FILE:CATEGORY[@SHARE].")
    gqa: GqaMode = Field(
        "any",
        description="A value row shared under GQA is frozen / trained when any (or, strict, all) its channels are.",
    )
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (merged at the end): r=8,alpha=16,...")
    allow_other_weights: bool = Field(False, description="Accept a unit file computed on other weights (same layout).")
    epochs: int | None = Field(None, ge=1, description="Passes over the data (default 1 without max_steps).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, ge=8, description="Truncate examples to this many tokens.")
    checkpoint_every: int | None = Field(None, ge=1, description="Write a checkpoint every N steps.")
    keep_checkpoints: bool = Field(False, description="Keep every checkpoint, not just the last.")
    resume: bool = Field(False, description="Continue OUT.partial from its newest checkpoint.")
    fsdp: bool = Field(False, description="Shard with FSDP2 (per decoder block) across the processes of a launch.")

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return None if value.strip().lower() in _OFF else parse_lora(value)
        return value

    @field_validator("freeze", "only")
    @classmethod
    def _unit_spec(cls, value: str | None) -> str | None:
        if value:
            parse_unit_spec(value)  # a UserError naming the spec's problem
        return value

    @model_validator(mode="after")
    def _one_trainable_set(self) -> TrainConfig:
        if self.freeze and self.only:
            raise UserError("give either --freeze (train all but a unit set) or --only (train just one), not both")
        if self.lora is not None and (self.freeze or self.only):
            raise UserError("--lora trains adapters, not units: drop --freeze / --only, or drop --lora")
        return self

    @property
    def mode(self) -> str:
        """``all``, ``freeze``, ``only`` or ``lora``."""
        if self.lora is not None:
            return "lora"
        if self.only:
            return "only"
        return "freeze" if self.freeze else "all"

    def check(self) -> None:
        """Cheap validation of the output folders before any data or model is loaded (the fields validate
        themselves)."""
        out = check_output_folder(self.out, self.overwrite)  # first: a path that can be a run folder at all
        partial = partial_dir(out)
        if self.resume:
            if not partial.is_dir():
                raise UserError(f"nothing to resume: {partial} does not exist; run without --resume to start")
        elif partial.exists() and not self.overwrite:
            raise UserError(
                f"an unfinished run is in {partial}: pass --resume to continue it or --overwrite to start over"
            )

    def settings(self) -> dict[str, Any]:
        """The settings that decide what is trained (compared when a run is resumed)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RESUME_FREE}
