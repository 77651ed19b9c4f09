"""Labelled replies: (prompt, reply, human label) rows read from CSV or JSONL files, for validating and training
refusal judges.

XSTest's files are read as they are (``completion`` is the reply, ``final_label`` the label with the values
``1_full_compliance`` / ``2_full_refusal`` / ``3_partial_refusal``); other files name their columns with
``columns={"reply": "response", "label": "human"}``. Labels may be words (``refusal``, ``compliance``,
``partial``, ``refused``, ``complied``, ...), booleans (``true`` = refused) or 0/1 (1 = refused).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ssah.errors import DataError, UserError

__all__ = [
    "LABELS",
    "LabelledReply",
    "LabelledSet",
    "PartialRule",
    "apply_partial",
    "load_labelled",
    "parse_label",
]

Label = Literal["refusal", "compliance", "partial"]
LABELS: tuple[Label, ...] = ("compliance", "refusal", "partial")
PartialRule = Literal["refusal", "exclude", "class"]

_COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "question", "instruction", "goal", "query", "input"),
    "reply": ("reply", "completion", "response", "output", "answer", "generation"),
    "label": ("label", "final_label", "human_label", "refused", "refusal", "judgement", "judgment"),
}
_LABEL_WORDS: dict[str, Label] = {
    "1_full_compliance": "compliance",
    "2_full_refusal": "refusal",
    "3_partial_refusal": "partial",
    "full_compliance": "compliance",
    "full_refusal": "refusal",
    "partial_refusal": "partial",
    "compliance": "compliance",
    "complied": "compliance",
    "comply": "compliance",
    "complies": "compliance",
    "refusal": "refusal",
    "refused": "refusal",
    "refuse": "refusal",
    "refuses": "refusal",
    "partial": "partial",
    "true": "refusal",
    "false": "compliance",
    "yes": "refusal",
    "no": "compliance",
    "1": "refusal",
    "0": "compliance",
}


def parse_label(value: object) -> Label | None:
    """A label word, bool or 0/1 as ``refusal`` / ``compliance`` / ``partial``; None when it is not one."""
    if isinstance(value, bool):
        return "refusal" if value else "compliance"
    if isinstance(value, int | float) and value in (0, 1):
        return "refusal" if value == 1 else "compliance"
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace(" ", "_").replace("-", "_")
    return _LABEL_WORDS.get(key)


@dataclass(frozen=True)
class LabelledReply:
    """One human-labelled reply; ``source`` is the file it came from (its stem)."""

    prompt: str
    reply: str
    label: Label
    source: str
    id: str = ""


@dataclass
class LabelledSet:
    """Labelled replies from one or more files, with their file fingerprints."""

    rows: list[LabelledReply]
    files: dict[str, str]  # source name -> sha256 of the file

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sources(self) -> list[str]:
        """Source names in file order."""
        return list(dict.fromkeys(r.source for r in self.rows))

    def counts(self) -> dict[str, dict[str, int]]:
        """Per source, how many rows carry each label."""
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            out.setdefault(r.source, dict.fromkeys(LABELS, 0))[r.label] += 1
        return out


def apply_partial(rows: Sequence[LabelledReply], rule: PartialRule) -> list[LabelledReply]:
    """Partial refusals under ``rule``: ``refusal`` relabels them as refusals, ``exclude`` drops them (the
    published XSTest anchors are binary), ``class`` keeps them as a third class."""
    if rule not in ("refusal", "exclude", "class"):
        raise UserError(f"unknown partial-refusal rule {rule!r}: use refusal, exclude or class")
    if rule == "class":
        return list(rows)
    if rule == "exclude":
        return [r for r in rows if r.label != "partial"]
    return [LabelledReply(r.prompt, r.reply, "refusal", r.source, r.id) if r.label == "partial" else r for r in rows]


def _files(paths: Sequence[str | Path]) -> list[Path]:
    """The data files named: files as given, folders expanded to their *.csv / *.jsonl files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in (".csv", ".jsonl") and q.is_file())
            if not found:
                raise DataError(f"folder {p} holds no .csv or .jsonl file: pass labelled files or their folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"labelled data {p} not found: check the path")
    if not out:
        raise DataError("no labelled data given: pass one or more CSV / JSONL files or folders")
    return out


def _records(path: Path) -> list[dict[str, object]]:
    """The rows of a CSV (header row) or JSONL (one object per line) file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read labelled file {path} ({exc}): pass a UTF-8 CSV or JSONL file") from exc
    if not text.strip():
        raise DataError(f"labelled file {path} is empty: pass a file with a header and labelled rows")
    if path.suffix.lower() == ".jsonl":
        rows: list[dict[str, object]] = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i} is not JSON ({exc.msg}): fix the line or the file") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {i} is not a JSON object: write one object per line")
            rows.append(obj)
        return rows
    if path.suffix.lower() != ".csv":
        raise DataError(f"labelled file {path} is neither .csv nor .jsonl: convert it to one of them")
    rows = list(csv.DictReader(text.splitlines(keepends=True)))
    for i, row in enumerate(rows, 2):
        if None in row:  # more cells than the header has columns
            raise DataError(f"{path} line {i} has more cells than its header: quote commas inside a cell")
    return rows


def _column(path: Path, fields: Sequence[str], role: str, columns: Mapping[str, str]) -> str:
    """The column of ``role`` (prompt / reply / label): the mapped name, else the first known name present."""
    if role in columns:
        if columns[role] not in fields:
            raise DataError(
                f"{path} has no column {columns[role]!r} (mapped to {role}); its columns: {', '.join(fields)}"
            )
        return columns[role]
    for name in _COLUMN_CANDIDATES[role]:
        if name in fields:
            return name
    raise DataError(
        f"{path} has no {role} column (looked for {', '.join(_COLUMN_CANDIDATES[role])}; found "
        f"{', '.join(fields) or 'none'}): map one with --column {role}=NAME"
    )


def load_labelled(paths: Sequence[str | Path], *, columns: Mapping[str, str] | None = None) -> LabelledSet:
    """Read labelled replies from files or folders (see the module docstring); every row must carry a readable
    label, or the whole load fails with a DataError naming the file, row and value."""
    columns = dict(columns or {})
    unknown = set(columns) - set(_COLUMN_CANDIDATES)
    if unknown:
        raise UserError(f"unknown column role(s) {sorted(unknown)}: map prompt, reply or label, e.g. reply=completion")
    rows: list[LabelledReply] = []
    files: dict[str, str] = {}
    for path in _files(paths):
        records = _records(path)
        if not records:
            raise DataError(f"labelled file {path} has no rows: pass a file with labelled rows")
        fields = list(dict.fromkeys(k for r in records for k in r))
        cols = {role: _column(path, fields, role, columns) for role in _COLUMN_CANDIDATES}
        source = path.stem
        if source in files:
            source = f"{path.parent.name}/{path.stem}"
        for i, rec in enumerate(records, 1):
            raw = rec.get(cols["label"])
            label = parse_label(raw)
            if label is None:
                raise DataError(
                    f"{path} row {i}: cannot read label {raw!r} in column {cols['label']!r}: use refusal / "
                    "compliance / partial, 1_full_compliance / 2_full_refusal / 3_partial_refusal, true/false or 1/0"
                )
            reply = rec.get(cols["reply"])
            prompt = rec.get(cols["prompt"])
            rows.append(
                LabelledReply(
                    "" if prompt is None else str(prompt),
                    "" if reply is None else str(reply),
                    label,
                    source,
                    str(rec.get("id", i)),
                )
            )
        files[source] = hashlib.sha256(path.read_bytes()).hexdigest()
    return LabelledSet(rows, files)
