"""`ssah align`: make the aligned model (SFT on refusals and helpful answers)."""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="align",
        help="Make the aligned model (SFT on refusals and helpful answers).",
        package=__name__,
        config=".run:AlignConfig",
        run=".run:run_align",
        render=".report:render",
        summary=".report:summary",
        stages=(DemoStage("align", "Aligning the model (safety SFT)", order=10, model="base", dtype=True),),
        headlines=(Headline(("align",), ".report:row_align", 10),),
    )
)
