"""The refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single direction"):
difference-in-means directions, their selection on a validation split, and the three interventions of the paper.

- :func:`candidate_directions`: per layer ``l`` and post-instruction position ``i``, the mean residual stream
  (the input of block ``l``) on harmful prompts minus the mean on harmless prompts, ``r[l, i]``.
- :func:`select_direction`: the paper's selection. For every candidate (layers below ``max_layer_share`` of the
  depth): *bypass* = mean refusal score of held-out harmful prompts with the direction ablated at every layer,
  *induce* = mean refusal score of held-out harmless prompts with the direction added at its layer, *KL* = KL
  divergence of the next-token distribution of held-out harmless prompts (last position) under ablation. Keep
  candidates with induce > 0 and KL < ``kl_max`` (0.1 in the paper); choose the lowest bypass.
- :func:`ablated_direction` (directional ablation: the component along ``r`` is projected out of the block input
  and of every output the blocks write into the residual stream, at every layer and position),
  :func:`added_direction` (activation addition at one layer, all positions) and :func:`orthogonalized` (the
  writer weights edited so they cannot write along ``r``: embeddings, attention and MLP output projections and
  their biases). All three are context managers that undo themselves on exit.

Simplified against the paper, and why:

- The refusal score is ssah's first-token log-odds (:func:`ssah.judges.first_token_refusal_scores`: log p(refusal
  first tokens) - log p(compliance first tokens) at the start of the reply) rather than the paper's
  log-odds of a refusal-token set against all other tokens. It needs one forward pass per prompt and candidate
  (no generation), which is what makes scoring every (layer, position) candidate affordable; a keyword judge on
  generated replies would cost a generation per prompt and candidate.
- The validation sets are small (tens of prompts, not the paper's 32 + 32 per split on 7B models' data), and a
  quick run scores every second layer only (``layer_step``).
- When no candidate passes the filters the best-bypass candidate below the depth limit is taken and the selection
  says so (``passed_filter: false``); the paper would report no direction.

Families whose blocks renormalise their outputs before adding them to the residual stream (Gemma 2 and 3:
``post_attention_layernorm`` / ``post_feedforward_layernorm``) are ablated at those norms' outputs; their weights
cannot be orthogonalised exactly (a norm's per-coordinate gain rotates what it writes), so
:func:`orthogonalized` refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import align_module_device
from torch import nn
from transformers.pytorch_utils import Conv1D

from ssah.arch import ArchAdapter, get_adapter
from ssah.data.chat import bos_to_add, context_length, encode_prompts, format_chat
from ssah.errors import UnsupportedModelError, UserError
from ssah.generate import left_pad
from ssah.inference import frozen_eval, logits_at, model_device, pad_id

# Families whose blocks write to the residual stream through a norm after the output projection.
_POST_NORM_WRITERS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
}
# Extra embedding tables that add into the residual stream (absolute position embeddings).
_POSITION_EMBEDDINGS = ("transformer.wpe",)
DEFAULT_POSITIONS = 5
KL_MAX = 0.1  # the paper's KL filter
MAX_LAYER_SHARE = 0.8  # the paper discards directions from the last 20% of layers


# ----------------------------------------------------------------------------------------------- geometry
def _hf(model: nn.Module) -> Any:
    """The model as a transformers model (``get_input_embeddings`` and friends), for the type checker."""
    return model


def _unit(r: torch.Tensor) -> torch.Tensor:
    r = r.detach().to(torch.float64)
    norm = r.norm()
    if not float(norm) > 0:
        raise UserError("the refusal direction is the zero vector: harmful and harmless prompts gave equal means")
    return r / norm


def _project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``x - (x . r) r`` along the last dimension (computed in x's dtype, r_hat already cast and placed)."""
    return x - (x @ r_hat).unsqueeze(-1) * r_hat


def residual_writers(model: nn.Module, adapter: ArchAdapter | None = None) -> list[str]:
    """Names of the modules whose outputs each block adds to the residual stream (attention, then MLP)."""
    adapter = adapter or get_adapter(model)
    post = _POST_NORM_WRITERS.get(adapter.family)
    out: list[str] = []
    for layer in range(adapter.num_layers):
        if post is not None:
            out += [f"{adapter.blocks_path}.{layer}.{name}" for name in post]
        else:
            out += [adapter.group(layer, kind).reader_module for kind in ("attn", "mlp")]
    return out


