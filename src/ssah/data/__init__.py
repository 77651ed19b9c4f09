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
from ssah.data.loaders import (
    BUILTIN_SETS,
    Example,
    PromptSet,
    builtin_path,
    load_prompts,
    parse_column_mapping,
)
from ssah.data.presets import PRESETS, load_preset

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
