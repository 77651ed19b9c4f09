"""A learned judge's folder: ``settings.json`` (:class:`LearnedSettings`) and ``head.safetensors`` (weights, bias,
feature mean and scale), written by :func:`save_judge` and read back, validated, by :func:`read_judge`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from ssah.errors import ModelError, UserError

__all__ = [
    "DEFAULT_BASE",
    "HEAD_FILE",
    "POOLINGS",
    "SETTINGS_FILE",
    "LearnedSettings",
    "Pooling",
    "read_judge",
    "save_judge",
    "shipped_judge_dir",
]

DEFAULT_BASE = "smollm2-135m-instruct"
HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "settings.json"
Pooling = Literal["mean", "last"]
POOLINGS: tuple[Pooling, ...] = ("mean", "last")


@dataclass
class LearnedSettings:
    """Everything needed to rebuild a learned judge's features, besides the head weights."""

    base_model: str = DEFAULT_BASE
    base_fingerprint: str = ""
    layer: int = 15  # output of decoder block ``layer`` (0-based)
    pooling: Pooling = "mean"
    max_prompt_tokens: int = 64
    max_reply_tokens: int = 64
    threshold: float = 0.5  # refusal when P(refusal) >= threshold
    c: float = 1.0  # inverse regularisation strength of the logistic regression
    trained_on: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1

    def check(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown pooling {self.pooling!r}: use mean or last")
        if self.max_prompt_tokens < 1 or self.max_reply_tokens < 1:
            raise UserError("max_prompt_tokens and max_reply_tokens must be at least 1: pass positive limits")
        if not 0.0 < self.threshold < 1.0:
            raise UserError(f"threshold must be in (0, 1), got {self.threshold}: pass a probability")


def shipped_judge_dir() -> Path:
    """The folder of the learned judge shipped with ssah (package data)."""
    return Path(str(resources.files("ssah.judges") / "data" / "learned"))


def save_judge(folder: Path, head: dict[str, torch.Tensor], settings: LearnedSettings) -> None:
    """Write a judge folder's two files (no pickles: safetensors and JSON)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.items()}, str(folder / HEAD_FILE))
    (folder / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


def read_judge(folder: str | Path) -> tuple[dict[str, torch.Tensor], LearnedSettings]:
    """A judge folder's head and settings, or a one-line ModelError."""
    folder = Path(folder)
    head_path, settings_path = folder / HEAD_FILE, folder / SETTINGS_FILE
    if not head_path.is_file() or not settings_path.is_file():
        raise ModelError(
            f"{folder} is not a learned judge folder (needs {HEAD_FILE} and {SETTINGS_FILE}): "
            "train one with `ssah judge train LABELLED --out FOLDER`"
        )
    try:
        settings = _read_settings(settings_path)
        head = _read_head(head_path)
        settings.check()
    except UserError as exc:
        raise ModelError(f"learned judge {folder}: {exc}; train it again with `ssah judge train`") from None
    return head, settings


# the type of every settings.json key (ssah.validate.check_fields); a blank fingerprint would skip the base check
_SETTINGS_KINDS: dict[str, Any] = {
    "base_model": str,
    "base_fingerprint": str,
    "layer": int,
    "pooling": str,
    "max_prompt_tokens": int,
    "max_reply_tokens": int,
    "threshold": float,
    "c": float,
    "trained_on": dict,
    "format_version": int,
}


def _read_settings(path: Path) -> LearnedSettings:
    """``settings.json`` validated: known keys of the right types, a base model and its fingerprint, a layer."""
    from ssah.validate import check_fields, read_json

    raw = check_fields(
        read_json(path, SETTINGS_FILE),
        _SETTINGS_KINDS,
        SETTINGS_FILE,
        required=("base_model", "base_fingerprint", "layer"),
    )
    for key in ("base_model", "base_fingerprint"):
        if not raw[key].strip():
            raise UserError(f"{SETTINGS_FILE} has an empty {key} (the base-model check needs it)")
    if raw["layer"] < 0:
        raise UserError(f"{SETTINGS_FILE} has layer={raw['layer']}, below 0")
    if raw.get("format_version", 1) != 1:
        raise UserError(f"{SETTINGS_FILE} has format_version={raw['format_version']}, which this ssah cannot read")
    return LearnedSettings(**raw)


def _read_head(path: Path) -> dict[str, torch.Tensor]:
    """``head.safetensors`` validated: weight, mean and scale finite float vectors of one width, a finite bias of
    one value, scale positive."""
    from ssah.errors import one_line
    from ssah.validate import check_tensor

    try:
        head = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a bad file
        raise UserError(f"{HEAD_FILE} is not a safetensors file ({one_line(exc, 120)})") from None
    missing = {"weight", "bias", "mean", "scale"} - set(head)
    if missing:
        raise UserError(f"{HEAD_FILE} lacks {sorted(missing)}")
    width = int(head["weight"].shape[0]) if head["weight"].dim() == 1 else None
    check_tensor(head["weight"], f"{HEAD_FILE} weight", shape=[None])
    for key in ("mean", "scale"):
        check_tensor(head[key], f"{HEAD_FILE} {key}", shape=[width])
    check_tensor(head["bias"], f"{HEAD_FILE} bias", shape=[1] if head["bias"].dim() else [])
    if bool((head["scale"] <= 0).any()):
        raise UserError(f"{HEAD_FILE} scale has values <= 0")
    return {k: v.float() for k, v in head.items()}
