"""Issue 31 beyond the one-line table (``test_hostile.py``): error lines stay short, every command holds its
``--out`` lock from its start, two runs into one folder at once stop the second at once, Ctrl-C is one line and
exit code 130 with nothing left, ``report --readme`` updates a link's target, and the judge's column mapping."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import hostile_cases
from helpers import snapshot
from ssah.cli import main
from ssah.errors import MESSAGE_LIMIT
from ssah.registry import Recipe, recipes
from ssah.runs import lock_path

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "SSAH_THREADS": "1"}
UNITS = ["--limit", "4", "--max-length", "64", "--no-progress"]


def _error_line(args: list[str], capsys: Any) -> str:
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out + err
    return lines[0]


# -- bounded messages ----------------------------------------------------------------------------------------
def test_the_alias_bomb_is_refused_in_one_short_line(tmp_path: Path, capsys: Any) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(hostile_cases.BOMB_YAML)
    for args in (
        ["units", "--config", str(bomb), "--out", str(tmp_path / "o")],
        ["units", "tiny-random-llama", f"system={hostile_cases.BOMB_FLOW}", "--out", str(tmp_path / "o")],
    ):
        line = _error_line(args, capsys)
        assert "expands to more than" in line and len(line) <= MESSAGE_LIMIT + len("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_a_huge_bad_value_is_quoted_not_printed(tmp_path: Path, capsys: Any) -> None:
    """A megabyte-sized bad value (a metric name) is quoted in a few hundred characters."""
    line = _error_line(["units", "tiny-random-llama", f"metric={'x' * 500_000}", "--out", str(tmp_path / "o")], capsys)
    assert "unknown metric" in line and "more characters" in line and len(line) <= MESSAGE_LIMIT + 10


# -- locks from the start ------------------------------------------------------------------------------------
def _recipe_args(name: str, out: str, data: Path) -> list[str]:
    if name.startswith("judge "):
        return [*name.split(), str(data), "--out", out]
    return [name, "tiny-random-llama", "--out", out]


@pytest.mark.parametrize("name", sorted(n for n, r in recipes().items() if not r.locks_itself))
def test_every_command_holds_its_out_lock_when_its_run_starts(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The recipe's run function is replaced by one that checks, on entry, that ``--out``'s lock is held (a second
    process's open + flock on the lock file would fail): so a second run stops before any work."""
    import importlib

    recipe = recipes()[name]
    module, _, attr = recipe.run.partition(":")
    module = importlib.import_module(module, recipe.package).__name__
    seen: dict[str, bool] = {}

    def fake_run(cfg: Any) -> Path:
        path = lock_path(cfg.out)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            seen["held"] = True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        return Path(cfg.out)

    monkeypatch.setattr(importlib.import_module(module), attr, fake_run)
    monkeypatch.setattr(Recipe, "summarize", lambda self, result: None)
    data = tmp_path / "labelled.csv"
    data.write_text("prompt,completion,final_label\na,b,2_full_refusal\n")
    out = tmp_path / "sub" / "run"
    assert main(_recipe_args(name, str(out), data)) == 0, capsys.readouterr()
    assert seen == {"held": True}
    assert not lock_path(out).exists() and not (tmp_path / "sub").exists()  # released; its folder removed again


def test_export_holds_its_out_lock_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ssah.export as export

    seen: list[bool] = []

    def fake(_spec: str, out: Path, **_kw: Any) -> Path:
        seen.append(lock_path(out).is_file() and str(os.getpid()) in lock_path(out).read_text())
        return out

    monkeypatch.setattr(export, "_export_held", fake)
    direction = tmp_path / "dir"
    direction.mkdir()
    from ssah.direction import DIRECTION_FILE, DIRECTION_FORMAT
    from ssah.safefiles import save_safetensors

    meta = {"format": DIRECTION_FORMAT, "fingerprint": "f", "model_name": "m", "layer": "0", "position": "-1"}
    save_safetensors({"direction": torch.ones(4)}, direction / DIRECTION_FILE, meta)
    out = tmp_path / "out"
    assert main(["export", "tiny-random-llama", "--orthogonalize", str(direction), "--out", str(out)]) == 0
    assert seen == [True] and not lock_path(out).exists()


