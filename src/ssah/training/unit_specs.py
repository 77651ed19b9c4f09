"""Unit specs (``UNITS_FILE:SCU,CU@6%``): parse them and resolve them to the unit set a run freezes or trains."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ssah.arch import get_adapter
from ssah.errors import UnitFileError, UserError
from ssah.measure import Selection, SelectionItem, parse_selection, safety_ranking, select
from ssah.scoring import Scores
from ssah.units import UnitSet, UnitSpace, load_unit_sets, read_unit_file_metadata


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


def unit_set_digest(units: UnitSet | None) -> str | None:
    """A short hash of a unit set (its layout and members), to tell sets apart when resuming."""
    if units is None:
        return None
    h = hashlib.sha256(units.space.structure_hash.encode())
    h.update(units.mask.numpy().tobytes())
    return h.hexdigest()[:16]
