"""`ssah localize`: which localisation method finds the units that carry safety, compared at the same budget."""

from ssah.registry import Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="localize",
        help="Compare localisation methods (SSAH, Wei et al., activation contrast, random) at equal unit budgets.",
        package=__name__,
        config=".run:LocalizeConfig",
        run=".run:run_localize",
        render=".report:render",
        summary=".report:summary",
    )
)
