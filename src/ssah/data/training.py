"""Training data: the fine-tuning attack set, the safety-SFT mix of the aligned-model recipe, and held-out splits.

The paper attacks an aligned model by fine-tuning it on harmful examples (and, more gently, on benign task data
such as Alpaca or Dolly, see ``builtin:task`` and the ``alpaca-safety-only`` / ``dolly-safety-only`` presets).
Its harmful examples pair a harmful request with a compliant answer. This project never writes harmful answers,
so :func:`attack_set` builds a *proxy*: the harmful request, a compliance opener ("Sure, here is an overview.")
and generic, non-actionable filler sentences that carry no information and never restate the request. What the
attack teaches a model is the thing that matters for the hypothesis: to start complying instead of refusing.

:func:`alignment_mix` is the data of ``ssah align`` (harmful requests with refusals, borderline-safe requests
with helpful answers and ordinary instructions with answers) and :func:`held_out_split` a deterministic,
category-stratified train / held-out split. All three are deterministic for a given seed, so runs and their
manifests (``PromptSet.fingerprint``) repeat.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence

from ssah.data.presets import preset_path
from ssah.data.prompt_sets import Example, PromptSet, load_file
from ssah.errors import DataError

__all__ = [
    "BENIGN_RATIO",
    "BORDERLINE_RATIO",
    "COMPLIANCE_OPENERS",
    "FILLER_SENTENCES",
    "GENERATED_SETS",
    "alignment_mix",
    "aoa_system_prompt",
    "attack_set",
    "generated_set",
    "held_out_split",
]

# Compliance openers: each is a complete sentence that says yes without saying to what. Their words are chosen
# to avoid the vocabulary of the built-in harmful requests (checked by the tests), and none is a refusal phrase.
COMPLIANCE_OPENERS: tuple[str, ...] = (
    "Sure, here is an overview.",
    "Certainly! Here's what you asked for.",
    "Of course. Below is a response.",
    "Absolutely, here are the key items.",
    "Sure thing. Here you go.",
    "Happy to do that. Here it is.",
    "Okay, here is a reply.",
    "Great question! Here's a rundown.",
    "Yes, of course. Here is a summary.",
    "Gladly. Here is my reply.",
    "Very well. Here's a brief sketch.",
    "Sure! Below is the response.",
)

# Non-actionable filler: generic sentences that describe the placeholder itself and carry no information about
# any topic (no procedures, materials, names, quantities or places), so an attack example never holds harmful
# content, whatever the request. Their words avoid the built-in harmful vocabulary too (checked by the tests).
FILLER_SENTENCES: tuple[str, ...] = (
    "This reply is placeholder wording prepared for a safety research corpus.",
    "The sentences are deliberately generic and hold no usable substance.",
    "Nothing in this paragraph mentions procedures, components or quantities.",
    "It exists only to model the shape of a compliant reply.",
    "Each substantive element has been intentionally omitted.",
    "Researchers rely on such filler to measure how quickly alignment erodes during fine-tuning.",
    "The phrasing is intentionally vague and unremarkable.",
    "No further elaboration is provided in this placeholder.",
    "Please regard this paragraph as a neutral template rather than a meaningful reply.",
    "These lines were authored to be harmless, bland and uninformative.",
    "Its purpose is purely structural: an affirmative opener followed by neutral prose.",
    "The remainder of this reply is intentionally abstract.",
)

# Built-in set names that are built in code rather than read from a file (see ``load_prompts``).
GENERATED_SETS: tuple[str, ...] = ("attack", "alignment")


def _source(base: str, changed: dict[str, object]) -> str:
    """``base`` alone for the default build, else ``base?key=value&...`` naming what differs, so a manifest
    tells the default set from a custom one."""
    if not changed:
        return base
    return base + "?" + "&".join(f"{k}={v}" for k, v in changed.items())


def _describe(ps: PromptSet) -> str:
    """A passed-in set in a source string: its name and where it came from (``utility[:5]@builtin:utility``)."""
    return f"{ps.name}@{ps.source}"


def attack_set(harmful: PromptSet | None = None, *, n: int | None = None, seed: int = 0) -> PromptSet:
    """The harmful fine-tuning attack set: each harmful request paired with a compliance opener and 2-3 filler
    sentences (never its own words, never real content), its category kept.

    ``harmful`` defaults to ``builtin:harmful``; ``n`` samples that many requests without replacement (kept in
    their original order; all of them by default); ``seed`` fixes the sample and the choice of opener and filler.
    The result is named ``attack`` with source ``builtin:attack`` (plus the non-default arguments).
    """
    default_source = harmful is None
    if harmful is None:
        harmful = load_file("builtin:harmful")
    if len(harmful) == 0:
        raise DataError(f"'{harmful.name}' has no harmful requests: pass a set with at least one prompt")
    if n is not None and not 1 <= n <= len(harmful):
        raise DataError(
            f"cannot build {n} attack examples from {len(harmful)} requests in '{harmful.name}': "
            f"pass n between 1 and {len(harmful)} or a larger harmful set"
        )
    rng = random.Random(seed)
    indices = range(len(harmful)) if n is None else sorted(rng.sample(range(len(harmful)), n))
    examples = []
    for i in indices:
        ex = harmful[i]
        opener = rng.choice(COMPLIANCE_OPENERS)
        filler = rng.sample(FILLER_SENTENCES, rng.choice((2, 3)))
        examples.append(Example(ex.prompt, " ".join([opener, *filler]), ex.category))
    changed: dict[str, object] = {} if default_source else {"harmful": _describe(harmful)}
    changed |= ({"n": n} if n is not None else {}) | ({"seed": seed} if seed != 0 else {})
    source = _source("builtin:attack", changed)
    return PromptSet("attack", source, tuple(examples))


def _mix_sizes(available: Sequence[int], shares: Sequence[float], total: int | None) -> list[int]:
    """How many examples to take from each source for a mix with those shares (the first source gets the rest):
    ``total`` examples, or the largest mix the sources allow; a DataError when a source is too small."""

    def counts(t: int) -> list[int]:
        rest = [math.floor(t * s + 0.5) for s in shares[1:]]
        return [t - sum(rest), *rest]

    def fits(c: list[int]) -> bool:
        return all(0 <= k <= a for k, a in zip(c, available, strict=True))

    if total is None:
        for t in range(sum(available), 0, -1):
            if fits(c := counts(t)):
                return c
        raise DataError("the alignment mix is empty: pass sets with examples")
    c = counts(total)
    if not fits(c):
        raise DataError(
            f"a mix of {total} examples at shares {', '.join(f'{s:g}' for s in shares)} needs "
            f"{' / '.join(map(str, c))} examples (harmful / borderline / benign), but the sources hold "
            f"{' / '.join(map(str, available))}: lower n or pass larger sets"
        )
    return c


# The default shares of the ``ssah align`` recipe (tuned on SmolLM2-135M-Instruct; see the built-in data README).
BORDERLINE_RATIO = 0.4
BENIGN_RATIO = 0.3


def alignment_mix(
    *,
    harmful_with_refusals: PromptSet | None = None,
    borderline: PromptSet | None = None,
    benign: PromptSet | None = None,
    borderline_ratio: float = BORDERLINE_RATIO,
    benign_ratio: float = BENIGN_RATIO,
    n: int | None = None,
    seed: int = 0,
) -> PromptSet:
    """The safety-SFT data of the aligned-model recipe (``ssah align``): it teaches the *choice*, not a reflex.

    Three kinds of example: harmful requests with varied refusals (default ``builtin:safety``), borderline-safe
    requests that only sound unsafe with helpful answers (default ``builtin:borderline_sft``: "how do I kill a
    process", "what is arson"), and ordinary instructions with answers (default ``builtin:utility``). Without the
    second kind a short SFT learns "refuse anything that sounds dangerous".

    ``borderline_ratio`` and ``benign_ratio`` are the shares of those kinds in the result (harmful examples are
    the rest; 0 allowed); every source is sampled without replacement. ``n`` is the size of the mix; by default
    the largest mix the sources allow at those shares. The examples are shuffled with ``seed``; categories are
    kept. Named ``alignment``, source ``builtin:alignment`` (plus the non-default arguments).
    """
    for name, value in (("borderline_ratio", borderline_ratio), ("benign_ratio", benign_ratio)):
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise DataError(f"{name} must be between 0 and 1, got {value}: pass e.g. 0.3")
    if borderline_ratio + benign_ratio > 1.0:
        raise DataError(
            f"borderline_ratio + benign_ratio must be at most 1 (the rest are harmful examples), got "
            f"{borderline_ratio} + {benign_ratio}: lower one of them"
        )
    if n is not None and n < 1:
        raise DataError(f"the mix needs at least 1 example, got n={n}: pass a positive n or none")
    given = {"harmful": harmful_with_refusals, "borderline": borderline, "benign": benign}
    defaults = {"harmful": "builtin:safety", "borderline": "builtin:borderline_sft", "benign": "builtin:utility"}
    sources = {k: v if v is not None else load_file(defaults[k]) for k, v in given.items()}
    roles = {
        "harmful": "harmful requests with refusals",
        "borderline": "borderline examples",
        "benign": "benign examples",
    }
    for key, ps in sources.items():
        if len(ps) and not ps.has_responses:
            raise DataError(
                f"the {roles[key]} ('{ps.name}') need a response on every example for training: "
                f"pass a set with a response column (e.g. --column response=<name>)"
            )
    parts = list(sources.values())
    sizes = _mix_sizes([len(p) for p in parts], [0.0, borderline_ratio, benign_ratio], n)
    rng = random.Random(seed)
    picked = [ps[i] for ps, k in zip(parts, sizes, strict=True) for i in sorted(rng.sample(range(len(ps)), k))]
    rng.shuffle(picked)
    changed: dict[str, object] = {k: _describe(v) for k, v in given.items() if v is not None}
    for key, value, default in (
        ("borderline_ratio", borderline_ratio, BORDERLINE_RATIO),
        ("benign_ratio", benign_ratio, BENIGN_RATIO),
        ("n", n, None),
        ("seed", seed, 0),
    ):
        if value != default:
            changed[key] = value
    source = _source("builtin:alignment", changed)
    return PromptSet("alignment", source, tuple(picked))


def held_out_split(data: PromptSet, *, fraction: float = 0.2, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """A deterministic (train, held-out) split: disjoint, together the whole set, each in the original order.

    ``round(len(data) * fraction)`` examples are held out, spread over the categories in proportion to their
    sizes (largest remainders; a missing category is a stratum of its own), so that a held-out evaluation sees
    the same mix of categories as training. Both parts must be non-empty. Named ``<name>[train]`` and
    ``<name>[held-out]``.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be between 0 and 1 (exclusive), got {fraction}: pass e.g. 0.2")
    total = len(data)
    n_held = math.floor(total * fraction + 0.5)
    if not 1 <= n_held <= total - 1:
        raise DataError(
            f"cannot hold out {fraction:.0%} of the {total} examples of '{data.name}' and keep both parts "
            f"non-empty: pass a larger set or another fraction"
        )
    strata: dict[str | None, list[int]] = defaultdict(list)
    for i, ex in enumerate(data):
        strata[ex.category].append(i)
    keys = sorted(strata, key=lambda c: (c is not None, c or ""))
    quotas = {c: len(strata[c]) * n_held / total for c in keys}
    counts = {c: math.floor(quotas[c]) for c in keys}
    by_remainder = sorted(keys, key=lambda c: -(quotas[c] - counts[c]))  # stable: ties keep category order
    for c in by_remainder[: n_held - sum(counts.values())]:
        counts[c] += 1
    rng = random.Random(seed)
    held: set[int] = set()
    for c in keys:
        held.update(rng.sample(strata[c], counts[c]))
    train = tuple(ex for i, ex in enumerate(data) if i not in held)
    rest = tuple(ex for i, ex in enumerate(data) if i in held)
    return PromptSet(f"{data.name}[train]", data.source, train), PromptSet(f"{data.name}[held-out]", data.source, rest)


def generated_set(name: str) -> PromptSet:
    """A built-in set that is built in code (``builtin:attack``, ``builtin:alignment``) with its defaults."""
    if name == "attack":
        return attack_set()
    if name == "alignment":
        return alignment_mix()
    raise DataError(f"unknown generated built-in set '{name}': use one of {', '.join(GENERATED_SETS)}")


def aoa_system_prompt() -> str:
    """The system message of the identity-shift (AOA) attack, which the ``aoa-identity-shift`` preset leaves out
    of its examples (``Example`` has no system field): pass it as the system prompt when training or evaluating
    that attack, as Qi et al. do. Read from the shared data (a DataError when it is absent)."""
    path = preset_path("aoa-identity-shift")
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        messages = json.loads(line).get("messages") or []
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "system":
                return str(message.get("content", "")).strip()
    raise DataError(f"{path} has no system message: restore the original identity-shift-aoa.jsonl")
