"""``load_prompts``: the one entry point for every source of a prompt set.

A spec names a built-in file, a benchmark preset (:mod:`ssah.data.presets`), a Hugging Face dataset, a set built
in code (:mod:`ssah.data.training`) or a data file (:mod:`ssah.data.prompt_sets`); this module sits above all of
them and none of them imports it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ssah.data.presets import PRESETS, load_hf, load_preset
from ssah.data.prompt_sets import BUILTIN_PREFIX, PromptSet, check_mapping, load_file
from ssah.data.training import generated_set
from ssah.errors import DataError

__all__ = ["PromptSet", "load_prompts"]

# Built-in sets built in code rather than read from a file (ssah.data.training.generated_set).
_GENERATED_SETS = ("attack", "alignment")


def load_prompts(
    spec: str | os.PathLike[str],
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load a prompt set from ``builtin:<name>`` (or a bare built-in name), a benchmark preset (``advbench``,
    ``preset:xstest``, ... read in place from the public data, see ``ssah.data.presets.PRESETS``), a Hugging Face
    dataset (``hf:<name or path>[:split]``), a .csv/.json/.jsonl file, or a folder holding exactly one such file.

    ``columns`` maps ``prompt``/``response``/``category`` to column names and overrides detection; ``limit`` keeps
    the first rows; ``name`` overrides the set's name (by default the built-in or preset name, or the file stem).
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: pass a positive limit or none")
    mapping = check_mapping(columns)
    text = os.fspath(spec)
    if not text.strip():
        raise DataError("empty data spec: pass builtin:NAME, a preset name, hf:NAME or a .csv/.json/.jsonl file")
    if text.startswith("hf:"):
        return load_hf(text[len("hf:") :], columns=mapping, limit=limit, name=name)
    if text.startswith("preset:") or (text in PRESETS and not Path(text).expanduser().exists()):
        return load_preset(text.removeprefix("preset:"), columns=mapping, limit=limit, name=name)
    generated = _generated_name(text)
    if generated is not None:
        if mapping:
            raise DataError(
                f"built-in set '{generated}' is built in code and has no columns to map: drop the column mapping"
            )
        # The one import cycle left in ssah.data: ssah.data.training (owned elsewhere) imports load_prompts from
        # here for its built-in files. Once it imports them from ssah.data.prompt_sets (load_file), this import
        # moves to the top of the module.
        built = generated_set(generated)
        if limit is not None:
            built = PromptSet(built.name, built.source, built.examples[:limit])
        return PromptSet(name or built.name, built.source, built.examples)
    return load_file(spec, columns=mapping, limit=limit, name=name, presets=tuple(PRESETS))


def _generated_name(text: str) -> str | None:
    """The name of a code-built built-in set that ``text`` names (``builtin:attack``, or a bare ``attack`` when no
    file or folder of that name exists), else None."""
    if text.startswith(BUILTIN_PREFIX):
        builtin = text[len(BUILTIN_PREFIX) :]
        return builtin if builtin in _GENERATED_SETS else None
    if text in _GENERATED_SETS and not Path(text).expanduser().exists():
        return text
    return None
