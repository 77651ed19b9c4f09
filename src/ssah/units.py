"""Units of a model: ``UnitSpace`` addresses every unit, ``UnitSet`` is a named boolean mask over a space.

A unit is one input channel of an attention output projection or of an MLP down-projection (neuron
granularity), or one attention head (head granularity, MLP units stay neurons). Unit files are safetensors
with one boolean vector per category, layer and kind (``SCU.layers.3.mlp``) plus metadata that ties them to
the model they were computed on.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from ssah.errors import UnitFileError, UserError
from ssah.safefiles import save_safetensors
from ssah.unit_groups import ALL_KINDS, Kind, UnitGroup, group_key

Granularity = Literal["neuron", "head"]
GRANULARITIES: tuple[Granularity, ...] = ("neuron", "head")
UNIT_FILE_FORMAT = "ssah.units/1"
# The categories of ``ssah.categorize`` (not imported: categorize builds on this module). A file holding all four
# must hold a partition: every unit in exactly one.
PARTITION: tuple[str, ...] = ("SCU", "UCU", "CU", "RU")
UNSCORED = "unscored"  # the set of units left unscored (experts with too few routed tokens): in no category
REQUIRED_METADATA: tuple[str, ...] = ("granularity", "structure", "structure_hash", "model_fingerprint", "sets")


@dataclass(frozen=True)
class GroupShape:
    """Shape of one (layer, kind) group: how many units, and how many channels each unit spans."""

    layer: int
    kind: Kind
    size: int  # units in this group at the space's granularity
    channels_per_unit: int = 1
    expert: int | None = None  # routed experts (kind ``expert``): the expert's index in its layer

    @property
    def key(self) -> str:
        return group_key(self.layer, self.kind, self.expert)

    def row(self) -> list[int | str]:
        """The group in a file's ``structure``: ``[layer, kind, units, channels_per_unit(, expert)]``."""
        row: list[int | str] = [self.layer, self.kind, self.size, self.channels_per_unit]
        return row if self.expert is None else [*row, self.expert]

    @property
    def channels(self) -> int:
        return self.size * self.channels_per_unit


