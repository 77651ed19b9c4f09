"""Fine-tuning on one loop (accelerate): full, frozen-units, units-only and LoRA training, with exact resume.

The loss is the cross-entropy of the response tokens only (``collate``'s labels), summed over every micro-batch
of an optimizer step and divided by the number of response tokens in that step, so gradient accumulation and
data parallelism give the gradient of one large batch. Trainable sets:

- ``all``: every parameter (optionally the input embeddings frozen, and with them a tied output head);
- ``freeze``: all but a :class:`~ssah.units.UnitSet`, whose reader columns and writer rows stay bit-identical
  (gradient masking plus :meth:`~ssah.interventions.FrozenUnits.restore` after every optimizer step, which also
  undoes AdamW's weight decay there);
- ``only``: just a unit set, through per-unit deltas (optimizer memory proportional to the trained units),
  merged into the weights at the end;
- ``lora``: peft LoRA adapters (the paper's PEFT baseline), merged at the end.

With several processes (``torchrun`` or ``accelerate launch``) the model is replicated (DDP), or, with
``fsdp`` (``--fsdp``, or ``accelerate launch --use_fsdp --fsdp_version 2``), sharded with FSDP2: a twin of the
model that shares its parameters is cut by ``torch.distributed.fsdp.fully_shard`` per decoder block and then at
the root, gradients and AdamW state exist only as shards, the freeze hooks are placed on the sharded parameters
(after sharding), and at the end the full trained values are gathered back into the caller's plain model.

The data order is a function of the seed and the epoch, so a checkpoint only needs the step to know where the
data stands; a checkpoint holds the trainable tensors, the optimizer and scheduler states and the RNG states,
and a run resumed from it reaches the same weights, bit for bit, as one that was never interrupted.
``train_model`` trains a model in memory (experiment loops call it); ``run_train`` is the `ssah train` recipe.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from ssah.arch import get_adapter
from ssah.config import BaseConfig, ModelRunConfig
from ssah.data import Encoded, PromptSet, collate, encode_set
from ssah.errors import DataError, UnitFileError, UserError
from ssah.measure import Selection, SelectionItem, parse_selection, safety_ranking, select
from ssah.runs import atomic_write_text, check_output_folder, set_seed
from ssah.units import UnitSet, UnitSpace, load_unit_sets, read_unit_file_metadata

log = logging.getLogger(__name__)

SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")
CHECKPOINT_FORMAT = "ssah.train-checkpoint/1"
# Settings that do not change what is trained: they may differ between a run and its resumption.
_RESUME_FREE = frozenset({"out", "overwrite", "progress", "resume", "checkpoint_every", "keep_checkpoints", "device"})


# -- configuration --------------------------------------------------------------------------------------------
class LoraSettings(BaseConfig):
    """LoRA adapter settings: rank, scaling ``alpha`` (default ``2 * r``), dropout and target modules
    (default every linear projection of the decoder blocks, peft's ``all-linear``)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.05
    targets: list[str] | None = None


def parse_lora(text: str) -> LoraSettings:
    """Parse ``r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj`` (or just ``8``) into :class:`LoraSettings`."""
    text = text.strip()
    if text.isdigit():
        return LoraSettings(r=int(text))
    values: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        try:
            if not sep or not value:
                raise ValueError
            if key == "r":
                values["r"] = int(value)
            elif key in ("alpha", "lora_alpha"):
                values["alpha"] = float(value)
            elif key in ("dropout", "lora_dropout"):
                values["dropout"] = float(value)
            elif key in ("targets", "target_modules"):
                values["targets"] = [t for t in value.replace("|", "+").split("+") if t]
            else:
                raise KeyError(key)
        except KeyError:
            raise UserError(
                f"unknown LoRA setting {key!r}: use r, alpha, dropout, targets (e.g. r=8,alpha=16)"
            ) from None
        except ValueError:
            raise UserError(
                f"bad LoRA setting {item.strip()!r}: write key=value, e.g. --lora r=8,alpha=16,dropout=0.05"
            ) from None
    return LoraSettings.build(values)


class TrainConfig(ModelRunConfig):
    """Everything `ssah train` needs (and what ``train_model`` reads).

    ``freeze`` / ``only`` are unit specs (``PATH:SCU,CU@6%``, see :func:`parse_unit_spec`); ``epochs``
    defaults to 1 when ``max_steps`` is not given, and without ``epochs`` a ``max_steps`` run cycles through the
    data as often as needed; with both, the run stops at whichever comes first. ``warmup`` is in optimizer steps.
    ``fsdp`` shards the model with FSDP2 across the processes of a distributed launch (see :func:`fsdp_requested`;
    a single process trains unsharded).
    """

    out: str = "runs/train"
    dtype: str = "float32"
    data: str = "builtin:task"
    columns: dict[str, str] = Field(default_factory=dict)
    limit: int | None = None
    system: str | None = None
    freeze: str | None = None
    only: str | None = None
    gqa: str = "any"  # a value row shared under GQA is frozen / trained when any (or, strict, all) its channels are
    lora: LoraSettings | None = None
    allow_other_weights: bool = False
    freeze_embeddings: bool = False
    epochs: int | None = None
    max_steps: int | None = None
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    max_length: int = 512
    checkpoint_every: int | None = None
    keep_checkpoints: bool = False
    resume: bool = False
    fsdp: bool = False

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return None if value.strip().lower() in ("", "none", "no", "off") else parse_lora(value)
        return value

    @property
    def mode(self) -> str:
        """``all``, ``freeze``, ``only`` or ``lora``."""
        if self.lora is not None:
            return "lora"
        if self.only:
            return "only"
        return "freeze" if self.freeze else "all"

    def check_training(self) -> None:
        """Validate the training settings (no file system access)."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"learning rate must be positive, got {self.lr}: pass e.g. --lr 2e-5")
        if self.freeze and self.only:
            raise UserError("give either --freeze (train all but a unit set) or --only (train just one), not both")
        if self.lora is not None and (self.freeze or self.only):
            raise UserError("--lora trains adapters, not units: drop --freeze / --only, or drop --lora")
        lora = self.lora
        if lora is not None and (lora.r < 1 or not 0.0 <= lora.dropout < 1.0 or (lora.alpha or 1) <= 0):
            raise UserError("LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1, e.g. --lora r=8,alpha=16")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1 (or left out), got {value}")
        if self.warmup < 0 or self.weight_decay < 0:
            raise UserError("warmup and weight-decay must not be negative")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"max-grad-norm must be positive (or left out), got {self.max_grad_norm}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.max_length < 8:
            raise UserError(f"max-length must be at least 8, got {self.max_length}")
        for spec in (self.freeze, self.only):
            if spec:
                parse_unit_spec(spec)
        from ssah.interventions import check_gqa_mode

        check_gqa_mode(self.gqa)

    def check(self) -> None:
        """Cheap validation before any data or model is loaded: settings, then the output folders."""
        self.check_training()
        out = check_output_folder(self.out, self.overwrite)  # first: a path that can be a run folder at all
        partial = partial_dir(out)
        if self.resume:
            if not partial.is_dir():
                raise UserError(f"nothing to resume: {partial} does not exist; run without --resume to start")
        else:
            if partial.exists() and not self.overwrite:
                raise UserError(
                    f"an unfinished run is in {partial}: pass --resume to continue it or --overwrite to start over"
                )

    def settings(self) -> dict[str, Any]:
        """The settings that decide what is trained (compared when a run is resumed)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in _RESUME_FREE}


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """Where a training run lives until it completes: ``<out>.partial`` (a stable name, so ``--resume`` finds it).

    It is staged like every run folder (see :class:`ssah.experiments.train.TrainRunDir`): only the process that
    holds ``out``'s lock (:class:`ssah.runs.FolderLock`) creates, trains into or renames it."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {str(out)!r} names no new folder: pass a folder name, e.g. --out runs/my-run")
    return out.with_name(out.name + ".partial")


# -- unit specs -----------------------------------------------------------------------------------------------
def _split_spec(text: str) -> tuple[Path, str]:
    path, sep, cats = str(text).strip().rpartition(":")
    if not sep or not path or not cats.strip() or "/" in cats or "\\" in cats:
        raise UserError(f"bad unit spec {text!r}: write UNITS_FILE:CATEGORY[,CATEGORY@SHARE], e.g. u.safetensors:SCU")
    return Path(os.path.expanduser(path)), cats.strip()


def parse_unit_spec(text: str) -> tuple[Path, list[SelectionItem]]:
    """Parse ``PATH:SCU,CU@6%`` into the unit file and its selection items (:func:`ssah.measure.parse_selection`).

    ``CU@6%`` (or ``CU@0.06``) is 6% of ALL units, taken from CU by safety rank (the paper's "SCU + 6%",
    about 7.5% of units with SCU); ``CU@6%cu`` is 6% of the CU units.
    """
    path, cats = _split_spec(text)
    return path, parse_selection(cats)


def load_ranked_categories(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    fingerprint: str | None = None,
    model_name: str | None = None,
    allow_other_weights: bool = False,
    ranked: bool = True,
) -> tuple[dict[str, UnitSet], torch.Tensor | None]:
    """Every unit set of a unit file (checked against ``model``) and, with ``ranked``, the safety ranking
    (:func:`ssah.measure.safety_ranking`) from the scores `ssah units` keeps beside it in ``scores/``."""
    from types import SimpleNamespace

    from ssah.scoring import Scores

    path = Path(path)
    meta = read_unit_file_metadata(path)
    groups = get_adapter(model).groups()
    space = UnitSpace.from_groups(groups, meta["granularity"], fingerprint, model_name)  # type: ignore[arg-type]
    sets = load_unit_sets(path, space, allow_other_weights=allow_other_weights)
    if not ranked:
        return sets, None
    files = [path.parent / "scores" / f"{which}.safetensors" for which in ("safety", "utility")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or meta.get("normalization") is None or meta.get("ranking") is None:
        raise UnitFileError(
            f"a share like CU@6% ranks units by safety, but {', '.join(missing) or path} lacks the scores or the "
            "categorisation settings: keep the scores/ folder `ssah units` wrote beside the unit file"
        )
    neuron = UnitSpace.from_groups(groups, "neuron")
    s, u = (Scores.load(f, neuron) for f in files)
    cats = SimpleNamespace(space=next(iter(sets.values())).space, **{k: meta[k] for k in ("normalization", "ranking")})
    return sets, safety_ranking(cats, s, u)


def unit_spec_selection(
    spec: str,
    model: nn.Module,
    *,
    fingerprint: str | None = None,
    model_name: str | None = None,
    allow_other_weights: bool = False,
) -> Selection:
    """The selection a spec names on ``model`` (:func:`ssah.measure.select` over the file's sets): the union of
    its categories, each cut to its top share by safety rank. ``.units`` is the unit set, ``.summary()`` its
    counts and share of all units. The file must belong to the model (same layout; same weights unless
    ``allow_other_weights``; the weight check needs ``fingerprint``)."""
    path, cats = _split_spec(spec)
    ranked = any(item.share is not None for item in parse_selection(cats))  # bad input fails before any file
    sets, ranking = load_ranked_categories(
        path,
        model,
        fingerprint=fingerprint,
        model_name=model_name,
        allow_other_weights=allow_other_weights,
        ranked=ranked,
    )
    total = next(iter(sets.values())).space.total
    return select(sets, ranking if ranking is not None else torch.zeros(total), cats)


def resolve_unit_spec(
    spec: str,
    model: nn.Module,
    *,
    fingerprint: str | None = None,
    model_name: str | None = None,
    allow_other_weights: bool = False,
) -> UnitSet:
    """The unit set a spec names on ``model`` (``unit_spec_selection(...).units``)."""
    return unit_spec_selection(
        spec, model, fingerprint=fingerprint, model_name=model_name, allow_other_weights=allow_other_weights
    ).units


# -- data order -----------------------------------------------------------------------------------------------
class DataPlan:
    """Which examples every rank sees in every micro-batch of every optimizer step: a pure function of the seed.

    Each epoch shuffles the examples with ``torch.Generator().manual_seed(seed, epoch)``; a global micro-batch is
    ``batch_size * world`` consecutive examples (rank ``r`` takes its ``r``-th slice; with several ranks a short
    last batch wraps around to the epoch's start), and an optimizer step takes ``grad_accum`` micro-batches (the
    last step of an epoch may take fewer).
    """

    def __init__(
        self,
        encoded: Sequence[Encoded],
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        world: int = 1,
        epochs: int | None = None,
        max_steps: int | None = None,
    ) -> None:
        if not encoded:
            raise DataError("no training examples: pass a data set with at least one example")
        self.n = len(encoded)
        self.batch_size, self.grad_accum, self.seed, self.world = batch_size, grad_accum, seed, world
        self.response_tokens = [sum(e.response_mask) for e in encoded]
        self.lengths = [len(e.input_ids) for e in encoded]
        self.micro_per_epoch = math.ceil(self.n / (batch_size * world))
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / grad_accum)
        if epochs is None and max_steps is None:
            epochs = 1
        limits = [x for x in (max_steps, None if epochs is None else epochs * self.steps_per_epoch) if x is not None]
        self.total_steps = min(limits)
        self._cached: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The shuffled example order of an epoch."""
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cached[1]

    def step(self, step: int) -> list[list[list[int]]]:
        """Micro-batches of optimizer step ``step`` (0-based): ``[micro][rank] -> example indices``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self.order(epoch)
        width = self.batch_size * self.world
        out = []
        for m in range(k * self.grad_accum, min((k + 1) * self.grad_accum, self.micro_per_epoch)):
            chunk = perm[m * width : (m + 1) * width]
            if len(chunk) < width and self.world > 1:
                chunk = chunk + [perm[j % self.n] for j in range(width - len(chunk))]
            out.append([chunk[r * self.batch_size : (r + 1) * self.batch_size] for r in range(self.world)])
        return out

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps."""
        return step / self.steps_per_epoch


def lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warmup over ``warmup`` steps, then linear decay to 0, a half
    cosine to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


# -- loss -----------------------------------------------------------------------------------------------------
def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens (labels != -100) and their count.

    Only the labelled positions' logits are upcast to float32, which keeps memory low for large vocabularies.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = out.logits[:, :-1][keep].float()
    targets = labels[keep]
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


# -- results --------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run did. ``model`` is the trained, plain model (deltas and LoRA merged)."""

    model: nn.Module
    mode: str
    steps: int
    total_steps: int
    losses: list[float]
    seconds: float
    trainable: dict[str, int | float]
    tokens: int
    response_tokens: int
    examples: int
    skipped: int
    epochs: float
    resumed_from: int | None = None
    frozen_max_drift: float | None = None
    unit_slices: dict[str, Any] | None = None  # SliceReport of the frozen / trained units (shares, GQA sharing)
    log: list[dict[str, Any]] = field(default_factory=list)
    fsdp: bool = False

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the model and the log)."""
        return {
            "mode": self.mode,
            "steps": self.steps,
            "total_steps": self.total_steps,
            "epochs": round(self.epochs, 4),
            "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "trainable": self.trainable,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "examples": self.examples,
            "skipped_examples": self.skipped,
            "resumed_from": self.resumed_from,
            "frozen_max_drift": self.frozen_max_drift,
            "unit_slices": self.unit_slices,
            "fsdp": self.fsdp,
            "seconds": round(self.seconds, 3),
        }


# -- accelerate -----------------------------------------------------------------------------------------------
def _accelerator(mixed_precision: str, cpu: bool) -> Any:
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


# -- FSDP2 ----------------------------------------------------------------------------------------------------
def fsdp_requested(cfg: TrainConfig) -> bool:
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


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective: every rank must call it), else the tensor itself."""
    full_tensor = getattr(t, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else t).detach()


