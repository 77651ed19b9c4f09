"""`ssah budget`: are redundant units a good alignment budget?"""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="budget",
        help="Are redundant units a good alignment budget?",
        package=__name__,
        config=".run:BudgetConfig",
        run=".run:run_budget",
        render=".report:render",
        summary=".report:summary",
        stages=(
            DemoStage("budget", "Aligning the base model through its redundant units only", order=90, model="base"),
        ),
        headlines=(Headline(("budget",), ".report:row_budget", 80),),
    )
)
