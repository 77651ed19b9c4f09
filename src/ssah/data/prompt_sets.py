"""Prompt sets: read CSV / JSON / JSONL files (or a built-in file) into an immutable, fingerprinted ``PromptSet``.

The bottom of ``ssah.data``: presets, code-built sets and the dispatcher :func:`ssah.data.load_prompts` build on
this module, which imports none of them.

Column names are detected from the usual benchmark spellings (AdvBench ``goal``/``target``, Alpaca
``instruction``/``input``/``output``, StrongREJECT ``forbidden_prompt`` ...) and can always be overridden, so that
any public safety or utility file loads without conversion.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, overload

from ssah.errors import DataError

__all__ = [
    "BUILTIN_SETS",
    "DATA_EXTENSIONS",
    "Example",
    "PromptSet",
    "builtin_path",
    "check_mapping",
    "load_file",
    "parse_column_mapping",
    "read_rows",
    "to_examples",
]


@dataclass(frozen=True)
class Example:
    """One prompt, with the reference response, category and checkable short answer when the data has them."""

    prompt: str
    response: str | None = None
    category: str | None = None
    answer: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable set of examples with the name and source it was loaded from."""

    name: str
    source: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    @overload
    def __getitem__(self, i: int) -> Example: ...

    @overload
    def __getitem__(self, i: slice) -> PromptSet: ...

    def __getitem__(self, i: int | slice) -> Example | PromptSet:
        """An example by index, or a sub-set by slice (named like the slice, e.g. ``harmful[10:20]``)."""
        if isinstance(i, slice):
            start, stop, step = (
                "" if i.start is None else i.start,
                "" if i.stop is None else i.stop,
                "" if i.step is None else f":{i.step}",
            )
            return PromptSet(f"{self.name}[{start}:{stop}{step}]", self.source, self.examples[i])
        return self.examples[i]

    @property
    def has_responses(self) -> bool:
        """True when every example has a non-empty response (needed for response-only statistics or training)."""
        return bool(self.examples) and all(ex.response for ex in self.examples)

    def fingerprint(self) -> str:
        """SHA-256 of a canonical JSON of the examples, in order; identifies the data in run manifests.

        The answer joins a row only when present, so sets without answers keep their earlier fingerprints."""
        rows = [
            [ex.prompt, ex.response, ex.category] + ([ex.answer] if ex.answer is not None else [])
            for ex in self.examples
        ]
        blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def take(self, n: int) -> PromptSet:
        """The first ``n`` examples (all of them when ``n`` is larger than the set)."""
        if n < 1:
            raise DataError(f"cannot take {n} examples: the count must be at least 1")
        if n >= len(self.examples):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.source, self.examples[:n])

    def spread(self, n: int | None) -> PromptSet:
        """``n`` examples evenly spaced through the set (example ``i * len // n`` for ``i < n``; deterministic),
        the whole set when ``n`` is None or not smaller: files are often sorted by category, so the first ``n``
        would cover only a few. The one even cut of the calibration sets (``CalibrationSection``), ablate's and the
        direction's evaluation sets and the probe's prompts."""
        size = len(self.examples)
        if n is None or n >= size:
            return self
        if n < 1:
            raise DataError(f"cannot keep {n} examples of '{self.name}': the count must be at least 1")
        picked = tuple(self.examples[(i * size) // n] for i in range(n))
        return PromptSet(self.name, f"{self.source} ({n} evenly spaced of {size})", picked)

    def split(self, parts: int = 2) -> list[PromptSet]:
        """``parts`` disjoint sets, example ``i`` going to part ``i % parts``; interleaving keeps each part a
        fair sample of a file that is sorted by category, and the result is deterministic."""
        if parts < 1:
            raise DataError(f"cannot split into {parts} parts: the number of parts must be at least 1")
        if parts > len(self.examples):
            raise DataError(
                f"cannot split {len(self.examples)} examples of '{self.name}' into {parts} parts: "
                f"use at most {len(self.examples)} parts or a larger set"
            )
        return [PromptSet(f"{self.name}[{k}::{parts}]", self.source, self.examples[k::parts]) for k in range(parts)]

    def prompts(self) -> list[str]:
        """The prompts, in order."""
        return [ex.prompt for ex in self.examples]


BUILTIN_SETS: dict[str, str] = {
    "safety": "harmful requests paired with refusals: safety-critical statistics and safety alignment data",
    "utility": "ordinary requests paired with helpful answers: utility statistics and fine-tuning data",
    "harmful": "harmful requests without responses: attack success rate (safety evaluation)",
    "benign": "ordinary requests: helpfulness checks and the baseline refusal rate",
    "borderline": "safe requests that look harmful: over-refusal evaluation",
    "borderline_sft": "safe requests that look harmful, with helpful answers: the borderline side of the safety-SFT "
    "mix (disjoint from 'borderline', which stays held out)",
    "task": "Alpaca-style benign instructions with answers: the benign fine-tuning task (default training data)",
    "attack": "harmful requests with a compliance opener and non-actionable filler: the fine-tuning attack "
    "(built in code from 'harmful', see ssah.data.training.attack_set)",
    "alignment": "refusals of harmful requests, helpful answers to borderline-safe and to ordinary requests: the "
    "safety-SFT data of the aligned-model recipe (built in code from 'safety', 'borderline_sft' and 'utility', see "
    "ssah.data.training.alignment_mix)",
}

BUILTIN_PREFIX = "builtin:"
DATA_EXTENSIONS = (".csv", ".json", ".jsonl")

# Auto-detected column names, in order of preference (matched case-insensitively, singular or plural).
PROMPT_COLUMNS = ("prompt", "instruction", "goal", "behavior", "question", "forbidden_prompt", "query", "text")
# "target" is deliberately absent: in AdvBench / JailbreakBench it is an attack target ("Sure, here is ..."),
# not a reply, and must never pass silently as a refusal response; map it with --column response=target.
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
CATEGORY_COLUMNS = ("category", "semanticcategory", "type", "focus", "tag")
ANSWER_COLUMNS = ("answer",)  # a short checkable answer (e.g. "437"), read only when not taken as the response
INPUT_COLUMNS = ("input",)
LOGICAL_COLUMNS = ("prompt", "response", "category")

_LLAMA2_SYS = re.compile(r"<<SYS>>.*?<</SYS>>", re.DOTALL)
_LLAMA2_TOKENS = re.compile(r"<s>|</s>|\[INST\]|\[/INST\]")


def builtin_path(name: str) -> Path:
    """The file of a built-in prompt set, shipped in the package as ``ssah/data/builtin/<name>.jsonl``."""
    if name not in BUILTIN_SETS:
        raise DataError(f"unknown built-in prompt set '{name}': use one of {', '.join(BUILTIN_SETS)}")
    return Path(str(resources.files("ssah.data").joinpath("builtin", f"{name}.jsonl")))


def parse_column_mapping(items: Sequence[str], fields: Sequence[str] = LOGICAL_COLUMNS) -> dict[str, str]:
    """Parse CLI ``--column`` items such as ``["prompt=goal", "response=target"]`` into a mapping; ``fields`` are
    the logical fields the command reads (``ssah judge``: prompt, reply, label)."""
    mapping: dict[str, str] = {}
    for item in items:
        logical, sep, actual = item.partition("=")
        logical, actual = logical.strip().lower(), actual.strip()
        if not sep or not logical or not actual:
            raise DataError(
                f"bad column mapping {item[:80]!r}: write it as <field>=<column>, e.g. --column prompt=goal"
            )
        if logical not in fields:
            raise DataError(
                f"bad column mapping {item[:80]!r}: the field must be one of {', '.join(fields)}, "
                f"e.g. --column {fields[-1]}=NAME"
            )
        if logical in mapping and mapping[logical] != actual:
            raise DataError(f"column '{logical}' is mapped twice ('{mapping[logical]}' and '{actual}'): keep one")
        mapping[logical] = actual
    return mapping


def load_file(
    spec: str | os.PathLike[str],
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    name: str | None = None,
    presets: Sequence[str] = (),
) -> PromptSet:
    """Load a prompt set from a built-in file (``builtin:<name>`` or a bare built-in name), a .csv/.json/.jsonl
    file, or a folder holding exactly one such file; the arguments are :func:`ssah.data.load_prompts`'s
    (``presets``: names to suggest when the file does not exist)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: pass a positive limit or none")
    path, source, default_name = _resolve(spec, presets)
    examples = to_examples(read_rows(path), check_mapping(columns), path)
    if limit is not None:
        examples = examples[:limit]
    return PromptSet(name or default_name, source, tuple(examples))


def check_mapping(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Validate the logical names of a column mapping (the actual names are checked against the file later)."""
    mapping: dict[str, str] = {}
    for logical, actual in (columns or {}).items():
        key = logical.strip().lower()
        if key not in LOGICAL_COLUMNS:
            raise DataError(
                f"unknown field '{logical}' in the column mapping: use {', '.join(LOGICAL_COLUMNS)}, "
                f"e.g. --column prompt=goal"
            )
        mapping[key] = actual
    return mapping


def _resolve(spec: str | os.PathLike[str], presets: Sequence[str] = ()) -> tuple[Path, str, str]:
    """Turn a spec into (data file, source string, default name)."""
    text = os.fspath(spec)
    if text.startswith(BUILTIN_PREFIX):
        builtin = text[len(BUILTIN_PREFIX) :]
        return _builtin_file(builtin), f"{BUILTIN_PREFIX}{builtin}", builtin
    path = Path(text).expanduser()
    if not path.exists():
        if text in BUILTIN_SETS:
            return _builtin_file(text), f"{BUILTIN_PREFIX}{text}", text
        hint = (
            f" or a built-in set ({', '.join(BUILTIN_SETS)}), a preset ({', '.join(presets)}) or hf:<dataset>[:split]"
            if os.sep not in text and "." not in text
            else ""
        )
        raise DataError(f"data file not found: {text}: pass an existing .csv, .json or .jsonl file{hint}")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS)
        if len(found) != 1:
            listed = ", ".join(p.name for p in found) if found else "none"
            raise DataError(
                f"folder {text} holds {len(found)} data files ({listed}): pass one .csv, .json or .jsonl file"
            )
        path = found[0]
    if path.suffix.lower() not in DATA_EXTENSIONS:
        raise DataError(
            f"unsupported data file type '{path.suffix or path.name}' ({text}): convert it to .csv, .json or .jsonl"
        )
    return path, str(path.resolve()), path.stem


def _builtin_file(name: str) -> Path:
    """The built-in set's file, with an error that says what to do when the package lacks it."""
    path = builtin_path(name)
    if not path.is_file():
        raise DataError(
            f"built-in prompt set '{name}' is missing from the installed package ({path}): reinstall ssah "
            f"or pass a data file instead"
        )
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a data file into a list of row dicts (column name -> value)."""
    suffix = path.suffix.lower()
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:  # keep CRLF inside quoted CSV fields as is
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}): check the path and its permissions") from exc
    if suffix == ".csv":
        return _read_csv(text, path)
    if suffix == ".jsonl":
        return _read_jsonl(text, path)
    return _read_json(text, path)


def _read_csv(text: str, path: Path) -> list[dict[str, Any]]:
    """CSV with a header row; quoted newlines and CRLF are handled by the csv module."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"CSV file {path} has no header row: add a first line naming the columns")
        names = [h.strip() for h in header]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            shown = ", ".join(repr(d) for d in dupes)
            raise DataError(f"CSV file {path} names column {shown} twice in its header: rename one of them")
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            if len(values) > len(names) and any(v.strip() for v in values[len(names) :]):
                raise DataError(
                    f"line {reader.line_num} of {path} has {len(values)} cells but the header names {len(names)} "
                    "columns: quote cells that contain commas, or add the missing column names"
                )
            rows.append(dict(zip(names, values, strict=False)))
    except csv.Error as exc:
        raise DataError(f"malformed CSV in {path} at line {reader.line_num} ({exc}): fix the quoting") from exc
    if not rows:
        raise DataError(f"CSV file {path} has a header but no rows: add data rows or pass another file")
    return rows


def _read_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped."""
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON in {path} at line {lineno}, column {exc.colno} ({exc.msg}): "
                f"fix that line (JSONL needs one JSON object per line)"
            ) from exc
        if not isinstance(obj, dict):
            raise DataError(
                f"line {lineno} of {path} is a JSON {type(obj).__name__}, not an object: write one JSON object per line"
            )
        rows.append(obj)
    return rows


def _read_json(text: str, path: Path) -> list[dict[str, Any]]:
    """A list of objects (or of strings); an object holding one such list; or an object of parallel lists."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno} ({exc.msg}): fix the file"
        ) from exc
    layout_fix = (
        "expected a list of objects, an object holding one list of objects, or an object of equal-length lists: "
        "convert the file to one of these"
    )
    if isinstance(data, list):
        return _rows_from_list(data, path, layout_fix)
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a JSON {type(data).__name__}: {layout_fix}")
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    object_lists = {k: v for k, v in lists.items() if v and all(isinstance(x, dict) for x in v)}
    if len(object_lists) == 1:
        return _rows_from_list(next(iter(object_lists.values())), path, layout_fix)
    if object_lists:
        raise DataError(f"{path} holds several lists of objects ({', '.join(object_lists)}): split the file")
    columns = {k: v for k, v in lists.items() if v}
    if not columns:
        if lists or not data:
            return []
        raise DataError(f"{path} holds no list: {layout_fix}")
    if not all(not isinstance(x, (dict, list)) for v in columns.values() for x in v):
        raise DataError(f"{path} has lists of nested values ({', '.join(columns)}): {layout_fix}")
    if len(columns) == 1:  # e.g. {"instructions": [...]}: the strings are the prompts, whatever the key
        key, values = next(iter(columns.items()))
        if not _match(key, PROMPT_COLUMNS):
            columns = {"prompt": values}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        sizes = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise DataError(f"{path} has lists of different lengths ({sizes}): make them parallel or split the file")
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _rows_from_list(data: list[Any], path: Path, layout_fix: str) -> list[dict[str, Any]]:
    """Rows from a JSON list: objects as they are, plain strings as prompts."""
    if all(isinstance(x, dict) for x in data):
        return list(data)
    if all(isinstance(x, str) for x in data):
        return [{"prompt": x} for x in data]
    raise DataError(f"{path} holds a list that mixes objects and other values: {layout_fix}")