@torch.no_grad()
def _copy_full_into(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``t``, or into this rank's shard of ``t`` when it is a DTensor (no communication)."""
    from ssah.interventions import _like_param, _local

    full = full.to(device=_local(t.detach()).device, dtype=t.dtype)
    _local(t.detach()).copy_(_local(_like_param(full, t)))


class _Sharded:
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
        return {k: _full(p) for k, p in self.named.items()}

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


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks FSDP2 shards one by one (none when the architecture is unknown: the root only)."""
    try:
        adapter = get_adapter(model)
        return [adapter.block(i) for i in range(adapter.num_layers)]
    except Exception as exc:  # an unknown architecture still trains, sharded at the root only
        log.warning("FSDP2 shards the whole model as one unit: no decoder blocks found (%s)", exc)
        return []


def unit_set_digest(units: UnitSet | None) -> str | None:
    """A short hash of a unit set (its layout and members), to tell sets apart when resuming."""
    if units is None:
        return None
    h = hashlib.sha256(units.space.structure_hash.encode())
    h.update(units.mask.numpy().tobytes())
    return h.hexdigest()[:16]


# -- checkpoints ----------------------------------------------------------------------------------------------
def checkpoint_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints of a run folder (``checkpoints/step-N`` with a ``state.json``), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        name = p.name
        if p.is_dir() and name.startswith("step-") and name[5:].isdigit() and (p / "state.json").is_file():
            found.append((int(name[5:]), p))
    return [p for _, p in sorted(found)]


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
    *,
    keep_all: bool = False,
) -> Path:
    """Write ``checkpoints/step-N`` (trainable tensors and RNG as safetensors, optimizer and scheduler states
    with ``torch.save``, position and settings as JSON) via a temporary folder and a rename; older checkpoints
    are removed unless ``keep_all``. ``optimizer`` is an optimizer or its state dict (the gathered full state
    of an FSDP2 run)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().to("cpu").contiguous().clone() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    rng_tensors, rng_json = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    opt_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
    torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_json}), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if not keep_all:
        for old in checkpoint_dirs(run_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, trainable: Mapping[str, torch.Tensor], optimizer: Any, scheduler: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    """Load a checkpoint into the trainable tensors, optimizer and scheduler (and the RNGs); returns its state.

    ``optimizer`` is anything with ``load_state_dict``. Raises a ``UserError`` when the checkpoint was written by
    a run with other training settings, or when any of its files is damaged (truncated by a full disk, edited):
    every way such a file can fail to load (JSON, safetensors, torch's unpickler, a wrong structure) says the
    same thing to the user, so all are caught here.
    """
    try:
        return _load_checkpoint(path, trainable, optimizer, scheduler, settings)
    except UserError:
        raise
    except Exception as exc:  # any failure to read a checkpoint file: see the docstring
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(
            f"checkpoint {path} is damaged ({type(exc).__name__}{': ' + detail if detail else ''}): delete it to "
            "resume from an earlier checkpoint, or pass --overwrite to start over"
        ) from None


def _load_checkpoint(
    path: Path, trainable: Mapping[str, torch.Tensor], optimizer: Any, scheduler: Any, settings: dict[str, Any]
) -> dict[str, Any]:
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an ssah training checkpoint: pass --overwrite to start over")
    saved = state.get("settings", {})
    if not isinstance(saved, dict):
        raise ValueError("settings is not a mapping")
    for key in sorted(set(saved) | set(settings)):
        if saved.get(key) != settings.get(key):
            raise UserError(
                f"the run in {path.parent.parent} was started with {key}={saved.get(key)!r}, not "
                f"{settings.get(key)!r}: resume with the same settings, or pass --overwrite to start over"
            )
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step {step!r} is not a step count")
    tensors = load_file(str(path / "trainable.safetensors"))
    if set(tensors) != set(trainable):
        raise UserError(f"{path} holds other trainable tensors than this run: pass --overwrite to start over")
    for name, t in trainable.items():  # a DTensor's shape is the global one
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)}, not {tuple(t.shape)}")
    device = next(iter(trainable.values())).device if trainable else torch.device("cpu")
    opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    if not isinstance(opt, dict) or "optimizer" not in opt or "scheduler" not in opt:
        raise ValueError("optimizer.pt holds no optimizer and scheduler state")
    rng = load_file(str(path / "rng.safetensors"))
    if not isinstance(state.get("rng"), dict) or "torch" not in rng:
        raise ValueError("no RNG state")
    # everything read and checked: only now change the model
    for name, t in trainable.items():
        _copy_full_into(t, tensors[name])  # a DTensor (FSDP2) takes its shard
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_state(rng, state["rng"])
    return state


