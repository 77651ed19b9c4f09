"""Utility tasks that are not prompt sets: multiple choice (PIQA) and grade-school math (GSM8K).

They are read in place from the public benchmark data (``piqa``, ``gsm8k``) or from a user's JSONL file, and
scored by ``ssah.evaluate`` (log-likelihood accuracy, exact match of the final number).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ssah.data.shared import shared_data_dir
from ssah.errors import DataError

__all__ = [
    "UTILITY_TASKS",
    "MathItem",
    "MultipleChoiceItem",
    "canonical_number",
    "extract_number",
    "load_gsm8k",
    "load_multiple_choice",
]

# What ``ssah eval --utility`` accepts besides a file: response perplexity, PIQA accuracy, GSM8K exact match.
UTILITY_TASKS: tuple[str, ...] = ("perplexity", "piqa", "gsm8k")

_DATA_FIX = "set SSAH_SHARED_DATA to the folder holding piqa/, gsm8k/, ... (or pass a JSONL file)"


@dataclass(frozen=True)
class MultipleChoiceItem:
    """A question with its options and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class MathItem:
    """A math word problem and its final numeric answer (as text, commas removed)."""

    question: str
    answer: str


def _shared_file(task: str, *parts: str) -> Path:
    """A file of a utility task in the shared benchmark data, with a one-line error when it is absent."""
    root = shared_data_dir(required=False)
    if root is None:
        raise DataError(f"task '{task}' needs the public benchmark data: {_DATA_FIX}")
    path = root.joinpath(*parts)
    if not path.is_file():
        raise DataError(f"task '{task}' needs the public benchmark data, but {path} is missing: {_DATA_FIX}")
    return path


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: pass a positive limit or none")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON objects, one per non-blank line, with errors naming the line."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): check the path and its permissions") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: save it as UTF-8") from exc
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON in {path} at line {lineno} ({exc.msg}): fix that line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"line {lineno} of {path} is not a JSON object: write one object per line")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path} has no items: pass a file with at least one item")
    return rows


def _user_file(spec: str, task_names: str) -> Path:
    """A user's JSONL task file, or an error naming the accepted specs."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"task data not found: {spec}: use {task_names} or an existing .jsonl file")
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"unsupported task file type '{path.suffix or path.name}' ({spec}): pass a .jsonl file")
    return path


def load_multiple_choice(spec: str, limit: int | None = None) -> tuple[str, list[MultipleChoiceItem]]:
    """Load ``"piqa"`` (the PIQA validation split: ``valid.jsonl`` goal/sol1/sol2 + ``valid-labels.lst``) or a
    JSONL file whose lines hold ``question``, ``choices`` (a list) and ``label`` (0-based); returns (name, items)."""
    _check_limit(limit)
    if spec == "piqa":
        rows = _read_jsonl(_shared_file("piqa", "piqa", "valid.jsonl"))
        labels_path = _shared_file("piqa", "piqa", "valid-labels.lst")
        labels = [ln.strip() for ln in labels_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(labels) != len(rows):
            raise DataError(
                f"PIQA has {len(rows)} items but {len(labels)} labels in {labels_path}: restore the original files"
            )
        # the text as published, not stripped: lm-eval's piqa task scores the raw goal and solutions (about 6% of
        # the solutions end in a space, which is part of the scored continuation and of acc_norm's length)
        items = [
            MultipleChoiceItem(str(r["goal"]), (str(r["sol1"]), str(r["sol2"])), int(lab))
            for r, lab in zip(rows, labels, strict=True)
        ]
        return "piqa", items[:limit] if limit else items
    path = _user_file(spec, "'piqa'")
    items = []
    for lineno, row in enumerate(_read_jsonl(path), start=1):
        question, choices, label = row.get("question"), row.get("choices"), row.get("label")
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
            raise DataError(
                f"item {lineno} of {path} needs 'question' (text) and 'choices' (a list of at least 2): "
                f'write lines like {{"question": ..., "choices": [...], "label": 0}}'
            )
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(f"item {lineno} of {path} has label {label!r}: use a 0-based index below {len(choices)}")
        items.append(MultipleChoiceItem(question.strip(), tuple(str(c).strip() for c in choices), label))
    return path.stem, items[:limit] if limit else items


def load_gsm8k(spec: str = "gsm8k", limit: int | None = None) -> list[MathItem]:
    """Load GSM8K's test split (``"gsm8k"``) or a JSONL file in its format (``question``, ``answer`` ending with
    ``#### <number>``; a bare number as the answer works too); the answer kept is the final number."""
    _check_limit(limit)
    path = _shared_file("gsm8k", "gsm8k", "test.jsonl") if spec == "gsm8k" else _user_file(spec, "'gsm8k'")
    items = []
    for lineno, row in enumerate(_read_jsonl(path), start=1):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or answer is None:
            raise DataError(f"item {lineno} of {path} needs 'question' and 'answer': write GSM8K-style lines")
        final = str(answer).rpartition("####")[2].strip().replace(",", "")
        if canonical_number(final) is None:
            raise DataError(
                f"item {lineno} of {path} has no final number after '####' ({final[:40]!r}): "
                f"end the answer with '#### <number>'"
            )
        items.append(MathItem(question.strip(), final))
    return items[:limit] if limit else items


_NUMBER = re.compile(r"(?<![\w.])(-)?\s?\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")


def canonical_number(text: str) -> str | None:
    """A number written in plain form (``"3.0"`` -> ``"3"``, ``"1,000"`` -> ``"1000"``, ``"-0"`` -> ``"0"``),
    or None when the text is not a number; equal numbers give equal strings."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def extract_number(text: str) -> str | None:
    """The last number in a generated answer, in canonical form (handles thousands commas, ``$``, a trailing
    period, negatives and decimals such as ``3.0`` == ``3``); None when the text has no number."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    sign, whole, frac = matches[-1].groups()
    return canonical_number(f"{sign or ''}{whole}{frac or ''}")
