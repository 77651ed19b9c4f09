"""The built-in recipes, one folder each (``ssah/recipes/<name>/``: config and run, report, summary, demo stage and
science-table rows, shipped ``configs/``), and what a recipe of one's own needs: :class:`Recipe`,
:func:`register_recipe`, :class:`DemoStage`, :class:`Headline` (from :mod:`ssah.registry`, which explains how
recipes are found) and :func:`execute` (the protocol every run goes through, :mod:`ssah.protocol`).

No recipe imports another; what two recipes share lives in the core.
"""

from __future__ import annotations

from typing import Any

from ssah.registry import DemoStage, Headline, Recipe, get_recipe, load_run, recipes, register_recipe

__all__ = ["DemoStage", "Experiment", "Headline", "Recipe", "execute", "get_recipe", "load_run", "recipes",
           "register_recipe"]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in ("execute", "Experiment"):  # the protocol imports torch: only on use
        from ssah import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'ssah.recipes' has no attribute {name!r}")
