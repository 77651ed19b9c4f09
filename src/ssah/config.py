"""Experiment configs: one pydantic class per recipe is the single source of every option.

Each field carries its type, constraint, default and help (``Field(description=...)``); the CLI is generated from
the class (:mod:`ssah.cliutil`), shipped YAML configs (``<recipe package>/configs/<name>.yaml``) are read into it,
and Python builds it directly. :meth:`BaseConfig.resolve` is the one place values are combined, in this order
(later wins): the class defaults < a shipped or YAML ``config`` < command-line flags < ``key=value`` overrides
(dotted keys reach nested fields: ``lora.r=16``). The resolved config is what a run folder records.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from ssah.errors import UserError
from ssah.validate import TEXT_LIMIT, YamlSyntaxError, load_yaml, quote

C = TypeVar("C", bound="BaseConfig")
SEED_LIMIT = 2**32  # seeds must fit every RNG ssah seeds (NumPy's takes 0 .. 2**32-1)
CONFIG_SUFFIXES = (".yaml", ".yml")


class BaseConfig(BaseModel):
    """Base of every experiment config: unknown keys are errors, so typos don't pass silently."""

    # nan and inf are never a meaningful setting (``--weight-decay nan``, ``--temperature inf``)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # fields given as positional command-line arguments rather than ``--flags`` (see ssah.cliutil)
    cli_arguments: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def cli_skip(cls) -> frozenset[str]:
        """Fields the generated command leaves out (they stay settable in YAML and as key=value)."""
        return frozenset()

    @model_validator(mode="before")
    @classmethod
    def _over_nested_defaults(cls, values: Any) -> Any:
        """A partial mapping for a nested config is merged over that field's default, so ``eval.limit=64`` keeps
        the recipe's other evaluation defaults (its default instance) rather than the section class's."""
        if not isinstance(values, Mapping):
            return values
        out = dict(values)
        for name, field in cls.model_fields.items():
            if isinstance(out.get(name), Mapping) and nested_config(field.annotation) is not None:
                default = field.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    out[name] = merge(default.model_dump(exclude_unset=True), out[name])
        return out

    @classmethod
    def build(cls: type[C], values: dict[str, Any]) -> C:
        """Validate values into a config, turning pydantic's report into a one-line error naming the (dotted) key."""
        _check_types(cls, values)
        try:
            return cls.model_validate(values)
        except (TypeError, AttributeError) as exc:  # a validator that met a value of a type it did not expect
            raise UserError(f"bad config value ({type(exc).__name__}: {exc}); check the types in the config") from None
        except ValidationError as exc:
            errors = exc.errors()
            err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
            where = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "config"  # no list index
            if err["type"] == "extra_forbidden":
                hint = _did_you_mean(cls, [str(p) for p in err["loc"]])
                raise UserError(f"unknown config key {where!r}: {hint}see the command's --help for the keys") from None
            if err["type"] == "literal_error":
                expected = str(err.get("ctx", {}).get("expected", "")).replace("'", "")
                what = where.replace("_", " ")
                raise UserError(f"unknown {what} {quote(err['input'])}: use one of {expected}") from None
            if err["type"] == "missing":
                raise UserError(f"missing {where!r}: give it on the command line or in the --config file") from None
            msg = str(err["msg"]).removeprefix("Value error, ")
            raise UserError(f"bad config value for {where!r}: {msg}; fix it in the config file or option") from None

    def check(self) -> None:
        """Every check that can fail before a run starts work (its output folder, values that depend on each
        other); the recipe protocol (:func:`ssah.protocol.execute`) calls it first. None by default."""

    @classmethod
    def resolve(
        cls: type[C],
        recipe: str | None = None,
        config: str | os.PathLike[str] | None = None,
        flags: Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> C:
        """The one way a config is put together: class defaults < ``config`` (a shipped config name of
        ``recipe``, e.g. ``quick``, or a YAML file) < ``flags`` < ``key=value`` ``overrides``."""
        values: dict[str, Any] = {}
        if config is not None:
            values = load_config(recipe, config)
        values = merge(merge(values, dict(flags or {})), parse_overrides(overrides))
        return cls.build(values)


class Section(BaseConfig):
    """Options nested under one key of a recipe's config (``eval.limit``): YAML writes ``eval: {limit: 16}``, an
    override ``eval.limit=16``, the CLI ``--eval-limit 16`` (in a help panel named ``title``). A recipe whose
    defaults differ gives a default instance (``eval: EvalSection = EvalSection(limit=32)``); values set in a
    config, a flag or an override are merged over it key by key."""

    title: ClassVar[str] = ""


def nested_config(annotation: Any) -> type[BaseConfig] | None:
    """The config class a field holds (``LoraSettings | None`` -> LoraSettings), or None for a plain value."""
    if typing.get_origin(annotation) is Annotated:
        return nested_config(typing.get_args(annotation)[0])
    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseConfig) else None
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [c for a in typing.get_args(annotation) if (c := nested_config(a)) is not None]
        return found[0] if len(found) == 1 else None
    return None


