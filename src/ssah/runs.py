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
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import yaml

from ssah.errors import UserError


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


def check_output_folder(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Fail early (before any work) when the output folder exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file: choose a folder with --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} already exists: pass --overwrite or choose another --out")
    return out


class RunDir:
    """A run folder under construction; ``commit`` moves it into place, leaving the exit an atomic rename."""

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.out = check_output_folder(out, overwrite)
        self.overwrite = overwrite
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        self.started = time.time()

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
        check_output_folder(self.out, self.overwrite)
        trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, trash)
        os.replace(self.path, self.out)
        shutil.rmtree(trash, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

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
