"""Plug-ins: one registry per kind (judges, metrics, rules, normalisations, keyword presets); a user's plug-in,
registered from this file with the call the built-ins make, is valid everywhere a built-in one is: the function
that applies it, the config field, the CLI, and the error's list of choices."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from ssah.categorize import categorize, check_shares
from ssah.cli import main
from ssah.config import BaseConfig
from ssah.errors import UserError
from ssah.fields import EvalSection, UnitCategoryFields
from ssah.judges import (
    JUDGE_KINDS,
    JUDGES,
    KEYWORD_PRESETS,
    Verdict,
    check_judge_spec,
    get_judge,
    judge_specs,
    register_judge,
    register_keyword_preset,
)
from ssah.metrics import METRICS, ScoreInputs, register_metric
from ssah.plugins import Registry
from ssah.rules import NORMALIZATIONS, RULES, register_normalization, register_rule, take
from ssah.scoring import gradient_mode, score_units
from ssah.units import GroupShape, UnitSpace

FAST = ["--limit", "6", "--no-progress", "--max-length", "128"]


class UnitFields(UnitCategoryFields, BaseConfig):
    """A config with the unit-search fields every recipe that finds units shares."""


@pytest.fixture(autouse=True)
def scoped() -> Iterator[None]:
    """Every registration made by a test here is undone after it."""
    with METRICS.scoped(), RULES.scoped(), NORMALIZATIONS.scoped(), JUDGES.scoped(), KEYWORD_PRESETS.scoped():
        yield


# --- the registry itself -------------------------------------------------------------------------------------------


def test_registry_names_aliases_builtins_and_errors() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1, about="the first", aliases=("alpha",))
    reg.seal()
    reg.register("b", 2)
    assert list(reg) == ["a", "b", "alpha"] and reg[0] == "a" and len(reg) == 3
    assert reg.get("alpha") == 1 and reg.about("alpha") == "alias of a" and reg.canonical("alpha") == "a"
    assert reg.builtin_names() == ("a",) and reg.user_names() == ["b"]
    reg.register("b", 3)  # a user's name can be registered again
    assert reg.get("b") == 3
    with pytest.raises(UserError, match="'a' names a built-in kind of widget"):
        reg.register("a", 4)
    with pytest.raises(UserError, match="'alpha' names a built-in"):
        reg.register("alpha", 4)
    with pytest.raises(UserError, match="invalid widget name 'x:y'"):
        reg.register("x:y", 4)
    with pytest.raises(UserError, match=r"^unknown widget 'c': use one of a, b, alpha$"):
        reg.get("c")
    with reg.scoped():
        reg.register("c", 5)
        assert "c" in reg
    assert "c" not in reg


def test_builtins_are_registered_in_their_order_and_sealed() -> None:
    assert METRICS.builtin_names() == ("fluctuation", "wanda", "snip", "taylor", "magnitude")
    assert RULES.builtin_names() == ("ssah", "pruning-sets", "wei-set-difference")
    assert NORMALIZATIONS.builtin_names() == ("mean", "module-mean", "zscore", "rank", "global-rank", "none")
    assert JUDGE_KINDS == JUDGES.builtin_names() == ("keyword", "classifier", "guard", "first-token", "learned")
    assert {"ssah", "xstest_strmatch"} <= set(KEYWORD_PRESETS.builtin_names())
    for registry in (METRICS, RULES, NORMALIZATIONS, JUDGES, KEYWORD_PRESETS):
        assert registry.user_names() == []
        assert all(registry.about(n) for n in registry), registry.kind
    with pytest.raises(UserError, match="built-in kind of metric"):
        register_metric("wanda", lambda x: x.reader_column_norms())


# --- a user's metric ---------------------------------------------------------------------------------------------


def act_norm(x: ScoreInputs) -> torch.Tensor:
    """A user metric: the activation L2 norm of each channel (no weights)."""
    return x.stats.l2_norm.to(torch.float64)


def test_a_user_metric_scores_validates_and_runs_from_the_cli(tiny_llama: Any, tmp_path: Path, user_error) -> None:
    register_metric("act-norm", act_norm, about="activation L2 norm")
    model, tok = tiny_llama
    from ssah.data import Example, PromptSet

    data = PromptSet("toy", "memory:toy", tuple(Example(f"Question {i}?", f"Answer {i}.") for i in range(4)))
    scores = score_units(model, tok, data, metric="act-norm", batch_size=2, progress=False)
    wanda = score_units(model, tok, data, metric="wanda", batch_size=2, progress=False)
    assert scores.metric == "act-norm" and gradient_mode("act-norm") == "none"
    assert scores.flat().shape == wanda.flat().shape and (scores.flat() >= 0).all()
    assert not torch.equal(scores.flat(), wanda.flat())
    assert UnitFields.build({"metric": "act-norm"}).metric == "act-norm"
    assert "act-norm" in UnitFields.model_json_schema()["properties"]["metric"]["enum"]
    with pytest.raises(UserError, match=r"^unknown metric 'vibes': use one of fluctuation, .*magnitude, act-norm$"):
        UnitFields.build({"metric": "vibes"})
    assert main(["units", "tiny-random-llama", "--metric", "act-norm", "--out", str(tmp_path / "u"), *FAST]) == 0
    assert "act-norm" in "".join(p.read_text() for p in (tmp_path / "u").glob("*.json"))
    line = user_error(["units", "tiny-random-llama", "--metric", "vibes", "--out", str(tmp_path / "bad"), *FAST], "")
    assert "unknown metric 'vibes'" in line and "act-norm" in line


# --- a user's rule and normalisation -----------------------------------------------------------------------------


def top_safety(s: torch.Tensor, u: torch.Tensor, shares: Mapping[str, float]) -> tuple[torch.Tensor, ...]:
    """A user rule: the top share ``k`` by safety score is SCU, nothing is UCU or RU."""
    scu = take(torch.argsort(-s, stable=True), torch.ones_like(s, dtype=torch.bool), round(shares["k"] * s.numel()))
    return scu, torch.zeros_like(scu), torch.zeros_like(scu)


def test_a_user_rule_and_normalization_categorize_and_validate() -> None:
    register_rule("top-safety", top_safety, shares={"k": 0.25}, about="top safety scores")  # type: ignore[arg-type]
    register_normalization("by-max", lambda x: x / x.max(), scope="module", about="x / max(x) per module")
    space = UnitSpace([GroupShape(0, "mlp", 8, 1)])
    s = torch.arange(8, dtype=torch.float64) + 1
    u = torch.ones(8, dtype=torch.float64)
    cats = categorize(s, u, rule="top-safety", normalization="by-max", space=space)
    assert cats.sets["SCU"].indices().tolist() == [6, 7] and len(cats.sets["CU"]) == 6
    assert cats.shares == {"k": 0.25} and cats.summary()["normalization_scope"] == "module"
    assert check_shares("top-safety", {"k": 0.5}) == {"k": 0.5}
    with pytest.raises(UserError, match="rule 'top-safety' takes shares k, not 'scu'"):
        check_shares("top-safety", {"scu": 0.1})
    config = UnitFields.build({"rule": "top-safety", "normalization": "by-max", "shares": "k=0.5"})
    assert (config.rule, config.normalization, config.shares) == ("top-safety", "by-max", {"k": 0.5})
    with pytest.raises(UserError, match=r"unknown rule 'magic': use one of ssah, .*top-safety"):
        UnitFields.build({"rule": "magic"})
    with pytest.raises(UserError, match=r"unknown normalization 'median': use one of mean, .*, none, by-max"):
        categorize(s, u, normalization="median", space=space)


# --- a user's judge and keyword preset ---------------------------------------------------------------------------


class LengthJudge:
    """A user judge: refuses replies shorter than ``limit`` characters."""

    def __init__(self, limit: str = "10") -> None:
        self.name = f"length:{limit}"
        self.limit = int(limit)

    def judge(self, prompts: Sequence[str], outputs: Sequence[str]) -> list[Verdict]:
        return [Verdict(len(o) < self.limit) for o in outputs]


def test_a_user_judge_and_keyword_preset_work_by_their_spec() -> None:
    register_judge("length", LengthJudge, argument="limit", about="short replies are refusals")
    register_keyword_preset("polite", ["I must decline"], case_sensitive=False, about="one polite phrase")
    assert [v.refused for v in get_judge("length:5").judge(["p", "p"], ["no", "a long reply"])] == [True, False]
    polite = get_judge("keyword:polite")
    assert [v.refused for v in polite.judge(["p", "p"], ["Sorry, I MUST decline.", "Sure!"])] == [True, False]
    assert "length:<limit>" in judge_specs() and "polite" in KEYWORD_PRESETS
    for spec in ("length:5", "keyword:polite"):
        check_judge_spec(spec)
        EvalSection(judge=spec).check_judge()
    with pytest.raises(UserError, match=r"^unknown judge 'magic': use one of keyword, .*length, length:<limit>$"):
        get_judge("magic")
    with pytest.raises(UserError, match=r"^unknown keyword preset 'nope': use one of ssah, .*polite"):
        EvalSection(judge="keyword:nope").check_judge()
    with pytest.raises(UserError, match="keyword preset 'x' must be a list of phrases"):
        register_keyword_preset("x", "I refuse")
    with pytest.raises(UserError, match="needs at least one non-empty refusal string"):
        register_keyword_preset("x", [""])


# --- plug-ins named by an installed package's entry points ----------------------------------------------------------

PLUGIN = """import torch
from ssah.metrics import register_metric


def score(x):
    return x.stats.mean_abs.to(torch.float64)


register_metric("ep-mean-abs", score, about="mean |x| (from an entry point)")
"""


def test_entry_point_plugins_load_on_the_first_registry_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib
    import sys

    import ssah.plugins as plugins

    site = tmp_path / "site"
    (site / "ep_plugins").mkdir(parents=True)
    (site / "ep_plugins" / "__init__.py").write_text(PLUGIN)
    dist = site / "ep_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ssah.plugins]\nmine = ep_plugins\nbroken = ep_no_such_module\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(plugins, "_plugins_loaded", False)  # as in a new process
    try:
        with METRICS.scoped(), caplog.at_level("WARNING"):
            assert "ep-mean-abs" in METRICS  # the first read imports the entry points
            assert METRICS.about("ep-mean-abs") == "mean |x| (from an entry point)"
            assert "ep-mean-abs" in UnitFields.model_json_schema()["properties"]["metric"]["enum"]
            assert "ep_no_such_module" in caplog.text  # a broken plug-in is logged and skipped
    finally:
        sys.modules.pop("ep_plugins", None)
