"""`ssah demo`: the whole method on one model, with one report (its stages and rows come from the registry)."""

from ssah.registry import Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="demo",
        help="The whole method on one model, with one report.",
        package=__name__,
        config=".run:DemoConfig",
        run=".run:run_demo",
        render=".report:render",
        locks_itself=True,
    )
)
