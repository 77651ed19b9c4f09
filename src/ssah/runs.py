"""Run folders: every result is written into a staging folder that becomes the run folder only when complete.

So a failed or interrupted run never leaves a half-written folder behind, and an existing folder is only
replaced when the user asks (``overwrite``). ``manifest.json`` records versions, seed, data hashes, the
model fingerprint and the git revision, so that a run can be reproduced.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import yaml

from ssah.errors import UserError
from ssah.locks import FolderLock, lock_holder, lock_path
from ssah.results import ConfigT, RunResult

Renderer = Callable[[Any, Path], str]  # render(results, run_dir) -> the report's Markdown


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable, allow_nan=True) + "\n"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a file via a temporary sibling and a rename, so readers never see it half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_STAGING = re.compile(r"\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)")


def sweep_stale_staging(out: str | os.PathLike[str]) -> list[Path]:
    """Remove staging (``.NAME.partial-PID``) and replaced (``.NAME.old-PID``) folders of ``out`` whose process is
    gone; call it holding ``out``'s lock, which no live writer of ``out`` can hold at the same time."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _STAGING.fullmatch(p.name)
        if m and m["name"] == out.name and int(m["pid"]) != os.getpid() and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_output_folder(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` cannot become a run folder: the current folder or one above it,
    under a file, in a place that cannot be written, an existing folder that may not be replaced, or one that
    another run is writing now. Writes nothing."""
    text = os.fspath(out)
    path = Path(text)
    if not text.strip() or path.name in ("", ".", ".."):
        raise UserError(f"--out {text!r} names no new folder: pass a folder name, e.g. --out runs/my-run")
    try:
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot resolve --out {text!r} ({exc}): pass another folder") from None
    if resolved == cwd or resolved in cwd.parents:
        raise UserError(
            f"--out {text!r} is the current folder or one above it: pass a new folder, e.g. --out runs/my-run"
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} is a file: choose a folder with --out")
    ancestor = resolved.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {text} lies under {ancestor}, which is a file: choose a folder with --out")
    if not _writable(ancestor):
        raise UserError(f"cannot write in {ancestor} (read-only or no permission): choose --out in a writable place")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"output folder {path} already exists: pass --overwrite or choose another --out")
    holder = lock_holder(path)
    if holder is not None:
        raise FolderLock(path)._busy(holder)
    return path


@contextlib.contextmanager
def held_output(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[FolderLock]:
    """Hold ``out``'s lock for a whole command, from its start: checks the folder (:func:`check_output_folder`),
    takes the lock, and the run folder the command writes at its end takes the same lock again. So a second
    command into the same ``--out`` stops at once, before any work, rather than after all of it. Parent folders
    made for the lock file are removed again when the command fails, so a refused run leaves nothing behind."""
    path = check_output_folder(out, overwrite)
    parent = lock_path(path).parent.absolute()
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    lock = FolderLock(path)
    try:
        lock.acquire()
        yield lock
    finally:
        lock.release()
        for folder in created:  # deepest first; stops at the first that holds something (the finished run)
            try:
                folder.rmdir()
            except OSError:
                break


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``: permission bits first, then a real try (root passes the bits
    test on a read-only file system), leaving nothing behind."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        probe = tempfile.mkdtemp(prefix=".ssah-probe-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


class RunDir:
    """A run folder under construction; ``commit`` moves it into place, leaving the exit an atomic rename.

    Every command stages the same way: take ``out``'s :class:`FolderLock` (a second run into the same folder fails
    at once with a one-line error), check the folder again under the lock, sweep staging folders that killed runs
    left behind, create the staging folder with ``os.mkdir`` (exclusive), and before the final rename check that
    the lock is still this process's. A failure removes the staging folder and releases the lock.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out = check_output_folder(out, overwrite)
        self.overwrite = overwrite
        self.lock = FolderLock(self.out).acquire()
        try:
            check_output_folder(self.out, overwrite)  # again under the lock: a run may have finished meanwhile
            sweep_stale_staging(self.out)
            self.path = self._staging_path()
            self._make_staging()
        except BaseException:
            self.lock.release()
            raise
        self.started = time.time()

    def _staging_path(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial-{os.getpid()}"

    def _make_staging(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # only a leftover of this very process (PID reuse)
        os.mkdir(self.path)

    def file(self, rel: str) -> Path:
        """Path of a file inside the staging folder (parent folders created)."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, obj: Any) -> Path:
        p = self.file(rel)
        p.write_text(to_json(obj), encoding="utf-8")
        return p

    def write_text(self, rel: str, text: str) -> Path:
        p = self.file(rel)
        p.write_text(text, encoding="utf-8")
        return p

    def write_yaml(self, rel: str, obj: Mapping[str, Any]) -> Path:
        p = self.file(rel)
        p.write_text(yaml.safe_dump(json.loads(to_json(obj)), sort_keys=False), encoding="utf-8")
        return p

    def commit(self) -> Path:
        """Move the finished run into place (replacing an old folder only when overwrite was given)."""
        try:
            if not self.lock.owned() or not self.path.is_dir():
                raise UserError(
                    f"the staging folder {self.path} was taken over by another run: nothing was written to "
                    f"{self.out}; run again"
                )
            check_output_folder(self.out, self.overwrite)
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            if self.out.exists():
                os.replace(self.out, trash)
            os.replace(self.path, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self.lock.release()
        return self.out

    def abort(self) -> None:
        """Remove the staging folder (named after this process, so it is this run's) and release the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def git_revision() -> str | None:
    """The git commit of the ssah source tree (with ``+dirty`` when it has uncommitted changes), if any."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import transformers

    import ssah

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ssah": ssah.__version__,
        "platform": platform.platform(),
    }
    for mod in ("accelerate", "peft", "safetensors", "datasets"):
        with contextlib.suppress(ImportError):
            out[mod] = __import__(mod).__version__
    return out


def manifest(
    *, command: str, seed: int, model: Mapping[str, Any], data: Mapping[str, Any], started: float, **extra: Any
) -> dict[str, Any]:
    """What is needed to reproduce a run: versions, seed, model and data identities, git revision, timing."""
    return {
        "command": command,
        "argv": sys.argv,
        "seed": seed,
        "model": dict(model),
        "data": dict(data),
        "versions": versions(),
        "git_revision": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        "device": str(extra.pop("device", "cpu")),
        **extra,
    }


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed)
    torch.manual_seed(seed)


def write_report(
    folder: str | os.PathLike[str], command: str, results: Mapping[str, Any], render: Renderer
) -> tuple[Path, Path]:
    """Draw a run's plots and write its ``report.md`` and self-contained ``report.html`` into ``folder``, by
    ``render(results, folder)`` (the recipe's renderer) from the results alone; returns both paths."""
    from ssah.provenance import caveat
    from ssah.reports.html import markdown_to_html, report_title

    folder = Path(folder)
    markdown = render(results, folder)
    if (note := caveat(results)) is not None:  # verdicts on prompts that also chose something: said at the top
        title, _, rest = markdown.partition("\n")
        markdown = f"{title}\n\n{note}\n{rest}"
    md_path, html_path = folder / "report.md", folder / "report.html"
    atomic_write_text(md_path, markdown)
    atomic_write_text(html_path, markdown_to_html(markdown, folder, report_title(markdown, command)))
    return md_path, html_path


def write_run(
    run: RunDir,
    command: str,
    *,
    config: ConfigT,
    results: Mapping[str, Any],
    manifest: Mapping[str, Any],
    render: Renderer,
    results_file: str = "results.json",
) -> RunResult[ConfigT]:
    """THE end of every recipe: write ``config.yaml``, ``results.json`` (or the recipe's ``results_file``), the
    report (:func:`write_report` by the recipe's ``render``) and ``manifest.json`` into the staging folder, so the
    run folder appears complete or not at all; ``ssah report`` later rebuilds the same report from the same
    ``results.json``.

    Returns the run's :class:`ssah.results.RunResult` (its ``out`` is the final folder, in place once ``run``
    commits): the results and manifest as written (JSON values, equal to what :func:`ssah.load_run` reads back)."""
    run.write_yaml("config.yaml", config.model_dump())
    text = to_json(results)
    run.write_text(results_file, text)
    written = json.loads(text)
    write_report(run.path, command, written, render)
    man = to_json(manifest)
    run.write_text("manifest.json", man)
    return RunResult(out=run.out, recipe=command, config=config, results=written, manifest=json.loads(man))
