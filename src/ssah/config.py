"""Experiment configs: pydantic models, read from YAML, overridden by CLI options, written into each run."""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ssah.errors import UserError

C = TypeVar("C", bound="BaseConfig")
SEED_LIMIT = 2**32  # seeds must fit every RNG ssah seeds (NumPy's takes 0 .. 2**32-1)


class BaseConfig(BaseModel):
    """Base of every experiment config: unknown keys are errors, so typos don't pass silently."""

    # nan and inf are never a meaningful setting (``--weight-decay nan``, ``--temperature inf``)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @classmethod
    def build(cls: type[C], values: dict[str, Any]) -> C:
        """Validate values into a config, turning pydantic's report into a one-line error."""
        _check_types(cls, values)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise UserError(f"bad config value for {where!r}: {msg}; fix it in the config file or option") from None

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str], **overrides: Any) -> C:
        """Read a YAML config; ``overrides`` (e.g. from the command line) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found: check the --config path")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise UserError(
                f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 YAML"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot read config file {path} ({exc.strerror}): check its permissions") from None
        except yaml.YAMLError as exc:
            raise UserError(
                f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax"
            ) from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping of option: value")
        return cls.build({**data, **overrides})


class ModelRunConfig(BaseConfig):
    """Options every command that loads one model and writes one run folder shares."""

    model: str
    out: str = "runs/run"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    dtype: str = "auto"
    device: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    progress: bool = True
    # Big models (accelerate's dispatch; see ssah.models.load_model): a strategy (auto, balanced, balanced_low_0,
    # sequential), a JSON file or a mapping of module name to device; memory per device ("0=70GiB,cpu=200GiB");
    # where disk-offloaded weights go (default: a temporary folder in the cache).
    device_map: str | dict[str, int | str] | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    # Commands whose loading honours the three placement fields set this True; the others refuse them rather
    # than ignore them silently.
    placement: ClassVar[bool] = False

    @model_validator(mode="after")
    def _placement_supported(self) -> ModelRunConfig:
        used = [k for k in ("device_map", "max_memory", "offload_folder") if getattr(self, k) is not None]
        if used and not type(self).placement:
            raise ValueError(
                f"{', '.join(used)} only apply to units, eval, probe and ablate; drop them here (use --device)"
            )
        return self

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ssah.models.load_model` this config sets."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "allow_pickle": self.allow_pickle,
            "trust_remote_code": self.trust_remote_code,
            "device_map": self.device_map,
            "max_memory": self.max_memory,
            "offload_folder": self.offload_folder,
        }

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


def _numeric_kinds(annotation: Any) -> set[type]:
    """The plain types an annotation admits (``int | None`` -> {int, NoneType})."""
    if isinstance(annotation, type):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_numeric_kinds(a) for a in typing.get_args(annotation)))
    return set()


def _check_types(cls: type[BaseConfig], values: dict[str, Any]) -> None:
    """What pydantic's lax mode lets through: ``true`` where a number is expected (``seed: true`` would become 1),
    and seeds outside what every RNG takes (NumPy's is 32-bit)."""
    for name, field in cls.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        kinds = _numeric_kinds(field.annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise UserError(f"bad config value for {name!r}: expected a number, got {value}; write a number")
        seed = name == "seed" or name.endswith("_seed")
        if seed and isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < SEED_LIMIT:
            raise UserError(f"bad config value for {name!r}: {value} is not in 0 .. 2**32-1; pass such a seed")


def check_device(spec: str) -> str:
    """A device spec that exists here (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), or a one-line error."""
    import torch

    text = spec.strip().lower()
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {spec!r}: no CUDA GPU is available here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {spec!r}: only {count} CUDA GPU(s) here (cuda:0 .. cuda:{count - 1})")
        return text
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {spec!r}: MPS is not available here; use --device cpu (or auto)")
        return text
    raise ValueError(f"device type {dev.type!r} cannot run ssah: use auto, cpu, cuda, cuda:N or mps")