def test_two_units_runs_into_one_folder_at_once_the_second_stops_at_once(tmp_path: Path) -> None:
    """Real processes started together: one writes the folder, the other fails with one line before any work
    (it ends first), and nothing but the finished folder is left."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssah", "units", "tiny-random-llama", "--out", str(out), *UNITS]
    started = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV))
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - started
        time.sleep(0.05)
        assert time.monotonic() - started < 600
    texts = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, texts)
    loser, winner = codes.index(2), codes.index(0)
    lines = [line for line in texts[loser].splitlines() if line.strip()]
    assert len(lines) == 1 and "another ssah run" in lines[0], texts[loser]
    assert ended[loser] < ended[winner]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "units.safetensors").is_file()


# -- Ctrl-C --------------------------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    """SIGINT once the command has started (its lock file is there): one line, exit code 130, no folder, no lock."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssah", "units", "tiny-random-llama", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while not lock_path(out).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=300)[0]
    if proc.returncode == 0:  # pragma: no cover - finished before the signal arrived (a very fast machine)
        pytest.skip("the run finished before Ctrl-C")
    lines = [line for line in text.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted"), text
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_inside_a_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import ssah.recipes.units.report as units_report

    def boom(*_a: object, **_k: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(units_report, "render", boom)
    capsys.readouterr()
    assert main(["units", "tiny-random-llama", "--out", str(tmp_path / "run"), *UNITS]) == 130
    out, err = capsys.readouterr()
    assert [line for line in (out + err).splitlines() if line.strip()] == [
        "interrupted (Ctrl-C): stopped; no partial run folder was left behind"
    ]
    assert list(tmp_path.iterdir()) == []


# -- report --readme -----------------------------------------------------------------------------------------
def test_readme_through_a_link_updates_its_target(tmp_path: Path, capsys: Any) -> None:
    from ssah.commands.report import README_END, README_START
    from test_science import README, _demo_folder

    run = _demo_folder(tmp_path)
    target = tmp_path / "docs" / "README.md"
    target.parent.mkdir()
    target.write_text(README.format(s=README_START, e=README_END))
    target.chmod(0o640)
    link = tmp_path / "README.md"
    link.symlink_to(target)
    assert main(["report", str(run), "--readme", str(link)]) == 0, capsys.readouterr()
    assert link.is_symlink() and "old table" not in target.read_text()
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)


def test_readme_that_cannot_be_replaced_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import ssah.commands.report as report
    from ssah.commands.report import README_END, README_START
    from test_science import README, _demo_folder

    run = _demo_folder(tmp_path)
    readme = tmp_path / "README.md"
    text = README.format(s=README_START, e=README_END)
    readme.write_text(text)

    def refuse(*_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(report, "atomic_write_text", refuse)
    before = snapshot(tmp_path)
    line = _error_line(["report", str(run), "--readme", str(readme)], capsys)
    assert "cannot write" in line and snapshot(tmp_path) == before


# -- the judge's columns -------------------------------------------------------------------------------------
def test_judge_validate_maps_a_reply_column(tmp_path: Path, capsys: Any) -> None:
    """The README's ``--column reply=answer_text`` works (reply and label are the fields ssah judge reads)."""
    data = tmp_path / "mine.csv"
    hostile_cases._labelled(data, reply_column="answer_text")
    out = tmp_path / "out"
    assert main(["judge", "validate", str(data), "--column", "reply=answer_text", "--out", str(out)]) == 0, (
        capsys.readouterr()
    )
    results = json.loads((out / "results.json").read_text())
    assert "mine" in json.dumps(results)
