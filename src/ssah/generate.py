"""Batched generation: the one place ssah produces text.

Prompts are formatted with the chat template (``ssah.data.format_chat``), an optional prefill is appended verbatim
after the generation prompt, and the batch is left-padded, sorted longest first (little padding) and generated
with HF ``generate``; results come back in input order. Greedy decoding is the default, and greedy outputs are
the same as one-prompt-at-a-time generation. Sampling is reproducible with a seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import transformers
from tqdm.auto import tqdm

from ssah.data import format_chat
from ssah.data.chat import bos_to_add, context_length, encode_prompt, encode_prompts
from ssah.errors import ModelError, UserError
from ssah.inference import frozen_eval, model_device, pad_id

__all__ = [
    "END_OF_TURN_TOKENS",
    "Generation",
    "GenerationConfig",
    "bos_to_add",
    "context_length",
    "encode_prompt",
    "eos_token_ids",
    "generate",
    "prompt_texts",
]

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
"""End-of-turn tokens that stop generation when the tokenizer knows them and its chat template writes them, even
if the model's configs name another EOS (a base model given a chat template)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Greedy by default; ``temperature`` and ``top_p`` only apply when ``do_sample``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | Literal["auto"] = 16  # "auto": the largest that fits, halved on out-of-memory, remembered
    system: str | None = None
    bf16: bool = False  # bf16 autocast around decoding (weights stay as loaded): see ssah.config's ``bf16``

    def check(self) -> None:
        """Raise a one-line UserError for settings that cannot generate."""
        if self.max_new_tokens < 1:
            raise UserError(
                f"max_new_tokens must be at least 1: got {self.max_new_tokens}, pass --max-new-tokens 1 or more"
            )
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UserError(
                f"batch_size must be at least 1 or auto: got {self.batch_size!r}, pass a positive batch size"
            )
        if self.do_sample and not self.temperature > 0:
            raise UserError(
                f"temperature must be above 0 when sampling: got {self.temperature}, pass a positive temperature "
                "or turn sampling off for greedy decoding"
            )
        if self.do_sample and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1]: got {self.top_p}, pass a value such as 0.9 or 1.0")


@dataclass(frozen=True)
class Generation:
    """One generated reply: ``output`` is the continuation after ``prefill``, so ``prefill + output`` is the
    assistant turn as the model wrote it (special tokens skipped, trailing whitespace stripped)."""

    prompt: str
    prefill: str
    output: str
    new_tokens: int  # tokens generated, up to and including the end-of-sequence token when one was hit
    finished: bool  # stopped on an end-of-sequence / end-of-turn token (not on max_new_tokens)


log = logging.getLogger(__name__)


