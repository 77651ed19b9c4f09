"""`ssah units`: score every unit on safety and utility data and split them into SCU / UCU / CU / RU."""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="units",
        help="Score every unit on safety and utility data; split into SCU / UCU / CU / RU.",
        package=__name__,
        config=".run:UnitsConfig",
        run=".run:run_units",
        render=".report:render",
        summary=".report:summary",
        memory=("units",),
        stages=(
            DemoStage("units", "Scoring and categorising units of the aligned model", order=50, needs=("align",),
                      dtype=True, fixed={"stability": True}, options=".run:demo_options"),
        ),
        headlines=(
            Headline(("units",), ".report:row_stability", 30),
            Headline(("units",), ".report:row_calibration", 40),
        ),
    )
)  # fmt: skip
