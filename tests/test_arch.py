"""Architecture adapters on tiny random models of every family: unit counts, GQA grouping, and that the reader
and writer slices each adapter names really are the weights that consume / produce each unit's channel."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from ssah.arch import KINDS, SUPPORTED_FAMILIES, ArchAdapter, UnitGroup, get_adapter
from ssah.errors import ModelError, UnsupportedModelError
from ssah.tiny import (
    ALL_TINY_FAMILIES,
    TINY_FAMILIES,
    TINY_HEAD_DIM,
    TINY_HEADS,
    TINY_INTERMEDIATE,
    TINY_KV_HEADS,
    TINY_LAYERS,
    build_tiny_model,
    tiny_tokenizer,
)

# Two prompts of the same byte length, so no padding is needed.
PROMPTS = ["Hello, tiny world! 1234", "Safety first, always!!!"]

# Independent statement of each family's writer layout: (writer module suffix, row offset of channel c).
# H query heads, KV key/value heads, D head size; c = head * D + d.
H, KV, D = TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM


def _v_row(c: int, kv: int = KV) -> int:
    return (c // D) // (H // kv) * D + c % D


_ATTN_WRITERS: dict[str, tuple[str, Callable[[int], int]]] = {
    "llama_like": ("self_attn.v_proj", _v_row),
    "phi3": ("self_attn.qkv_proj", lambda c: H * D + KV * D + _v_row(c)),
    "gpt2": ("attn.c_attn", lambda c: 2 * H * D + c),
    "gpt_neox": ("attention.query_key_value", lambda c: (c // D) * 3 * D + 2 * D + c % D),
}
_MLP_WRITERS: dict[str, tuple[tuple[str, Callable[[int], int]], ...]] = {
    "llama_like": (("mlp.gate_proj", lambda c: c), ("mlp.up_proj", lambda c: c)),
    "phi3": (("mlp.gate_up_proj", lambda c: c), ("mlp.gate_up_proj", lambda c: TINY_INTERMEDIATE + c)),
    "gpt2": (("mlp.c_fc", lambda c: c),),
    "gpt_neox": (("mlp.dense_h_to_4h", lambda c: c),),
}
_READERS = {
    "llama_like": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}
_BLOCKS = {
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "gemma3_multimodal": "model.language_model.layers",
}


def _layout(family: str) -> str:
    return family if family in ("phi3", "gpt2", "gpt_neox") else "llama_like"


def _has_gqa(family: str) -> bool:
    return family not in ("gpt2", "gpt_neox")


class Tiny(SimpleNamespace):
    family: str
    model: torch.nn.Module
    adapter: ArchAdapter
    input_ids: torch.Tensor


@pytest.fixture(scope="module", params=ALL_TINY_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> Tiny:
    model, tok = build_tiny_model(request.param)
    ids = tok(PROMPTS, return_tensors="pt")["input_ids"]
    assert ids.shape == (2, len(PROMPTS[0]))
    return Tiny(family=request.param, model=model, adapter=get_adapter(model), input_ids=ids)


def _logits(t: Tiny) -> torch.Tensor:
    with torch.no_grad():
        return t.model(input_ids=t.input_ids).logits


@contextmanager
def _restored(adapter: ArchAdapter, names: set[str]) -> Iterator[None]:
    """Clone the named parameters and copy them back afterwards."""
    saved = {n: adapter.parameter(n).detach().clone() for n in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                adapter.parameter(n).copy_(v)


@contextmanager
def _capture_input(module: torch.nn.Module, store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Store a copy of the module's input as ``store["x"]`` on every forward."""
    handle = module.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach().clone()))
    try:
        yield
    finally:
        handle.remove()


