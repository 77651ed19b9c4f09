"""Typed run results: ``run(config)`` returns a RunResult, ``ssah.load_run`` reads the same one back from the folder,
verdicts of the one rule are parsed wherever a recipe put them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

import ssah
from ssah.errors import UserError
from ssah.measure import Comparison, Proportion, Verdict, compare, verdict
from ssah.registry import load_run
from ssah.results import RunResult, find_verdicts


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult[Any]:
    from ssah.recipes.eval.run import EvalConfig, run_eval

    out = tmp_path_factory.mktemp("results") / "eval"
    common = {"model": "tiny-random-llama", "out": str(out), "progress": False}
    return run_eval(EvalConfig(**common, limit=3, benign="none", utility=["none"], max_new_tokens=4))


def test_run_eval_returns_the_typed_result_of_its_folder(eval_run: RunResult[Any]) -> None:
    from ssah.recipes.eval.run import EvalConfig

    r = eval_run
    assert isinstance(r, RunResult) and r.recipe == "eval" and isinstance(r.config, EvalConfig)
    assert r.config.limit == 3 and r.out == Path(r.config.out) and r.out.is_dir()
    assert r.results == json.loads((r.out / "results.json").read_text())  # results.json as written
    assert r.manifest == json.loads((r.out / "manifest.json").read_text()) and r.manifest["command"] == "eval"
    assert r.report_path == r.out / "report.md" and r.report_path.is_file() and r.html_path.is_file()
    asr = r.proportion("safety.asr")
    assert isinstance(asr, Proportion) and asr.n == 3 and asr.to_dict() == r.results["safety"]["asr"]
    assert r.get("safety.asr.n") == 3 and r.seconds == r.results["seconds"]["total"]
    assert r.verdicts == {} and r.table is None  # eval compares nothing and writes no condition table
    assert repr(r) == f"RunResult(recipe='eval', out={str(r.out)!r}, verdicts: none)"
    with pytest.raises(KeyError, match="no 'nope' under safety"):
        r.get("safety.nope")


def test_load_run_reads_back_an_equal_result(eval_run: RunResult[Any]) -> None:
    back = ssah.load_run(eval_run.out)
    assert ssah.RunResult is RunResult and back == eval_run  # config, results, manifest and verdicts
    assert type(back.config) is type(eval_run.config) and back.config == eval_run.config
    assert back.config is not eval_run.config  # re-validated from config.yaml, not shared


def test_load_run_validates_the_recorded_config(eval_run: RunResult[Any], tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(eval_run.out, run)
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    # a run made on another machine: its device need not exist here (no CUDA device 7 on the test machine)
    (run / "config.yaml").write_text(yaml.safe_dump({**recorded, "device": "cuda:7"}))
    assert load_run(run).config.device == "cuda:7"
    (run / "config.yaml").write_text(yaml.safe_dump({**recorded, "bogus_key": 1}))
    with pytest.raises(UserError, match=r"does not fit `ssah eval`'s EvalConfig \(bogus_key") as err:
        load_run(run)
    assert "\n" not in str(err.value)
    (run / "config.yaml").unlink()
    with pytest.raises(UserError, match="has no config.yaml"):
        load_run(run)


@pytest.mark.parametrize("case", ["missing", "empty", "no-command", "unknown", "unfinished", "not-json"])
def test_load_run_of_a_folder_that_is_not_a_run_is_one_line(tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    manifest = {"no-command": {"seed": 0}, "unknown": {"command": "nosuch"}}.get(case, {"command": "eval"})
    if case not in ("missing", "empty"):
        (run / "manifest.json").write_text(json.dumps(manifest))
    if case in ("unknown", "not-json"):
        (run / "results.json").write_text("{" if case == "not-json" else "{}")
    expected = {
        "missing": "not a run folder (no such folder)",
        "empty": "not a run folder (no manifest.json)",
        "no-command": "names no valid command",
        "unknown": "no recipe called 'nosuch'",
        "unfinished": "has no results.json: the `eval` run did not finish",
        "not-json": "cannot read the results",
    }[case]
    with pytest.raises(UserError) as err:
        load_run(run)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_folder_that_is_not_a_run_exits_2_through_the_cli(tmp_path: Path, user_error: Any) -> None:
    (tmp_path / "notes").mkdir()
    user_error(["report", str(tmp_path / "notes")], "is not a run folder (no manifest.json)")


# -- verdicts parsed from constructed results ----------------------------------------------------------------------
class _Cfg(BaseModel):
    seeds: int = 3


def _verdict(k: int, k_control: int, expected: str = "higher") -> Verdict:
    return verdict(compare(Proportion(k, 20), Proportion(k_control, 20)), expected)  # type: ignore[arg-type]


def test_verdicts_are_found_wherever_a_recipe_writes_them(tmp_path: Path) -> None:
    scu, ppl, lora = _verdict(18, 2), _verdict(10, 10, "lower"), _verdict(9, 11)
    assert (scu.verdict, ppl.verdict, lora.verdict) == ("reproduced", "inconclusive", "inconclusive")
    results = {
        "verdicts": {"scu_vs_random": {"asr": scu.to_dict()}, "vs_baseline": {"RU": {"perplexity": ppl.to_dict()}}},
        "verdict": {"attack": {"comparisons": [{"name": "lora vs full", "a": "lora", **lora.to_dict()}, {}]}},
        "paper": {"tests": {"SCU->CU": {"verdict": "inconclusive", "reason": "no control"}}, "verdict": "inconclusive"},
        "separation": {"mean": {"verdict": "separates"}},  # another rule's word: not a verdict of the one rule
        "cells": [{"x": lora.to_dict() | {"label": "extra keys are kept out"}}],
        "table": [{"condition": "baseline"}],
    }
    r = RunResult(out=tmp_path, recipe="ablate", config=_Cfg(), results=results)
    assert r.verdicts == {
        "verdicts.scu_vs_random.asr": scu,
        "verdicts.vs_baseline.RU.perplexity": ppl,
        "verdict.attack.comparisons.lora vs full": lora,
        "cells.0.x": lora,
    }
    assert all(Verdict.from_dict(r.get(name)) == v for name, v in r.verdicts.items())  # the names are paths
    assert r.table == [{"condition": "baseline"}] and r.plots == [] and r.seconds is None
    same = json.loads(json.dumps(results | {"perplexity": float("nan")}))
    assert RunResult(out=tmp_path, recipe="ablate", config=_Cfg(), results=same) == RunResult(
        out=tmp_path, recipe="ablate", config=_Cfg(), results=json.loads(json.dumps(same))
    )  # NaN, as JSON writes it, equals itself
    assert r != RunResult(out=tmp_path, recipe="ablate", config=_Cfg(seeds=5), results=results)
    assert "verdicts: 1 reproduced, 3 inconclusive" in repr(r)
    lines = r.summary().splitlines()
    assert lines[0] == f"ablate run in {tmp_path}" and len(lines) == 5
    assert lines[1].startswith("  verdicts.scu_vs_random.asr: reproduced (difference +80.0 points, 95% interval [")
    assert lines[1].endswith("], published direction higher)")


def test_verdict_and_comparison_round_trip_through_json() -> None:
    v = _verdict(4, 15, "lower")
    again = Verdict.from_dict(json.loads(json.dumps(v.to_dict())))
    assert again == v and isinstance(again.comparison.ci95, tuple)
    assert Comparison.from_dict(v.comparison.to_dict()) == v.comparison
    with pytest.raises(UserError, match="not a verdict: 'likely'"):
        Verdict.from_dict({**v.to_dict(), "verdict": "likely"})
    assert list(find_verdicts({"a": [v.to_dict(), {"name": "b", **v.to_dict()}]})) == [("a.0", v), ("a.b", v)]


def test_plots_lists_the_images_the_report_drew(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    for rel in ("plots/b.png", "plots/a.svg", "agreement.png", "plots/notes.txt", "model.safetensors"):
        (tmp_path / rel).write_bytes(b"x")
    r = RunResult(out=tmp_path, recipe="judge validate", config=_Cfg(), results={})
    assert r.plots == [tmp_path / "agreement.png", tmp_path / "plots/a.svg", tmp_path / "plots/b.png"]
