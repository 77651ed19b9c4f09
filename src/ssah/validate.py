"""The one validation layer for what ssah reads back: YAML and JSON text, tensors and typed settings.

Files ssah wrote earlier (directions, learned-judge heads and their ``settings.json``, run folders) and files a user
hands in (``--config`` YAML, ``key=value`` overrides) are checked here when read, before anything uses them: a
damaged or hand-edited file is one :class:`~ssah.errors.UserError` line naming the file and the problem, never a
traceback deep inside torch, and never a run that quietly folds ``inf`` into a model's weights.

- :func:`load_yaml` refuses text whose aliases expand past :data:`YAML_NODE_LIMIT` nodes (the "billion laughs"
  alias bomb, 300 bytes that expand to megabytes) or refer to themselves, before any value is built or printed;
- :func:`read_json` reads a JSON file of bounded size, a one-line error for every way it can be unreadable;
- :func:`check_tensor` checks a tensor's dtype, shape and finiteness;
- :func:`check_fields` checks the types of a JSON object's fields (``true`` is not a number, ``"0.5"`` is not one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ssah.errors import UserError, one_line

__all__ = [
    "TEXT_LIMIT",
    "YAML_NODE_LIMIT",
    "YamlSyntaxError",
    "check_fields",
    "check_tensor",
    "load_yaml",
    "metadata_int",
    "quote",
    "read_json",
]

YAML_NODE_LIMIT = 100_000  # values a config may hold once its aliases are expanded (a real config has < 200)
TEXT_LIMIT = 1 << 20  # bytes of a config file, an override value or a settings / metadata JSON file
QUOTE_LIMIT = 120  # characters of a bad value an error quotes


class YamlSyntaxError(UserError):
    """Text that is not YAML (an override value falls back to the text itself)."""


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a bad value in a one-line error."""
    return one_line(repr(value), limit)


def _expanded_size(node: yaml.Node, what: str) -> int:
    """How many nodes ``node`` stands for with every alias expanded (aliases share the node they name, so the
    graph is small while the value it expands to can be huge); refuses past the limit or a node inside itself."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UserError(f"{what} holds a YAML alias that refers to itself: write the value out")
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        if total > YAML_NODE_LIMIT:
            raise UserError(
                f"{what} expands to more than {YAML_NODE_LIMIT:,} values (YAML aliases repeated inside each other): "
                "write the config out without such aliases"
            )
        sizes[key] = total
        return total

    return size(node)


def load_yaml(text: str, what: str) -> Any:
    """``text`` read as YAML (safe types only), refusing text over :data:`TEXT_LIMIT` and aliases that expand past
    :data:`YAML_NODE_LIMIT` values before any value is built; a one-line ``UserError`` naming ``what`` otherwise."""
    if len(text) > TEXT_LIMIT:
        raise UserError(f"{what} is {len(text):,} characters long (at most {TEXT_LIMIT:,}): shorten it")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, what)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        first = one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)
        raise YamlSyntaxError(f"{what} is not valid YAML ({first}); fix its syntax") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply to read: flatten it") from None
    finally:
        loader.dispose()


def read_json(path: str | Path, what: str, *, limit: int = TEXT_LIMIT) -> Any:
    """The JSON value of a file ssah wrote (a judge's settings, a run's manifest): a one-line ``UserError`` when
    it is missing, larger than ``limit`` bytes, not UTF-8, not JSON or nested too deeply."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"{what} {path} is {size:,} bytes (at most {limit:,}): it is not a file ssah wrote")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: it is damaged; write it again") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise UserError(f"{what} {path} is not valid JSON ({one_line(exc, 120)}): it is damaged") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a file ssah wrote") from None


def check_tensor(
    tensor: Any,
    what: str,
    *,
    shape: Sequence[int | None] | None = None,
    floating: bool = True,
    finite: bool = True,
) -> Any:
    """``tensor`` when it is a torch tensor of a floating dtype (if ``floating``), of ``shape`` (``None`` entries
    match any size) and, if ``finite``, without NaN or infinity; a one-line ``UserError`` naming ``what`` else."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{what} is not a tensor ({type(tensor).__name__})")
    if floating and not tensor.is_floating_point():
        raise UserError(f"{what} is {str(tensor.dtype).removeprefix('torch.')}, not a floating-point tensor")
    if shape is not None:
        ok = tensor.dim() == len(shape) and all(w is None or w == s for w, s in zip(shape, tensor.shape, strict=True))
        if not ok:
            want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
            raise UserError(f"{what} has shape {list(tensor.shape)}, expected {want}")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UserError(f"{what} holds {bad} NaN or infinite value(s)")
    return tensor


def metadata_int(meta: Mapping[str, str], key: str, what: str, *, minimum: int | None = 0) -> int:
    """An integer stored as text in a safetensors file's metadata (``"layer": "12"``)."""
    text = meta.get(key)
    if text is None or not str(text).strip():
        raise UserError(f"{what} has no {key!r} in its metadata")
    try:
        value = int(str(text).strip())
    except ValueError:
        raise UserError(f"{what} has {key}={quote(text)} in its metadata, not a whole number") from None
    if minimum is not None and value < minimum:
        raise UserError(f"{what} has {key}={value} in its metadata, below {minimum}")
    return value


def _kind_ok(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if float in kinds and isinstance(value, int | float):
        return math.isfinite(value)
    return isinstance(value, kinds)


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "text", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_fields(data: Any, kinds: Mapping[str, Any], what: str, *, required: Sequence[str] = ()) -> dict[str, Any]:
    """``data`` as a dict when it is a JSON object whose keys are among ``kinds`` (key -> type or tuple of types)
    and whose values have those types (``true`` is no number, a number must be finite); ``required`` keys must be
    present. A one-line ``UserError`` naming ``what`` and the first bad key otherwise."""
    if not isinstance(data, dict):
        raise UserError(f"{what} does not hold a JSON object (found {type(data).__name__})")
    unknown = sorted(str(k) for k in data if k not in kinds)
    if unknown:
        raise UserError(f"{what} has unknown key {quote(unknown[0])}: it was not written by this ssah version")
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{what} lacks {missing[0]!r}")
    for key, value in data.items():
        if not _kind_ok(value, kinds[key]):
            raise UserError(f"{what} has {key}={quote(value)}: expected {_kind_name(kinds[key])}")
    return dict(data)
