"""Data: prompt-set loaders (CSV / JSON / JSONL / built-in sets) and chat formatting with exact token regions."""

from ssah.data.chat import (
    FALLBACK_TEMPLATE,
    Encoded,
    TokenRegion,
    batches,
    collate,
    encode_example,
    encode_set,
    format_chat,
)
from ssah.data.loaders import load_prompts
from ssah.data.presets import PRESETS, load_preset
from ssah.data.prompt_sets import BUILTIN_SETS, Example, PromptSet, builtin_path, parse_column_mapping

__all__ = [
    "BUILTIN_SETS",
    "FALLBACK_TEMPLATE",
    "PRESETS",
    "Encoded",
    "Example",
    "PromptSet",
    "TokenRegion",
    "batches",
    "builtin_path",
    "collate",
    "encode_example",
    "encode_set",
    "format_chat",
    "load_preset",
    "load_prompts",
    "parse_column_mapping",
]