def _units(group: UnitGroup) -> list[int]:
    return [0, group.size // 2 + 3, group.size - 1]


# 1. Structure


def test_groups_and_counts(tiny: Tiny) -> None:
    a, cfg = tiny.adapter, tiny.adapter.config
    assert a.num_layers == TINY_LAYERS
    groups = a.groups()
    assert len(groups) == 2 * TINY_LAYERS
    assert [g.key for g in groups] == [f"layers.{i}.{k}" for i in range(TINY_LAYERS) for k in KINDS]
    assert [(g.layer, g.kind) for g in groups] == [(i, k) for i in range(TINY_LAYERS) for k in KINDS]
    assert a.groups()[0] is groups[0]  # computed once
    for g in groups:
        assert a.group(g.layer, g.kind) is g
        if g.kind == "attn":
            assert g.size == cfg.num_attention_heads * g.head_dim == TINY_HEADS * TINY_HEAD_DIM
            assert g.num_heads == cfg.num_attention_heads == TINY_HEADS
            assert g.head_dim == TINY_HEAD_DIM
            assert g.num_kv_heads == (TINY_KV_HEADS if _has_gqa(tiny.family) else TINY_HEADS)
        else:
            assert g.size == TINY_INTERMEDIATE
            assert g.head_dim is g.num_heads is g.num_kv_heads is None
    with pytest.raises(KeyError):
        a.group(TINY_LAYERS, "attn")
    with pytest.raises(KeyError):
        a.group(0, "ffn")  # type: ignore[arg-type]


def test_reader_and_writer_names_follow_the_family_layout(tiny: Tiny) -> None:
    a, layout = tiny.adapter, _layout(tiny.family)
    params = dict(tiny.model.named_parameters())
    modules = dict(tiny.model.named_modules())
    blocks = _BLOCKS.get(tiny.family, "model.layers")
    for g in a.groups():
        prefix = f"{blocks}.{g.layer}."
        reader_rel = _READERS[layout][KINDS.index(g.kind)]
        assert g.reader_module == prefix + reader_rel
        assert g.reader_module in modules
        assert g.reader.name == g.reader_module + ".weight"
        assert a.reader_weight(g) is params[g.reader.name]
        assert g.reader.dim == (0 if tiny.family == "gpt2" else 1)
        assert params[g.reader.name].shape[g.reader.dim] == g.size
        assert torch.equal(g.reader.index, torch.arange(g.size))

        expected = (_ATTN_WRITERS[layout],) if g.kind == "attn" else _MLP_WRITERS[layout]
        weights = [w for w in g.writers if w.name.endswith(".weight")]
        biases = [w for w in g.writers if w.name.endswith(".bias")]
        assert len(weights) == len(expected)
        for w, (rel, row) in zip(weights, expected, strict=True):
            assert w.name == prefix + rel + ".weight"
            assert w.index.dtype == torch.int64 and w.index.device.type == "cpu"
            assert w.index.tolist() == [row(c) for c in range(g.size)]
            assert w.dim == (1 if tiny.family == "gpt2" else 0)
            bias = modules[prefix + rel].bias
            bias_name = prefix + rel + ".bias"
            matching = [b for b in biases if b.name == bias_name and torch.equal(b.index, w.index)]
            assert len(matching) == (0 if bias is None else 1)
        assert all(s.name in params for s in g.writers)


def _heads(g: UnitGroup) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of an attention group."""
    assert g.num_heads is not None and g.num_kv_heads is not None and g.head_dim is not None
    return g.num_heads, g.num_kv_heads, g.head_dim


def test_gqa_value_rows_are_shared_by_the_heads_of_one_group(tiny: Tiny) -> None:
    g = tiny.adapter.group(0, "attn")
    n_heads, n_kv, head_dim = _heads(g)
    rows = g.writers[0].index
    per_kv = n_heads // n_kv
    for c in range(g.size):
        head, d = divmod(c, head_dim)
        sharing = [h * head_dim + d for h in range(n_heads) if h // per_kv == head // per_kv]
        assert (rows == rows[c]).nonzero().flatten().tolist() == sharing
    assert len(set(rows.tolist())) == n_kv * head_dim


# 2. Readers


def test_zeroing_the_reader_slice_equals_zeroing_the_input_channel(tiny: Tiny) -> None:
    a = tiny.adapter
    base = _logits(tiny)
    for g in a.groups():
        reader = a.module(g.reader_module)
        for j in _units(g):
            with _restored(a, {g.reader.name}):
                with torch.no_grad():
                    a.reader_weight(g).select(g.reader.dim, int(g.reader.index[j])).zero_()
                by_weight = _logits(tiny)

            def zero_channel(module: torch.nn.Module, args: tuple, j: int = j) -> tuple:
                x = args[0].clone()
                x[..., j] = 0
                return (x, *args[1:])

            handle = reader.register_forward_pre_hook(zero_channel)
            try:
                by_hook = _logits(tiny)
            finally:
                handle.remove()
            torch.testing.assert_close(by_weight, by_hook, atol=1e-5, rtol=0)
            assert (by_weight - base).abs().max() > 1e-4, (g.key, j)
    torch.testing.assert_close(_logits(tiny), base, atol=0, rtol=0)  # weights restored


# 3. Writers


def _expected_zeroed(g: UnitGroup, j: int) -> list[int]:
    """Channels that share a writer slice with unit j: the same value row under GQA, else only j."""
    if g.kind == "mlp":
        return [j]
    n_heads, n_kv, head_dim = _heads(g)
    per_kv = n_heads // n_kv
    head, d = divmod(j, head_dim)
    return [h * head_dim + d for h in range(n_heads) if h // per_kv == head // per_kv]


def test_zeroing_the_writer_slices_silences_exactly_the_channel(tiny: Tiny) -> None:
    a = tiny.adapter
    base = _logits(tiny)
    for g in a.groups():
        reader = a.module(g.reader_module)
        before: dict[str, torch.Tensor] = {}
        with _capture_input(reader, before):
            _logits(tiny)
        for j in _units(g):
            after: dict[str, torch.Tensor] = {}
            with _restored(a, {s.name for s in g.writers}):
                with torch.no_grad():
                    for s in g.writers:
                        a.parameter(s.name).select(s.dim, int(s.index[j])).zero_()
                with _capture_input(reader, after):
                    _logits(tiny)
            zeroed = _expected_zeroed(g, j)
            others = [c for c in range(g.size) if c not in zeroed]
            if g.kind == "attn" and _has_gqa(tiny.family):
                n_heads, n_kv, _ = _heads(g)
                assert len(zeroed) == n_heads // n_kv > 1
            assert before["x"][..., j].abs().max() > 1e-3, (g.key, j)
            assert after["x"][..., zeroed].abs().max() < 1e-6, (g.key, j)
            torch.testing.assert_close(after["x"][..., others], before["x"][..., others], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(tiny), base, atol=0, rtol=0)  # weights restored


# 4. Reader norms


def test_reader_column_norms(tiny: Tiny) -> None:
    a = tiny.adapter
    for g in a.groups():
        w = a.reader_weight(g).detach()
        direct = torch.stack([w.select(g.reader.dim, j).double().pow(2).sum().sqrt() for j in range(g.size)])
        norms = a.reader_column_norms(g)
        assert norms.dtype == torch.float64 and norms.shape == (g.size,)
        torch.testing.assert_close(norms, direct, atol=1e-12, rtol=1e-12)


# Bare base models (no LM head) are located too.


def test_bare_base_model() -> None:
    model, _ = build_tiny_model("llama")
    full = get_adapter(model).group(1, "mlp")
    bare = get_adapter(model.model).group(1, "mlp")
    assert bare.reader_module == "layers.1.mlp.down_proj"
    assert [s.name for s in bare.writers] == [s.name.removeprefix("model.") for s in full.writers]
    assert get_adapter(model.model).reader_weight(bare) is get_adapter(model).reader_weight(full)


# 5. Unsupported models


class _Fake(torch.nn.Module):
    def __init__(self, model_type: str | None) -> None:
        super().__init__()
        if model_type is not None:
            self.config = SimpleNamespace(model_type=model_type)
        self.layer = torch.nn.Linear(2, 2)


def _bert() -> torch.nn.Module:
    return BertForMaskedLM(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )


@pytest.mark.parametrize(
    ("make", "model_type"),
    [(lambda: _Fake("foo"), "foo"), (lambda: _Fake(None), "None"), (_bert, "bert")],
    ids=["fake", "no-config", "bert"],
)
def test_unsupported_model_raises_one_line_listing_families(make: Callable, model_type: str) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        get_adapter(make())
    message = str(info.value)
    assert "\n" not in message
    assert model_type in message
    assert all(f in message for f in SUPPORTED_FAMILIES)
    assert isinstance(info.value, ModelError)


def test_supported_families() -> None:
    expected = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "gemma3_text"}
    assert expected | {"gemma3", "phi3", "gpt2", "gpt_neox"} <= set(SUPPORTED_FAMILIES)
    from ssah.tiny import TINY_HYBRID_FAMILIES, TINY_MOE_FAMILIES

    families = ALL_TINY_FAMILIES + TINY_MOE_FAMILIES + TINY_HYBRID_FAMILIES
    built = {get_adapter(build_tiny_model(f)[0]).family for f in families}
    assert built == set(SUPPORTED_FAMILIES)  # every supported family has a tiny model under test


def test_supported_family_without_blocks_raises_model_error() -> None:
    with pytest.raises(ModelError, match="decoder blocks"):
        get_adapter(_Fake("llama"))


# 6. Tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_tiny_model_is_deterministic(family: str) -> None:
    rng = torch.get_rng_state()
    m1, tok = build_tiny_model(family, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # global RNG untouched
    m2, _ = build_tiny_model(family, seed=3)
    m3, _ = build_tiny_model(family, seed=4)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)
    assert not m1.training
    assert all(p.dtype == torch.float32 for p in m1.parameters())
    cfg = m1.config
    assert cfg.num_hidden_layers == TINY_LAYERS
    assert cfg.vocab_size == len(tok) == len(tiny_tokenizer())
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )


def test_unknown_tiny_family_raises_model_error() -> None:
    with pytest.raises(ModelError) as info:
        build_tiny_model("bert")
    assert all(f in str(info.value) for f in TINY_FAMILIES)


# 7. The whole model: embeddings, final norm, unembedding

# Families whose tiny model ties the output head to the embeddings by default (an independent statement).
_TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gpt2", "smollm3", "gemma3_multimodal"}
_EMBEDDINGS = {"gpt2": "transformer.wte", "gpt_neox": "gpt_neox.embed_in"}
# gpt2 adds position embeddings, Gemma (1, 2) scales the token embeddings in the base model's forward
_EMBEDDINGS_TRANSFORMED = {"gpt2", "gemma", "gemma2"}
_FINAL_NORMS = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def _first(args: object, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states a block reads or returns (positional, keyword, or the first of a tuple)."""
    if isinstance(args, torch.Tensor):
        return args
    return args[0] if args else kwargs["hidden_states"]  # type: ignore[index,return-value]


def test_whole_model_parts_are_the_ones_transformers_uses(tiny: Tiny) -> None:
    a, model = tiny.adapter, tiny.model
    assert a.embeddings is model.get_input_embeddings()
    assert a.unembedding is model.get_output_embeddings()
    prefix = "model.language_model" if tiny.family == "gemma3_multimodal" else "model"
    assert a.part_path("embeddings") == _EMBEDDINGS.get(tiny.family, f"{prefix}.embed_tokens")
    assert a.part_path("final_norm") == _FINAL_NORMS.get(tiny.family, f"{prefix}.norm")
    assert a.part_path("unembedding") == "lm_head"
    assert a.part("final_norm") is a.final_norm
    assert a.tied_embeddings is (tiny.family in _TIED_BY_DEFAULT)


def test_final_norm_runs_once_after_the_last_block_and_feeds_the_unembedding(tiny: Tiny) -> None:
    a = tiny.adapter
    seen: dict[str, list[torch.Tensor]] = {"emb": [], "block0": [], "last": [], "norm_in": [], "norm": [], "head": []}
    hooks = [
        a.embeddings.register_forward_hook(lambda m, i, o: seen["emb"].append(o)),
        a.block(0).register_forward_pre_hook(
            lambda m, args, kw: seen["block0"].append(_first(args, kw)), with_kwargs=True
        ),
        a.block(a.num_layers - 1).register_forward_hook(lambda m, i, o: seen["last"].append(_first(o, {}))),
        a.final_norm.register_forward_hook(lambda m, i, o: seen["norm_in"].append(i[0])),
        a.final_norm.register_forward_hook(lambda m, i, o: seen["norm"].append(o)),
        a.unembedding.register_forward_pre_hook(lambda m, i: seen["head"].append(i[0])),
    ]
    try:
        logits = _logits(tiny)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen["norm"]) == 1 and len(seen["head"]) == 1 and len(seen["emb"]) == 1
    torch.testing.assert_close(seen["norm_in"][0], seen["last"][0])  # it normalises the last block's output
    torch.testing.assert_close(seen["head"][0], seen["norm"][0])  # and its output is what the head reads
    if tiny.family not in _EMBEDDINGS_TRANSFORMED:
        torch.testing.assert_close(seen["block0"][0], seen["emb"][0])  # the embeddings are what block 0 reads
    head = a.unembedding(seen["norm"][0])
    cap = a.logit_softcap
    assert (cap is not None) == (tiny.family == "gemma2")  # the one tiny family that soft-caps its logits
    if cap:
        head = torch.tanh(head / cap) * cap
    torch.testing.assert_close(head, logits)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "phi3"])