def _match(column: str, candidates: Sequence[str]) -> bool:
    """Whether a column name is one of the candidates, ignoring case and a plural ``s``."""
    low = column.strip().lower()
    return any(low in (c, c + "s", c + "es", c[:-1] + "ies") for c in candidates)


def _detect(names: Sequence[str], candidates: Sequence[str]) -> str | None:
    """The first candidate (in preference order) that names a column; None when none does."""
    for cand in candidates:
        for name in names:
            if _match(name, (cand,)):
                return name
    return None


def _column_names(rows: list[dict[str, Any]]) -> list[str]:
    """Every column name in the rows, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _cell(value: Any) -> str:
    """A cell as stripped text; missing values become the empty string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value).strip()


def _check_text(
    row: Mapping[str, Any], column: str, what: str, number: int, path: Path | str, *, numbers: bool = False
) -> None:
    """A prompt (or response) cell must be text (or missing): a number, boolean, list or object there is almost
    always a wrong column or a broken export, and stringifying it would score nonsense. Responses may be numbers
    (``"answer": 437``)."""
    value = row.get(column)
    if value is None or isinstance(value, str):
        return
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return
    kind = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )
    raise DataError(
        f"row {number} of {path} has a {kind} as its {what} ({column!r}: {str(value)[:40]}), not text: "
        f"fix that row or map another column with --column {what}=NAME"
    )


