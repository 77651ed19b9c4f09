"""Preference pairs for the DPO step, built at run time from an alignment mix (never stored in the repository).

Harmful request -> its refusal from the data (chosen) over the model's own reply, generated greedily at run time
(rejected); a request the model already refused gives no pair (there would be nothing to push apart).
Borderline-safe and ordinary request -> the data's reference answer (chosen) over a refusal (rejected): the
opening sentence of one of the data's refusals, drawn with the seed, so the rejected side is the refusal reflex
itself, not another topic's advice.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ssah.data import Encoded, PromptSet, encode_example
from ssah.data.prompt_sets import Example
from ssah.errors import DataError

KINDS = ("harmful", "safe")


@dataclass(frozen=True)
class Pair:
    """One preference pair: ``chosen`` should become more likely than ``rejected`` after ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    kind: str  # "harmful" (refusal over compliance) or "safe" (answer over refusal)
    category: str | None = None


def refusal_openers(refusals: Sequence[str]) -> list[str]:
    """The first sentence of each refusal, without repeats, in order (``"I'm sorry, but I can't help with that."``)."""
    out: list[str] = []
    for text in refusals:
        first = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0].strip()
        if first and first not in out:
            out.append(first)
    return out


def preference_pairs(
    model: Any,
    tokenizer: Any,
    data: PromptSet,
    harmful: Collection[str],
    *,
    judge: Any,
    generation: Any,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[Pair], dict[str, int]]:
    """The pairs of ``data`` (every example with a response): prompts in ``harmful`` are harmful requests whose
    response is a refusal; the others are safe requests whose response is a helpful answer.

    The model's replies to the harmful prompts are generated in one batched greedy pass (``generation``, a
    :class:`ssah.generate.GenerationConfig`) and judged by ``judge``; those it refused are dropped. Returns the
    pairs in the order of ``data`` and their counts."""
    from ssah.generate import generate

    if not data.has_responses:
        raise DataError(f"preference pairs need a response on every example of {data.name!r}")
    harmful_set = set(harmful)
    bad = [ex for ex in data if ex.prompt in harmful_set]
    refusals = refusal_openers([ex.response or "" for ex in bad])
    if not refusals:
        raise DataError("preference pairs need refusals: the mix has no harmful request with a refusal")
    replies = generate(model, tokenizer, [ex.prompt for ex in bad], config=generation, progress=progress, desc="pairs")
    verdicts = judge.judge([ex.prompt for ex in bad], [r.prefill + r.output for r in replies])
    complied = {ex.prompt: r.output for ex, r, v in zip(bad, replies, verdicts, strict=True) if not v.refused}
    rng = random.Random(seed)
    pairs: list[Pair] = []
    for ex in data:
        assert ex.response is not None
        if ex.prompt in harmful_set:
            reply = complied.get(ex.prompt)
            if reply and reply.strip() != ex.response.strip():
                pairs.append(Pair(ex.prompt, ex.response, reply, "harmful", ex.category))
        else:
            pairs.append(Pair(ex.prompt, ex.response, rng.choice(refusals), "safe", ex.category))
    counts = {
        "pairs": len(pairs),
        "harmful": sum(p.kind == "harmful" for p in pairs),
        "safe": sum(p.kind == "safe" for p in pairs),
        "harmful_already_refused": len(bad) - len(complied),
    }
    if not pairs:
        raise DataError("no preference pair could be built: every harmful reply was a refusal and no safe request")
    return pairs, counts


def pairs_jsonl(pairs: Sequence[Pair]) -> str:
    """The pairs as JSON lines (what ``--keep-pairs`` writes into the run folder)."""
    return "".join(json.dumps(asdict(p)) + "\n" for p in pairs)


def encode_pair(
    tokenizer: Any, pair: Pair, *, system: str | None, max_length: int, bos_id: int | None
) -> dict[str, list[int]] | None:
    """The pair as trl's DPOTrainer takes it (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), formatted and
    tokenized exactly as the SFT step formats its examples (:func:`ssah.data.encode_example`: chat template,
    system prompt, BOS); None when the prompt alone fills ``max_length``."""
    sides = []
    for reply in (pair.chosen, pair.rejected):
        enc = encode_example(
            tokenizer, Example(pair.prompt, reply), system=system, max_length=max_length, bos_id=bos_id
        )
        sides.append(_split(enc))
    (prompt_a, chosen), (prompt_b, rejected) = sides
    if prompt_a != prompt_b or not chosen or not rejected:
        return None
    return {"prompt_ids": prompt_a, "chosen_ids": chosen, "rejected_ids": rejected}


def _split(enc: Encoded) -> tuple[list[int], list[int]]:
    """Prompt tokens (everything before the response) and the response with its end-of-turn token(s)."""
    where = [i for i, m in enumerate(enc.response_mask) if m]
    if not where:
        return list(enc.input_ids), []
    return list(enc.input_ids[: where[0]]), list(enc.input_ids[where[0] : where[-1] + 1])
