"""Deterministic tiny models for tests and docs: a byte-level tokenizer and random-weight models per family.

The tokenizer is built in code (no files, no network) so that unit tests run offline in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from ssah.errors import ModelError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML, the template SmolLM2 uses, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, 256 + 3 special tokens) with a ChatML chat template.

    Written by hand because every real tokenizer needs a file or the hub; this one is exact, reversible and
    supports offset mappings like any fast tokenizer.
    """
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


# Tiny random-weight models, one per supported family.

TINY_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma2",
    "gemma3",
    "phi3",
    "gpt2",
    "gpt_neox",
)
"""One tiny model per distinct layout, for tests to parametrize over (``gemma3`` is the text-only model)."""

TINY_EXTRA_FAMILIES: tuple[str, ...] = ("qwen3", "olmo", "olmo2", "olmo3", "smollm3", "gemma3_multimodal")
"""Families whose blocks repeat a layout above, and the multimodal Gemma 3 wrapper; for the adapter tests."""

ALL_TINY_FAMILIES: tuple[str, ...] = TINY_FAMILIES + TINY_EXTRA_FAMILIES

TINY_LAYERS = 2
TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_HEAD_DIM = 16
TINY_INTERMEDIATE = 128
TINY_MAX_POSITIONS = 512
# Larger than the usual 0.02 so that attention patterns and MLP activations of a 2-layer model are far from
# uniform / zero; tests that compare "changed" and "unchanged" outputs need visible effects.
TINY_INIT_RANGE = 0.1

# Config class names of the llama-like families (GQA, explicit head_dim).
_LLAMA_LIKE: dict[str, str] = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "olmo": "OlmoConfig",
    "olmo2": "Olmo2Config",
    "olmo3": "Olmo3Config",
    "smollm3": "SmolLM3Config",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "gemma3": "Gemma3TextConfig",
    "phi3": "Phi3Config",
}


_CONFIG_CLASSES: dict[str, str] = {**_LLAMA_LIKE, "gpt2": "GPT2Config", "gpt_neox": "GPTNeoXConfig"}

# The config keywords of (hidden, intermediate, layers, query heads, positions): GPT-2 has names of its own.
_SIZES = (TINY_HIDDEN, TINY_INTERMEDIATE, TINY_LAYERS, TINY_HEADS, TINY_MAX_POSITIONS)
_SIZE_KEYS: dict[str, tuple[str, ...]] = {
    "standard": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    ),
    "gpt2": ("n_embd", "n_inner", "n_layer", "n_head", "n_positions"),
}


def _special_ids() -> dict[str, int]:
    """Vocabulary size and bos/eos/pad ids of :func:`tiny_tokenizer`, as config keyword arguments."""
    tok = tiny_tokenizer()
    return {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


def tiny_config(family: str, *, tie_embeddings: bool | None = None) -> PretrainedConfig:
    """The config of a 2-layer tiny model of ``family`` (hidden 64, 4 query heads of size 16, 2 KV heads where
    the family has GQA, intermediate 128, the vocabulary of :func:`tiny_tokenizer`).

    Embedding tying is the family's default unless ``tie_embeddings`` says otherwise.
    """
    import transformers

    ids = _special_ids()
    common: dict[str, Any] = {"initializer_range": TINY_INIT_RANGE, **ids}
    if tie_embeddings is not None:
        common["tie_word_embeddings"] = tie_embeddings
    if family in _CONFIG_CLASSES:
        sizes = dict(zip(_SIZE_KEYS.get(family, _SIZE_KEYS["standard"]), _SIZES, strict=True))
        if family in _LLAMA_LIKE:  # grouped-query attention with an explicit head size
            sizes |= {"num_key_value_heads": TINY_KV_HEADS, "head_dim": TINY_HEAD_DIM}
        return getattr(transformers, _CONFIG_CLASSES[family])(**sizes, **common)
    if family == "gemma3_multimodal":
        vision = transformers.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        )
        text = tiny_config("gemma3", tie_embeddings=tie_embeddings)
        return transformers.Gemma3Config(
            text_config=text.to_dict(),
            vision_config=vision.to_dict(),
            mm_tokens_per_image=4,
            initializer_range=TINY_INIT_RANGE,
            **{k: v for k, v in common.items() if k not in ("vocab_size", "initializer_range")},
        )
    raise ModelError(f"No tiny model for family {family!r}; choose one of: {', '.join(ALL_TINY_FAMILIES)}")


def build_tiny_model(
    family: str, seed: int = 0, *, tie_embeddings: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random-weight tiny model of ``family`` (float32, eval mode) and :func:`tiny_tokenizer`; embeddings tied
    as the family does by default unless ``tie_embeddings`` says otherwise.

    The same ``seed`` gives bit-identical weights; the global RNG state is left as it was.
    """
    import transformers

    config = tiny_config(family, tie_embeddings=tie_embeddings)
    cls_name = "Gemma3ForConditionalGeneration" if family == "gemma3_multimodal" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cls_name is None:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = getattr(transformers, cls_name)(config)
    model = model.to(torch.float32).eval()
    tok = tiny_tokenizer()
    gen = model.generation_config
    gen.bos_token_id = tok.bos_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    return model, tok
