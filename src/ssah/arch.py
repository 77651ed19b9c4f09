"""Per-family architecture adapters for the whole model: token embeddings, decoder blocks, the weights each unit
reads and writes, the final norm and the unembedding (output head).

A *unit* is one input channel of an attention output projection (``o_proj``) or of an MLP down-projection
(``down_proj``). Its *reader* is the slice of that projection's weight that consumes the channel (a column of
an ``nn.Linear`` weight, a row of a GPT-2 ``Conv1D`` weight); its *writers* are the slices of the weights and
biases that produce the channel (``v_proj`` rows, ``gate_proj``/``up_proj`` rows, or slices of fused
projections).

Families differ only in module names and in how fused projections are laid out, so one adapter class reads a
small table of per-family layouts instead of one class per family. Head size and GQA grouping always come from
the model's config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, cast

import torch
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ssah import arch_moe
from ssah.errors import ModelError, UnsupportedModelError
from ssah.unit_groups import ALL_KINDS, EXPERT_KINDS, KINDS, Kind, ParamSlice, UnitGroup, group_key

__all__ = [
    "ALL_KINDS",
    "EXPERT_KINDS",
    "KINDS",
    "SUPPORTED_FAMILIES",
    "ArchAdapter",
    "Kind",
    "ParamSlice",
    "Part",
    "UnitGroup",
    "get_adapter",
    "group_key",
]

Part = Literal["embeddings", "final_norm", "unembedding"]


@dataclass(frozen=True)
class _Geometry:
    """Attention shape of one model, read from its (text) config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    def v_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """Row of the value projection that produces each attention output channel (GQA-aware)."""
        head, offset = channels // self.head_dim, channels % self.head_dim
        kv_head = head // (self.num_heads // self.num_kv_heads)
        return kv_head * self.head_dim + offset


# How the output features of a writer module map to unit channels: (channels, geometry, group size) -> rows.
_WriterMap = Callable[[torch.Tensor, _Geometry, int], torch.Tensor]

_WRITER_MAPS: dict[str, _WriterMap] = {
    # one output feature per channel (gate_proj, up_proj, c_fc, dense_h_to_4h)
    "same": lambda c, g, n: c.clone(),
    # second half of a fused [gate | up] projection (phi3 gate_up_proj)
    "second_half": lambda c, g, n: c + n,
    # separate value projection, shared by the query heads of one KV group
    "v": lambda c, g, n: g.v_rows(c),
    # fused [q | k | v] projection (phi3 qkv_proj, gpt2 c_attn)
    "qkv_v": lambda c, g, n: (g.num_heads + g.num_kv_heads) * g.head_dim + g.v_rows(c),
    # fused per-head interleaved [head, (q, k, v), head_dim] projection (gpt_neox query_key_value)
    "qkv_interleaved_v": lambda c, g, n: (c // g.head_dim) * 3 * g.head_dim + 2 * g.head_dim + c % g.head_dim,
}


class _Slices(NamedTuple):
    """One unit kind's modules, relative to a decoder block: the reader, and each writer with its map."""

    reader: str
    writers: tuple[tuple[str, str], ...]  # (module, key of _WRITER_MAPS)


@dataclass(frozen=True)
class _Layout:
    """Module names of one family and the writer maps of fused projections.

    ``base`` names the token embeddings and the final norm, relative to the module that holds the blocks (the base
    model); the unembedding candidates are relative to the model itself (a bare base model has none).
    """

    blocks: tuple[str, ...]  # candidate paths of the ModuleList of decoder blocks, tried in order
    base: tuple[str, str]  # (token embeddings, final norm)
    attn: _Slices
    mlp: _Slices
    unembedding: tuple[str, ...] = ("lm_head",)
    # mixture-of-experts and hybrid families: candidate names of each block's MLP-like module (dense MLP or MoE
    # block, found by structure in ssah.arch_moe); blocks without attention are reported, not an error
    ffn: tuple[str, ...] = ()


# CausalLM wrappers first, then bare base models; multimodal Gemma 3 keeps its text model in language_model.
_DECODER_BLOCKS = ("model.layers", "model.language_model.layers", "layers", "language_model.layers")

_LLAMA = _Layout(
    blocks=_DECODER_BLOCKS,
    base=("embed_tokens", "norm"),
    attn=_Slices("self_attn.o_proj", (("self_attn.v_proj", "v"),)),
    mlp=_Slices("mlp.down_proj", (("mlp.gate_proj", "same"), ("mlp.up_proj", "same"))),
)
# Phi-3: the Llama layout with fused projections ([q | k | v] and [gate | up]).
_PHI3 = replace(
    _LLAMA,
    attn=_Slices("self_attn.o_proj", (("self_attn.qkv_proj", "qkv_v"),)),
    mlp=_Slices("mlp.down_proj", (("mlp.gate_up_proj", "same"), ("mlp.gate_up_proj", "second_half"))),
)
_GPT2 = _Layout(
    blocks=("transformer.h", "h"),
    base=("wte", "ln_f"),
    attn=_Slices("attn.c_proj", (("attn.c_attn", "qkv_v"),)),
    mlp=_Slices("mlp.c_proj", (("mlp.c_fc", "same"),)),
)
_GPT_NEOX = _Layout(
    blocks=("gpt_neox.layers", "layers"),
    base=("embed_in", "final_layer_norm"),
    attn=_Slices("attention.dense", (("attention.query_key_value", "qkv_interleaved_v"),)),
    mlp=_Slices("mlp.dense_4h_to_h", (("mlp.dense_h_to_4h", "same"),)),
    unembedding=("lm_head", "embed_out"),  # embed_out in transformers before 5
)

# Mixture-of-experts and hybrid families: Llama attention, the MLP-like module found by structure.
_MOE = replace(_LLAMA, ffn=("mlp", "block_sparse_moe", "feed_forward"))
_LFM2 = replace(_MOE, attn=_Slices("self_attn.out_proj", (("self_attn.v_proj", "v"),)), ffn=("feed_forward",))
MOE_FAMILIES: tuple[str, ...] = (
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "olmoe",
    "gpt_oss",
    "granitemoe",
    "granitemoeshared",
    "phimoe",
    "glm4_moe",
    "flex_olmo",
)
HYBRID_FAMILIES: tuple[str, ...] = ("jamba", "qwen3_next", "granitemoehybrid")

_LAYOUTS: dict[str, _Layout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "olmo": _LLAMA,
    "olmo2": _LLAMA,
    "olmo3": _LLAMA,
    "smollm3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "gemma3": _LLAMA,
    "phi3": _PHI3,
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    **dict.fromkeys(MOE_FAMILIES + HYBRID_FAMILIES, _MOE),
    "lfm2": _LFM2,
}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_LAYOUTS)