def test_tied_embedding_model_shares_one_matrix(family: str) -> None:
    model, _ = build_tiny_model(family, tie_embeddings=True)
    a = get_adapter(model)
    assert a.tied_embeddings
    assert a.unembedding.weight is a.embeddings.weight  # type: ignore[union-attr]
    with torch.no_grad():
        a.embeddings.weight[5].zero_()  # type: ignore[index,union-attr]
    assert torch.count_nonzero(a.unembedding.weight[5]) == 0  # type: ignore[index,union-attr]
    untied, _ = build_tiny_model("gemma", tie_embeddings=False)
    assert not get_adapter(untied).tied_embeddings


def test_bare_base_model_has_embeddings_and_norm_but_no_unembedding() -> None:
    model, _ = build_tiny_model("llama")
    bare = get_adapter(model.model)
    assert bare.embeddings is model.model.embed_tokens
    assert bare.final_norm is model.model.norm
    assert bare.part_path("unembedding") is None and not bare.tied_embeddings
    with pytest.raises(ModelError) as info:
        _ = bare.unembedding
    assert "\n" not in str(info.value) and "no unembedding module" in str(info.value)


def test_unsupported_model_has_no_whole_model_parts_to_guess() -> None:
    with pytest.raises(UnsupportedModelError, match="supported families"):
        _ = get_adapter(_bert()).final_norm
