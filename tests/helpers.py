"""Test helpers shared by every test file: the one bad-input harness.

The promise for bad input (README, "Errors"): exit code 2, exactly one ``error:`` line naming the problem, no
traceback, and nothing partial written. :func:`assert_user_error` checks all of it; the ``user_error`` fixture in
``conftest.py`` binds it to pytest's ``capsys`` and the test's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) with a hash of each file's content."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def assert_user_error(args: Sequence[str], needle: str, *, watch: Path, capsys: Any) -> str:
    """Run the CLI in-process with ``args`` and assert the bad-input promise: exit code 2, one ``error:`` line
    containing ``needle`` and no other output (no traceback, no warnings), and nothing under ``watch`` created,
    changed or removed.

    Returns the error line (for tests that check more of it)."""
    from ssah.cli import main

    capsys.readouterr()  # what earlier steps of the test printed is not this run's output
    before = snapshot(watch)
    code = main(list(args))
    out, err = capsys.readouterr()
    text = out + err
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in text, text
    assert code == 2, (code, text)
    assert len(errors) == 1 and lines == errors, text  # the error line and nothing else
    assert needle in errors[0], errors[0]
    assert snapshot(watch) == before, "something was written"
    return errors[0]


def measured(k: int, n: int, *, start: int = 0, prompts: str = "test-prompts") -> Any:
    """``k`` of ``n`` with per-prompt outcomes, as ``measure_condition`` stores a rate: prompts ``start`` to
    ``start + k - 1`` (wrapping) are the true ones, all on one prompt set (``prompts``: its digest)."""
    from ssah.measure import Proportion

    return Proportion.of([((i - start) % n) < k for i in range(n)], prompts)


def benchmark(name: str) -> Any:
    """The script ``benchmarks/<name>.py`` loaded as a module (benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
