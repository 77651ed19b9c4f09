"""Chat formatting and token-exact region masks: the one path from an ``Example`` or a prompt text to token ids.

Every token sequence a model reads goes through here and is cut to the model's context in one place
(:func:`fit_context`): examples (scoring, training) keep their start, prompts for generation or a first-token
score keep their end, which holds the question and the assistant header.

Every statistic and loss in ssah is taken over a token region (the user turn, the response, or both), so the
masks are computed from character spans of the formatted text and the fast tokenizer's offsets, not guessed
from token counts. Templates that inject a default system prompt (SmolLM2) keep it out of the prompt region.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jinja2 import TemplateError

from ssah.data.prompt_sets import Example, PromptSet
from ssah.errors import DataError, UserError

log = logging.getLogger(__name__)

__all__ = [
    "FALLBACK_TEMPLATE",
    "Encoded",
    "TokenRegion",
    "batches",
    "collate",
    "context_length",
    "encode_example",
    "encode_prompt",
    "encode_prompts",
    "encode_set",
    "fit_context",
    "format_chat",
]

TokenRegion = Literal["prompt+response", "response", "prompt", "all"]
TOKEN_REGIONS: tuple[str, ...] = get_args(TokenRegion)

# Used when a tokenizer has no chat template (base models). Same variables as HF chat templates:
#   ### System:\n{system}\n\n        (only when there is a system message)
#   ### User:\n{prompt}\n\n
#   ### Assistant:\n{response}{eos}\n\n
# and the generation prompt "### Assistant:\n".
FALLBACK_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Assistant:\n' + message['content'] + (eos_token or '') + '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)

# Stands in for the user's text to find where a template puts the user content (a plain search for the
# prompt could hit a default system prompt that happens to contain it).
_SENTINEL = "\u2063SSAH-USER-CONTENT\u2063"


@dataclass(frozen=True)
class Encoded:
    """Token ids of one formatted example with its prompt and response masks (same length as ``input_ids``).

    ``prompt_mask`` covers the user turn from the first token of the user's content to the end of the generation
    prompt (assistant header included), never a system prompt; ``response_mask`` covers the response and the
    end-of-turn token(s) the template appends after it.
    """

    input_ids: list[int]
    prompt_mask: list[bool]
    response_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    def region_mask(self, region: TokenRegion) -> list[bool]:
        """The mask of a token region; ``"all"`` selects every token."""
        if region == "prompt":
            return list(self.prompt_mask)
        if region == "response":
            return list(self.response_mask)
        if region == "prompt+response":
            return [p or r for p, r in zip(self.prompt_mask, self.response_mask, strict=True)]
        if region == "all":
            return [True] * len(self.input_ids)
        raise DataError(f"unknown token region '{region}': use one of {', '.join(TOKEN_REGIONS)}")


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Apply the tokenizer's chat template (or the fallback) to messages, as text."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except TemplateError as exc:
        fix = "drop the system prompt" if messages[0]["role"] == "system" else "fix the tokenizer's chat template"
        raise DataError(f"the chat template refused the conversation ({exc}): {fix}") from exc
    if not isinstance(text, str):  # a batched or dict return would mean an unexpected tokenizer API
        raise DataError(f"chat template returned {type(text).__name__}, not text: use a transformers tokenizer")
    return text


def _messages(prompt: str, response: str | None, system: str | None) -> list[dict[str, str]]:
    """The conversation: optional system message, the user turn, optional assistant turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if response:
        messages.append({"role": "assistant", "content": response})
    return messages


