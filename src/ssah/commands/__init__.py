"""The hand-written commands (``ssah report``, ``ssah export``, the ``ssah judge`` group that holds the judge
recipes' commands), one module each; importing this package registers them on :data:`ssah.cliutil.app`. Every
recipe's command is generated from the registry (:mod:`ssah.registry`) by :mod:`ssah.cliutil`."""

from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
