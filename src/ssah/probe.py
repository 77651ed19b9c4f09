"""Reasoning-direction probe: does the state a model reaches after a query lean to refusing or to complying?

The paper's probe (PAPER.md section 1) compares the final-token hidden state of a query ``Q`` with that of ``Q+R``
(the query followed by the start of a refusal) and of ``Q+C`` (followed by the start of a compliance), block by
block. That comparison is dominated by which word ends the prefix: it shows a gap already at the embedding layer,
where no token has seen any other. So next to it (``naive``, kept as published) this module measures:

- ``openers`` / ``openers-mean``: many refusal and compliance openers averaged, on the final token or averaged
  over the opener tokens;
- ``contrast`` / ``contrast-mean``: the same after a harmful query *minus* after a harmless one (a content
  baseline: the word-identity part is the same after both and cancels);
- ``direction``: the projection of the query's final state on a difference-in-means refusal direction (harmful
  minus harmless), fitted on one half of the prompts and read on the other (cross-fitted), harmful minus harmless;
- ``logit-lens``: refusal minus compliance first-token log-odds read from every layer on the harmful queries
  (nothing is appended, so there is no ending word to confound it; the harmless values are kept for reference).

Every value is positive when the model leans to refusing. The per-prompt values come from one forward pass of
each query (left-padded batches, KV cache kept) plus one short cached extension per opener, so the cost grows with
the opener tokens, not with the query length. While the model generates greedily, or is forced along a compliance
prefix and then continues, the same quantities are followed token by token (``token_*`` arrays).

Two models are compared layer by layer with paired bootstrap replicates (the same resampled prompts for both);
the one separation verdict over the later layers reads a simultaneous band, as runs of layers, the same rule for
*reproduced* and *not reproduced* (:mod:`ssah._probe_band`, calibrated by ``benchmarks/calibration_probe.py``).

Everything here is in memory and works on any causal LM of a supported family (the family adapter names its final
norm and output head);
:mod:`ssah.recipes.probe.run` turns it into a run folder.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ssah._probe_band import MIN_RESAMPLES, MIN_VERDICT_PROMPTS, min_resamples, separation_verdict
from ssah.arch import get_adapter
from ssah.data import format_chat
from ssah.data.chat import bos_to_add
from ssah.data.probe_prompts import COMPLIANCE_OPENERS, FORCED_PREFIX, REFUSAL_OPENERS
from ssah.errors import UserError
from ssah.generate import encode_prompt, eos_token_ids, left_pad
from ssah.inference import frozen_eval, model_device, pad_id
from ssah.judges import opener_token_ids

__all__ = [
    "GAP_STEPS",
    "METHODS",
    "MIN_RESAMPLES",
    "MIN_VERDICT_PROMPTS",
    "MODES",
    "Directions",
    "Estimate",
    "Method",
    "MethodValues",
    "ModelMeasures",
    "Openers",
    "bootstrap_indices",
    "cosine_distance",
    "estimate",
    "fit_directions",
    "gap_steps",
    "measure_model",
    "method_values",
    "min_resamples",
    "project",
    "separation",
    "separation_verdict",
    "token_values",
]


@dataclass(frozen=True)
class Method:
    """One way of reading the reasoning direction from a model's states."""

    name: str
    label: str
    description: str
    controlled: bool  # controls the word-identity confound (a harmless baseline, or no appended words at all)
    baseline: bool  # the gap is harmful minus harmless
    shared_space: bool  # compares models in one residual space (needs the same tokenizer and shapes)


_METHOD_LIST: tuple[Method, ...] = (
    Method(
        "naive",
        "paper's probe (as published)",
        "d(Q,Q+C) - d(Q,Q+R), cosine distances of final-token states, one refusal and one compliance opener",
        controlled=False,
        baseline=False,
        shared_space=False,
    ),
    Method(
        "openers",
        "many openers",
        "the same averaged over every refusal and compliance opener, final-token states",
        controlled=False,
        baseline=False,
        shared_space=False,
    ),
    Method(
        "openers-mean",
        "many openers, opener-token mean",
        "the same with the states averaged over the opener tokens instead of the final token",
        controlled=False,
        baseline=False,
        shared_space=False,
    ),
    Method(
        "contrast",
        "harmful - harmless (content baseline)",
        "the many-openers gap after a harmful query minus after a harmless query (same openers)",
        controlled=True,
        baseline=True,
        shared_space=False,
    ),
    Method(
        "contrast-mean",
        "harmful - harmless, opener-token mean",
        "the content-subtracted gap with states averaged over the opener tokens",
        controlled=True,
        baseline=True,
        shared_space=False,
    ),
    Method(
        "direction",
        "refusal direction (difference in means)",
        "projection of the query's final state on the harmful-minus-harmless mean difference (cross-fitted, "
        "pooled over the models compared, 1 = the fitted harmful-harmless distance), harmful - harmless",
        controlled=True,
        baseline=True,
        shared_space=True,
    ),
    Method(
        "logit-lens",
        "logit lens: refusal vs compliance log-odds",
        "logsumexp of refusal minus compliance first-token logits read from each layer (final norm + output "
        "head) on the harmful queries; no words are appended, so no word-identity confound",
        controlled=True,
        baseline=False,
        shared_space=False,
    ),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHOD_LIST}