def sections(cls: type[BaseConfig]) -> dict[str, tuple[FieldInfo, type[Section]]]:
    """The :class:`Section` fields of a config: name -> (field, section class)."""
    out = {}
    for name, field in cls.model_fields.items():
        sub = nested_config(field.annotation)
        if sub is not None and issubclass(sub, Section):
            out[name] = (field, sub)
    return out


def _did_you_mean(cls: type[BaseConfig], loc: list[str]) -> str:
    """A hint for an unknown (dotted) key: the closest key where it was written, or the section that holds it
    (``limit`` -> ``eval.limit``)."""
    owner: type[BaseConfig] | None = cls
    for part in loc[:-1]:
        owner = nested_config(owner.model_fields[part].annotation) if owner and part in owner.model_fields else None
    if owner is None:
        return ""
    prefix = "".join(f"{p}." for p in loc[:-1])
    names = [prefix + n for n in owner.model_fields]
    if not loc[:-1]:
        names += [f"{s}.{n}" for s, (_, sub) in sections(owner).items() for n in sub.model_fields]
    inside = [n for n in names if n.rsplit(".", 1)[-1] == loc[-1]]
    close = inside or difflib.get_close_matches(prefix + loc[-1], names, n=1)
    return f"did you mean {' or '.join(map(repr, close))}? " if close else ""


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; nested mappings are merged key by key (so ``lora.r=16`` keeps the file's alpha)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["seeds=7", "lora.r=16", "dose=[0.01, 0.02]"]`` -> nested values; each value is read as YAML
    (``7`` a number, ``[a, b]`` a list, ``null`` None, anything else a string; ``key=`` the empty string)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value: write e.g. seeds=7 (dotted keys for nested fields)")
        try:
            value = load_yaml(text, f"override {key}") if text.strip() else ""
        except YamlSyntaxError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} sets a key inside {part!r}, which another override sets whole")
        node[leaf] = value
    return out


def load_config(recipe: str | None, spec: str | os.PathLike[str]) -> dict[str, Any]:
    """The values of ``--config SPEC``: a YAML file when SPEC is one (or looks like a path), else the shipped
    config of that name for ``recipe`` (``quick``, or ``ablate/quick``)."""
    text = str(spec)
    if Path(text).is_file() or text.endswith(CONFIG_SUFFIXES) or recipe is None or isinstance(spec, Path):
        return read_yaml(text)
    name = text.split("/", 1)[1] if "/" in text and text.split("/", 1)[0] == recipe.replace(" ", "-") else text
    if "/" in name or os.sep in name:
        raise UserError(f"config file {text} not found: check the --config path")
    from ssah.registry import shipped_config_text  # the recipes' configs folders

    what = f"shipped config {recipe}/{name}"
    return _mapping(load_yaml(shipped_config_text(recipe, name), what), what)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file as a mapping; a one-line ``UserError`` for every way it can be unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: check the --config path")
    try:
        if path.stat().st_size > TEXT_LIMIT:
            raise UserError(f"config file {path} is larger than {TEXT_LIMIT:,} bytes: it is not an ssah config")
        data = load_yaml(path.read_text(encoding="utf-8"), f"config file {path}")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 YAML"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path} ({exc.strerror}): check its permissions") from None
    return _mapping(data, f"config file {path}")


def _mapping(data: Any, what: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} must hold a mapping of option: value")
    return data


Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], Field(description="Weights' dtype.")]
Out = Annotated[str, Field(description="Run folder to write.")]


