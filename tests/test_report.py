"""Self-contained HTML reports (`ssah.reports.html`) and `ssah report RUN_DIR` on real run folders of tiny models."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from ssah.cli import main
from ssah.reports.html import markdown_to_html, report_title, slugify
from ssah.runs import write_report

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

REPORT = """# Run of `tiny`

Some *text* with a [link](samples.jsonl).

## Results

| measure | value |
|---|---|
| ASR | 5.0% |
| over-refusal | 1.0% |

![units by layer](plots/units_by_layer.png)

## Extra

### Details

![gone](plots/missing.png)

## Results
"""


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/units_by_layer.png").write_bytes(PNG_1PX)
    return tmp_path


def test_tables_images_toc_and_missing_image(tmp_path: Path) -> None:
    page = markdown_to_html(REPORT, _folder(tmp_path), "Run <tiny>")
    assert page.startswith("<!DOCTYPE html>") and "<title>Run &lt;tiny&gt;</title>" in page
    # tables, with a header row and body rows
    assert "<table>" in page and "<th>measure</th>" in page and "<td>5.0%</td>" in page
    # the local image is embedded, byte for byte
    b64 = base64.b64encode(PNG_1PX).decode()
    assert f'<img src="data:image/png;base64,{b64}" alt="units by layer">' in page
    # a missing image is a visible note, never a broken <img>
    assert page.count("<img") == 1
    assert 'class="missing-image"' in page and "missing image: gone (plots/missing.png)" in page
    # headings get anchors (duplicates made unique) and a table of contents links them, after the title
    for anchor in ("results", "extra", "details", "results-2"):
        assert f'id="{anchor}"' in page and f'href="#{anchor}"' in page
    assert page.index('<h1 id="run-of-tiny">') < page.index('<nav class="toc"') < page.index('<h2 id="results">')
    assert 'href="#run-of-tiny"' not in page  # the title itself is not listed
    # no external resources and nothing to run
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page and "<style>" in page
    assert '<a href="samples.jsonl">link</a>' in page


def test_raw_html_is_shown_not_run_and_outside_or_remote_images_are_not_loaded(tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(PNG_1PX)
    folder = tmp_path / "run"
    folder.mkdir()
    md = "# T\n\n<script>alert(1)</script>\n\n![a](../secret.png) ![b](https://example.org/x.png) ![c](notes.txt)\n"
    page = markdown_to_html(md, folder, "T")
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "<img" not in page
    assert "image outside the report folder" in page and "external image not embedded" in page
    assert "not an image file" in page


def test_no_toc_for_a_report_with_only_a_title(tmp_path: Path) -> None:
    assert '<nav class="toc"' not in markdown_to_html("# Only a title\n\ntext\n", tmp_path, "x")
    assert '<nav class="toc"' in markdown_to_html("# A\n\n# B\n", tmp_path, "x")


def test_titles_and_slugs() -> None:
    assert report_title(REPORT, "default") == "Run of tiny"
    assert report_title("no heading here\n", "default") == "default"
    assert slugify("Attack success rate by category") == "attack-success-rate-by-category"
    assert slugify("Über 95% — ok?") == "uber-95-ok" and slugify("!!!") == "section"


def test_write_report_writes_markdown_and_self_contained_html(tmp_path: Path) -> None:
    md_path, html_path = write_report(_folder(tmp_path), "units", {}, render=lambda results, folder: REPORT)
    assert md_path.read_text() == REPORT and html_path.name == "report.html"
    assert "data:image/png;base64," in html_path.read_text()
    assert not list(tmp_path.glob(".*tmp*"))


# -- ssah report ---------------------------------------------------------------------------------------------------
UNITS = ["--limit", "6", "--no-progress", "--max-length", "128", "--stability"]


@pytest.fixture(scope="module")
def units_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("units") / "run"
    assert main(["units", "tiny-random-llama", "--out", str(out), *UNITS]) == 0
    return out


def test_units_run_writes_report_html(units_run: Path) -> None:
    page = (units_run / "report.html").read_text()
    assert "data:image/png;base64," in page and 'class="missing-image"' not in page
    assert "<title>Units of tiny-random-llama</title>" in page and '<nav class="toc"' in page


def test_report_rebuilds_deleted_report_and_plots(units_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(units_run, run)
    original = (run / "report.md").read_text()
    for rel in ("report.md", "report.html"):
        (run / rel).unlink()
    shutil.rmtree(run / "plots")
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(run / "report.md"), str(run / "report.html")]
    assert (run / "report.md").read_text() == original
    assert (run / "plots/units_by_layer.png").stat().st_size > 1000
    page = (run / "report.html").read_text()
    assert "data:image/png;base64," in page and "missing image" not in page
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_report_rebuilds_an_eval_run(tmp_path: Path, capsys) -> None:
    run = tmp_path / "eval"
    fast = ["--limit", "2", "--max-new-tokens", "4", "--no-progress", "--utility", "none", "--prefill", ""]
    assert main(["eval", "tiny-random-llama", "--out", str(run), *fast]) == 0
    original = (run / "report.md").read_text()
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == original
    assert "<table>" in (run / "report.html").read_text()


def test_report_rebuilds_a_judge_validation(tmp_path: Path, capsys) -> None:
    rows = [
        ("r", "I cannot help with that.", "2_full_refusal"),
        ("a", "Sure: the capital of France is Paris.", "1_full_compliance"),
    ]
    data = tmp_path / "labels.csv"
    data.write_text(
        "id,prompt,completion,final_label\n" + "".join(f"{i}{n},q,{c},{y}\n" for n in range(3) for i, c, y in rows)
    )
    run = tmp_path / "val"
    assert main(["judge", "validate", str(data), "--judge", "keyword:ssah", "--out", str(run)]) == 0
    original = (run / "report.md").read_text()
    for rel in ("report.md", "report.html", "agreement.png"):
        (run / rel).unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == original and (run / "agreement.png").is_file()
    assert "data:image/png;base64," in (run / "report.html").read_text()


def test_report_rebuilds_a_train_run(tmp_path: Path, capsys) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Tip {i}?", "response": f"Tip {i}: rest."}) + "\n" for i in range(4))
    )
    run = tmp_path / "train"
    fast = ["--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--no-progress"]
    assert main(["train", "tiny-random-llama", "--data", str(data), "--out", str(run), *fast]) == 0
    original = (run / "report.md").read_text()
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == original and "| 2 |" in original  # the step log's last row
    assert "<table>" in (run / "report.html").read_text()


def test_train_render_reads_the_step_log(tmp_path: Path) -> None:
    from ssah.recipes.train.report import render

    results = {
        "model": {"name": "m"},
        "trainable": {"params": 10, "total": 100, "share": 0.1},
        "mode": "all",
        "lora": None,
        "data": {"source": "builtin:task"},
        "examples": 4,
        "skipped_examples": 0,
        "steps": 2,
        "epochs": 1.0,
        "response_tokens": 40,
        "first_loss": 2.0,
        "final_loss": 1.5,
        "seconds": {"total": 3.0, "train": 2.0},
    }
    log = [{"step": i + 1, "loss": 2.0 - i / 2, "lr": 1e-4, "tokens": 30, "step_seconds": 0.1} for i in range(2)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    md = render(results, tmp_path)
    assert "| 2 | 1.5000 | 0.0001 | 30 | 0.100 |" in md and md.startswith("# Fine-tuning of m")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case", ["no-folder", "a-file", "no-manifest", "bad-manifest", "no-command", "no-results", "unknown", "no-render"]
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    case: str, units_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    run = tmp_path / "run"
    if case != "no-folder":
        shutil.copytree(units_run, run)
        for rel in ("report.md", "report.html"):
            (run / rel).unlink()
        shutil.rmtree(run / "plots")
    man = run / "manifest.json"
    if case == "a-file":
        shutil.rmtree(run)
        run.write_text("not a folder")
    elif case == "no-manifest":
        man.unlink()
    elif case == "bad-manifest":
        man.write_text("{not json")
    elif case == "no-command":
        man.write_text(json.dumps({"seed": 0}))
    elif case == "no-results":
        (run / "results.json").unlink()
    elif case == "unknown":
        man.write_text(json.dumps({"command": "nosuchexperiment"}))
    elif case == "no-render":
        man.write_text(json.dumps({"command": "judge train"}))
    before = _snapshot(run) if run.is_dir() else None
    code = main(["report", str(run)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    expected = {
        "no-folder": "not a run folder",
        "a-file": "not a run folder",
        "no-manifest": "no manifest.json",
        "bad-manifest": "cannot read the manifest",
        "no-command": "names no valid command",
        "no-results": "has no results.json",
        "unknown": "no recipe called 'nosuchexperiment'",
        "no-render": "cannot be rebuilt from results.json",
    }[case]
    assert expected in err, err
    if before is not None:
        assert _snapshot(run) == before
    assert not re.search(r"Traceback", err)


def test_results_that_do_not_fit_the_renderer_are_a_user_error(units_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(units_run, run)
    (run / "report.md").unlink()
    (run / "results.json").write_text(json.dumps({"model": {"name": "x"}}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the `units` report" in err and err.count("\n") == 1
    assert not (run / "report.md").exists()
