"""`ssah report RUN_DIR`: rebuild a run folder's plots, ``report.md`` and self-contained ``report.html``.

The run's ``manifest.json`` names the command that wrote it; its registered recipe's ``render(results, run_dir)``
(:mod:`ssah.registry`) redraws the plots from ``results.json`` alone and returns the Markdown, so a report can be
regenerated (after a change of the report code, or when it was deleted) without rerunning anything.
"""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated, Any

import typer

from ssah.cliutil import app
from ssah.errors import UserError
from ssah.registry import Renderer, get_recipe, read_run_files
from ssah.results import read_manifest
from ssah.runs import atomic_write_text, write_report

README_START = "<!-- ssah:results:start -->"
README_END = "<!-- ssah:results:end -->"
# a full demo (`ssah demo --full`) has its own block, so a README can show both sizes side by side
FULL_START, FULL_END = README_START.replace("results", "results-full"), README_END.replace("results", "results-full")


def readme_markers(results: dict[str, Any]) -> tuple[str, str]:
    """The marker lines of a demo run's README block: the quick block, or the full block for `ssah demo --full`."""
    return (README_START, README_END) if results.get("quick", True) else (FULL_START, FULL_END)


def renderer_for(command: str) -> Renderer:
    """The registered recipe's ``render``; a ``UserError`` when no recipe of that name can rebuild its report."""
    return get_recipe(command).renderer()


def rebuild_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Redraw a run folder's plots and rewrite its ``report.md`` and ``report.html``; returns their paths."""
    run_dir = Path(run_dir)
    render = renderer_for(read_manifest(run_dir)[0])
    command, _, results = read_run_files(run_dir)  # no config check: a report is rebuilt from the results alone
    try:
        return write_report(run_dir, command, results, render)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UserError(
            f"results.json in {run_dir} does not fit the `{command}` report ({type(exc).__name__}: {exc}): "
            "was it written by another ssah version? rerun the experiment"
        ) from exc


def demo_command(results: dict[str, Any]) -> str:
    """The `ssah demo` command line that makes a run with these settings (model, seed, quick or full)."""
    full = "" if results.get("quick", True) else " --full"
    return f"ssah demo --model {results['model']} --seed {results['seed']}{full}"


def readme_block(run_dir: str | Path) -> str:
    """The README's results block for a demo run: one line naming the run, the verdict rule and the science table,
    between the two markers. Built from the run folder alone, so the same run gives the same bytes."""
    from ssah.reports.science import VERDICT_RULE, headlines, science_table

    run_dir = Path(run_dir)
    command, man, results = read_run_files(run_dir)
    if command != "demo":
        raise UserError(
            f"{run_dir} is a `{command}` run, not a demo run: --readme takes a folder written by `ssah demo`"
        )
    rows = headlines(run_dir) or results.get("headlines") or []
    if not rows:
        raise UserError(f"{run_dir} holds no finished stage to tabulate: run `ssah demo` to the end first")
    revision, (start, end) = str(man.get("git_revision") or "unknown")[:12], readme_markers(results)
    run_line = (
        f"Measured by `{demo_command(results)}` ({'quick' if results.get('quick', True) else 'full'} settings, "
        f"model `{results['model']}`, seed {results['seed']}) on {str(man.get('started', 'an unknown date'))[:10]}, "
        f"ssah revision `{revision}`; this table was written by `ssah report RUN_DIR --readme README.md`."
    )
    return "\n".join([start, "", run_line, "", VERDICT_RULE, "", science_table(rows), "", end])


def write_readme_table(run_dir: str | Path, readme: str | Path) -> Path:
    """Replace the block between the results markers of ``readme`` (the quick or the full ones, as the run) with
    the demo run's science table; a ``UserError`` (file untouched) when the markers are missing or the run is not
    a finished demo run."""
    readme = Path(readme)
    block = readme_block(run_dir)
    start, end = block.splitlines()[0], block.splitlines()[-1]
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {readme} ({type(exc).__name__}): pass the README file to update") from None
    starts, ends = text.count(start), text.count(end)
    if starts != 1 or ends != 1 or text.index(start) > text.index(end):
        raise UserError(
            f"{readme} needs one line {start} and, after it, one line {end} (found {starts} and "
            f"{ends}): add them where the results table goes"
        )
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    new = head + block + tail
    if new != text:
        _replace_text(readme, new)
    return readme


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` into ``path`` atomically; through a symbolic link the link's target is updated (the link
    stays), keeping the file's permission bits; a one-line ``UserError`` when it cannot be replaced."""
    import os
    import stat

    target = Path(os.path.realpath(path))
    if not target.is_file() or not os.access(target, os.W_OK) or not os.access(target.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path} (read-only, or its folder is): make it writable or pass another file")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
        atomic_write_text(target, text)
        os.chmod(target, mode)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or type(exc).__name__}): nothing was changed") from None


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by an ssah command (has manifest.json).")],
    open_: Annotated[bool, typer.Option("--open/--no-open", help="Open report.html in the web browser.")] = False,
    readme: Annotated[
        Path | None,
        typer.Option(
            help="Instead of rebuilding the report, write this demo run's science table into FILE between the lines "
            f"{README_START} and {README_END} ({FULL_START} and {FULL_END} for a --full demo; nothing else in FILE "
            "changes)."
        ),
    ] = None,
) -> None:
    """Rebuild a run folder's plots, report.md and self-contained report.html from its results.json."""
    if readme is not None:
        typer.echo(str(write_readme_table(run_dir, readme)))
        return
    md_path, html_path = rebuild_report(run_dir)
    typer.echo(str(md_path))
    typer.echo(str(html_path))
    if open_ and not webbrowser.open(html_path.resolve().as_uri()):
        typer.echo(f"no web browser to open {html_path} with", err=True)
