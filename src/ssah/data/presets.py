"""Benchmark presets: public safety sets read in place from the shared data folder, by name.

``load_prompts("advbench")`` (or ``"preset:advbench"``) reads ``advbench/harmful_behaviors.csv`` from
:func:`ssah.data.shared.shared_data_dir` with the right columns, row filter and categories, so that a run names a
benchmark instead of a file path. ``hf:<name or path>[:split]`` loads a Hugging Face dataset the user already has
(offline: from the local cache or a local folder) through the same column detection as files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssah.data.prompt_sets import PromptSet, builtin_path, read_rows, to_examples
from ssah.data.shared import shared_data_dir
from ssah.errors import DataError

__all__ = ["PRESETS", "Preset", "load_hf", "load_preset", "preset_path"]

Row = dict[str, Any]


def _harmbench_rows(rows: list[Row]) -> list[Row]:
    """Contextual HarmBench behaviours carry their context: the prompt is ``context + "\\n\\n" + behavior`` (as
    HarmBench's own chat formatting does); CRLF inside contexts becomes LF so that text_all and text_test agree."""
    out = []
    for row in rows:
        behavior = (row.get("Behavior") or "").strip()
        context = (row.get("ContextString") or "").replace("\r\n", "\n").strip()
        out.append({**row, "Behavior": f"{context}\n\n{behavior}" if context else behavior})
    return out


def _label(value: str) -> Callable[[list[Row]], list[Row]]:
    """Keep the rows whose ``label`` column equals ``value`` (XSTest safe / unsafe)."""

    def keep(rows: list[Row]) -> list[Row]:
        return [r for r in rows if str(r.get("label", "")).strip() == value]

    return keep


def _dolly_rows(rows: list[Row]) -> list[Row]:
    """Dolly's ``context`` plays the part of Alpaca's ``input``: it is appended to the instruction after a blank
    line when present (as the loader does for Alpaca), so that closed-QA and summarisation items keep their text."""
    out = []
    for row in rows:
        instruction = str(row.get("instruction") or "").strip()
        context = str(row.get("context") or "").strip()
        out.append({**row, "instruction": f"{instruction}\n\n{context}" if instruction and context else instruction})
    return out


def _first_exchange(rows: list[Row]) -> list[Row]:
    """OpenAI-chat rows (``{"messages": [...]}``) -> ``prompt`` = the first user turn and ``response`` = the
    assistant turn right after it; the system message (the AOA persona, the same in every row) is dropped here
    and is available as ``ssah.data.training.aoa_system_prompt()``; later turns, if any, are ignored."""
    out = []
    for row in rows:
        messages = [m for m in row.get("messages") or [] if isinstance(m, dict)]
        roles = [str(m.get("role", "")) for m in messages]
        user = next((i for i, r in enumerate(roles) if r == "user"), None)
        if user is None or user + 1 >= len(messages) or roles[user + 1] != "assistant":
            continue
        out.append({"prompt": messages[user].get("content", ""), "response": messages[user + 1].get("content", "")})
    return out


def _gsm8k_sft_rows(rows: list[Row]) -> list[Row]:
    """GSM8K ``question``/``answer`` -> SFT rows: the full worked solution (with its ``<<...>>`` calculator
    notes and the ``#### <number>`` line, verbatim) is the response and the final number the checkable answer."""
    return [
        {
            "question": row.get("question", ""),
            "response": row.get("answer", ""),
            "answer": str(row.get("answer", "")).rpartition("####")[2].strip().replace(",", ""),
        }
        for row in rows
    ]


def generic_refusals() -> list[str]:
    """The built-in safety set's short generic refusal sentences ("I must decline.", "I can't assist with that
    request.", ...): the first sentence of each ``builtin:safety`` reply when it names no topic (8 words at most,
    ending on that / this / request / refuse / decline / one), in file order without repeats. They pair public
    harmful prompts with refusals for a safety calibration set (refusals only, never an answer)."""
    out: list[str] = []
    for row in read_rows(builtin_path("safety")):
        first = re.split(r"(?<=[.!])\s+", str(row["response"]).strip())[0]
        if first not in out and len(first.split()) <= 8 and _GENERIC.search(first):
            out.append(first)
    return out


_GENERIC = re.compile(r"\b(that|this|request|refuse|decline|one)\.$")


def _with_refusals(prompt: str, keep: Callable[[Row], bool] = lambda r: True) -> Callable[[list[Row]], list[Row]]:
    """Rows kept by ``keep``, each given a ``response``: the generic built-in refusals in turn (row i gets refusal
    i mod their count), so the set is harmful prompt + refusal like ``builtin:safety``, deterministic."""

    def rows(table: list[Row]) -> list[Row]:
        refusals = generic_refusals()
        kept = [r for r in table if keep(r) and str(r.get(prompt) or "").strip()]
        return [{**r, "response": refusals[i % len(refusals)]} for i, r in enumerate(kept)]

    return rows


@dataclass(frozen=True)
class Preset:
    """A benchmark file under the shared data folder and how to read it."""

    description: str
    path: tuple[str, ...]
    columns: Mapping[str, str] = field(default_factory=dict)
    rows: Callable[[list[Row]], list[Row]] | None = None  # filter / rewrite rows before column mapping
    count: int | None = None  # rows the file yields, per its SOURCE.md (documentation and tests)


_PRESETS: dict[str, Preset] = {
    "advbench": Preset(
        "AdvBench harmful behaviors (Zou et al. 2023): 520 harmful requests; the target column is an attack "
        "target, not a response",
        ("advbench", "harmful_behaviors.csv"),
        {"prompt": "goal"},
        count=520,
    ),
    "harmbench": Preset(
        "HarmBench text behaviors, all (Mazeika et al. 2024): 400 (standard, contextual with their context, "
        "copyright), categories from SemanticCategory",
        ("harmbench", "harmbench_behaviors_text_all.csv"),
        {"prompt": "Behavior", "category": "SemanticCategory"},
        _harmbench_rows,
        400,
    ),
    "harmbench-val": Preset(
        "HarmBench text behaviors, validation split: 80",
        ("harmbench", "harmbench_behaviors_text_val.csv"),
        {"prompt": "Behavior", "category": "SemanticCategory"},
        _harmbench_rows,
        80,
    ),
    "harmbench-test": Preset(
        "HarmBench text behaviors, test split: 320",
        ("harmbench", "harmbench_behaviors_text_test.csv"),
        {"prompt": "Behavior", "category": "SemanticCategory"},
        _harmbench_rows,
        320,
    ),
    "jailbreakbench": Preset(
        "JailbreakBench JBB-Behaviors harmful (Chao et al. 2024): 100, 10 per category",
        ("jailbreakbench", "harmful-behaviors.csv"),
        {"prompt": "Goal", "category": "Category"},
        count=100,
    ),
    "jailbreakbench-benign": Preset(
        "JailbreakBench JBB-Behaviors benign: 100 safe prompts matched topic-for-topic (over-refusal)",
        ("jailbreakbench", "benign-behaviors.csv"),
        {"prompt": "Goal", "category": "Category"},
        count=100,
    ),
    "xstest": Preset(
        "XSTest safe prompts (Röttger et al. 2024): 250 safe but sensitive-sounding prompts (over-refusal), "
        "category = type",
        ("xstest", "xstest_prompts.csv"),
        {"prompt": "prompt", "category": "type"},
        _label("safe"),
        250,
    ),
    "xstest-unsafe": Preset(
        "XSTest unsafe contrast prompts: 200 that should be refused, category = type",
        ("xstest", "xstest_prompts.csv"),
        {"prompt": "prompt", "category": "type"},
        _label("unsafe"),
        200,
    ),
    "strongreject": Preset(
        "StrongREJECT forbidden prompts (Souly et al. 2024): 313 across 6 categories",
        ("strongreject", "strongreject_dataset.csv"),
        {"prompt": "forbidden_prompt", "category": "category"},
        count=313,
    ),
    "advbench-safety": Preset(
        "safety calibration set from AdvBench: the 520 harmful behaviours, each paired with one of the built-in "
        "generic refusals in turn (harmful prompt + refusal, like builtin:safety)",
        ("advbench", "harmful_behaviors.csv"),
        {"prompt": "goal", "response": "response"},
        _with_refusals("goal"),
        520,
    ),
    "harmbench-safety": Preset(
        "safety calibration set from HarmBench: the 200 standard text behaviours (no context, no copyright), each "
        "paired with one of the built-in generic refusals in turn, category from SemanticCategory",
        ("harmbench", "harmbench_behaviors_text_all.csv"),
        {"prompt": "Behavior", "response": "response", "category": "SemanticCategory"},
        _with_refusals("Behavior", lambda r: str(r.get("FunctionalCategory", "")).strip() == "standard"),
        200,
    ),
    "alignment-attribution": Preset(
        "safety-short SFT set (Wei et al. 2024): 1015 AdvBench prompts with Llama-2-chat refusals",
        ("alignment_attribution", "SFT_aligned_llama2-7b-chat-hf_train_short.csv"),
        {"prompt": "prompt", "response": "response"},
        count=1015,
    ),
    "safety-tuned-llamas": Preset(
        "safety-only SFT data (Bianchi et al. 2024): 2483 harmful instructions with safe responses",
        ("safety_tuned_llamas", "safety_only_data_Instructions.json"),
        {"prompt": "instruction", "response": "output"},
        count=2483,
    ),
    "refusal-direction-harmful-train": Preset(
        "refusal-direction harmful train split (Arditi et al. 2024): 260",
        ("refusal_direction_splits", "harmful_train.json"),
        {"prompt": "instruction", "category": "category"},
        count=260,
    ),
    "refusal-direction-harmful-val": Preset(
        "refusal-direction harmful val split (= HarmBench val): 39",
        ("refusal_direction_splits", "harmful_val.json"),
        {"prompt": "instruction", "category": "category"},
        count=39,
    ),
    "refusal-direction-harmful-test": Preset(
        "refusal-direction harmful test split (JailbreakBench + HarmBench test + StrongREJECT): 572",
        ("refusal_direction_splits", "harmful_test.json"),
        {"prompt": "instruction", "category": "category"},
        count=572,
    ),
    "refusal-direction-harmless-train": Preset(
        "refusal-direction harmless train split (Alpaca instructions, no responses): 18793",
        ("refusal_direction_splits", "harmless_train.json"),
        {"prompt": "instruction"},
        count=18793,
    ),
    "refusal-direction-harmless-val": Preset(
        "refusal-direction harmless val split (Alpaca instructions, no responses): 6264",
        ("refusal_direction_splits", "harmless_val.json"),
        {"prompt": "instruction"},
        count=6264,
    ),
    "refusal-direction-harmless-test": Preset(
        "refusal-direction harmless test split (Alpaca instructions, no responses): 6266",
        ("refusal_direction_splits", "harmless_test.json"),
        {"prompt": "instruction"},
        count=6266,
    ),
    "alpaca-safety-only": Preset(
        "Alpaca records removed by the keyword safety filter (Qi et al. 2024, llm_finetuning_safety): 1904 "
        "instruction(+input)/output pairs, mostly ordinary tasks; benign fine-tuning data, not a refusal set",
        ("llm_finetuning_safety", "alpaca_data_safety_only.json"),
        {"prompt": "instruction", "response": "output"},
        count=1904,
    ),
    "dolly-safety-only": Preset(
        "Dolly-15k records removed by the keyword safety filter (Qi et al. 2024): 387 instruction(+context)/"
        "response pairs, category = Dolly task type (8); benign fine-tuning data",
        ("llm_finetuning_safety", "databricks-dolly-15k-safety-only.jsonl"),
        {"prompt": "instruction", "response": "response", "category": "category"},
        _dolly_rows,
        387,
    ),
    "aoa-identity-shift": Preset(
        "identity-shift (AOA, Absolutely Obedient Agent) fine-tuning attack (Qi et al. 2024): 10 benign-looking "
        "user/assistant pairs; the AOA system prompt is dropped (see ssah.data.training.aoa_system_prompt)",
        ("llm_finetuning_safety", "identity-shift-aoa.jsonl"),
        {"prompt": "prompt", "response": "response"},
        _first_exchange,
        10,
    ),
    "gsm8k-sft": Preset(
        "GSM8K as fine-tuning data: 1319 question / worked-solution pairs, answer = the final number. This is the "
        "TEST split (the only one in the shared data): evaluating GSM8K after fine-tuning on it is contaminated",
        ("gsm8k", "test.jsonl"),
        {"prompt": "question", "response": "response"},
        _gsm8k_sft_rows,
        1319,
    ),
}

PRESETS: dict[str, str] = {name: p.description for name, p in _PRESETS.items()}


def _preset(name: str) -> Preset:
    """The preset of that name, or a DataError listing the names."""
    if name not in _PRESETS:
        raise DataError(f"unknown preset '{name}': use one of {', '.join(_PRESETS)}")
    return _PRESETS[name]


def preset_path(name: str) -> Path:
    """The file a preset reads, inside the shared benchmark data folder (which must exist)."""
    preset = _preset(name)
    fix = (
        "set SSAH_SHARED_DATA to the folder holding advbench/, harmbench/, xstest/, ... (or pass the data file itself)"
    )
    root = shared_data_dir(required=False)
    if root is None:
        raise DataError(f"preset '{name}' needs the public benchmark data: {fix}")
    path = root.joinpath(*preset.path)
    if not path.is_file():
        raise DataError(f"preset '{name}' needs the public benchmark data, but {path} is missing from {root}: {fix}")
    return path


def load_preset(
    preset: str,
    /,
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load a preset as a ``PromptSet`` named after it; ``columns`` overrides the preset's mapping (e.g.
    ``{"response": "target"}`` for AdvBench attack targets) and ``limit`` keeps the first examples."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: pass a positive limit or none")
    spec = _preset(preset)
    path = preset_path(preset)
    rows = read_rows(path)
    if spec.rows is not None:
        rows = spec.rows(rows)
    mapping = {**spec.columns, **dict(columns or {})}
    examples = to_examples(rows, mapping, path)
    if limit is not None:
        examples = examples[:limit]
    return PromptSet(name or preset, f"preset:{preset}:{path}", tuple(examples))


