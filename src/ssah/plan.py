"""Memory plan of a model from its config alone: what each ssah command needs, before a long run starts.

The model is built on the meta device (shapes, no memory, no weights read), its parameters are counted exactly,
and the memory of every command is estimated per dtype from those counts and the config's shapes:

- **weights**: parameters (tied ones once) x bytes of the dtype;
- **statistics**: the streaming per-channel statistics of ``ssah units`` (count, mean, M2, sum |x| in float64 for
  every unit, for the safety and the utility set);
- **gradients / optimizer**: AdamW keeps two moments per trained entry in the parameter's dtype, plus one gradient;
  ``frozen`` adds the masks and saved values of the frozen slices, ``only`` trains deltas of the chosen units'
  slices, ``lora`` trains rank-r adapters (peft's default targets);
- **activations per batch row**: an estimate of the tensors alive at the peak for one example of ``seq_len``
  tokens (forward temporaries of one block and the float64 copies the statistics hooks make; the KV cache and the
  last-token logits for generation; the tensors saved for backward by every block and the float32 logits for
  training). Attention is taken to run in a fused kernel (PyTorch SDPA: flash / memory-efficient), so no
  ``seq_len x seq_len`` score matrix is counted.

Parameter counts are exact; activation figures are estimates to plan with (``benchmarks/gpu_check.py`` measures
peaks beside them), and allocator overheads (CUDA context, fragmentation: often 1-3 GiB) come on top.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssah.errors import ModelError, one_line

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAT_TENSORS = 3  # mean, M2, sum |x| per channel (float64); the count is one integer per group
LORA_TARGETS = ("q_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj")  # peft's defaults per family
COMMANDS = ("units", "eval", "ablate", "train-full", "train-frozen", "train-only", "train-lora")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read from its config and its meta-device modules."""

    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    params: int  # every parameter once (tied ones once)
    unit_params: int  # parameters of the weights units read and write (o / v / gate / up / down, or fused)
    units: int  # attention channels + MLP neurons over all blocks
    max_unit_channels: int  # widest reader input (the statistics hooks copy it to float64)
    lora_params_per_rank: int  # LoRA parameters at rank 1 on peft's default target modules


def load_config(spec: str | os.PathLike[str]) -> Any:
    """The config of a registry name, a model folder, a ``config.json`` file or a (cached) hub id; no weights."""
    from transformers import AutoConfig

    from ssah.models import SMOLLM2, TINY_PREFIX, convert_gguf, smollm2_gguf

    name = str(spec)
    if name.startswith(TINY_PREFIX):
        from ssah.tiny import tiny_config

        try:
            return tiny_config(name[len(TINY_PREFIX) :])
        except ModelError:
            raise
        except Exception as exc:  # an unknown tiny family
            raise ModelError(f"unknown tiny model {name!r}: see `ssah models`") from exc
    path = Path(os.path.expanduser(name))
    if name == SMOLLM2:
        path = convert_gguf(smollm2_gguf())
    elif path.suffix == ".gguf" and path.is_file():
        path = convert_gguf(path)
    if path.is_file() and path.suffix == ".json":
        from ssah.validate import read_json

        data = read_json(path, "model config")
        if not isinstance(data, dict):
            raise ModelError(f"model config {path} does not hold a JSON object: pass a model's config.json")
        return config_from_dict(data)
    if path.is_dir() and (path / "config.json").is_file():
        from ssah.validate import read_json

        data = read_json(path / "config.json", "model config")
        if not isinstance(data, dict):
            raise ModelError(f"model config {path / 'config.json'} does not hold a JSON object: save the model again")
        check_config_numbers(data)
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"no config for {name!r} ({first}): pass a model folder, a config.json, a registry name or a cached hub id"
        ) from None