class UnitSpace:
    """Every unit of a model, addressable as (layer, kind, index) and as a flat index."""

    def __init__(
        self,
        shapes: Sequence[GroupShape],
        granularity: Granularity = "neuron",
        model_fingerprint: str | None = None,
        model_name: str | None = None,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise UserError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
        self.shapes: tuple[GroupShape, ...] = tuple(shapes)
        self.granularity: Granularity = granularity
        self.model_fingerprint = model_fingerprint
        self.model_name = model_name
        self._index = {(s.layer, s.kind, s.expert): i for i, s in enumerate(self.shapes)}
        offsets = [0]
        for s in self.shapes:
            offsets.append(offsets[-1] + s.size)
        self.offsets: tuple[int, ...] = tuple(offsets)

    @classmethod
    def from_groups(
        cls,
        groups: Sequence[UnitGroup],
        granularity: Granularity = "neuron",
        model_fingerprint: str | None = None,
        model_name: str | None = None,
    ) -> UnitSpace:
        """Build the space of an architecture adapter's groups at the given granularity."""
        shapes = []
        for g in groups:
            if granularity == "head" and g.kind == "attn":
                assert g.head_dim is not None
                shapes.append(GroupShape(g.layer, g.kind, g.size // g.head_dim, g.head_dim))
            else:
                shapes.append(GroupShape(g.layer, g.kind, g.size, 1, g.expert))
        return cls(shapes, granularity, model_fingerprint, model_name)

    # -- addressing -------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Number of units."""
        return self.offsets[-1]

    @property
    def num_layers(self) -> int:
        return 1 + max(s.layer for s in self.shapes) if self.shapes else 0

    def group_keys(self) -> list[str]:
        return [s.key for s in self.shapes]

    def shape(self, layer: int, kind: Kind, expert: int | None = None) -> GroupShape:
        try:
            return self.shapes[self._index[(layer, kind, expert)]]
        except KeyError:
            where = "" if expert is None else f" expert {expert}"
            raise UserError(
                f"no units at layer {layer} kind {kind!r}{where}: the model has {self.num_layers} layers"
            ) from None

    def group_slice(self, layer: int, kind: Kind, expert: int | None = None) -> slice:
        """The flat index range of one group."""
        i = self._index[(layer, kind, expert)]
        return slice(self.offsets[i], self.offsets[i + 1])

    def flat_index(self, layer: int, kind: Kind, index: int, expert: int | None = None) -> int:
        s = self.shape(layer, kind, expert)
        if not 0 <= index < s.size:
            raise UserError(f"unit index {index} out of range for {s.key} (size {s.size})")
        return self.group_slice(layer, kind, expert).start + index

    def expert_of(self, flat: int) -> int | None:
        """The routed expert a flat index belongs to (None outside routed experts)."""
        self.locate(flat)  # range check
        return self.shapes[self._shape_at(flat)].expert

    def _shape_at(self, flat: int) -> int:  # offsets strictly increase: every group has units
        return bisect.bisect_right(self.offsets, flat) - 1

    def locate(self, flat: int) -> tuple[int, Kind, int]:
        """The (layer, kind, index) address of a flat index (:meth:`expert_of` names a routed unit's expert)."""
        if not 0 <= flat < self.total:
            raise UserError(f"flat unit index {flat} out of range (0..{self.total - 1})")
        lo = self._shape_at(flat)
        s = self.shapes[lo]
        return s.layer, s.kind, flat - self.offsets[lo]

    # -- conversions between channels and units -----------------------------------------------------------
    def aggregate(self, key: str, channel_values: torch.Tensor) -> torch.Tensor:
        """Per-unit values from per-channel values (a head's value is the sum over its channels)."""
        s = self.shapes[self.group_keys().index(key)]
        if s.channels_per_unit == 1:
            return channel_values
        return channel_values.reshape(s.size, s.channels_per_unit).sum(dim=1)

    def expand(self, key: str, unit_values: torch.Tensor) -> torch.Tensor:
        """Per-channel values from per-unit values (a head's channels all take the head's value)."""
        s = self.shapes[self.group_keys().index(key)]
        if s.channels_per_unit == 1:
            return unit_values
        return unit_values.repeat_interleave(s.channels_per_unit)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat vector into one vector per group key."""
        if flat.shape[0] != self.total:
            raise UserError(f"vector of length {flat.shape[0]} does not fit a space of {self.total} units")
        return {s.key: flat[self.offsets[i] : self.offsets[i + 1]] for i, s in enumerate(self.shapes)}

    def join(self, per_group: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate one vector per group key into a flat vector (the inverse of ``split``)."""
        missing = [k for k in self.group_keys() if k not in per_group]
        if missing:
            raise UnitFileError(f"missing groups {missing[:3]}... for this model; was it made for another model?")
        parts = []
        for s in self.shapes:
            v = per_group[s.key]
            if v.shape != (s.size,):
                raise UnitFileError(
                    f"group {s.key} has {tuple(v.shape)} entries but this model has {s.size} units there; "
                    "the file was made for another model or granularity"
                )
            parts.append(v)
        return torch.cat(parts) if parts else torch.zeros(0)

    # -- identity -----------------------------------------------------------------------------------------
    def structure(self) -> list[list[int | str]]:
        return [s.row() for s in self.shapes]

    @property
    def structure_hash(self) -> str:
        """Hash of the unit layout alone (layers, kinds, sizes), independent of weights."""
        blob = json.dumps(self.structure(), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitSpace) and self.structure() == other.structure()

    def __hash__(self) -> int:
        return hash(self.structure_hash)

    def __repr__(self) -> str:
        return f"UnitSpace({self.total} units, {len(self.shapes)} groups, granularity={self.granularity})"


class UnitSet:
    """A named set of units of one ``UnitSpace``, stored as a flat boolean mask."""

    def __init__(self, space: UnitSpace, mask: torch.Tensor, name: str = "units") -> None:
        if mask.dtype != torch.bool or mask.shape != (space.total,):
            raise UserError(
                f"a unit mask must be a bool vector of length {space.total}, got {mask.dtype} {tuple(mask.shape)}"
            )
        self.space = space
        self.mask = mask
        self.name = name

    @classmethod
    def empty(cls, space: UnitSpace, name: str = "empty") -> UnitSet:
        return cls(space, torch.zeros(space.total, dtype=torch.bool), name)

    @classmethod
    def full(cls, space: UnitSpace, name: str = "all") -> UnitSet:
        return cls(space, torch.ones(space.total, dtype=torch.bool), name)

    @classmethod
    def from_indices(cls, space: UnitSpace, flat: Sequence[int] | torch.Tensor, name: str = "units") -> UnitSet:
        mask = torch.zeros(space.total, dtype=torch.bool)
        mask[torch.as_tensor(flat, dtype=torch.long)] = True
        return cls(space, mask, name)

    @classmethod
    def from_units(cls, space: UnitSpace, units: Sequence[tuple[int, Kind, int]], name: str = "units") -> UnitSet:
        return cls.from_indices(space, [space.flat_index(*u) for u in units], name)

    def random_like(self, seed: int = 0, within: UnitSet | None = None, name: str | None = None) -> UnitSet:
        """A random set of the same size (a control), drawn from ``within`` when given, reproducible by seed."""
        pool = (within.mask if within is not None else torch.ones_like(self.mask)).nonzero().flatten()
        n = len(self)
        if n > pool.numel():
            raise UserError(f"cannot draw {n} random units from a pool of {pool.numel()}")
        g = torch.Generator().manual_seed(seed)
        chosen = pool[torch.randperm(pool.numel(), generator=g)[:n]]
        return UnitSet.from_indices(self.space, chosen, name or f"random({self.name},seed={seed})")

    # -- set algebra --------------------------------------------------------------------------------------
    def _check(self, other: UnitSet) -> None:
        if self.space != other.space:
            raise UserError(f"unit sets {self.name!r} and {other.name!r} belong to different unit spaces")

    def __or__(self, other: UnitSet) -> UnitSet:
        self._check(other)
        return UnitSet(self.space, self.mask | other.mask, f"{self.name}|{other.name}")

    def __and__(self, other: UnitSet) -> UnitSet:
        self._check(other)
        return UnitSet(self.space, self.mask & other.mask, f"{self.name}&{other.name}")

    def __sub__(self, other: UnitSet) -> UnitSet:
        self._check(other)
        return UnitSet(self.space, self.mask & ~other.mask, f"{self.name}-{other.name}")

    def __xor__(self, other: UnitSet) -> UnitSet:
        self._check(other)
        return UnitSet(self.space, self.mask ^ other.mask, f"{self.name}^{other.name}")

    def __invert__(self) -> UnitSet:
        return UnitSet(self.space, ~self.mask, f"~{self.name}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnitSet) and self.space == other.space and bool(torch.equal(self.mask, other.mask))

    def __hash__(self) -> int:
        return hash((self.space.structure_hash, int(self.mask.sum())))

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __contains__(self, unit: tuple[int, Kind, int]) -> bool:
        return bool(self.mask[self.space.flat_index(*unit)])

    def __iter__(self) -> Iterator[tuple[int, Kind, int]]:
        for i in self.indices().tolist():
            yield self.space.locate(i)

    @property
    def fraction(self) -> float:
        return len(self) / self.space.total if self.space.total else 0.0

    def indices(self) -> torch.Tensor:
        """Flat indices of the members, ascending."""
        return self.mask.nonzero().flatten()

    def jaccard(self, other: UnitSet) -> float:
        """Overlap |A & B| / |A | B| (1.0 for two empty sets)."""
        self._check(other)
        union = int((self.mask | other.mask).sum())
        return int((self.mask & other.mask).sum()) / union if union else 1.0

    # -- per group ----------------------------------------------------------------------------------------
    def group_mask(self, layer: int, kind: Kind) -> torch.Tensor:
        """The members of one (layer, kind) group, at unit granularity."""
        return self.mask[self.space.group_slice(layer, kind)]

    def channel_masks(self) -> dict[str, torch.Tensor]:
        """Per group key, a bool mask over the group's channels (heads expanded to their channels)."""
        return {k: self.space.expand(k, v) for k, v in self.space.split(self.mask).items()}

    def counts_by_group(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.space.split(self.mask).items()}

    def counts_by_layer(self) -> list[dict[str, int]]:
        """For each layer, the number of members per kind (attn and mlp always; routed experts summed)."""
        out: list[dict[str, int]] = [{"attn": 0, "mlp": 0} for _ in range(self.space.num_layers)]
        for s, n in zip(self.space.shapes, self.counts_by_group().values(), strict=True):
            out[s.layer][s.kind] = out[s.layer].get(s.kind, 0) + n
        return out

    def __repr__(self) -> str:
        return f"UnitSet({self.name!r}, {len(self)}/{self.space.total} units)"


# -- files ------------------------------------------------------------------------------------------------
def save_unit_sets(
    path: str | os.PathLike[str], sets: Mapping[str, UnitSet], metadata: Mapping[str, str] | None = None
) -> None:
    """Write named unit sets of one space as safetensors (keys ``NAME.layers.L.KIND``), atomically."""
    if not sets:
        raise UserError("no unit sets to save")
    space = next(iter(sets.values())).space
    if any(s.space != space for s in sets.values()):
        raise UserError("unit sets saved to one file must belong to one unit space")
    if not space.model_fingerprint:
        raise UserError(
            "unit sets saved to a file must name their model: build the space with the model's fingerprint "
            "(UnitSpace.from_groups(groups, granularity, fingerprint))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, s in sets.items():
        if "." in name:
            raise UserError(f"unit set name {name!r} must not contain '.'")
        for key, mask in space.split(s.mask).items():
            tensors[f"{name}.{key}"] = mask.clone().contiguous()
    meta = {
        "format": UNIT_FILE_FORMAT,
        "granularity": space.granularity,
        "structure": json.dumps(space.structure(), separators=(",", ":")),
        "structure_hash": space.structure_hash,
        "model_fingerprint": space.model_fingerprint or "",
        "model_name": space.model_name or "",
        "sets": ",".join(sets),
    }
    meta.update(dict(metadata or {}))
    # canonical bytes: the same sets and metadata give the same file (sha256) in every run
    save_safetensors(tensors, path, meta)


def read_unit_file_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a unit file, with a clear error when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise UnitFileError(f"unit file {path} not found: pass the units.safetensors written by `ssah units`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several exception types for a bad header
        raise UnitFileError(
            f"{path} is not a safetensors unit file ({exc}); pass a file written by `ssah units`"
        ) from None
    if meta.get("format") != UNIT_FILE_FORMAT:
        raise UnitFileError(
            f"{path} is not an ssah unit file (format {meta.get('format')!r}); pass a file written by `ssah units`"
        )
    _check_metadata(path, meta)
    return meta


def _damaged(path: Path, what: str) -> UnitFileError:
    return UnitFileError(f"unit file {path} is damaged ({what}); compute it again with `ssah units`")


def _check_metadata(path: Path, meta: Mapping[str, str]) -> None:
    """The metadata every reader relies on: present, well-formed and consistent with itself."""
    missing = [k for k in REQUIRED_METADATA if not meta.get(k)]
    if missing:
        raise _damaged(path, f"metadata {', '.join(repr(k) for k in missing)} missing or empty")
    if meta["granularity"] not in GRANULARITIES:
        raise _damaged(path, f"unknown granularity {meta['granularity']!r}")
    shapes = _parse_structure(path, meta["structure"])
    if UnitSpace(shapes).structure_hash != meta["structure_hash"]:
        raise _damaged(path, "its structure and structure_hash disagree")
    names = meta["sets"].split(",")
    if any(not n or "." in n for n in names) or len(set(names)) != len(names):
        raise _damaged(path, f"bad set names {meta['sets']!r}")


def _parse_structure(path: Path, text: str) -> list[GroupShape]:
    """The unit layout stored in a file: a JSON list of ``[layer, kind, units, channels_per_unit]``."""
    try:
        rows = json.loads(text)
    except ValueError:
        raise _damaged(path, "its structure is not JSON") from None
    shapes: list[GroupShape] = []
    if not isinstance(rows, list) or not rows:
        raise _damaged(path, "its structure is not a list of groups")
    for row in rows:
        routed = isinstance(row, list) and len(row) == 5 and row[1] == "expert"
        ok = (
            isinstance(row, list)
            and len(row) == (5 if routed else 4)
            and all(isinstance(v, int) and not isinstance(v, bool) for i, v in enumerate(row) if i != 1)
            and row[1] in (ALL_KINDS if routed or len(row) == 4 else ())
            and (row[1] != "expert" or routed)
            and row[0] >= 0
            and row[2] >= 1
            and row[3] >= 1
            and (not routed or row[4] >= 0)
        )
        if not ok:
            raise _damaged(path, f"structure entry {row!r} is not [layer, kind, units, channels(, expert)]")
        shapes.append(GroupShape(row[0], row[1], row[2], row[3], row[4] if routed else None))
    return shapes


def load_unit_sets(
    path: str | os.PathLike[str],
    space: UnitSpace,
    *,
    names: Sequence[str] | None = None,
    allow_other_weights: bool = False,
) -> dict[str, UnitSet]:
    """Read unit sets and check they belong to the model of ``space``.

    A different unit layout is always an error. Different weights (same architecture) is an error unless
    ``allow_other_weights`` (e.g. applying units found on a model to its fine-tuned copy).
    """
    path = Path(path)
    meta = read_unit_file_metadata(path)
    if meta["granularity"] != space.granularity:
        space = _space_for_granularity(space, meta)
    if meta["structure_hash"] != space.structure_hash:
        raise UnitFileError(
            f"{path} was computed on a model with another unit layout ({meta.get('model_name') or 'unknown model'}); "
            "compute the units on this model with `ssah units`"
        )
    fp = meta["model_fingerprint"]  # present and non-empty (checked on read): a file always names its model
    if space.model_fingerprint and fp != space.model_fingerprint and not allow_other_weights:
        raise UnitFileError(
            f"{path} was computed on another model ({meta.get('model_name') or '?'}, fingerprint {fp[:12]}), "
            f"not this one (fingerprint {space.model_fingerprint[:12]}); pass --allow-other-weights to apply it anyway"
        )
    available = [n for n in meta.get("sets", "").split(",") if n]
    wanted = list(names) if names is not None else available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise UnitFileError(f"unit set {unknown[0]!r} is not in {path}: it holds {', '.join(available)}")
    masks = _read_masks(path, space, available)
    if set(PARTITION) <= set(masks):
        counts = torch.stack([masks[c] for c in PARTITION]).sum(0)
        if UNSCORED in masks:  # units of experts with too few routed tokens are in no category
            counts = counts + masks[UNSCORED].to(counts.dtype)
        if bool((counts != 1).any()):
            raise _damaged(path, f"{int((counts != 1).sum())} units are in none or several of {'/'.join(PARTITION)}")
    return {name: UnitSet(space, masks[name], name) for name in wanted}


def _read_masks(path: Path, space: UnitSpace, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every set's flat mask: one bool vector of the group's size per (set, group), and nothing else."""
    expected = {f"{n}.{sh.key}": sh.size for n in names for sh in space.shapes}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(expected):
                extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
                raise _damaged(path, f"tensors {(missing or extra)[:3]} {'missing' if missing else 'unexpected'}")
            tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    except UnitFileError:
        raise
    except Exception as exc:  # safetensors raises several types for a bad body
        raise _damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for key, t in tensors.items():
        if t.dtype != torch.bool or tuple(t.shape) != (expected[key],):
            raise _damaged(path, f"{key} is {t.dtype} {tuple(t.shape)}, not a bool mask of {expected[key]} units")
    return {n: space.join({sh.key: tensors[f"{n}.{sh.key}"] for sh in space.shapes}) for n in names}


def _space_for_granularity(space: UnitSpace, meta: Mapping[str, str]) -> UnitSpace:
    """Rebuild ``space`` at the file's granularity from the structure stored in the file."""
    shapes = _parse_structure(Path("unit file"), meta["structure"])
    if [(s.layer, s.kind, s.channels) for s in shapes] != [(s.layer, s.kind, s.channels) for s in space.shapes]:
        raise UnitFileError(
            "the unit file was computed on a model with another unit layout; compute the units on this model"
        )
    return UnitSpace(shapes, meta["granularity"], space.model_fingerprint, space.model_name)  # type: ignore[arg-type]