MODES: tuple[str, ...] = ("greedy", "forced")
"""Per-token tracking: the model's own greedy reply, and a reply forced to start with a compliance prefix."""

GAP_STEPS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Generated steps at which the paper's gap is re-measured (it needs two extra cached passes per step)."""


def gap_steps(token_steps: int) -> list[int]:
    """The steps (1..token_steps) at which the per-token gap is measured: ``GAP_STEPS`` up to and with the last."""
    steps = [s for s in GAP_STEPS if s <= token_steps]
    if token_steps >= 1 and token_steps not in steps:
        steps.append(token_steps)
    return steps


@dataclass(frozen=True)
class Openers:
    """Refusal and compliance openers; the first of each list is the pair of the paper's probe."""

    refusal: tuple[str, ...] = REFUSAL_OPENERS
    compliance: tuple[str, ...] = COMPLIANCE_OPENERS

    def check(self) -> None:
        """Raise a one-line UserError for openers that cannot be compared."""
        if not self.refusal or not self.compliance:
            raise UserError("the probe needs at least one refusal and one compliance opener: pass both kinds")
        if any(not o.strip() for o in (*self.refusal, *self.compliance)):
            raise UserError("an opener is empty: give every refusal and compliance opener some words")
        both = set(self.refusal) & set(self.compliance)
        if both:
            raise UserError(
                f"opener {sorted(both)[0]!r} is both a refusal and a compliance opener: keep it in one list"
            )

    @property
    def all(self) -> tuple[str, ...]:
        """Refusal openers, then compliance openers (the order of the ``n_openers`` axis)."""
        return (*self.refusal, *self.compliance)

    @property
    def refusal_index(self) -> list[int]:
        return list(range(len(self.refusal)))

    @property
    def compliance_index(self) -> list[int]:
        return list(range(len(self.refusal), len(self.refusal) + len(self.compliance)))


@dataclass
class ModelMeasures:
    """Everything measured on one model: raw per-prompt arrays that every method and plot is computed from.

    Prompts are the harmful ones, then the harmless ones (``n = n_harmful + n_harmless``); layer 0 is the
    embedding output, layer ``L`` the last block's output (as ``output_hidden_states`` returns them).
    Token arrays cover the first ``token_prompts`` harmful and the first ``token_prompts`` harmless prompts
    (``m = 2 * token_prompts`` rows, harmful first) and steps 0..T (0 = the end of the query).
    """

    n_harmful: int
    n_harmless: int
    layers: int  # L: number of blocks
    query_states: np.ndarray  # (n, L+1, H) float32: final-token state of Q
    d_last: np.ndarray  # (n, n_openers, L+1): cosine distance Q vs Q+opener, final tokens
    d_mean: np.ndarray  # (n, n_openers, L+1): Q's final token vs the mean over the opener tokens
    lens: np.ndarray  # (n, L+1): logit-lens refusal-minus-compliance log-odds
    token_prompts: int = 0
    token_steps: int = 0
    gap_steps: list[int] = field(default_factory=list)
    forced_tokens: int = 0  # tokens of the forced prefix
    token_states: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> (m, T+1, L+1, H)
    token_logodds: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> (m, T+1), final layer
    token_gap: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> (m, 1+len(gap_steps), L+1)
    token_alive: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> (m, T+1) bool: before any EOS
    token_text: dict[str, list[str]] = field(default_factory=dict)  # mode -> model-written text (never saved)
    last_layer_normed: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.n_harmful + self.n_harmless