def _read_log(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if r.get("step", 0) <= upto]
    except (ValueError, AttributeError, TypeError) as exc:
        raise UserError(
            f"the step log {path} is damaged ({type(exc).__name__}): delete it (the log restarts) or pass "
            "--overwrite to start over"
        ) from None


# -- the loop -------------------------------------------------------------------------------------------------
@dataclass
class _Trainable:
    """The model as trained (maybe a peft wrapper), what the optimizer updates, and how to finish."""

    model: nn.Module
    named: dict[str, nn.Parameter]
    params: int
    total: int
    finish: Callable[[bool], nn.Module]
    frozen: Any = None
    report: Any = None  # SliceReport of a units-only run


def _prepare_trainable(model: nn.Module, cfg: TrainConfig, freeze: UnitSet | None, only: UnitSet | None) -> _Trainable:
    """Set what trains (before accelerate wraps the model; freeze hooks are added after)."""
    from ssah.interventions import train_only_units

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
        return _Trainable(model, named, deltas.trainable_parameters, total, finish_only, report=deltas.report)

    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = cfg.lora
        peft_cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.r,  # type: ignore[arg-type]
            lora_dropout=lora.dropout,
            target_modules=lora.targets or "all-linear",
            task_type="CAUSAL_LM",
        )
        try:
            peft_model = get_peft_model(model, peft_cfg)  # type: ignore[arg-type]
        except ValueError as exc:
            raise UserError(f"LoRA cannot be applied: {str(exc).splitlines()[0]}; check --lora targets=...") from None
        named = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}

        def finish_lora(ok: bool) -> nn.Module:
            base = peft_model.merge_and_unload() if ok else peft_model.unload()
            restore_flags()
            return base  # type: ignore[no-any-return]

        return _Trainable(peft_model, named, sum(p.numel() for p in named.values()), total, finish_lora)

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

    return _Trainable(model, named, sum(p.numel() for p in named.values()), total, finish_all)


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
    here: pass the resolved sets (:func:`resolve_unit_spec`). With ``run_dir``, the main process appends each
    optimizer step to ``train_log.jsonl`` there and writes checkpoints every ``cfg.checkpoint_every`` steps into
    ``checkpoints/``; with ``cfg.resume`` training continues from the newest of them. ``on_step`` is called
    with each step's log record (after the step's checkpoint, if any). The returned model is plain (saveable
    with ``save_pretrained``) and in the training mode it had before. With ``cfg.fsdp`` (or an FSDP2 accelerate
    launch) and several processes, an FSDP2-sharded twin of the model trains and every rank's ``model`` receives
    the gathered trained weights at the end (a run that fails midway leaves ``model`` as it was).
    """
    cfg.check_training()
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
    t0 = time.time()
    run_path = Path(run_dir) if run_dir is not None else None
    set_seed(cfg.seed)

    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    encoded_all = encode_set(tokenizer, data, system=cfg.system, max_length=cfg.max_length)
    encoded = [e for e in encoded_all if any(e.response_mask)]
    skipped = len(encoded_all) - len(encoded)
    if not encoded:
        raise DataError(
            f"no example of {data.name!r} keeps a response token within max-length {cfg.max_length}: "
            "raise --max-length or shorten the prompts"
        )

    device = next(model.parameters()).device
    accelerator = _accelerator("bf16" if cfg.bf16 else "no", cpu=device.type == "cpu")
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if skipped and main:
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
    settings = {
        **cfg.settings(),
        "fsdp": shard,
        "data_sha256": data.fingerprint(),
        "examples": len(encoded),
        "world_size": world,
        "freeze_units": unit_set_digest(freeze),
        "only_units": unit_set_digest(only),
    }
    blocks = _decoder_blocks(model) if shard else []

    was_training = model.training
    tr = _prepare_trainable(model, cfg, freeze, only)
    had_forward = "forward" in tr.model.__dict__
    ok = False
    frozen = None
    sharded: _Sharded | None = None
    try:
        named = tr.named
        if shard:
            sharded = _Sharded(tr.model, tr.named, blocks, accelerator.device)
            named = sharded.named
        optimizer = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, plan.total_steps, cfg.warmup))
        if sharded is not None:
            wrapped, opt_loader = sharded.module, sharded.optimizer_loader(optimizer)
        else:
            wrapped, optimizer = accelerator.prepare(tr.model, optimizer)
            opt_loader = optimizer
        if freeze is not None:
            from ssah.interventions import freeze_units

            # after accelerate wrapped or FSDP2 sharded the model: the hooks must sit on the parameters it trains
            frozen = freeze_units(
                wrapped if sharded is not None else accelerator.unwrap_model(wrapped), freeze, gqa=cfg.gqa
            )
        trainable_params = tr.params - (frozen.frozen_parameters if frozen is not None else 0)
        trainable = {
            "params": trainable_params,
            "total": tr.total,
            "share": trainable_params / tr.total if tr.total else 0.0,
        }

        start, resumed_from, history = 0, None, []
        ckpts = checkpoint_dirs(run_path) if run_path is not None and cfg.resume else []
        if ckpts:
            state = load_checkpoint(ckpts[-1], named, opt_loader, scheduler, settings)
            start = resumed_from = int(state["step"])
        if run_path is not None:
            history = _read_log(run_path / "train_log.jsonl", start)
            if main:
                run_path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_path / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        accelerator.wait_for_everyone()

        wrapped.train()
        params = list(named.values())
        records: list[dict[str, Any]] = list(history)
        log_file = open(run_path / "train_log.jsonl", "a", encoding="utf-8") if run_path and main else None  # noqa: SIM115
        bar = _progress(plan.total_steps, start, progress and main)
        try:
            for step in range(start, plan.total_steps):
                record = _train_step(
                    step,
                    plan,
                    encoded,
                    wrapped,
                    optimizer,
                    scheduler,
                    params,
                    accelerator,
                    frozen,
                    cfg,
                    pad_id,
                    rank,
                    fsdp=sharded is not None,
                )
                records.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if run_path is not None and cfg.checkpoint_every and record["step"] % cfg.checkpoint_every == 0:
                    tensors: Mapping[str, torch.Tensor] = named
                    opt_state: Any = optimizer
                    if sharded is not None:  # gathered by every rank, written by the main one
                        tensors, opt_state = sharded.gather(), sharded.optimizer_state(optimizer)
                    accelerator.wait_for_everyone()
                    if main:
                        save_checkpoint(
                            run_path,
                            record["step"],
                            tensors,
                            opt_state,
                            scheduler,
                            {
                                "format": CHECKPOINT_FORMAT,
                                "step": record["step"],
                                "epoch": record["step"] // plan.steps_per_epoch,
                                "step_in_epoch": record["step"] % plan.steps_per_epoch,
                                "settings": settings,
                            },
                            keep_all=cfg.keep_checkpoints,
                        )
                    accelerator.wait_for_everyone()
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
        accelerator.wait_for_everyone()
        drift = frozen.max_drift() if frozen is not None else None
        if sharded is not None:
            if drift is not None:  # each rank saw its own shards
                drift = float(accelerator.reduce(torch.tensor([drift], device=accelerator.device), "max").max())
            sharded.write_back()
        ok = True
    finally:
        if frozen is not None:
            frozen.remove()
        sharded = None  # drops the sharded twin (the caller's model holds the trained values)
        # accelerate's mixed precision patches the instance's forward (autocast): give back the class's own
        if not had_forward:
            tr.model.__dict__.pop("forward", None)
        tr.model.__dict__.pop("_original_forward", None)
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


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step")


def _train_step(
    step: int,
    plan: DataPlan,
    encoded: Sequence[Encoded],
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    params: Sequence[torch.Tensor],
    accelerator: Any,
    frozen: Any,
    cfg: TrainConfig,
    pad_id: int,
    rank: int,
    *,
    fsdp: bool = False,
) -> dict[str, Any]:
    """One optimizer step over its micro-batches; returns the step's log record.

    ``fsdp``: ``model`` is FSDP2-sharded (not prepared by accelerate): gradient sync, backward, mixed precision
    and clipping go through torch directly.
    """
    t0 = time.perf_counter()
    micro = plan.step(step)
    response_tokens = sum(plan.response_tokens[i] for mb in micro for idx in mb for i in idx)
    tokens = sum(plan.lengths[i] for mb in micro for idx in mb for i in idx)
    device = accelerator.device
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    for j, mb in enumerate(micro):
        batch = collate([encoded[i] for i in mb[rank]], pad_id, padding_side="right")
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
    grad_norm = None
    if cfg.max_grad_norm is not None:
        if fsdp:  # the norm of sharded gradients is a DTensor
            norm = _full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        grad_norm = float(norm) if norm is not None else None
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    if frozen is not None:
        frozen.restore()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
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
