"""The recipe registry: every entry resolves to a config class, a run function and (where declared) a renderer."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from ssah.errors import UserError
from ssah.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
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