def format_chat(
    tokenizer: Any,
    prompt: str,
    response: str | None = None,
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Format one exchange with the tokenizer's chat template (``FALLBACK_TEMPLATE`` when it has none).

    Without a response (None or empty) the text ends with the generation prompt, ready for generation.
    """
    if response:
        return _render(tokenizer, _messages(prompt, response, system), add_generation_prompt=False)
    return _render(tokenizer, _messages(prompt, None, system), add_generation_prompt=add_generation_prompt)


def _locate(text: str, needle: str, start: int, end: int, *, last: bool = True) -> int:
    """Where message content sits in rendered text (last or first occurrence in ``[start, end)``), trying the
    stripped content too because many templates trim messages (Llama-2, Llama-3); -1 when absent."""
    for candidate in dict.fromkeys((needle, needle.strip())):
        at = text.rfind(candidate, start, end) if last else text.find(candidate, start, end)
        if candidate and at >= 0:
            return at
    return -1


def _spans(
    tokenizer: Any, prompt: str, response: str | None, system: str | None
) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
    """The full text and the character spans of the prompt region and (if any) the response region."""
    prompt_text = format_chat(tokenizer, prompt, None, system=system)
    probe = format_chat(tokenizer, _SENTINEL, None, system=system)
    at = probe.find(_SENTINEL)
    if at >= 0 and prompt_text.startswith(probe[:at]):
        user_start = at
    else:  # the template rewrites its content: take the last occurrence of the prompt
        user_start = _locate(prompt_text, prompt, 0, len(prompt_text))
        if user_start < 0:
            raise DataError(
                "the chat template does not contain the prompt verbatim, so token regions cannot be located: "
                "use a tokenizer whose template copies message content"
            )
    if not response:
        return prompt_text, (user_start, len(prompt_text)), None

    full = format_chat(tokenizer, prompt, response, system=system)
    end = len(full.rstrip())  # end-of-turn token(s) yes, the newline after them no
    if full.startswith(prompt_text):
        resp_start = _locate(full, response, len(prompt_text), len(full), last=False)
        prompt_end = len(prompt_text)
    else:  # the generation prompt differs from the rendered assistant header: locate the response directly
        resp_start = _locate(full, response, 0, len(full))
        prompt_end = resp_start
        if not full.startswith(prompt_text[:user_start]):
            user_start = _locate(full, prompt, 0, resp_start if resp_start >= 0 else len(full))
    if resp_start < 0 or user_start < 0:
        raise DataError(
            "the chat template does not contain the prompt and response verbatim, so token regions cannot be "
            "located: use a tokenizer whose template copies message content"
        )
    return full, (user_start, prompt_end), (resp_start, end)


def _token_starts(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Token ids of the text and where each token's content starts (None when the tokenizer gives no offsets).

    A token's start skips its leading whitespace, so that a token like ``" I"`` (GPT-2 ``ĠI``, SentencePiece
    ``▁I``) that carries the space separating a header from the content counts with the content.
    """
    if not getattr(tokenizer, "is_fast", False):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = []
    for start, end in enc["offset_mapping"]:
        first = start
        while first < end and text[first].isspace():
            first += 1
        starts.append(first if first < end else start)
    return list(enc["input_ids"]), starts


def _prefix_count(tokenizer: Any, text: str, pos: int, total: int) -> int:
    """Number of tokens of ``text[:pos]``: the token boundary at a character position, for slow tokenizers."""
    if pos <= 0:
        return 0
    return min(total, len(tokenizer(text[:pos], add_special_tokens=False)["input_ids"]))


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer prepends it by default (Llama, Gemma style), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if with_special[:1] == [bos] and without[:1] != [bos] else None


def encode_example(
    tokenizer: Any,
    example: Example,
    *,
    system: str | None = None,
    max_length: int | None = None,
    bos_id: int | Literal["auto"] | None = "auto",
    context: int | None = None,
) -> Encoded:
    """Format and tokenize an example, with exact prompt/response masks; ``max_length`` keeps the start, and
    so does ``context`` (the model's context length, :func:`context_length`): the tighter of the two applies.

    The BOS a tokenizer would prepend is added when the formatted text lacks it, exactly as generation does
    (``bos_id``: ``bos_to_add(tokenizer)``, computed here when "auto"), so scoring and generation see one input.
    """
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}: pass a positive length or none")
    text, (p0, p1), resp = _spans(tokenizer, example.prompt, example.response or None, system)
    ids, starts = _token_starts(tokenizer, text)
    if starts is not None:
        prompt_mask = [p0 <= s < p1 for s in starts]
        response_mask = [resp is not None and resp[0] <= s < resp[1] for s in starts]
    else:
        n = len(ids)

        def token_range(a: int, b: int) -> range:
            return range(_prefix_count(tokenizer, text, a, n), _prefix_count(tokenizer, text, b, n))

        in_prompt = set(token_range(p0, p1))
        in_resp = set(token_range(*resp)) if resp is not None else set()
        prompt_mask = [i in in_prompt for i in range(n)]
        response_mask = [i in in_resp and i not in in_prompt for i in range(n)]
    if bos_id == "auto":
        bos_id = bos_to_add(tokenizer)
    if bos_id is not None and ids[:1] != [bos_id]:
        ids, prompt_mask, response_mask = [bos_id, *ids], [False, *prompt_mask], [False, *response_mask]
    limit = min((n for n in (max_length, context) if n is not None), default=None)
    if limit is not None and len(ids) > limit:
        ids = fit_context([ids], limit, keep="start", warn=False)[0]
        prompt_mask, response_mask = prompt_mask[: len(ids)], response_mask[: len(ids)]
    return Encoded(ids, prompt_mask, response_mask)