def _ids(value: Any) -> list[int]:
    """A token id, a list of ids or None, as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's and the model's EOS, plus the end-of-turn tokens in
    ``END_OF_TURN_TOKENS`` that the chat template writes (ChatML models stop on ``<|im_end|>``)."""
    ids = _ids(getattr(tokenizer, "eos_token_id", None))
    gen_config = getattr(model, "generation_config", None)
    ids += _ids(getattr(gen_config, "eos_token_id", None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        ids += [vocab[tok] for tok in END_OF_TURN_TOKENS if tok in template and tok in vocab]
    return list(dict.fromkeys(ids))


def prompt_texts(tokenizer: Any, prompts: Sequence[str], prefills: Sequence[str], system: str | None) -> list[str]:
    """The text the model continues: the chat-formatted prompt ending in the generation prompt, then the prefill."""
    return [format_chat(tokenizer, p, system=system) + f for p, f in zip(prompts, prefills, strict=True)]


def _prefills(prefill: str | Sequence[str] | None, n: int) -> list[str]:
    """One prefill per prompt from None, a single string, or a sequence of n strings."""
    if prefill is None:
        return [""] * n
    if isinstance(prefill, str):
        return [prefill] * n
    out = list(prefill)
    if len(out) != n:
        raise UserError(f"got {len(out)} prefills for {n} prompts: pass one prefill string or one per prompt")
    return out


def _hf_config(model: Any, config: GenerationConfig, eos: list[int], pad: int) -> transformers.GenerationConfig:
    """A fresh HF generation config: the model's token ids and our decoding settings, with neutral values for
    the logits processors a hub ``generation_config.json`` may switch on, so that greedy means plain argmax."""
    base = getattr(model, "generation_config", None)
    settings: dict[str, Any] = {
        "bos_token_id": getattr(base, "bos_token_id", None),
        "eos_token_id": eos or None,
        "pad_token_id": pad,
        "max_new_tokens": config.max_new_tokens,
        "do_sample": config.do_sample,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "use_cache": True,
    }
    if config.do_sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    else:
        settings.update(temperature=1.0, top_p=1.0, top_k=50)  # HF's neutral values; unused when greedy
    return transformers.GenerationConfig(**settings)


class _LengthClashFilter(logging.Filter):
    """Drops HF's "both max_new_tokens and max_length set" notice: a hub generation config's ``max_length`` is
    always overridden by our ``max_new_tokens``, on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "seem to have been set" not in record.getMessage()


@contextmanager
def _quiet_length_clash() -> Iterator[None]:
    """Install :class:`_LengthClashFilter` on the transformers generation logger for the block."""
    hf_logger = logging.getLogger("transformers.generation.utils")
    flt = _LengthClashFilter()
    hf_logger.addFilter(flt)
    try:
        yield
    finally:
        hf_logger.removeFilter(flt)


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask for a batch of token id lists."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _split(tokens: list[int], eos: set[int]) -> tuple[list[int], int, bool]:
    """Generated ids up to the first EOS (excluded), the count including that EOS, and whether one was hit."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i], i + 1, True
    return tokens, len(tokens), False


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    config: GenerationConfig = GenerationConfig(),
    prefill: str | Sequence[str] | None = None,
    progress: bool = True,
    desc: str | None = None,
    preformatted: bool = False,
) -> list[Generation]:
    """Generate a reply to each prompt (chat-formatted with ``config.system``), in input order.

    ``prefill`` (one string for all prompts, or one per prompt) is forced at the start of the assistant turn; the
    returned ``output`` is what the model wrote after it. Batches are left-padded and sorted by prompt length,
    longest first; greedy outputs equal one-at-a-time generation. Sampling draws from ``torch.manual_seed(seed)``
    set once per call, with the global RNG state restored afterwards. ``preformatted=True`` takes the prompts as
    complete model inputs (chat formatting already applied, e.g. a guard model's own template) and skips
    ``format_chat``.
    """
    config.check()
    if not callable(getattr(model, "generate", None)):
        raise ModelError(
            f"{type(model).__name__} cannot generate text: load a causal language model (AutoModelForCausalLM)"
        )
    if isinstance(prompts, str):
        raise UserError("generate() takes a sequence of prompts, not one string: wrap the prompt in a list")
    prompts = list(prompts)
    prefills = _prefills(prefill, len(prompts))
    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad = pad_id(tokenizer, eos)
    hf_config = _hf_config(model, config, eos, pad)
    bos_id = bos_to_add(tokenizer)
    if preformatted:
        texts = [p + f for p, f in zip(prompts, prefills, strict=True)]
    else:
        texts = prompt_texts(tokenizer, prompts, prefills, config.system)
    encoded = encode_prompts(
        tokenizer, texts, context=context_length(model), reserve=config.max_new_tokens, bos_id=bos_id
    )
    if any(not e for e in encoded):
        raise UserError("a prompt formats to no tokens at all: give the tokenizer a chat template or non-empty prompts")
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    device = model_device(model)
    eos_set = set(eos)
    results: list[Generation | None] = [None] * len(prompts)
    devices = [device] if device.type == "cuda" else []

    def run(batch_size: int) -> None:
        """Generate every prompt still without a result, ``batch_size`` at a time (a retry after an
        out-of-memory error continues where the failed batch started)."""
        todo = [i for i in order if results[i] is None]
        chunks = [todo[k : k + batch_size] for k in range(0, len(todo), batch_size)]
        for chunk in tqdm(chunks, desc=desc or "generate", disable=not progress, unit="batch"):
            input_ids, attention_mask = left_pad([encoded[i] for i in chunk], pad, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=hf_config)
            new = out[:, input_ids.shape[1] :].tolist()
            del out
            for row, i in enumerate(chunk):
                kept, count, finished = _split(new[row], eos_set)
                text = tokenizer.decode(kept, skip_special_tokens=True).rstrip()
                results[i] = Generation(prompts[i], prefills[i], text, count, finished)

    with frozen_eval(model, inference=True), _quiet_length_clash(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        if config.batch_size == "auto":
            auto_generation(model, run, longest=len(encoded[order[0]]), config=config, prompts=len(prompts))
        else:
            run(config.batch_size)
    return [r for r in results if r is not None]


def auto_generation(model: Any, run: Any, *, longest: int, config: GenerationConfig, prompts: int) -> int:
    """Call ``run(batch_size)`` with the largest generation batch that fits: from the plan's start (or the size
    remembered for this model and length), halving on out-of-memory; returns the size that worked."""
    from ssah.plan import batch_key, find_batch_size, start_from_plan

    start = start_from_plan(model, "eval", prompt_len=longest, new_tokens=config.max_new_tokens)
    key = batch_key(model, "generate", longest + config.max_new_tokens)
    size, _ = find_batch_size(run, start=min(start, max(prompts, 1)), key=key, what="a generation batch")
    return size


def generation_batch_size(model: Any, tokenizer: Any, prompts: Sequence[str], config: GenerationConfig) -> int:
    """``config.batch_size`` as a number: "auto" is resolved by generating the longest prompts once at the
    largest batch that fits (for callers that need one size for generation and their other passes)."""
    if config.batch_size != "auto":
        return config.batch_size
    if not prompts:
        return 1
    texts = prompt_texts(tokenizer, list(prompts), [""] * len(prompts), config.system)
    bos_id = bos_to_add(tokenizer)
    lengths = [len(encode_prompt(tokenizer, t, bos_id=bos_id)) for t in texts]
    longest = [p for _, p in sorted(zip(lengths, prompts, strict=True), key=lambda x: -x[0])]
    found: dict[str, int] = {}

    def run(batch_size: int) -> None:
        found["size"] = batch_size
        probe = (longest * batch_size)[:batch_size]
        generate(model, tokenizer, probe, config=replace(config, batch_size=batch_size), progress=False)

    with frozen_eval(model, inference=True), _quiet_length_clash():
        auto_generation(model, run, longest=max(lengths), config=config, prompts=len(prompts))
    return found["size"]