# --- model passes ----------------------------------------------------------------------------------------------------


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` along the last dimension (0 for identical directions, 2 for opposite)."""
    return 1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)


def _forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One forward with the cache: hidden states ``(L+1, B, S, H)`` float32, last-position logits, the cache."""
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "past_key_values": cache,
        "use_cache": True,
        "output_hidden_states": True,
    }
    try:
        out = model(logits_to_keep=1, **kwargs)
    except TypeError:  # models without logits_to_keep
        out = model(**kwargs)
    if out.hidden_states is None:
        raise UserError(f"{type(model).__name__} returns no hidden states: the probe needs output_hidden_states")
    states = torch.stack([h.float() for h in out.hidden_states], 0)
    return states, out.logits[:, -1].float(), out.past_key_values


def _crop(cache: Any, tokens: int) -> None:
    """Drop the last ``tokens`` positions from a cache (undoing an extension)."""
    if tokens > 0:
        cache.crop(-tokens)


def _extend(
    model: Any, cache: Any, mask: torch.Tensor, next_pos: torch.Tensor, conts: Sequence[Sequence[int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """States of continuations (right-padded) run on top of a cached prefix; the cache is restored afterwards.

    Returns the hidden states ``(L+1, B, C, H)`` and the continuation mask ``(B, C)``.
    """
    width = max(len(c) for c in conts)
    device = mask.device
    ids = torch.full((len(conts), width), pad, dtype=torch.long, device=device)
    cmask = torch.zeros((len(conts), width), dtype=torch.long, device=device)
    for row, c in enumerate(conts):
        ids[row, : len(c)] = torch.tensor(list(c), dtype=torch.long, device=device)
        cmask[row, : len(c)] = 1
    pos = next_pos[:, None] + torch.arange(width, device=device)[None, :]
    states, _, cache = _forward(model, ids, torch.cat([mask, cmask], 1), pos, cache)
    _crop(cache, width)
    return states, cmask


def _shared_prefix(encoded: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every query shares, leaving at least one own token per query."""
    shortest = min(len(e) for e in encoded)
    k = 0
    first = encoded[0]
    while k < shortest - 1 and all(e[k] == first[k] for e in encoded):
        k += 1
    return k


def _last_and_mean(states: torch.Tensor, cmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the state at the last real continuation token and the mean over the real tokens: ``(L+1, B, H)``."""
    lengths = cmask.sum(1)
    rows = torch.arange(cmask.shape[0], device=cmask.device)
    last = states[:, rows, lengths - 1]
    weights = (cmask.float() / lengths[:, None].float())[None, :, :, None]
    return last, (states * weights).sum(2)


def _continuation(tokenizer: Any, text: str, base: list[int], opener: str, bos_id: int | None) -> list[int]:
    """Token ids an opener adds after a formatted query, as tokenized together with it (alone if they merge)."""
    ids = encode_prompt(tokenizer, text + opener, bos_id=bos_id)
    if ids[: len(base)] == base and len(ids) > len(base):
        return ids[len(base) :]
    alone = list(tokenizer(opener, add_special_tokens=False)["input_ids"])
    if not alone:
        raise UserError(f"opener {opener!r} has no tokens with this tokenizer: use another opener")
    return alone


def _mid_text_ids(tokenizer: Any, opener: str) -> list[int]:
    """Token ids of an opener appended in the middle of a reply (after generated text): a space, then the words."""
    ids = list(tokenizer(" " + opener, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError(f"opener {opener!r} has no tokens with this tokenizer: use another opener")
    return ids


class _Readout:
    """Refusal-minus-compliance log-odds from a hidden state: final norm (not on an already normed last layer), then
    only the output-head rows of the opener first tokens (the softmax normaliser cancels in the difference) and the
    model's logit soft cap where it has one (elementwise, so it applies to those rows exactly)."""

    def __init__(self, model: Any, refusal: list[int], compliance: list[int]) -> None:
        adapter = get_adapter(model)  # one-line errors for an unknown family or a model without a head
        self.head: Any = adapter.unembedding
        self.norm = adapter.final_norm
        self.cap = adapter.logit_softcap
        self.refusal, self.compliance = refusal, compliance
        self.last_normed = True

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap

    def calibrate(self, last_state: torch.Tensor, logits: torch.Tensor) -> str | None:
        """Decide from real logits whether the last layer's state is already normalised; a note when unsure."""
        with torch.no_grad():
            direct = self._capped(self.head(last_state.to(self.head.weight.dtype)).float())
            err_direct = (direct - logits).abs().max().item()
            normed = self._capped(self.head(self.norm(last_state.to(self.head.weight.dtype))).float())
            err_normed = (normed - logits).abs().max().item()
        self.last_normed = err_direct <= err_normed
        scale = logits.abs().max().item() + 1e-6
        if min(err_direct, err_normed) > 1e-2 * scale:
            return "the output head does not reproduce the logits exactly: logit lens approximate"
        return None

    def logodds(self, states: torch.Tensor, layer: int, last_layer: int) -> torch.Tensor:
        """``(..., H)`` states of one layer -> ``(...)`` log-odds (float64)."""
        x = states.to(self.head.weight.dtype)
        if not (layer == last_layer and self.last_normed):
            x = self.norm(x)
        w = self.head.weight
        bias = getattr(self.head, "bias", None)
        r = x @ w[self.refusal].T
        c = x @ w[self.compliance].T
        if bias is not None:
            r, c = r + bias[self.refusal], c + bias[self.compliance]
        r, c = self._capped(r.double()), self._capped(c.double())
        return (torch.logsumexp(r, -1) - torch.logsumexp(c, -1)).cpu()


def _logodds_from_logits(logits: torch.Tensor, refusal: list[int], compliance: list[int]) -> torch.Tensor:
    return (
        torch.logsumexp(logits[:, refusal].double(), -1) - torch.logsumexp(logits[:, compliance].double(), -1)
    ).cpu()


@dataclass(frozen=True)
class _Inputs:
    """The token ids of one probe run: every query, each opener's continuation of it, the paper's two openers as
    they read in the middle of a reply, and the forced prefix."""

    encoded: list[list[int]]
    conts: list[list[list[int]]]  # [query][opener] -> ids
    naive_mid: list[list[int]]
    forced: list[int]


def _encode(
    tokenizer: Any, prompts: Sequence[str], openers: Openers, system: str | None, forced_prefix: str
) -> _Inputs:
    """Format and tokenize the queries and the openers once, as :func:`measure_model` feeds them."""
    bos_id = bos_to_add(tokenizer)
    texts = [format_chat(tokenizer, p, system=system) for p in prompts]
    encoded = [encode_prompt(tokenizer, t, bos_id=bos_id) for t in texts]
    conts = [
        [_continuation(tokenizer, t, e, o, bos_id) for o in openers.all] for t, e in zip(texts, encoded, strict=True)
    ]
    naive_mid = [_mid_text_ids(tokenizer, openers.refusal[0]), _mid_text_ids(tokenizer, openers.compliance[0])]
    forced = _continuation(tokenizer, texts[0], encoded[0], forced_prefix, bos_id) if forced_prefix else []
    return _Inputs(encoded, conts, naive_mid, forced)


@dataclass
class _Arrays:
    """What :func:`measure_model` fills batch by batch, allocated when the first batch gives the layer count."""

    layers: int
    query_states: np.ndarray
    d_last: np.ndarray
    d_mean: np.ndarray
    lens: np.ndarray
    tok: dict[str, dict[str, Any]]  # mode -> per-token arrays of the tracked prompts

    @classmethod
    def allocate(cls, n: int, n_openers: int, hq: torch.Tensor, m: int, steps: int, gap_at: list[int]) -> _Arrays:
        """Arrays for ``n`` prompts from the first batch's query states ``hq`` ``(L+1, B, H)``."""
        layers, width = hq.shape[0] - 1, hq.shape[-1]
        d_last = np.zeros((n, n_openers, layers + 1))
        tok = {
            mode: {
                "states": np.full((2 * m, steps + 1, layers + 1, width), np.nan, np.float32),
                "logodds": np.full((2 * m, steps + 1), np.nan),
                "gap": np.full((2 * m, 1 + len(gap_at), layers + 1), np.nan),
                "alive": np.zeros((2 * m, steps + 1), dtype=bool),
                "text": [""] * (2 * m),
            }
            for mode in (MODES if m else ())
        }
        return cls(
            layers=layers,
            query_states=np.zeros((n, layers + 1, width), dtype=np.float32),
            d_last=d_last,
            d_mean=np.zeros_like(d_last),
            lens=np.zeros((n, layers + 1)),
            tok=tok,
        )


def _check_probe_args(
    openers: Openers, harmful: Sequence[str], harmless: Sequence[str], batch: int, steps: int
) -> None:
    """One-line UserErrors for inputs :func:`measure_model` cannot measure."""
    openers.check()
    if not harmful or not harmless:
        raise UserError("the probe needs harmful and harmless prompts: pass non-empty --harmful and --harmless sets")
    if batch < 1:
        raise UserError(f"batch_size must be at least 1, got {batch}: pass a positive batch size")
    if steps < 0:
        raise UserError(f"token_steps must be 0 or more, got {steps}")


def _prefix_cache(model: Any, ids: list[int], device: torch.device) -> Any:
    """The KV cache of the token prefix every query shares (the system prompt and user header), computed once."""
    if not ids:
        return None
    t = torch.tensor([ids], dtype=torch.long, device=device)
    _, _, cache = _forward(model, t, torch.ones_like(t), torch.arange(len(ids), device=device)[None], None)
    return cache


def measure_model(
    model: Any,
    tokenizer: Any,
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    openers: Openers = Openers(),
    system: str | None = None,
    token_steps: int = 16,
    token_prompts: int = 16,
    forced_prefix: str = FORCED_PREFIX,
    batch_size: int = 32,
    progress: bool = False,
    desc: str | None = None,
) -> ModelMeasures:
    """Run every query once (and each opener as a cached extension of it) and follow the first ``token_prompts``
    harmful and harmless queries for ``token_steps`` generated tokens, greedy and forced; returns raw arrays."""
    _check_probe_args(openers, harmful, harmless, batch_size, token_steps)
    n_h, n = len(harmful), len(harmful) + len(harmless)
    m = min(token_prompts, len(harmful), len(harmless)) if token_steps > 0 else 0
    refusal_ids, compliance_ids = opener_token_ids(
        tokenizer, system=system, refusal_openers=openers.refusal, compliance_openers=openers.compliance
    )
    run = _ProbeRun(
        model=model,
        tokenizer=tokenizer,
        inputs=_encode(tokenizer, [*harmful, *harmless], openers, system, forced_prefix),
        n_openers=len(openers.all),
        readout=_Readout(model, refusal_ids, compliance_ids),
        tracked=[*range(m), *range(n_h, n_h + m)],  # token rows: harmful first, then harmless
        steps=token_steps,
        gap_at=gap_steps(token_steps),
        eos=set(eos_token_ids(model, tokenizer)),
        pad=pad_id(tokenizer),
        device=model_device(model),
    )
    order = sorted(range(n), key=lambda i: -len(run.inputs.encoded[i]))
    chunks = [order[k : k + batch_size] for k in range(0, n, batch_size)]
    shared = _shared_prefix(run.inputs.encoded)
    with frozen_eval(model, inference=True):
        prefix_cache = _prefix_cache(model, run.inputs.encoded[0][:shared], run.device)
        for chunk in tqdm(chunks, desc=desc or "probe", disable=not progress, unit="batch"):
            run.measure_chunk(chunk, shared, prefix_cache, n)
    a = run.arrays
    assert a is not None
    measures = ModelMeasures(
        n_harmful=n_h,
        n_harmless=n - n_h,
        layers=a.layers,
        query_states=a.query_states,
        d_last=a.d_last,
        d_mean=a.d_mean,
        lens=a.lens,
        token_prompts=m,
        token_steps=token_steps if m else 0,
        gap_steps=run.gap_at if m else [],
        forced_tokens=len(run.inputs.forced),
        last_layer_normed=run.readout.last_normed,
        notes=run.notes,
    )
    r0, c0 = 0, len(openers.refusal)
    for mode, arrays in a.tok.items():
        # step 0 of the per-token gap is the paper's probe on the query itself
        arrays["gap"][:, 0] = a.d_last[run.tracked, c0] - a.d_last[run.tracked, r0]
        measures.token_states[mode] = arrays["states"]
        measures.token_logodds[mode] = arrays["logodds"]
        measures.token_gap[mode] = arrays["gap"]
        measures.token_alive[mode] = arrays["alive"]
        measures.token_text[mode] = arrays["text"]
    return measures


@dataclass
class _ProbeRun:
    """One model's probe pass: the fixed inputs and settings, and the arrays it fills chunk by chunk."""

    model: Any
    tokenizer: Any
    inputs: _Inputs
    n_openers: int
    readout: _Readout
    tracked: list[int]
    steps: int
    gap_at: list[int]
    eos: set[int]
    pad: int
    device: torch.device
    arrays: _Arrays | None = None
    notes: list[str] = field(default_factory=list)

    def measure_chunk(self, chunk: list[int], shared: int, prefix_cache: Any, n: int) -> None:
        """Query states, opener distances and logit lens of one batch of prompts, then the token tracking of the
        tracked prompts among them."""
        model, inputs, device = self.model, self.inputs, self.device
        # layout [shared prefix | left padding | rest of the query]: the last column is every query's end
        ids, rest_mask = left_pad([inputs.encoded[i][shared:] for i in chunk], self.pad, device)
        mask = torch.cat([torch.ones((len(chunk), shared), dtype=torch.long, device=device), rest_mask], 1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = None
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(chunk))
        states, logits, cache = _forward(model, ids, mask, pos, cache)
        hq = states[:, :, -1]  # (L+1, B, H)
        if self.arrays is None:
            m = len(self.tracked) // 2
            self.arrays = _Arrays.allocate(n, self.n_openers, hq, m, self.steps, self.gap_at)
            note = self.readout.calibrate(hq[-1], logits)
            if note:
                self.notes.append(note)
        a = self.arrays
        a.query_states[chunk] = hq.permute(1, 0, 2).cpu().numpy()
        for layer in range(a.layers + 1):
            a.lens[chunk, layer] = self.readout.logodds(hq[layer], layer, a.layers).numpy()
        next_pos = mask.sum(-1)
        for j in range(self.n_openers):
            ext, cmask = _extend(model, cache, mask, next_pos, [inputs.conts[i][j] for i in chunk], self.pad)
            last, mean = _last_and_mean(ext, cmask)
            a.d_last[chunk, j] = cosine_distance(hq, last).T.cpu().numpy()
            a.d_mean[chunk, j] = cosine_distance(hq, mean).T.cpu().numpy()
        rows = [r for r, i in enumerate(chunk) if i in self.tracked]
        if not rows:
            return
        where = [self.tracked.index(chunk[r]) for r in rows]
        sel = torch.tensor(rows, device=device)
        cache.batch_select_indices(sel)
        for mode in a.tok:
            _follow(
                model,
                cache,
                mask[sel],
                next_pos[sel],
                logits[sel],
                hq[:, sel],
                forced=inputs.forced if mode == "forced" else [],
                steps=self.steps,
                gap_at=self.gap_at,
                naive_mid=inputs.naive_mid,
                readout=(self.readout.refusal, self.readout.compliance),
                eos=self.eos,
                pad=self.pad,
                out=a.tok[mode],
                where=where,
                tokenizer=self.tokenizer,
            )


def _follow(
    model: Any,
    cache: Any,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    logits: torch.Tensor,
    hq: torch.Tensor,
    *,
    forced: list[int],
    steps: int,
    gap_at: list[int],
    naive_mid: list[list[int]],
    readout: tuple[list[int], list[int]],
    eos: set[int],
    pad: int,
    out: dict[str, Any],
    where: list[int],
    tokenizer: Any,
) -> None:
    """Generate ``steps`` tokens (the forced ones first, then greedy) on top of a cached query, recording at every
    step the final-token states, the next-token refusal log-odds and (at ``gap_at``) the paper's gap; the cache is
    returned to the query afterwards."""
    b = mask.shape[0]
    device = mask.device
    out["states"][where, 0] = hq.permute(1, 0, 2).cpu().numpy()
    out["logodds"][where, 0] = _logodds_from_logits(logits, *readout).numpy()
    out["alive"][where, 0] = True
    alive = torch.ones(b, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(b)]
    one = torch.ones((b, 1), dtype=torch.long, device=device)
    pos = next_pos.clone()
    for t in range(1, steps + 1):
        if t <= len(forced):
            nxt = torch.full((b,), forced[t - 1], dtype=torch.long, device=device)
        else:
            nxt = logits.argmax(-1)
        states, logits, cache = _forward(model, nxt[:, None], torch.cat([mask, one], 1), pos[:, None], cache)
        mask = torch.cat([mask, one], 1)
        pos = pos + 1
        h = states[:, :, -1]
        out["alive"][where, t] = alive.cpu().numpy()
        out["states"][where, t] = h.permute(1, 0, 2).cpu().numpy()
        out["logodds"][where, t] = _logodds_from_logits(logits, *readout).numpy()
        if t > len(forced):
            for r in range(b):
                if alive[r]:
                    generated[r].append(int(nxt[r]))
        if t in gap_at:
            col = 1 + gap_at.index(t)
            d = []
            for ids in naive_mid:
                ext, cmask = _extend(model, cache, mask, pos, [ids] * b, pad)
                last, _ = _last_and_mean(ext, cmask)
                d.append(cosine_distance(h, last).T.cpu().numpy())
            out["gap"][where, col] = d[1] - d[0]
        alive = alive & ~torch.tensor([int(x) in eos for x in nxt.tolist()], device=device)
    _crop(cache, steps)
    for r, w in enumerate(where):
        ids = [i for i in generated[r] if i not in eos]
        out["text"][w] = tokenizer.decode(ids, skip_special_tokens=True)


# --- methods ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Directions:
    """Cross-fitted difference-in-means refusal directions: per fold, ``r = mean(harmful) - mean(harmless)`` and the
    midpoint, each ``(L+1, H)``, fitted on the prompts outside the fold (pooled with equal weight over models)."""

    r: np.ndarray  # (folds, L+1, H) float64
    mid: np.ndarray  # (folds, L+1, H) float64
    folds: int = 2

    def fold_of(self, index: int) -> int:
        """The fold of a prompt by its index within its set (harmful or harmless)."""
        return index % self.folds


def fit_directions(harmful: Sequence[np.ndarray], harmless: Sequence[np.ndarray], *, folds: int = 2) -> Directions:
    """Fit the refusal direction of every layer on each fold's complement; ``harmful[k]`` / ``harmless[k]`` are the
    ``(n, L+1, H)`` query states of model ``k`` (several models: means pooled with equal weight)."""
    if not harmful or len(harmful) != len(harmless):
        raise UserError("fit_directions needs the harmful and harmless states of the same models")
    n_h, n_b = harmful[0].shape[0], harmless[0].shape[0]
    if min(n_h, n_b) < 2 * folds:
        raise UserError(
            f"the refusal direction needs at least {2 * folds} harmful and harmless prompts (cross-fitting)"
        )
    shapes = {h.shape[1:] for h in (*harmful, *harmless)}
    if len(shapes) != 1:
        raise UserError("the models compared have different layer counts or hidden sizes: drop the direction method")
    rs, mids = [], []
    for k in range(folds):
        keep_h = np.arange(n_h) % folds != k
        keep_b = np.arange(n_b) % folds != k
        mu_h = np.mean([h[keep_h].astype(np.float64).mean(0) for h in harmful], 0)
        mu_b = np.mean([b[keep_b].astype(np.float64).mean(0) for b in harmless], 0)
        rs.append(mu_h - mu_b)
        mids.append((mu_h + mu_b) / 2)
    return Directions(np.stack(rs), np.stack(mids), folds)


def project(states: np.ndarray, fold: np.ndarray, directions: Directions) -> np.ndarray:
    """Projection of ``(rows, ..., L+1, H)`` states on their fold's direction, minus the midpoint, in units of the
    fitted harmful-harmless distance (harmless about -0.5, harmful about +0.5 in-sample): ``(rows, ..., L+1)``.
    Layers where the direction vanishes (the embedding of the same final token for every query) give 0."""
    r = directions.r[fold]  # (rows, L+1, H)
    mid = directions.mid[fold]
    norm2 = (r**2).sum(-1)  # (rows, L+1)
    scale = (directions.mid**2).sum(-1).mean() + 1e-30
    extra = states.ndim - 3
    shape = (r.shape[0],) + (1,) * extra + r.shape[1:]
    r, mid = r.reshape(shape), mid.reshape(shape)
    norm2 = norm2.reshape(shape[:-1])
    dot = ((states.astype(np.float64) - mid) * r).sum(-1)
    ok = norm2 > 1e-12 * scale
    return np.where(ok, dot / np.where(ok, norm2, 1.0), 0.0)


@dataclass(frozen=True)
class MethodValues:
    """Per-prompt values of one method: ``harmful (n_h, L+1)``, ``harmless (n_b, L+1)``; ``pairs`` holds the
    prompt-mean gap of every (refusal, compliance) opener pair ``(P, L+1)`` for the spread across templates."""

    method: str
    harmful: np.ndarray
    harmless: np.ndarray
    baseline: bool
    pairs: np.ndarray | None = None

    @property
    def gap(self) -> np.ndarray:
        """The method's gap per layer: mean over harmful prompts, minus the harmless mean when it has a baseline."""
        g = self.harmful.mean(0)
        return g - self.harmless.mean(0) if self.baseline else g


def _pair_gaps(d: np.ndarray, openers: Openers, n_h: int, baseline: bool) -> np.ndarray:
    """Prompt-mean gap of every (refusal, compliance) pair: ``(P, L+1)``."""
    out = []
    for r in openers.refusal_index:
        for c in openers.compliance_index:
            g = d[:, c] - d[:, r]
            out.append(g[:n_h].mean(0) - (g[n_h:].mean(0) if baseline else 0.0))
    return np.stack(out)


def method_values(
    measures: ModelMeasures, method: str, openers: Openers, directions: Directions | None = None
) -> MethodValues:
    """The per-prompt values of ``method`` on one model's measures (``directions`` needed for ``direction``)."""
    if method not in METHODS:
        raise UserError(f"unknown probe method {method!r}: use one of {', '.join(METHODS)}")
    info, n_h = METHODS[method], measures.n_harmful
    if method == "naive":
        d = measures.d_last
        v = d[:, len(openers.refusal)] - d[:, 0]
        pairs = None
    elif method in ("openers", "contrast", "openers-mean", "contrast-mean"):
        d = measures.d_mean if method.endswith("-mean") else measures.d_last
        v = d[:, openers.compliance_index].mean(1) - d[:, openers.refusal_index].mean(1)
        pairs = _pair_gaps(d, openers, n_h, info.baseline)
    elif method == "direction":
        if directions is None:
            raise UserError("the direction method needs fitted directions (fit_directions)")
        idx = np.concatenate([np.arange(n_h), np.arange(measures.n_harmless)])
        v = project(measures.query_states, idx % directions.folds, directions)
        pairs = None
    else:  # logit-lens
        v, pairs = measures.lens, None
    return MethodValues(method, v[:n_h], v[n_h:], info.baseline, pairs)


# --- statistics ------------------------------------------------------------------------------------------------------


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_boot, n)`` resampling indices (with replacement)."""
    return rng.integers(0, n, size=(n_boot, n))


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile bootstrap interval; ``reps`` are the bootstrap replicates (kept for paired
    comparisons between models that share the resampling indices)."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    reps: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {"mean": _floats(self.mean), "lo": _floats(self.lo), "hi": _floats(self.hi)}


def _floats(a: np.ndarray) -> Any:
    """Array as nested lists of rounded floats (NaN kept as None-free NaN)."""
    return np.round(np.asarray(a, dtype=np.float64), 6).tolist()


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    if not np.isnan(a).any():  # the common case, several times faster (and the same numbers)
        return a.mean(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        count = np.sum(~np.isnan(a), axis=axis)
        total = np.nansum(a, axis=axis)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def estimate(
    harmful: np.ndarray,
    idx_h: np.ndarray,
    harmless: np.ndarray | None = None,
    idx_b: np.ndarray | None = None,
    *,
    level: float = 0.95,
) -> Estimate:
    """Mean over prompts (minus the harmless mean when given) with a percentile bootstrap interval; prompts are
    resampled by the given indices (harmful and harmless independently). NaN values (steps after the end of a
    reply) are left out of every mean."""
    mean = _nanmean(harmful, 0)
    reps = _nanmean(harmful[idx_h], 1)
    if harmless is not None:
        if idx_b is None:
            raise ValueError("harmless values need their own resampling indices")
        mean = mean - _nanmean(harmless, 0)
        reps = reps - _nanmean(harmless[idx_b], 1)
    lo, hi = _quantiles(reps, level)
    return Estimate(mean, lo, hi, reps)


def _quantiles(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of bootstrap replicates along axis 0 (NaN where every replicate is NaN)."""
    alpha = (1 - level) / 2
    if not np.isnan(reps).any():  # nanquantile goes column by column; the same numbers at once
        return np.quantile(reps, alpha, axis=0), np.quantile(reps, 1 - alpha, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(reps, alpha, axis=0), np.nanquantile(reps, 1 - alpha, axis=0)


def separation(a: Estimate, b: Estimate, *, level: float = 0.95) -> dict[str, Any]:
    """How model ``a`` differs from model ``b`` per layer: layers where ``a``'s interval lies wholly above ``b``'s
    (``higher``) or below (``lower``), and the paired bootstrap interval of the difference (same resampled
    prompts for both models) with the layers where it excludes 0."""
    lo, hi = _quantiles(a.reps - b.reps, level)
    layers = range(len(a.mean))
    return {
        "higher": [i for i in layers if a.lo[i] > b.hi[i]],
        "lower": [i for i in layers if a.hi[i] < b.lo[i]],
        "diff": {"mean": _floats(a.mean - b.mean), "lo": _floats(lo), "hi": _floats(hi)},
        "diff_above_zero": [i for i in layers if lo[i] > 0],
        "diff_below_zero": [i for i in layers if hi[i] < 0],
    }


def token_values(
    measures: ModelMeasures, mode: str, layer: int, directions: Directions | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-token values of one mode, each as (harmful rows, harmless rows): ``gap`` (the paper's gap at ``layer``,
    at step 0 and ``gap_steps``), ``direction`` (projection at ``layer``, steps 0..T) and ``logodds`` (the model's
    next-token refusal log-odds, steps 0..T). Steps after the end of a reply are NaN."""
    m = measures.token_prompts
    alive = measures.token_alive[mode]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    gap = measures.token_gap[mode][:, :, layer].copy()
    cols = [0, *measures.gap_steps]
    gap[~alive[:, cols]] = np.nan
    out["gap"] = (gap[:m], gap[m:])
    lo = measures.token_logodds[mode].copy()
    lo[~alive] = np.nan
    out["logodds"] = (lo[:m], lo[m:])
    if directions is not None:
        idx = np.concatenate([np.arange(m), np.arange(m)]) % directions.folds
        states = measures.token_states[mode][:, :, layer : layer + 1]  # keep the layer axis for project()
        sub = Directions(directions.r[:, layer : layer + 1], directions.mid[:, layer : layer + 1], directions.folds)
        proj = project(states, idx, sub)[..., 0]
        proj[~alive] = np.nan
        out["direction"] = (proj[:m], proj[m:])
    return out


def later_layers(layers: int) -> list[int]:
    """The last third of the blocks (the "later layers" a separation verdict talks about)."""
    return list(range(max(1, math.ceil(2 * layers / 3)), layers + 1))
