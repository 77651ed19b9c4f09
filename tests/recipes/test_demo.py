"""`ssah demo` on a tiny model: every stage runs, the report is written, a second run continues instead of redoing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ssah.cli import main
from ssah.recipes.demo.run import DemoConfig, stage_names, stages
from ssah.recipes.units.run import available_safety_sets
from ssah.registry import get_recipe, load_run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("SSAH_CACHE", str(root / "cache"))
    try:
        assert main(["demo", "--model", "tiny-random-llama", "--out", str(root / "demo"), "--no-progress"]) == 0
    finally:
        mp.undo()
    return root / "demo"


def test_demo_runs_every_stage_and_writes_one_report(demo_run: Path) -> None:
    res = json.loads((demo_run / "results.json").read_text())
    assert list(res["stages"]) == list(stage_names())
    for name, stage in res["stages"].items():
        assert stage["done"] and stage["seconds"] is not None, name
        assert (demo_run / name / "results.json").is_file() and (demo_run / name / "report.md").is_file()
    assert res["headlines"], "the report compares with the published effects"
    effects = [h["effect"] for h in res["headlines"]]
    # align, the over-refusal price, SCU stability (halves; and calibration sets where the public data is present),
    # ablate, transfer, protect, budget, probe; none unreadable
    compared = bool(available_safety_sets())
    assert len(effects) == 8 + compared and not [e for e in effects if "see its section" in e], effects
    assert all(h["control"] for h in res["headlines"]), "every row names its control"
    judged = [h["effect"].split(":")[0] for h in res["headlines"] if h["judge"]]
    assert any("Table 1" in e for e in judged) and not any("attribute transfer" in e for e in judged)
    if compared:
        cal = json.loads((demo_run / "units" / "results.json").read_text())["calibration_sets"]
        assert [s["spec"] for s in cal["sets"]] == ["builtin:safety", "advbench-safety", "harmbench-safety"]
        assert any("calibration sets" in e for e in effects)
    tax = next(h for h in res["headlines"] if "safety tax" in h["effect"])
    assert tax["verdict"] is None and "over-refusal" in tax["ours"]
    verdicts = {h["effect"]: h["verdict"] for h in res["headlines"]}
    assert set(verdicts.values()) <= {"reproduced", "not reproduced", "inconclusive", None}, verdicts
    protect = next(h for h in res["headlines"] if h["effect"].startswith("freezing SCU"))
    assert "ASR before" in protect["ours"] and "random-frozen" in protect["ours"]
    report = (demo_run / "report.md").read_text()
    assert "Published effects and what we measured" in report
    for title in (s["title"] for s in res["stages"].values()):
        assert title in report
    # stage reports are inlined with their image paths rewritten to stay valid from the demo folder
    for image in __import__("re").findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (demo_run / image).is_file(), image
    assert json.loads((demo_run / "manifest.json").read_text())["command"] == "demo"
    html = (demo_run / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html and "missing image" not in html


def test_the_demo_and_every_stage_load_back_as_typed_results(demo_run: Path) -> None:
    """Each stage folder is a run of its recipe: ``load_run`` re-validates its config by that recipe's class and
    parses the verdicts it states; the demo folder is a run of its own."""
    demo = load_run(demo_run)
    assert demo.recipe == "demo" and isinstance(demo.config, DemoConfig) and demo.config.model == "tiny-random-llama"
    assert demo.results == json.loads((demo_run / "results.json").read_text())
    runs = {s.name: load_run(demo_run / s.name) for s in stages()}
    for stage in stages():
        r = runs[stage.name]
        assert r.recipe == stage.recipe.name and isinstance(r.config, get_recipe(stage.recipe.name).config_class())
        assert r.config.out == str(demo_run / stage.name) and r.report_path.is_file()
    assert "verdicts.refusal_up" in runs["align"].verdicts
    assert {"verdicts.scu_vs_random.asr", "verdicts.scu_vs_random.coherent_compliance"} <= set(runs["ablate"].verdicts)
    assert any(k.startswith("verdict.") and " vs " in k for k in runs["protect"].verdicts)
    assert all(
        v.verdict in ("reproduced", "not reproduced", "inconclusive")
        for r in runs.values()
        for v in r.verdicts.values()
    )


def test_demo_continues_where_it_stopped(demo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(demo_run.parent / "cache"))
    copy = tmp_path / "demo"
    shutil.copytree(demo_run, copy)
    shutil.rmtree(copy / "units")  # as if the demo had been interrupted during the units stage
    (copy / ".units.partial-123").mkdir()  # ... leaving a staging folder behind
    before = (copy / "align" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["demo", "--model", "tiny-random-llama", "--out", str(copy), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "Scoring and categorising units" in out
    assert (copy / "align" / "results.json").stat().st_mtime_ns == before  # not redone
    assert (copy / "units" / "results.json").is_file() and not (copy / ".units.partial-123").exists()


def test_demo_stage_subset_and_dependencies(tmp_path: Path, monkeypatch, user_error) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny-random-llama", "--out", str(out), "--stages", "eval-base"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["stages"]["eval-base"]["done"] and not res["stages"]["align"]["done"]
    user_error(["demo", "--model", "tiny-random-llama", "--out", str(out), "--stages", "units"], "needs stage align")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--stages", "align,nope"], "unknown demo stage 'nope'"),
        (["--model", "tiny-random-qwen2"], "holds a demo started with model=tiny-random-llama"),
        (["--no-bf16"], "not bf16=False"),
    ],
)
def test_demo_bad_input(args: list[str], needle: str, tmp_path: Path, monkeypatch, user_error) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    out.mkdir()
    state = {"model": "tiny-random-llama", "quick": True, "bf16": True, "stages": {}}
    (out / "demo.json").write_text(json.dumps(state))
    user_error(["demo", "--model", "tiny-random-llama", "--out", str(out), *args], needle)


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path: Path, user_error) -> None:
    out = tmp_path / "other"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(["demo", "--model", "tiny-random-llama", "--out", str(out)], "not a demo folder")


def test_report_rebuild_reads_the_headlines_from_the_stage_folders(demo_run: Path, tmp_path: Path) -> None:
    """`ssah report` on a demo folder recomputes the published-vs-ours table from the stages' results."""
    copy = tmp_path / "demo"
    shutil.copytree(demo_run, copy)
    res = json.loads((copy / "results.json").read_text())
    res["headlines"] = []  # as if written by a version that knew fewer effects
    (copy / "results.json").write_text(json.dumps(res))
    (copy / "report.md").unlink()
    assert main(["report", str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert "safety tax" in report and "freezing SCU" in report


@pytest.mark.parametrize("stage", stage_names())
def test_ssah_report_rebuilds_every_stage(stage: str, demo_run: Path, tmp_path: Path, capsys) -> None:
    """Each stage is an ordinary run folder of its recipe: `ssah report` rebuilds the same report.md, a
    self-contained report.html and the plots from results.json alone."""
    run = tmp_path / stage
    shutil.copytree(demo_run / stage, run, ignore=shutil.ignore_patterns("model"))
    original = (run / "report.md").read_text()
    plots = sorted(p.name for p in (run / "plots").glob("*.png")) if (run / "plots").is_dir() else []
    for rel in ("report.md", "report.html"):
        (run / rel).unlink()
    shutil.rmtree(run / "plots", ignore_errors=True)
    capsys.readouterr()
    assert main(["report", str(run)]) == 0, capsys.readouterr().err
    assert (run / "report.md").read_text() == original
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == plots if plots else not (run / "plots").exists()
    page = (run / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "missing image" not in page
    assert page.count("data:image/png;base64,") == len(plots)


def test_readme_table_from_the_demo_is_the_reports_table(demo_run: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- ssah:results:start -->\n<!-- ssah:results:end -->\n")
    assert main(["report", str(demo_run), "--readme", str(readme)]) == 0
    first = readme.read_bytes()
    assert main(["report", str(demo_run), "--readme", str(readme)]) == 0
    assert readme.read_bytes() == first
    table = [line for line in first.decode().splitlines() if line.startswith("| ")]
    report = (demo_run / "report.md").read_text()
    assert table and all(line in report for line in table)  # the same table as the demo report's
