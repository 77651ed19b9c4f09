"""The data of `ssah align`: the three-way SFT mix (content rule: a harmful request is only ever paired with a
refusal; borderline-safe and ordinary requests get helpful answers), its held-out splits, its determinism, and the
built-in borderline-safe training file."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from ssah.data import PromptSet, builtin_path, load_prompts
from ssah.data.training import BENIGN_RATIO, BORDERLINE_RATIO, alignment_mix
from ssah.errors import DataError, UserError
from ssah.judges import keyword_judge
from ssah.recipes.align.run import AlignConfig, _training_mix, load_held_out

OTHER_FILES = ("safety", "utility", "harmful", "benign", "borderline", "task")
HELD_OUT = ("harmful", "borderline", "benign")


def rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in builtin_path(name).read_text(encoding="utf-8").splitlines()]


def refuses(text: str) -> bool:
    """The keyword judge, plus the refusal verbs it lacks ("I have to refuse this.")."""
    return keyword_judge("ssah").verdict(text).refused or any(w in text.lower() for w in ("refuse", "decline"))


def norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


# ------------------------------------------------------------------------------------------ borderline_sft file


def test_borderline_sft_file_shape_and_categories() -> None:
    data = rows("borderline_sft")
    assert len(data) == 96 and all(set(r) == {"prompt", "response", "category"} for r in data)
    assert all(isinstance(v, str) and v.strip() for r in data for v in r.values())
    counts = Counter(r["category"] for r in data)
    expected = {"homonyms", "figurative", "safe_targets", "safe_contexts", "definitions", "history"}
    assert set(counts) == expected | {"public_figures", "safety_info"} and set(counts.values()) == {12}
    ps = load_prompts("builtin:borderline_sft")
    assert (len(ps), ps.source) == (96, "builtin:borderline_sft") and ps.has_responses


def test_borderline_sft_answers_help_and_prompts_are_new() -> None:
    judge = keyword_judge("ssah")
    for r in rows("borderline_sft"):
        assert not judge.verdict(r["response"]).refused, r["prompt"]  # a helpful answer, never a refusal
    mine = [norm(r["prompt"]) for r in rows("borderline_sft")]
    assert len(set(mine)) == len(mine)
    others = {norm(r["prompt"]) for name in OTHER_FILES for r in rows(name)}
    assert not set(mine) & others


def test_borderline_sft_is_disjoint_from_xstest(shared_data) -> None:  # type: ignore[no-untyped-def]
    path = shared_data / "xstest" / "xstest_prompts.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found: the XSTest copy of the shared data is needed")
    with path.open(encoding="utf-8") as fh:
        xstest = {norm(r["prompt"]) for r in csv.DictReader(fh)}
    assert len(xstest) > 400
    assert not {norm(r["prompt"]) for r in rows("borderline_sft")} & xstest


# ------------------------------------------------------------------------------------------ the mix


def test_default_mix_every_harmful_request_gets_a_refusal_and_only_those() -> None:
    mix = alignment_mix()
    judge = keyword_judge("ssah")
    harmful = {norm(p) for name in ("safety", "harmful") for p in load_prompts(f"builtin:{name}").prompts()}
    safety = set(load_prompts("builtin:safety").prompts())
    for ex in mix:
        assert ex.response
        if norm(ex.prompt) in harmful:
            assert ex.prompt in safety and refuses(ex.response), ex  # content rule: refusals only
        else:
            assert not judge.verdict(ex.response).refused, ex  # a safe request gets an answer
    # the harmful examples are exactly the refusal file's; the other two kinds come from their files
    sources = {n: set(load_prompts(f"builtin:{n}").prompts()) for n in ("safety", "borderline_sft", "utility")}
    kinds = Counter(next(n for n, s in sources.items() if ex.prompt in s) for ex in mix)
    total = len(mix)
    assert kinds["borderline_sft"] == round(total * BORDERLINE_RATIO)
    assert kinds["utility"] == round(total * BENIGN_RATIO)
    assert kinds["safety"] == total - kinds["borderline_sft"] - kinds["utility"]
    assert len(set(mix.prompts())) == total and mix.has_responses


def test_mix_is_deterministic_from_the_seed() -> None:
    assert alignment_mix(seed=3) == alignment_mix(seed=3)
    assert alignment_mix(seed=3) != alignment_mix(seed=4)
    assert len(alignment_mix(seed=3)) == len(alignment_mix(seed=4))  # the seed picks and orders, not the sizes
    assert alignment_mix().source == "builtin:alignment" and load_prompts("builtin:alignment") == alignment_mix()
    assert alignment_mix(seed=2).source == "builtin:alignment?seed=2"


@pytest.mark.parametrize(
    ("borderline_ratio", "benign_ratio", "n", "expected"),
    [
        (0.25, 0.25, 100, (50, 25, 25)),
        (0.0, 0.5, 50, (25, 0, 25)),
        (0.5, 0.0, 10, (5, 5, 0)),
        (0.0, 0.0, 30, (30, 0, 0)),
        (0.4, 0.3, 50, (15, 20, 15)),
    ],
)
def test_mix_shares(borderline_ratio: float, benign_ratio: float, n: int, expected: tuple[int, int, int]) -> None:
    mix = alignment_mix(borderline_ratio=borderline_ratio, benign_ratio=benign_ratio, n=n, seed=5)
    sources = [set(load_prompts(f"builtin:{k}").prompts()) for k in ("safety", "borderline_sft", "utility")]
    assert tuple(sum(p in s for p in mix.prompts()) for s in sources) == expected


def test_largest_mix_is_bounded_by_the_smallest_share() -> None:
    small = load_prompts("builtin:borderline_sft").take(10)
    mix = alignment_mix(borderline=small, borderline_ratio=0.5, benign_ratio=0.25)
    assert len(mix) == 20 and sum(p in set(small.prompts()) for p in mix.prompts()) == 10
    assert mix.source == (
        "builtin:alignment?borderline=borderline_sft[:10]@builtin:borderline_sft&borderline_ratio=0.5&benign_ratio=0.25"
    )


def test_mix_errors() -> None:
    with pytest.raises(DataError, match="borderline_ratio must be between 0 and 1"):
        alignment_mix(borderline_ratio=1.5)
    with pytest.raises(DataError, match="at most 1"):
        alignment_mix(borderline_ratio=0.6, benign_ratio=0.6)
    with pytest.raises(DataError, match="needs 300 / 400 / 300 examples"):
        alignment_mix(n=1000)
    with pytest.raises(DataError, match="at least 1 example"):
        alignment_mix(n=0)
    with pytest.raises(DataError, match="borderline examples .* need a response"):
        alignment_mix(borderline=load_prompts("builtin:borderline"))
    with pytest.raises(DataError, match="harmful requests with refusals .* need a response"):
        alignment_mix(harmful_with_refusals=load_prompts("builtin:harmful"))


# ------------------------------------------------------------------------------------------ held-out splits


def test_held_out_sets_never_meet_the_training_mix() -> None:
    cfg = AlignConfig(model="tiny-random-llama")
    mix = _training_mix(cfg)
    sets = load_held_out(cfg, mix)
    assert (len(sets.harmful), len(sets.borderline), len(sets.benign)) == (150, 60, 100)  # all of each by default
    train = {norm(p) for p in mix.prompts()}
    for ps in (sets.harmful, *sets.safe()):
        assert not train & {norm(p) for p in ps.prompts()}
    # the borderline training file and the held-out borderline file share no prompt, whatever the mix
    assert not {norm(p) for p in load_prompts("builtin:borderline_sft").prompts()} & {
        norm(p) for p in sets.borderline.prompts()
    }


def test_eval_limit_takes_a_stratified_deterministic_sample() -> None:
    cfg = AlignConfig(model="tiny-random-llama", eval={"limit": 20})
    sets = load_held_out(cfg, _training_mix(cfg))
    assert len(sets.harmful) == 20 and len(sets.borderline) == 20
    assert len(Counter(ex.category for ex in sets.harmful)) == 10  # every harm category, not just the first ones
    assert load_held_out(cfg, _training_mix(cfg)) == sets


def test_a_training_prompt_in_an_eval_set_is_refused() -> None:
    cfg = AlignConfig(model="tiny-random-llama", eval={"borderline": "builtin:borderline_sft"})
    with pytest.raises(UserError, match="also training prompts"):
        load_held_out(cfg, _training_mix(cfg))
    fake = PromptSet("x", "x", tuple(load_prompts("builtin:harmful").examples[:3]))
    with pytest.raises(UserError, match="3 evaluation prompts"):
        load_held_out(AlignConfig(model="tiny-random-llama"), fake)
