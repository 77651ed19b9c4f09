"""The recipe registry: every entry resolves to a config class, a run function and (where declared) a renderer."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from ssah.errors import UserError
from ssah.registry import get_recipe, recipes


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_recipe_resolves(name: str) -> None:
    recipe = get_recipe(name)
    assert issubclass(recipe.config_class(), BaseModel)
    assert callable(recipe.runner())
    if recipe.render is not None:
        assert callable(recipe.renderer())
    else:
        with pytest.raises(UserError, match="cannot be rebuilt"):
            recipe.renderer()


def test_unknown_recipe_names_the_known_ones() -> None:
    with pytest.raises(UserError, match="no recipe called 'nope'.*ablate"):
        get_recipe("nope")


def test_the_memory_plan_has_the_rows_the_recipes_declare() -> None:
    from ssah.plan import COMMANDS
    from ssah.registry import memory_rows

    assert memory_rows() == list(COMMANDS)


def test_the_demo_stages_and_science_rows_come_from_the_registry() -> None:
    from ssah.registry import demo_stages, science_rows

    assert [s.name for _, s in demo_stages()] == [
        "align", "eval-base", "eval-aligned", "probe", "units", "ablate", "transfer", "protect", "budget"
    ]  # fmt: skip
    assert [h.row.split(":")[1] for _, h in science_rows()] == [
        "row_align", "row_overrefusal", "row_stability", "row_calibration", "row_ablate", "row_transfer",
        "row_protect", "row_budget", "row_probe",
    ]  # fmt: skip


def test_the_registry_order_does_not_depend_on_import_order(monkeypatch) -> None:
    import ssah.registry as registry

    shuffled = dict(reversed(list(registry.recipes().items())))  # as if the packages had been imported backwards
    monkeypatch.setattr(registry, "_RECIPES", shuffled)
    from ssah.plan import COMMANDS

    assert registry.memory_rows() == list(COMMANDS)
    names = list(registry.recipes())
    assert names[0] == "units" and set(names[-2:]) == {"judge validate", "judge train"}
