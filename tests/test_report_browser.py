"""`report.html` as a person sees it: a real run folder, `ssah report`, then the page in headless Chromium.

Chromium is Debian's ``chromium`` (the CI script installs it; ``make setup`` tries to), driven by Playwright
through ``executable_path`` (Playwright's own browser download is never used). The test skips only when no
Chromium is found and ``SSAH_REQUIRE_BROWSER`` is unset; CI sets it, so a missing browser fails there.
A full-page screenshot is saved in the test's folder and, when ``SSAH_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from ssah.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """The Chromium binary: ``$SSAH_CHROMIUM`` if set, else the first of the usual names on PATH."""
    env = os.environ.get("SSAH_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _require_browser() -> str:
    chromium = find_chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        chromium = None
        why = "the playwright package is not installed (make setup installs it)"
    else:
        why = "no Chromium binary found (apt-get install chromium, or set SSAH_CHROMIUM)"
    if chromium is None:
        if os.environ.get("SSAH_REQUIRE_BROWSER"):
            pytest.fail(f"SSAH_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)
    return chromium


def _headings(markdown: str) -> list[tuple[str, str]]:
    """(tag, text) of every heading of a Markdown report, in order."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    return [(t.tag, tokens[i + 1].content.replace("`", "")) for i, t in enumerate(tokens) if t.type == "heading_open"]


def check_in_chromium(run: Path, chromium: str, shot: Path) -> None:
    """Open ``run/report.html`` in headless Chromium: headings, contents, images, tables, no errors; screenshot."""
    from playwright.sync_api import sync_playwright

    markdown = (run / "report.md").read_text()
    expected = _headings(markdown)
    assert expected and markdown.count("![") >= 1
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((run / "report.html").resolve().as_uri(), wait_until="load")

            assert page.title() == expected[0][1]
            # every heading of report.md is on the page, visible, in order, and listed in the contents
            shown = page.eval_on_selector_all(
                "main > h1, main > h2, main > h3, main > h4, main > h5, main > h6",
                "els => els.map(e => [e.tagName.toLowerCase(), e.textContent.trim(), e.id])",
            )
            assert [(tag, text) for tag, text, _ in shown] == expected
            for _, _, anchor in shown[1:]:
                assert page.locator(f'nav.toc a[href="#{anchor}"]').count() == 1, anchor
                assert page.locator(f"#{anchor}").is_visible()
            # every image has loaded and has a size; none is missing
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight, e.alt])"
            )
            assert len(images) == markdown.count("!["), images
            for complete, width, height, alt in images:
                assert complete and width > 0 and height > 0, alt
            assert page.locator(".missing-image").count() == 0
            # the tables are real tables, and the page fits its width (no horizontal scroll)
            assert page.locator("table tbody tr").count() >= 4
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    # the page loads nothing but itself: images are data URIs, styles inline
    assert all(u.startswith("data:") or u == (run / "report.html").resolve().as_uri() for u in requests), requests
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    target = os.environ.get("SSAH_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


def _units_then_report(model: str, run: Path, limit: int) -> None:
    """A units run folder, its report, plots and HTML deleted and rebuilt by `ssah report`."""
    args = ["units", model, "--out", str(run), "--limit", str(limit), "--max-length", "128"]
    assert main([*args, "--stability", "--no-progress"]) == 0
    for rel in ("report.md", "report.html"):
        (run / rel).unlink()
    shutil.rmtree(run / "plots")
    assert main(["report", str(run)]) == 0


def test_report_html_renders_in_chromium(tmp_path: Path, capsys) -> None:
    chromium = _require_browser()
    _units_then_report("tiny-random-llama", tmp_path / "run", limit=6)
    capsys.readouterr()
    check_in_chromium(tmp_path / "run", chromium, tmp_path / "units_report.png")


@pytest.mark.slow
def test_smollm2_report_renders_in_chromium(tmp_path: Path, capsys) -> None:
    chromium = _require_browser()
    _units_then_report("smollm2-135m-instruct", tmp_path / "run", limit=4)
    capsys.readouterr()
    check_in_chromium(tmp_path / "run", chromium, tmp_path / "smollm2_units_report.png")