class ModelRunConfig(BaseConfig):
    """Options every command that loads one model and writes one run folder shares."""

    cli_arguments: ClassVar[tuple[str, ...]] = ("model",)
    model: str = Field(description="Registry name, model folder, .gguf file or hub id.")
    out: Out = "runs/run"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Random seed.")
    dtype: Dtype = "auto"
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    allow_pickle: bool = Field(False, description="Allow pickled .bin weights (can run code).")
    trust_remote_code: bool = Field(False, description="Allow the model's own Python code.")
    overwrite: bool = Field(False, description="Replace an existing run folder.")
    progress: bool = Field(True, description="Show progress bars.")
    bf16: bool = Field(
        False,
        description="Mixed precision: bf16 autocast for text generation and fine-tuning (weights and optimizer "
        "state stay fp32; unit scores, KL, perplexity and probe statistics are computed in fp32).",
    )
    # Big models (accelerate's dispatch; see ssah.models.load_model)
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="Spread a big model over devices: auto | balanced | balanced_low_0 | sequential | a JSON file "
        "of module -> device (0, 1, cpu, disk). Overrides --device.",
    )
    max_memory: str | None = Field(None, description="Memory per device for --device-map, e.g. 0=70GiB,cpu=200GiB.")
    offload_folder: str | None = Field(
        None, description="Folder for weights offloaded to disk (default: a temporary folder in the cache)."
    )
    # Commands whose loading honours the three placement fields set this True; the others refuse them rather
    # than ignore them silently.
    placement: ClassVar[bool] = False

    @classmethod
    def cli_skip(cls) -> frozenset[str]:
        """The placement options are shown only by the commands that honour them."""
        return frozenset() if cls.placement else frozenset({"device_map", "max_memory", "offload_folder"})

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
    def _device(cls, value: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("recorded"):  # a run folder's config read back (ssah.load_run): made elsewhere
            return value
        return check_device(value)


def _numeric_kinds(annotation: Any) -> set[type]:
    """The plain types an annotation admits (``int | None`` -> {int, NoneType})."""
    if typing.get_origin(annotation) is Annotated:
        return _numeric_kinds(typing.get_args(annotation)[0])
    if isinstance(annotation, type):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_numeric_kinds(a) for a in typing.get_args(annotation)))
    return set()


def _check_types(cls: type[BaseConfig], values: Mapping[str, Any], prefix: str = "") -> None:
    """What pydantic's lax mode lets through: ``true`` where a number is expected (``seed: true`` would become 1),
    and seeds outside what every RNG takes (NumPy's is 32-bit); nested configs are checked under their dotted key."""
    for key, field in cls.model_fields.items():
        if key not in values:
            continue
        value, name = values[key], prefix + key
        sub = nested_config(field.annotation)
        if sub is not None and isinstance(value, Mapping):
            _check_types(sub, value, f"{name}.")
            continue
        _check_size(value, name)
        kinds = _numeric_kinds(field.annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise UserError(f"bad config value for {name!r}: expected a number, got {value}; write a number")
        seed = key == "seed" or key.endswith("_seed")
        if seed and isinstance(value, int) and not isinstance(value, bool) and not 0 <= value < SEED_LIMIT:
            raise UserError(f"bad config value for {name!r}: {value} is not in 0 .. 2**32-1; pass such a seed")


ITEM_LIMIT = 10_000  # items of a list or mapping in a config value (dose shares, seeds, columns ...)
INT_LIMIT = 2**53  # whole numbers beyond this are never a count, size or seed (and overflow torch's int64)


def _check_size(value: Any, name: str, depth: int = 0) -> None:
    """Bounded values: text of at most TEXT_LIMIT characters, lists and mappings of at most ITEM_LIMIT items,
    nested at most 8 deep, whole numbers below 2**53, so that nothing huge reaches a validator or an error line."""
    if depth > 8:
        raise UserError(f"bad config value for {name!r}: nested more than 8 deep; write a flat value")
    if isinstance(value, str) and len(value) > TEXT_LIMIT:
        raise UserError(f"bad config value for {name!r}: {len(value):,} characters (at most {TEXT_LIMIT:,})")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
        raise UserError(f"bad config value for {name!r}: {quote(value, 40)} is too large; pass a smaller number")
    if isinstance(value, list | tuple | dict):
        if len(value) > ITEM_LIMIT:
            raise UserError(f"bad config value for {name!r}: {len(value):,} items (at most {ITEM_LIMIT:,})")
        items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else list(value)
        for item in items:
            _check_size(item, name, depth + 1)


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