def config_from_dict(data: Mapping[str, Any]) -> Any:
    """A transformers config from a ``config.json`` mapping (its ``model_type`` picks the class)."""
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelError("the config has no model_type: pass a model's config.json")
    if not isinstance(model_type, str):
        raise ModelError(f"the config's model_type is {type(model_type).__name__}, not a name: fix config.json")
    check_config_numbers(data)
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:
        why = one_line(exc, 160)
        raise ModelError(f"cannot read the config (model_type {model_type[:60]!r}: {why}); fix config.json") from None


# config fields that count something: each must be a whole number of at least 1 where the config has it
_SIZE_FIELDS = (
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("intermediate_size", "n_inner"),
    ("num_key_value_heads",),
    ("vocab_size",),
    ("head_dim",),
    ("max_position_embeddings", "n_positions"),
)
SIZE_LIMIT = 1 << 24  # no real model has a width, depth or vocabulary near this; the plan would not be meaningful


def check_config_numbers(config: Any) -> None:
    """The numbers the plan builds on, checked before any module is built (a negative ``hidden_size``, zero
    heads or a head count that does not divide the width fail deep inside transformers or torch): every size
    a whole number in 1 .. 2**24, the query heads dividing the hidden size (unless ``head_dim`` is given) and the
    key-value heads dividing the query heads. One ``ModelError`` line naming the field otherwise."""
    if isinstance(config, Mapping):  # a config.json read as is, before transformers builds anything from it
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
        get = text.get
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        get = functools.partial(getattr, text)
    found: dict[str, int] = {}
    for names in _SIZE_FIELDS:
        for name in names:
            value = get(name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= SIZE_LIMIT:
                raise ModelError(
                    f"the config's {name} is {str(value)[:40]!r}: it must be a whole number from 1 to {SIZE_LIMIT:,}"
                )
            found[names[0]] = value
            break
    hidden, heads = found.get("hidden_size"), found.get("num_attention_heads")
    if hidden and heads and "head_dim" not in found and hidden % heads:
        raise ModelError(f"the config's num_attention_heads ({heads}) does not divide its hidden_size ({hidden})")
    kv = found.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ModelError(f"the config's num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})")


def meta_model(config: Any) -> Any:
    """The model of ``config`` on the meta device: every module and shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model


def model_shape(config: Any) -> ModelShape:
    """Count the parameters of ``config``'s model on the meta device and read the shapes the plan uses."""
    from ssah.arch import get_adapter

    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() lists tied weights once
    adapter = get_adapter(model)
    groups = adapter.groups()
    names = {g.reader.name for g in groups} | {w.name for g in groups for w in g.writers}
    unit_params = sum(model.get_parameter(n).numel() for n in names)
    lora = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and hasattr(module, "weight"):
            w = module.weight
            lora += int(w.shape[0]) + int(w.shape[1])  # A: r x in, B: out x r
    cfg = adapter.config
    attn = next(g for g in groups if g.kind == "attn")
    mlp = [g for g in groups if g.kind == "mlp"]
    emb: Any = adapter.embeddings
    return ModelShape(
        family=adapter.family,
        layers=adapter.num_layers,
        hidden=int(cfg.hidden_size),
        intermediate=max(g.size for g in mlp),
        heads=int(attn.num_heads or 0),
        kv_heads=int(attn.num_kv_heads or 0),
        head_dim=int(attn.head_dim or 0),
        vocab=int(emb.weight.shape[0]),
        tied_embeddings=adapter.tied_embeddings,
        params=int(params),
        unit_params=int(unit_params),
        units=sum(g.size for g in groups),
        max_unit_channels=max(g.size for g in groups),
        lora_params_per_rank=lora,
    )


@dataclass(frozen=True)
class Need:
    """Memory of one command in one dtype, in bytes: fixed parts and what each batch row adds."""

    command: str
    dtype: str
    weights: int
    statistics: int
    gradients: int
    optimizer: int
    per_row: int  # activations of one batch row
    batch_size: int

    @property
    def fixed(self) -> int:
        return self.weights + self.statistics + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.fixed + self.batch_size * self.per_row

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fixed": self.fixed, "total": self.total}


def _block_forward_elems(s: ModelShape) -> int:
    """Elements per token alive in one block's forward (no grad): residual and normed hidden, q / k / v,
    the attention output, gate, up and their product."""
    return 2 * s.hidden + 2 * s.heads * s.head_dim + 2 * s.kv_heads * s.head_dim + 3 * s.intermediate


def _block_saved_elems(s: ModelShape) -> int:
    """Elements per token one block saves for backward: norm inputs and outputs, q / k / v before and after
    rotary embedding, the attention output, the residual, gate, up, act(gate) and act(gate) * up."""
    return 5 * s.hidden + 3 * s.heads * s.head_dim + 3 * s.kv_heads * s.head_dim + 4 * s.intermediate


def plan_needs(
    s: ModelShape,
    dtype: str,
    *,
    seq_len: int = 512,
    prompt_len: int = 256,
    new_tokens: int = 64,
    batch_size: int = 8,
    frozen_share: float = 0.013,
    only_share: float = 0.148,
    lora_rank: int = 8,
) -> list[Need]:
    """Memory of every command in :data:`COMMANDS` for ``dtype`` (see the module docstring for what is counted).

    ``seq_len`` is the tokens per example for scoring and training, ``prompt_len + new_tokens`` for generation;
    ``frozen_share`` / ``only_share`` are the shares of units frozen / trained (defaults: the paper's SCU and RU).
    """
    if dtype not in BYTES:
        raise ModelError(f"unknown dtype {dtype!r} for the plan: use {', '.join(BYTES)}")
    b = BYTES[dtype]
    weights = s.params * b
    stats = 2 * s.units * STAT_TENSORS * 8  # safety + utility set
    # scoring: one block's forward temporaries + the float64 copies of the widest reader input (x, x - mean, square)
    units_row = seq_len * (_block_forward_elems(s) * b + 3 * s.max_unit_channels * 8) + 3 * s.vocab * 4
    gen_tokens = prompt_len + new_tokens
    kv_cache = 2 * s.layers * s.kv_heads * s.head_dim * gen_tokens * b
    eval_row = kv_cache + prompt_len * _block_forward_elems(s) * b + 3 * s.vocab * 4
    # training: every block's saved tensors + float32 logits and their gradient
    train_row = seq_len * (s.layers * _block_saved_elems(s) * b + 2 * s.vocab * 4)
    frozen_entries = int(frozen_share * s.unit_params)
    only_entries = int(only_share * s.unit_params)
    lora = lora_rank * s.lora_params_per_rank
    rows = [
        Need("units", dtype, weights, stats, 0, 0, units_row, batch_size),
        Need("eval", dtype, weights, 0, 0, 0, eval_row, batch_size),
        Need("ablate", dtype, weights, stats, 0, 0, max(units_row, eval_row), batch_size),
        Need("train-full", dtype, weights, 0, s.params * b, 2 * s.params * b, train_row, batch_size),
        # + a bool mask over each affected parameter, the saved frozen values and their int64 flat indices
        Need(
            "train-frozen",
            dtype,
            weights,
            s.unit_params + frozen_entries * (b + 8),
            s.params * b,
            2 * s.params * b,
            train_row,
            batch_size,
        ),
        Need("train-only", dtype, weights, 0, only_entries * b, 2 * only_entries * b, train_row, batch_size),
        Need("train-lora", dtype, weights, 0, lora * b, 2 * lora * b, train_row, batch_size),
    ]
    return rows


def plan(
    spec: str | os.PathLike[str] | Any,
    *,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    commands: Sequence[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The memory plan of a model (a spec for :func:`load_config`, or a config) as a JSON-ready dict: the rows of
    ``commands`` (names of :data:`COMMANDS`; None: all; `ssah info --plan` passes those the registered recipes
    declare, :attr:`ssah.registry.Recipe.memory`)."""
    config = load_config(spec) if isinstance(spec, str | os.PathLike) else spec
    check_config_numbers(config)
    try:
        shape = model_shape(config)
    except (ModelError, MemoryError):
        raise
    except Exception as exc:  # transformers or torch refusing a config the checks above let through
        raise ModelError(f"cannot build the model of this config ({one_line(exc, 160)}); check config.json") from None
    wanted = set(COMMANDS if commands is None else commands)
    needs = [n.as_dict() for d in dtypes for n in plan_needs(shape, d, **settings) if n.command in wanted]
    defaults = {"seq_len": 512, "prompt_len": 256, "new_tokens": 64, "batch_size": 8}
    return {
        "model": str(spec) if isinstance(spec, str | os.PathLike) else shape.family,
        "shape": asdict(shape),
        "settings": {**defaults, **settings},
        "needs": needs,
    }


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below 0.1 GiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:.1f} MiB"


def format_plan(p: Mapping[str, Any]) -> str:
    """A plain-text table of a plan (one block per dtype)."""
    s = p["shape"]
    st = p["settings"]
    lines = [
        f"model: {p['model']} ({s['family']}, {s['layers']} layers, hidden {s['hidden']}, MLP {s['intermediate']}, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads of {s['head_dim']}, vocab {s['vocab']})",
        f"parameters: {s['params']:,} ({s['unit_params']:,} in unit readers / writers); units: {s['units']:,}",
        f"per row: {st['seq_len']} tokens for units / train, {st['prompt_len']} + {st['new_tokens']} for "
        f"eval; totals at batch {st['batch_size']} (estimates; allocator overhead not included)",
    ]
    header = f"{'command':<14}{'weights':>12}{'stats/masks':>13}" + "".join(
        f"{c:>12}" for c in ("grads", "optimizer", "per row", "total")
    )
    for dtype in dict.fromkeys(n["dtype"] for n in p["needs"]):
        lines += ["", f"{dtype}:", header]
        for n in p["needs"]:
            if n["dtype"] != dtype:
                continue
            lines.append(
                f"{n['command']:<14}{gib(n['weights']):>12}{gib(n['statistics']):>13}{gib(n['gradients']):>12}"
                f"{gib(n['optimizer']):>12}{gib(n['per_row']):>12}{gib(n['total']):>12}"
            )
    return "\n".join(lines)


# -- Automatic batch sizes ----------------------------------------------------------------------------------------
#
# `--batch-size auto` starts from the plan (the rows that fit in the free memory of the model's device), halves on
# out-of-memory with accelerate's find_executable_batch_size, and remembers the size that worked per model,
# command, dtype, device and length in $SSAH_CACHE/batch_sizes.json, so later runs start there.

BATCH_CACHE = "batch_sizes.json"
MAX_AUTO_BATCH = 256


def _cache_path() -> Path:
    from ssah.models import cache_dir

    return cache_dir() / BATCH_CACHE


def remembered_batch_sizes() -> dict[str, int]:
    """Every batch size found so far, by key (empty when none or unreadable)."""
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: int(v) for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


def remember_batch_size(key: str, size: int) -> None:
    """Store a found batch size (atomically; a cache that cannot be written is skipped)."""
    data = {**remembered_batch_sizes(), key: int(size)}
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


def batch_key(model: Any, command: str, length: int) -> str:
    """What a found batch size depends on: the model (name, type, size), command, dtype, device (and its memory)
    and the longest sequence."""
    from ssah.inference import model_device

    cfg = getattr(model, "config", None)
    dev = model_device(model)
    memory = ""
    if dev.type == "cuda":
        memory = f"/{torch.cuda.get_device_properties(dev).total_memory}"
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    params = sum(p.numel() for p in model.parameters())
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "?")
    return f"{command}|{name}|{params}|{str(dtype).removeprefix('torch.')}|{dev}{memory}|{length}"


def free_memory(model: Any) -> int:
    """Free bytes where the model computes: the GPU's free memory, else the machine's available memory."""
    from ssah.inference import model_device

    dev = model_device(model)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    from accelerate.utils import get_max_memory

    return int(get_max_memory().get("cpu", 0))


def start_from_plan(model: Any, command: str, *, free: int | None = None, **lengths: int) -> int:
    """The batch size the plan says fits beside the loaded weights (a power of two, 1 to ``MAX_AUTO_BATCH``)."""
    shape = model_shape(model.config)
    dtype = str(next((p.dtype for p in model.parameters()), torch.float32)).removeprefix("torch.")
    need = next(n for n in plan_needs(shape, dtype if dtype in BYTES else "float32", **lengths) if n.command == command)
    room = (free_memory(model) if free is None else free) - (need.statistics + need.gradients + need.optimizer)
    rows = max(1, room // max(need.per_row, 1))
    return int(min(MAX_AUTO_BATCH, 1 << (int(rows).bit_length() - 1)))


def find_batch_size(run: Any, *, start: int, key: str | None = None, what: str = "a batch") -> tuple[int, Any]:
    """Call ``run(b)`` from ``b = start`` (or the size remembered under ``key``), halving on out-of-memory, and
    return ``(b, run's result)``; the size that worked is remembered. Raises a one-line :class:`UserError` when
    even 1 does not fit."""
    from accelerate.utils import find_executable_batch_size

    from ssah.errors import UserError

    remembered = remembered_batch_sizes().get(key) if key else None
    first = max(1, min(start, remembered) if remembered else start)
    state = {"b": first}

    def halve() -> int:
        state["b"] //= 2
        return state["b"]

    def attempt(b: int) -> tuple[int, Any]:
        return b, run(b)

    try:
        b, out = find_executable_batch_size(attempt, starting_batch_size=first, reduce_batch_size_fn=halve)()
    except RuntimeError as exc:
        if "No executable batch size" not in str(exc):
            raise
        raise UserError(
            f"{what} of even 1 example does not fit in memory: use --device-map auto with --max-memory (offload), "
            "a smaller --max-length / --max-new-tokens, or --dtype bfloat16"
        ) from None
    if key:
        remember_batch_size(key, b)
    return b, out


def wants_auto_batch(config: Any, model: Any) -> bool:
    """``--batch-size auto`` given, or no batch size given at all on a GPU (where auto is the default)."""
    from ssah.inference import model_device

    value = getattr(config, "batch_size", None)
    if value == "auto":
        return True
    return "batch_size" not in getattr(config, "model_fields_set", {"batch_size"}) and (
        model_device(model).type == "cuda"
    )


def auto_scoring_batch_size(
    model: Any,
    tokenizer: Any,
    datasets: Any,
    *,
    max_length: int | None = 512,
    system: str | None = None,
    start: int | None = None,
) -> int:
    """The largest scoring batch that fits: a forward pass with the statistics hooks on ``b`` copies of the
    longest example, from the plan's start, halving on out-of-memory (remembered per model and length)."""
    from ssah.arch import get_adapter
    from ssah.data import encode_set
    from ssah.inference import frozen_eval, model_device
    from ssah.stats import ActivationRecorder

    longest: list[int] = []
    most = 1  # never probe more rows than the largest set has
    for data in datasets:
        most = max(most, len(data))
        for e in encode_set(tokenizer, data, system=system, max_length=max_length):
            if len(e.input_ids) > len(longest):
                longest = list(e.input_ids)
    if not longest:
        return 1
    device = model_device(model)
    adapter = get_adapter(model)

    def probe(b: int) -> None:
        ids = torch.tensor([longest] * b, dtype=torch.long, device=device)
        recorder = ActivationRecorder(model, adapter)
        recorder.set_mask(torch.ones_like(ids, dtype=torch.bool))
        with frozen_eval(model), recorder.recording():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)

    first = min(start or start_from_plan(model, "units", seq_len=len(longest)), most)
    b, _ = find_batch_size(probe, start=first, key=batch_key(model, "units", len(longest)), what="a scoring batch")
    return b