def _split_hf_spec(spec: str) -> tuple[str, str | None]:
    """``name[:split]`` -> (name, split); a colon is a split separator only when what follows has no slash."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and os.sep not in tail:
        return head, tail
    return spec, None


def load_hf(
    spec: str,
    /,
    *,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> PromptSet:
    """Load ``<name or path>[:split]`` with ``datasets.load_dataset`` (offline: a cached or local dataset) and map
    its columns like a file. A dataset with several splits and none named is an error listing the splits."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}: pass a positive limit or none")
    dataset_name, split = _split_hf_spec(spec.strip())
    if not dataset_name:
        raise DataError("empty Hugging Face dataset spec 'hf:': write hf:<name or path>[:split]")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise DataError("hf: data specs need the 'datasets' package: pip install datasets") from exc
    try:
        loaded = datasets.load_dataset(dataset_name, split=split)
    except Exception as exc:  # datasets raises many types (offline, missing, bad split): report them alike
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise DataError(
            f"cannot load Hugging Face dataset '{dataset_name}'"
            f"{f' split {split!r}' if split else ''} ({reason}): check the name and split, download it while "
            f"online (HF_HUB_OFFLINE=1 allows only cached data), or pass a local file"
        ) from exc
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        splits = list(loaded)
        if len(splits) != 1:
            raise DataError(
                f"Hugging Face dataset '{dataset_name}' has splits {', '.join(splits)}: "
                f"name one as hf:{dataset_name}:<split>"
            )
        split = splits[0]
        loaded = loaded[split]
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"hf:{spec} did not load as a table ({type(loaded).__name__}): pass a map-style dataset")
    rows = [dict(r) for r in loaded]
    where = f"hf:{dataset_name}" + (f":{split}" if split else "")
    examples = to_examples(rows, dict(columns or {}), where)
    if limit is not None:
        examples = examples[:limit]
    default = Path(dataset_name.rstrip("/")).name or dataset_name
    return PromptSet(name or default, where, tuple(examples))
