"""Where the public benchmark data lives: ``$SSAH_SHARED_DATA``, else a ``shared/data`` folder beside the
working directory or beside this checkout. The data is read in place, never copied into the package."""

from __future__ import annotations

import os
from pathlib import Path

from ssah.errors import DataError

_REPO = Path(__file__).resolve().parents[3]  # src/ssah/data/shared.py -> repository root (editable installs)


def shared_data_dir(required: bool = True) -> Path | None:
    """The benchmark data folder, or None (or a DataError when ``required``) if there is none."""
    env = os.environ.get("SSAH_SHARED_DATA")
    candidates = [Path(env)] if env else []
    for base in (Path.cwd(), _REPO):
        candidates += [base / ".." / "shared" / "data", base / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if required:
        raise DataError(
            "public benchmark data not found: set SSAH_SHARED_DATA to the folder holding advbench/, xstest/, ..."
        )
    return None