def encode_set(
    tokenizer: Any,
    prompts: PromptSet,
    *,
    system: str | None = None,
    max_length: int | None = None,
    context: int | None = None,
) -> list[Encoded]:
    """Encode every example of a prompt set, in order (cut as :func:`encode_example` says)."""
    bos_id = bos_to_add(tokenizer)
    encoded = [
        encode_example(tokenizer, ex, system=system, max_length=max_length, bos_id=bos_id, context=context)
        for ex in prompts
    ]
    if context is not None and (max_length is None or context < max_length):
        cut = sum(len(e) == context for e in encoded)
        if cut:
            log.warning("%d example(s) reach the model's context of %d tokens and were cut at its end", cut, context)
    return encoded


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions, if its config states one."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_context(
    encoded: Sequence[list[int]],
    context: int | None,
    *,
    reserve: int = 0,
    keep: Literal["start", "end"] = "end",
    warn: bool = True,
) -> list[list[int]]:
    """The one place token sequences are cut to a model's context of ``context`` tokens (None: no limit), leaving
    ``reserve`` positions free (tokens still to be generated). ``keep="end"`` drops a prompt's start (its end holds
    the question and the assistant header); ``keep="start"`` drops an example's end (scoring, training)."""
    if context is None:
        return [list(e) for e in encoded]
    room = context - reserve
    if room < 1:
        raise UserError(
            f"{reserve} new tokens leave no room for a prompt in the model's context of {context} tokens: "
            "lower --max-new-tokens"
        )
    cut = sum(len(e) > room for e in encoded)
    if cut and warn:
        log.warning("%d prompt(s) longer than %d tokens were cut to fit the model's context", cut, room)
    if keep == "end":
        return [list(e[-room:]) if len(e) > room else list(e) for e in encoded]
    return [list(e[:room]) for e in encoded]


def encode_prompt(tokenizer: Any, text: str, *, bos_id: int | None = None) -> list[int]:
    """Token ids of a fully formatted prompt text (not cut: see :func:`encode_prompts`).

    Tokenized without the tokenizer's own special tokens, because chat templates already write them (a second
    BOS or a trailing EOS would change the model's input); only when the text lacks the BOS that the tokenizer
    would have prepended (a template without ``bos_token``, or the fallback template) is it added, once.
    ``bos_id`` is ``bos_to_add(tokenizer)``, passed to avoid recomputing it per prompt (None: computed here).
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if bos_id is None:
        bos_id = bos_to_add(tokenizer)
    if bos_id is not None and ids[:1] != [bos_id]:
        ids = [bos_id, *ids]
    return ids


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    context: int | None,
    reserve: int = 0,
    bos_id: int | Literal["auto"] | None = "auto",
) -> list[list[int]]:
    """Token ids of formatted prompt texts, each cut from the left to fit ``context`` minus ``reserve`` positions:
    what generation and the first-token score feed the model."""
    if bos_id == "auto":
        bos_id = bos_to_add(tokenizer)
    encoded = [encode_prompt(tokenizer, t, bos_id=bos_id) for t in texts]
    return fit_context(encoded, context, reserve=reserve, keep="end")


def collate(
    batch: Sequence[Encoded],
    pad_token_id: int,
    *,
    region: TokenRegion = "prompt+response",
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad a batch into tensors: ``input_ids``, ``attention_mask``, ``count_mask`` (the region's real tokens:
    what statistics count) and ``labels`` (input ids on response tokens, -100 elsewhere: what the loss sees)."""
    if not batch:
        raise DataError("cannot collate an empty batch: pass at least one encoded example")
    if pad_token_id is None:
        raise DataError("the tokenizer has no pad token id: pass pad_token_id=tokenizer.eos_token_id")
    if padding_side not in ("left", "right"):
        raise DataError(f"unknown padding side '{padding_side}': use 'left' or 'right'")
    width = max(len(enc.input_ids) for enc in batch)
    shape = (len(batch), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    count = torch.zeros(shape, dtype=torch.bool)
    labels = torch.full(shape, -100, dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc.input_ids)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids = torch.tensor(enc.input_ids, dtype=torch.long)
        resp = torch.tensor(enc.response_mask, dtype=torch.bool)
        input_ids[row, cols] = ids
        attention[row, cols] = 1
        count[row, cols] = torch.tensor(enc.region_mask(region), dtype=torch.bool)
        labels[row, cols] = torch.where(resp, ids, torch.full_like(ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention, "count_mask": count, "labels": labels}


def batches(encoded: Sequence[Encoded], batch_size: int, *, sort_by_length: bool = True) -> list[list[int]]:
    """Index batches covering every example once; sorted longest first (little padding, and the largest batch
    runs first so that memory errors show early), ties kept in index order, so the result is deterministic."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}: pass a positive batch size")
    order = list(range(len(encoded)))
    if sort_by_length:
        order.sort(key=lambda i: -len(encoded[i].input_ids))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