def _model_type(model: torch.nn.Module) -> str | None:
    """``model.config.model_type``, or None when the model has no config."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


class ArchAdapter:
    """One model's parts: token embeddings, decoder blocks (per block the reader and writer slices of each unit
    group), final norm and unembedding; the one place that knows module names.

    Build it with :func:`get_adapter` (or directly); the groups are computed once, on first use.
    """

    family: str

    def __init__(self, model: torch.nn.Module) -> None:
        family = _model_type(model)
        if family not in _LAYOUTS:
            raise UnsupportedModelError(
                f"Unsupported model_type {family!r} ({type(model).__name__}); "
                f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
            )
        self.model = model
        self.family = family
        self._layout = _LAYOUTS[family]
        self.blocks_path = self._find_blocks()
        self._groups: list[UnitGroup] | None = None
        self._by_key: dict[str, UnitGroup] = {}
        self._uncovered: list[str] = []

    # -- structure

    @property
    def config(self) -> PretrainedConfig:
        """The config of the text model (``text_config`` of multimodal wrappers, else the model's config)."""
        config: Any = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    def _find_blocks(self) -> str:
        """Name of the ModuleList of decoder blocks: the first candidate path of the layout that exists."""
        for path in self._layout.blocks:
            try:
                blocks = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
                return path
        raise ModelError(
            f"Cannot find the decoder blocks of this {self.family} model ({type(self.model).__name__}); "
            f"looked for: {', '.join(self._layout.blocks)}"
        )

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(cast(torch.nn.ModuleList, self.module(self.blocks_path)))

    def block(self, layer: int) -> torch.nn.Module:
        """The decoder block ``layer``."""
        return self.module(f"{self.blocks_path}.{layer}")

    def module(self, name: str) -> torch.nn.Module:
        """The submodule ``name`` (as in ``model.named_modules()``)."""
        return self.model.get_submodule(name)

    def parameter(self, name: str) -> torch.nn.Parameter:
        """The parameter ``name`` (as in ``model.named_parameters()``)."""
        return self.model.get_parameter(name)

    # -- whole model: embeddings, final norm, unembedding

    def part_path(self, part: Part) -> str | None:
        """Module name of ``part``: ``embeddings`` and ``final_norm`` live beside the decoder blocks (in the base
        model), ``unembedding`` (the output head) on the model itself; None where the model has no such module
        (a bare base model has no unembedding)."""
        base = self.blocks_path.rpartition(".")[0]
        if part == "unembedding":
            candidates = self._layout.unembedding
        else:
            name = self._layout.base[0 if part == "embeddings" else 1]
            candidates = (f"{base}.{name}" if base else name,)
        for path in candidates:
            try:
                module = self.module(path)
            except AttributeError:
                continue
            if part != "unembedding" or getattr(module, "weight", None) is not None:
                return path
        return None

    def part(self, part: Part) -> torch.nn.Module:
        """The module of ``part`` (see :meth:`part_path`), or a one-line :class:`~ssah.errors.ModelError`."""
        path = self.part_path(part)
        if path is None:
            hint = ": load it as a causal LM" if part == "unembedding" else ""
            raise ModelError(
                f"This {self.family} model ({type(self.model).__name__}) has no {part.replace('_', ' ')} module{hint}"
            )
        return self.module(path)

    @property
    def embeddings(self) -> torch.nn.Module:
        """The token embedding module (an ``nn.Embedding`` or a scaled subclass, as in Gemma)."""
        return self.part("embeddings")

    @property
    def final_norm(self) -> torch.nn.Module:
        """The normalisation applied after the last block, before the unembedding."""
        return self.part("final_norm")

    @property
    def unembedding(self) -> torch.nn.Module:
        """The output head (hidden state -> vocabulary logits)."""
        return self.part("unembedding")

    @property
    def logit_softcap(self) -> float | None:
        """The cap the model puts on its logits after the unembedding (``cap * tanh(logits / cap)``, as Gemma 2
        does), or None when it applies none."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @property
    def tied_embeddings(self) -> bool:
        """Whether the unembedding is the embedding matrix itself (one Parameter: editing one edits both)."""
        if self.part_path("unembedding") is None:
            return False
        head: Any = self.unembedding
        emb: Any = self.embeddings
        return bool(head.weight is emb.weight)

    def _geometry(self) -> _Geometry:
        """Query heads, KV heads and head size from the config (``head_dim`` if set, else hidden / heads)."""
        cfg = self.config
        num_heads = int(cfg.num_attention_heads)
        num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
        if num_heads % num_kv_heads:
            raise ModelError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} key/value heads")
        return _Geometry(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    # -- unit groups

    def groups(self) -> list[UnitGroup]:
        """All unit groups, ordered by layer; within a layer attention, then the MLP (dense ``mlp``, or a
        mixture-of-experts block's ``shared_expert`` and then one ``expert`` group per routed expert)."""
        if self._groups is None:
            geometry = self._geometry()
            groups: list[UnitGroup] = []
            self._uncovered = []
            for layer in range(self.num_layers):
                if self._layout.ffn:
                    groups += self._structural_groups(layer, geometry)
                else:
                    groups += [self._build_group(layer, kind, geometry) for kind in KINDS]
            self._groups = groups
            self._by_key = {g.key: g for g in groups}
        return list(self._groups)

    @property
    def uncovered(self) -> list[str]:
        """Parts of blocks that hold no units, one line each (``layers.0.attn: mamba (JambaMambaMixer)``): sequence
        mixers that are neither attention nor MLP in hybrid models. Empty for every dense and MoE family."""
        self.groups()
        return list(self._uncovered)

    @property
    def is_moe(self) -> bool:
        """Whether any block routes tokens to experts."""
        return any(g.kind == "expert" for g in self.groups())

    def group(self, layer: int, kind: Kind, expert: int | None = None) -> UnitGroup:
        """The group of ``kind`` units in block ``layer`` (of routed expert ``expert`` for kind ``expert``)."""
        self.groups()
        found = self._by_key.get(group_key(layer, kind, expert))
        if found is None:
            raise KeyError(
                f"No unit group ({layer}, {kind!r}{'' if expert is None else f', expert {expert}'}): "
                f"layers 0..{self.num_layers - 1}, kinds {ALL_KINDS}"
            )
        return found

    def reader_weight(self, group: UnitGroup) -> torch.Tensor:
        """The reader weight of ``group`` (unit i owns ``.select(group.reader.dim, i)``): the Parameter, or for
        fused experts the view ``down_proj[expert]`` of the expert's 2D slice."""
        weight = self.parameter(group.reader.name)
        return weight[group.reader.expert] if group.reader.expert is not None else weight

    def _structural_groups(self, layer: int, geometry: _Geometry) -> list[UnitGroup]:
        """Groups of one block of a mixture-of-experts or hybrid family; missing attention is recorded."""
        prefix = f"{self.blocks_path}.{layer}"
        groups: list[UnitGroup] = []
        try:
            self.module(f"{prefix}.{self._layout.attn.reader}")
        except AttributeError:
            self._uncovered.append(f"{group_key(layer, 'attn')}: {arch_moe.mixer_description(self.model, prefix)}")
        else:
            groups.append(self._build_group(layer, "attn", geometry))
        for name in self._layout.ffn:
            ffn = f"{prefix}.{name}"
            try:
                self.module(ffn)
            except AttributeError:
                continue
            if arch_moe.is_moe(self.model, ffn):
                return groups + arch_moe.moe_groups(self.model, ffn, layer)
            dense = arch_moe.mlp_group(self.model, ffn, layer, "mlp")
            if dense is not None:
                return [*groups, dense]
        self._uncovered.append(f"{group_key(layer, 'mlp')}: no MLP module ssah knows")
        return groups

    def reader_column_norms(self, group: UnitGroup) -> torch.Tensor:
        """L2 norm of each unit's reader slice, float64 ``[group.size]``."""
        from accelerate.utils import align_module_device

        # a reader offloaded by accelerate (CPU / disk) holds meta tensors: load it for the read
        with align_module_device(self.module(group.reader_module)):
            weight = self.reader_weight(group).detach()
            per_unit = weight.movedim(group.reader.dim, 0).reshape(weight.shape[group.reader.dim], -1)
            return per_unit.double().norm(dim=1)[group.reader.index.to(weight.device)].cpu()

    def _build_group(self, layer: int, kind: Kind, geometry: _Geometry) -> UnitGroup:
        """Reader and writer slices of one group, checked against the parameter shapes."""
        prefix = f"{self.blocks_path}.{layer}"
        reader_rel, writer_specs = self._layout.attn if kind == "attn" else self._layout.mlp
        reader_name = f"{prefix}.{reader_rel}"
        reader_mod: Any = self.module(reader_name)
        # nn.Linear weight is [out, in]: a unit is a column; Conv1D weight is [in, out]: a unit is a row.
        reader_dim = 0 if isinstance(reader_mod, Conv1D) else 1
        size = int(reader_mod.weight.shape[reader_dim])
        channels = torch.arange(size, dtype=torch.int64)
        if kind == "attn" and size != geometry.num_heads * geometry.head_dim:
            raise ModelError(
                f"{reader_name} reads {size} channels but the config says {geometry.num_heads} heads "
                f"x {geometry.head_dim}"
            )

        writers: list[ParamSlice] = []
        for rel, map_key in writer_specs:
            mod_name = f"{prefix}.{rel}"
            mod: Any = self.module(mod_name)
            index = _WRITER_MAPS[map_key](channels, geometry, size).to(torch.int64)
            out_dim = 1 if isinstance(mod, Conv1D) else 0
            n_out = int(mod.weight.shape[out_dim])
            if int(index.max()) >= n_out:
                raise ModelError(f"{mod_name} has {n_out} output features, too few for {size} {kind} units")
            writers.append(ParamSlice(f"{mod_name}.weight", out_dim, index))
            if getattr(mod, "bias", None) is not None:
                writers.append(ParamSlice(f"{mod_name}.bias", 0, index))

        attn = kind == "attn"
        return UnitGroup(
            layer=layer,
            kind=kind,
            size=size,
            reader_module=reader_name,
            reader=ParamSlice(f"{reader_name}.weight", reader_dim, channels),
            writers=tuple(writers),
            head_dim=geometry.head_dim if attn else None,
            num_heads=geometry.num_heads if attn else None,
            num_kv_heads=geometry.num_kv_heads if attn else None,
        )


def get_adapter(model: torch.nn.Module) -> ArchAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises :class:`~ssah.errors.UnsupportedModelError` (one line, naming the supported families) otherwise.
    """
    return ArchAdapter(model)