def _strip_llama2(prompt: str) -> str:
    """Remove a Llama-2 chat wrapper (``<s>[INST] <<SYS>>...<</SYS>> ... [/INST]``) so the prompt is plain text."""
    if "[INST]" not in prompt and "<<SYS>>" not in prompt and "<s>" not in prompt:
        return prompt
    return _LLAMA2_TOKENS.sub("", _LLAMA2_SYS.sub("", prompt)).strip()


def to_examples(rows: list[dict[str, Any]], mapping: dict[str, str], path: Path | str) -> list[Example]:
    """Map rows to examples using the column mapping or detection; rows with an empty prompt are dropped."""
    if not rows:
        raise DataError(f"{path} has no rows: pass a file with at least one example")
    names = _column_names(rows)
    found = ", ".join(repr(n) for n in names) or "none"
    for logical, actual in mapping.items():
        if actual not in names:
            raise DataError(
                f"column '{actual}' (mapped to {logical}) is not in {path} (columns: {found}): "
                f"pass --column {logical}=<name> with one of these"
            )
    prompt_col = mapping.get("prompt") or _detect(names, PROMPT_COLUMNS)
    if prompt_col is None:
        raise DataError(
            f"no prompt column in {path} (columns: {found}): pass --column prompt=<name> naming the prompt column"
        )
    response_col = mapping.get("response") or _detect([n for n in names if n != prompt_col], RESPONSE_COLUMNS)
    category_col = mapping.get("category") or _detect(
        [n for n in names if n not in (prompt_col, response_col)], CATEGORY_COLUMNS
    )
    input_col = _detect(names, INPUT_COLUMNS) if _match(prompt_col, ("instruction",)) else None
    answer_col = _detect([n for n in names if n not in (prompt_col, response_col, category_col)], ANSWER_COLUMNS)

    examples: list[Example] = []
    for number, row in enumerate(rows, start=1):
        _check_text(row, prompt_col, "prompt", number, path)
        if response_col:
            _check_text(row, response_col, "response", number, path, numbers=True)
        prompt = _strip_llama2(_cell(row.get(prompt_col)))
        if input_col is not None and (extra := _cell(row.get(input_col))):
            prompt = f"{prompt}\n\n{extra}" if prompt else extra
        if not prompt:
            continue
        response = _cell(row.get(response_col)) if response_col else ""
        response = response.removesuffix("</s>").rstrip()
        category = _cell(row.get(category_col)) if category_col else ""
        answer = _cell(row.get(answer_col)) if answer_col else ""
        examples.append(Example(prompt, response or None, category or None, answer or None))
    if not examples:
        raise DataError(f"every prompt in {path} (column '{prompt_col}') is empty: pass --column prompt=<name>")
    return examples
