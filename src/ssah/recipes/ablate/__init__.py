"""`ssah ablate`: ablate unit categories against stratified random controls."""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="ablate",
        help="Ablate unit categories against stratified random controls.",
        package=__name__,
        config=".run:AblateConfig",
        run=".run:run_ablate",
        render=".report:render",
        summary=".report:summary",
        memory=("ablate",),
        stages=(
            DemoStage("ablate", "Ablating each unit category, with random controls", order=60,
                      needs=("align", "units"), units=True),
        ),
        headlines=(Headline(("ablate",), ".report:row_ablate", 50),),
    )
)  # fmt: skip
