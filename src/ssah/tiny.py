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

TINY_EXPERTS = 4
TINY_TOP_K = 2
TINY_EXPERT_INTERMEDIATE = 32
TINY_SHARED_INTERMEDIATE = 48
_MOE_SIZES: dict[str, Any] = {"num_experts_per_tok": TINY_TOP_K, "moe_intermediate_size": TINY_EXPERT_INTERMEDIATE}
_LOCAL = {"num_local_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_TOP_K}
# DeepSeek-style routing: one group, the first block dense (as the real models are), one shared expert.
_DEEPSEEK_LIKE = {
    **_MOE_SIZES,
    "n_routed_experts": TINY_EXPERTS,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}

# Mixture-of-experts families (fused 3D experts in transformers 5): config class and the keywords of 4 experts,
# top-2 routing, small experts and (where the family has one) a shared expert.
_MOE_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", {**_MOE_SIZES, "num_experts": TINY_EXPERTS}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {**_MOE_SIZES, "num_experts": TINY_EXPERTS, "shared_expert_intermediate_size": TINY_SHARED_INTERMEDIATE},
    ),
    "mixtral": ("MixtralConfig", {**_LOCAL, "intermediate_size": TINY_EXPERT_INTERMEDIATE}),
    "olmoe": ("OlmoeConfig", {"num_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_TOP_K}),
    "gpt_oss": ("GptOssConfig", {**_LOCAL, "intermediate_size": TINY_EXPERT_INTERMEDIATE}),
    "granitemoe": ("GraniteMoeConfig", {**_LOCAL, "intermediate_size": TINY_EXPERT_INTERMEDIATE}),
    "granitemoeshared": (
        "GraniteMoeSharedConfig",
        {**_LOCAL, "intermediate_size": TINY_EXPERT_INTERMEDIATE, "shared_intermediate_size": TINY_SHARED_INTERMEDIATE},
    ),
    "phimoe": ("PhimoeConfig", {**_LOCAL, "intermediate_size": TINY_EXPERT_INTERMEDIATE}),
    "glm4_moe": ("Glm4MoeConfig", _DEEPSEEK_LIKE),
    "flex_olmo": ("FlexOlmoConfig", {"num_experts": TINY_EXPERTS, "num_experts_per_tok": TINY_TOP_K}),
}
# Hybrid families: blocks whose sequence mixer is neither attention nor MLP (state-space, linear attention).
_HYBRID_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "jamba": (
        "JambaConfig",
        {
            "num_experts": TINY_EXPERTS,
            "num_experts_per_tok": TINY_TOP_K,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
        },
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {
            **_MOE_SIZES,
            "num_experts": TINY_EXPERTS,
            "shared_expert_intermediate_size": TINY_SHARED_INTERMEDIATE,
            "layer_types": ["linear_attention", "full_attention"],
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
        },
    ),
}
_HYBRID_CONFIGS["granitemoehybrid"] = (
    "GraniteMoeHybridConfig",
    {
        **_LOCAL,
        "intermediate_size": TINY_EXPERT_INTERMEDIATE,
        "shared_intermediate_size": TINY_SHARED_INTERMEDIATE,
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_n_groups": 1,
        "mamba_d_state": 16,
    },
)
_HYBRID_CONFIGS["lfm2"] = (
    "Lfm2Config",
    {"layer_types": ["conv", "full_attention"], "block_auto_adjust_ff_dim": False},
)
TINY_MOE_FAMILIES: tuple[str, ...] = tuple(_MOE_CONFIGS)
"""Mixture-of-experts families with a tiny model (fused experts; ``moe_modulelist`` is the per-module layout)."""
TINY_HYBRID_FAMILIES: tuple[str, ...] = tuple(_HYBRID_CONFIGS)
"""Hybrid families with a tiny model: some blocks hold a sequence mixer that is neither attention nor MLP."""
MODULE_LIST_FAMILY = "moe_modulelist"

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
    if family in _MOE_CONFIGS or family in _HYBRID_CONFIGS:
        cls_name, extra = {**_MOE_CONFIGS, **_HYBRID_CONFIGS}[family]
        sizes = dict(zip(_SIZE_KEYS["standard"], _SIZES, strict=True))
        sizes |= {"num_key_value_heads": TINY_KV_HEADS, "head_dim": TINY_HEAD_DIM}
        return getattr(transformers, cls_name)(**{**sizes, **extra}, **common)
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
    known = ALL_TINY_FAMILIES + TINY_MOE_FAMILIES + TINY_HYBRID_FAMILIES + (MODULE_LIST_FAMILY,)
    raise ModelError(f"No tiny model for family {family!r}; choose one of: {', '.join(known)}")


def build_tiny_model(
    family: str, seed: int = 0, *, tie_embeddings: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A random-weight tiny model of ``family`` (float32, eval mode) and :func:`tiny_tokenizer`; embeddings tied
    as the family does by default unless ``tie_embeddings`` says otherwise.

    The same ``seed`` gives bit-identical weights; the global RNG state is left as it was.
    """
    import transformers

    if family == MODULE_LIST_FAMILY:
        from ssah.tiny_moe import module_list_model

        model, tok = build_tiny_model("qwen3_moe", seed, tie_embeddings=tie_embeddings)
        return module_list_model(model), tok
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