def _block_names(adapter: ArchAdapter) -> list[str]:
    return [f"{adapter.blocks_path}.{layer}" for layer in range(adapter.num_layers)]


def _placed(r: torch.Tensor) -> Any:
    """A function (device, dtype) -> r there, cached (hooks run on every forward)."""
    cache: dict[tuple[Any, Any], torch.Tensor] = {}

    def get(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = r.to(x.device, x.dtype)
        return cache[key]

    return get


def _edit_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], fn: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Apply ``fn`` to a block's hidden-states input, whether passed positionally or by keyword."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


@contextmanager
def _hooked(pre: dict[str, Any], post: dict[str, Any], model: nn.Module) -> Iterator[None]:
    handles = []
    try:
        for name, fn in pre.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(fn, with_kwargs=True))
        for name, fn in post.items():
            handles.append(model.get_submodule(name).register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablated_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Directional ablation (the paper's): remove the component along ``direction`` from every block's input and
    from every output a block writes into the residual stream, at every layer and position; undone on exit."""
    adapter = get_adapter(model)
    at = _placed(_unit(direction))

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _edit_hidden(args, kwargs, lambda x: _project_out(x, at(x)))

    def post(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> Any:
        if isinstance(out, tuple):
            return (_project_out(out[0], at(out[0])), *out[1:])
        return _project_out(out, at(out))

    writers = dict.fromkeys(residual_writers(model, adapter), post)
    with _hooked(dict.fromkeys(_block_names(adapter), pre), writers, model):
        yield


@contextmanager
def added_direction(model: nn.Module, direction: torch.Tensor, layer: int, scale: float = 1.0) -> Iterator[None]:
    """Activation addition: add ``scale * direction`` (not normalised: the difference in means has the size of
    the harmful-harmless gap) to the input of block ``layer`` at every position; undone on exit."""
    adapter = get_adapter(model)
    if not 0 <= layer < adapter.num_layers:
        raise UserError(f"layer {layer} is outside the model's 0..{adapter.num_layers - 1}: pick a layer it has")
    at = _placed(direction.detach().to(torch.float64) * scale)

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _edit_hidden(args, kwargs, lambda x: x + at(x))

    with _hooked({f"{adapter.blocks_path}.{layer}": pre}, {}, model):
        yield


def _writer_params(model: nn.Module, adapter: ArchAdapter) -> list[tuple[str, nn.Parameter, int]]:
    """Every parameter that writes into the residual stream and the dimension that indexes the hidden size:
    input (and position) embeddings [vocab, hidden] -> 1; Linear outputs [hidden, in] -> 0; Conv1D [in, hidden]
    -> 1; biases [hidden] -> 0."""
    out: list[tuple[str, nn.Parameter, int]] = []
    names = {id(p): n for n, p in model.named_parameters()}
    emb = _hf(model).get_input_embeddings()
    out.append((names[id(emb.weight)], emb.weight, 1))
    for path in _POSITION_EMBEDDINGS:
        try:
            pos = model.get_submodule(path)
        except AttributeError:
            continue
        out.append((f"{path}.weight", pos.weight, 1))  # type: ignore[arg-type]
    for mod_name in residual_writers(model, adapter):
        mod: Any = model.get_submodule(mod_name)
        out.append((f"{mod_name}.weight", mod.weight, 1 if isinstance(mod, Conv1D) else 0))
        if getattr(mod, "bias", None) is not None:
            out.append((f"{mod_name}.bias", mod.bias, 0))
    return out


def orthogonal_weights(model: nn.Module, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """The writer weights with the direction projected out (``W <- W - r r^T W`` on the hidden dimension), by
    parameter name, in each parameter's dtype (computed in float64). Does not change the model."""
    adapter = get_adapter(model)
    if adapter.family in _POST_NORM_WRITERS:
        raise UnsupportedModelError(
            f"{adapter.family} renormalises what its blocks write, so its weights cannot be orthogonalised exactly: "
            "use directional ablation (hooks) for this family"
        )
    r_hat = _unit(direction)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p, dim in _writer_params(model, adapter):
            w = p.detach().to(torch.float64)
            r = r_hat.to(w.device)
            w = w.movedim(dim, -1)
            w = w - (w @ r).unsqueeze(-1) * r
            out[name] = w.movedim(-1, dim).to(p.dtype)
    return out


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head shares its weight with the input embeddings."""
    head = _hf(model).get_output_embeddings()
    return head is not None and head.weight is _hf(model).get_input_embeddings().weight


@contextmanager
def orthogonalized(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Weight orthogonalisation (the paper's): edit the writer weights so no block can write along ``direction``.

    Tied embeddings are untied for the block (the output head keeps the original weight, as an exported model
    with ``tie_word_embeddings=False`` does); everything is restored bit for bit on exit."""
    edited = orthogonal_weights(model, direction)
    emb = _hf(model).get_input_embeddings()
    emb_name = next(n for n, p in model.named_parameters() if p is emb.weight)
    tied = tied_embeddings(model)
    saved = {n: model.get_parameter(n).detach().clone() for n in edited if not (tied and n == emb_name)}
    original_emb = emb.weight
    try:
        with torch.no_grad():
            for n, w in edited.items():
                if tied and n == emb_name:
                    emb.weight = nn.Parameter(w, requires_grad=original_emb.requires_grad)
                else:
                    model.get_parameter(n).copy_(w)
        yield
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                model.get_parameter(n).copy_(w)
        if tied:
            emb.weight = original_emb


# ----------------------------------------------------------------------------------------------- directions
def post_instruction_tokens(tokenizer: Any, system: str | None = None) -> int:
    """How many tokens the chat template writes after the instruction (end of turn, assistant header): the
    common token suffix of two formatted prompts that differ in their last word."""
    a = encode_prompts(tokenizer, [format_chat(tokenizer, "Say one word: apple", system=system)], context=None)[0]
    b = encode_prompts(tokenizer, [format_chat(tokenizer, "Say one word: pear?", system=system)], context=None)[0]
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _encode(model: Any, tokenizer: Any, prompts: Sequence[str], system: str | None) -> list[list[int]]:
    texts = [format_chat(tokenizer, p, system=system) for p in prompts]
    return encode_prompts(tokenizer, texts, context=context_length(model), bos_id=bos_to_add(tokenizer))


def _forward(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of a left-padded batch (position ids follow the mask)."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return logits_at(model, 1, input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)


def mean_activations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    positions: int,
    system: str | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Mean input of every block at the last ``positions`` prompt positions: float64 ``[layers, positions,
    hidden]`` (position ``-positions`` first, the last token last)."""
    if not prompts:
        raise UserError("no prompts to average activations over: pass a non-empty prompt set")
    adapter = get_adapter(model)
    encoded = _encode(model, tokenizer, prompts, system)
    if min(len(e) for e in encoded) < positions:
        raise UserError(f"a prompt has fewer than {positions} tokens: pass fewer --positions")
    L = adapter.num_layers
    total: torch.Tensor | None = None
    seen: list[torch.Tensor] = []

    def capture(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x[:, -positions:, :].detach().to("cpu", torch.float64))

    device, pad = model_device(model), pad_id(tokenizer)
    with frozen_eval(model, inference=True), _hooked(dict.fromkeys(_block_names(adapter), capture), {}, model):
        for k in range(0, len(encoded), batch_size):
            ids, mask = left_pad(encoded[k : k + batch_size], pad, device)
            seen.clear()
            _forward(model, ids, mask)
            batch = torch.stack(seen[:L], dim=0).sum(dim=1)  # [L, P, d]
            total = batch if total is None else total + batch
    assert total is not None
    return total / len(encoded)


def candidate_directions(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    positions: int | None = None,
    system: str | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Difference-in-means directions ``mean(harmful) - mean(harmless)`` per block input and post-instruction
    position: float64 ``[layers, positions, hidden]``. ``positions`` defaults to the template's post-instruction
    tokens (at most ``DEFAULT_POSITIONS``)."""
    if not harmful or not harmless:
        raise UserError("the refusal direction needs harmful and harmless prompts: pass non-empty sets of both")
    if positions is None:
        positions = max(1, min(DEFAULT_POSITIONS, post_instruction_tokens(tokenizer, system)))
    kw: dict[str, Any] = {"positions": positions, "system": system, "batch_size": batch_size}
    return mean_activations(model, tokenizer, harmful, **kw) - mean_activations(model, tokenizer, harmless, **kw)


# ----------------------------------------------------------------------------------------------- selection
def last_logprobs(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None = None, batch_size: int = 16
) -> torch.Tensor:
    """Next-token log-probabilities at the start of the reply, float32 ``[prompts, vocab]`` on CPU."""
    encoded = _encode(model, tokenizer, prompts, system)
    device, pad = model_device(model), pad_id(tokenizer)
    rows = []
    with frozen_eval(model, inference=True):
        for k in range(0, len(encoded), batch_size):
            ids, mask = left_pad(encoded[k : k + batch_size], pad, device)
            logits = _forward(model, ids, mask)[:, -1, :].float()
            rows.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(rows)


def refusal_scores(logp: torch.Tensor, refusal: Sequence[int], compliance: Sequence[int]) -> torch.Tensor:
    """First-token refusal log-odds per prompt (see :func:`ssah.judges.first_token_refusal_scores`)."""
    return torch.logsumexp(logp[:, list(refusal)], -1) - torch.logsumexp(logp[:, list(compliance)], -1)


def _kl_rows(ref: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """KL(ref || edited) per row of two log-probability tables."""
    return (ref.exp() * (ref - edited)).sum(-1)


@dataclass
class Selection:
    """The chosen direction and every candidate's scores (lists over candidates, in ``candidates`` order)."""

    layer: int
    position: int  # negative: counted from the end of the prompt (-1 = the last token)
    direction: torch.Tensor  # float64 [hidden], the difference in means (not normalised)
    passed_filter: bool
    candidates: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        chosen = next(c for c in self.candidates if c["layer"] == self.layer and c["position"] == self.position)
        return {
            "layer": self.layer,
            "position": self.position,
            "norm": float(self.direction.norm()),
            "passed_filter": self.passed_filter,
            "chosen": chosen,
            "baseline": self.baseline,
            "candidates": self.candidates,
        }


def select_direction(
    model: Any,
    tokenizer: Any,
    directions: torch.Tensor,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    system: str | None = None,
    batch_size: int = 16,
    kl_max: float = KL_MAX,
    max_layer_share: float = MAX_LAYER_SHARE,
    layer_step: int = 1,
    progress: bool = False,
) -> Selection:
    """Arditi et al.'s selection on held-out prompts (see the module doc): filter by induce > 0, KL < ``kl_max``
    and layer < ``max_layer_share`` of the depth; the lowest bypass score wins."""
    from tqdm.auto import tqdm

    from ssah.judges import opener_token_ids

    if not harmful_val or not harmless_val:
        raise UserError("selecting the direction needs held-out harmful and harmless prompts: pass larger sets")
    refusal, compliance = opener_token_ids(tokenizer, system=system)
    kw: dict[str, Any] = {"system": system, "batch_size": batch_size}
    base_harmless = last_logprobs(model, tokenizer, harmless_val, **kw)
    base_harmful = last_logprobs(model, tokenizer, harmful_val, **kw)
    baseline = {
        "harmful_refusal_score": float(refusal_scores(base_harmful, refusal, compliance).mean()),
        "harmless_refusal_score": float(refusal_scores(base_harmless, refusal, compliance).mean()),
    }
    n_layers, n_pos = directions.shape[0], directions.shape[1]
    limit = max(1, math.ceil(max_layer_share * n_layers - 1e-9))  # layers l < share * depth
    # a zero difference (block 0's input at template tokens is the same embedding for every prompt) is no direction
    cands = [
        (layer, i)
        for layer in sorted(range(limit - 1, -1, -max(1, layer_step)))  # the deepest allowed layer always
        for i in range(n_pos)
        if float(directions[layer, i].norm()) > 0
    ]
    if not cands:
        raise UserError(
            "every candidate direction is zero (harmful and harmless prompts are not told apart at these layers): "
            "pass a larger --max-layer-share or --layer-step 1"
        )
    rows: list[dict[str, Any]] = []
    for layer, i in tqdm(cands, desc="direction candidates", disable=not progress, unit="cand"):
        r = directions[layer, i]
        with ablated_direction(model, r):
            bypass = refusal_scores(last_logprobs(model, tokenizer, harmful_val, **kw), refusal, compliance)
            kl = _kl_rows(base_harmless, last_logprobs(model, tokenizer, harmless_val, **kw))
        with added_direction(model, r, layer):
            induce = refusal_scores(last_logprobs(model, tokenizer, harmless_val, **kw), refusal, compliance)
        rows.append(
            {
                "layer": layer,
                "position": i - n_pos,
                "bypass": float(bypass.mean()),
                "induce": float(induce.mean()),
                "kl": float(kl.mean()),
            }
        )
    passing = [c for c in rows if c["induce"] > 0 and c["kl"] < kl_max]
    for c in rows:
        c["passed_filter"] = c in passing
    best = min(passing or rows, key=lambda c: c["bypass"])
    return Selection(
        layer=best["layer"],
        position=best["position"],
        direction=directions[best["layer"], best["position"] + n_pos].clone(),
        passed_filter=bool(passing),
        candidates=rows,
        baseline=baseline,
    )


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniformly random direction with the norm of ``like`` (the random-direction control)."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(like.shape, generator=g, dtype=torch.float64)
    return r / r.norm() * like.detach().to(torch.float64).norm()


# ----------------------------------------------------------------------------------------------- files
DIRECTION_FILE = "direction.safetensors"
DIRECTION_JSON = "direction.json"
DIRECTION_FORMAT = "ssah-direction-1"


def save_direction(
    folder: Any, selection: Selection, *, fingerprint: str, model_name: str, directions: torch.Tensor | None = None
) -> None:
    """Write ``direction.safetensors`` (the chosen direction and, if given, every candidate) and
    ``direction.json`` (model fingerprint, layer, position, scores) into ``folder``."""
    from pathlib import Path

    from ssah.runs import to_json
    from ssah.safefiles import save_safetensors

    folder = Path(folder)
    meta = {
        "format": DIRECTION_FORMAT,
        "fingerprint": fingerprint,
        "model_name": model_name,
        "layer": str(selection.layer),
        "position": str(selection.position),
    }
    tensors = {"direction": selection.direction.to(torch.float32)}
    if directions is not None:
        tensors["candidates"] = directions.to(torch.float32)
    save_safetensors(tensors, folder / DIRECTION_FILE, meta)
    info = {k: v for k, v in meta.items() if k != "format"} | {"layer": selection.layer, "position": selection.position}
    (folder / DIRECTION_JSON).write_text(to_json(info | {"selection": selection.summary()}), encoding="utf-8")


@dataclass(frozen=True)
class SavedDirection:
    """A direction read back from a run folder."""

    direction: torch.Tensor  # float64 [hidden]
    layer: int
    position: int
    fingerprint: str
    model_name: str


def load_direction(folder: Any, *, fingerprint: str | None = None, hidden: int | None = None) -> SavedDirection:
    """Read ``direction.safetensors`` from a run folder of `ssah direction`, validated (:mod:`ssah.validate`): a
    finite, non-zero float vector, the format, fingerprint, layer and position in its metadata. With
    ``fingerprint``, refuse a direction computed on another model; with ``hidden``, one of another width. Every
    problem is one :class:`UserError` line that says to run `ssah direction` again."""
    from pathlib import Path

    from safetensors import safe_open

    from ssah.errors import one_line
    from ssah.validate import check_tensor, metadata_int

    path = Path(folder) / DIRECTION_FILE if Path(folder).is_dir() else Path(folder)
    if not path.is_file():
        raise UserError(f"no {DIRECTION_FILE} in {folder}: pass a run folder written by `ssah direction`")
    again = "run `ssah direction` again"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "direction" not in set(f.keys()):
                raise UserError(f"{path} holds no 'direction' tensor: {again}")
            r = f.get_tensor("direction")
    except UserError:
        raise
    except Exception as exc:  # safetensors raises several exception types for a bad file
        why = one_line(exc, 120)
        raise UserError(f"{path} is not a direction file ({why}); pass a folder written by `ssah direction`") from None
    if meta.get("format") != DIRECTION_FORMAT:
        raise UserError(f"{path} is not an ssah direction file: pass a folder written by `ssah direction`")
    try:
        check_tensor(r, f"the direction in {path}", shape=[hidden])
        layer, position = (
            metadata_int(meta, "layer", str(path)),
            metadata_int(meta, "position", str(path), minimum=None),
        )
        if not meta.get("fingerprint", "").strip():
            raise UserError(f"{path} names no model fingerprint in its metadata")
    except UserError as exc:
        raise UserError(f"{exc}: {again}") from None
    if float(r.double().norm()) == 0.0:
        raise UserError(f"the direction in {path} is all zeros: {again}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise UserError(
            f"the direction in {path} was computed on another model ({meta.get('model_name')!r}, fingerprint "
            f"{meta.get('fingerprint')}, this one {fingerprint}): run `ssah direction` on this model"
        )
    return SavedDirection(r.to(torch.float64), layer, position, meta["fingerprint"], meta.get("model_name", ""))


def fit_direction(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    system: str | None = None,
    batch_size: int = 16,
    layer_step: int = 1,
    positions: int | None = None,
    kl_max: float = KL_MAX,
    per_split: int | None = None,
    progress: bool = False,
) -> Selection:
    """Difference-in-means candidates from the even-indexed prompts of each set, selected on the odd-indexed
    ones (disjoint halves, both spread over the set; at most ``per_split`` prompts each): the one-call version
    for recipes that add the direction as a condition beside their own (e.g. `ssah ablate`)."""
    if len(harmful) < 2 or len(harmless) < 2:
        raise UserError("fitting the refusal direction needs at least 2 harmful and 2 harmless prompts")
    h, b = list(harmful), list(harmless)
    if per_split is not None:  # at most per_split prompts in each half, spread over the set
        h, b = (x[:: max(1, len(x) // (2 * per_split))][: 2 * per_split] for x in (h, b))
    dirs = candidate_directions(
        model, tokenizer, h[0::2], b[0::2], positions=positions, system=system, batch_size=batch_size
    )
    return select_direction(
        model, tokenizer, dirs, h[1::2], b[1::2], system=system, batch_size=batch_size, layer_step=layer_step,
        kl_max=kl_max, progress=progress,
    )  # fmt: skip


def write_share(model: nn.Module, units: Any, direction: torch.Tensor) -> dict[str, float]:
    """How much of what the units can write lies along the direction: the sum over the units' reader slices of
    ``(w_j . r_hat)^2`` as a share of the same sum over all units, beside the units' share of all channels
    (a set no more aligned with the direction than any other has the two equal). Attention and MLP readers of
    every layer; for post-norm families (Gemma 2/3) before the norm, so only indicative there."""
    adapter = get_adapter(model)
    r_hat = _unit(direction)
    masks = units.channel_masks()
    inside = total = 0.0
    n_in = n_all = 0
    with torch.no_grad():
        for g in adapter.groups():
            mod: Any = model.get_submodule(g.reader_module)
            with align_module_device(mod):  # offloaded (device-map) weights are loaded for the read
                # the adapter's reader (a fused expert's 2D slice too); unit i owns .select(dim, i)
                w = adapter.reader_weight(g).detach().to(torch.float64)
            cols = w.movedim(g.reader.dim, 0)  # [channels, hidden]
            proj = (cols @ r_hat.to(cols.device)) ** 2
            mask = masks[g.key].to(proj.device)
            inside += float(proj[mask].sum())
            total += float(proj.sum())
            n_in += int(mask.sum())
            n_all += int(mask.numel())
    return {"share_of_channels": n_in / n_all, "share_of_direction_write": inside / total if total > 0 else 0.0}
