"""Experiment configs: pydantic models, read from YAML, overridden by CLI options, written into each run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ssah.errors import UserError

C = TypeVar("C", bound="BaseConfig")


class BaseConfig(BaseModel):
    """Base of every experiment config: unknown keys are errors, so typos don't pass silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def build(cls: type[C], values: dict[str, Any]) -> C:
        """Validate values into a config, turning pydantic's report into a one-line error."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            raise UserError(
                f"bad config value for {where!r}: {err['msg']}; fix it in the config file or option"
            ) from None

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike[str], **overrides: Any) -> C:
        """Read a YAML config; ``overrides`` (e.g. from the command line) win over the file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found: check the --config path")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
    seed: int = 0
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
