"""Checkpoints and exact resume: trainable tensors, optimizer, scheduler and RNG states of a step.

The data order is a function of the seed and the epoch (:class:`ssah.training.DataPlan`), so a checkpoint only
needs the step to know where the data stands; a run resumed from one reaches the same weights, bit for bit, as
one that was never interrupted.

Hand-written rather than accelerate's ``save_state`` / ``load_state`` (accelerate 1.15), which would not give the
same exact resume: RNG states that fail to load are only logged ("Could not load random states") and the run goes
on, no longer exact, where ours refuses a damaged checkpoint; the states are a torch pickle with NumPy globals
allowed (ssah writes safetensors and JSON, plus optimizer and scheduler state dicts read with
``weights_only=True``); it saves the whole model where a units-only or LoRA run trains a few tensors; and the
FSDP2 twin is sharded by ``fully_shard`` directly, not prepared by accelerate, so its state is not accelerate's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ssah.errors import UserError
from ssah.training.distributed import copy_full_into

CHECKPOINT_FORMAT = "ssah.train-checkpoint/1"


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """Where a training run lives until it completes: ``<out>.partial`` (a stable name, so ``--resume`` finds it).

    It is staged like every run folder (see :class:`ssah.recipes.train.run.TrainRunDir`): only the process that
    holds ``out``'s lock (:class:`ssah.runs.FolderLock`) creates, trains into or renames it."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {str(out)!r} names no new folder: pass a folder name, e.g. --out runs/my-run")
    return out.with_name(out.name + ".partial")


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
        copy_full_into(t, tensors[name])  # a DTensor (FSDP2) takes its shard
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_state(rng, state["rng"])
    return state


def read_step_log(path: Path, upto: int) -> list[dict[str, Any]]:
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
