"""`ssah protect`: does freezing safety units protect against a fine-tuning attack?"""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="protect",
        help="Does freezing safety units protect against a fine-tuning attack?",
        package=__name__,
        config=".run:ProtectConfig",
        run=".run:run_protect",
        render=".report:render",
        summary=".report:summary",
        stages=(
            DemoStage("protect", "Fine-tuning with safety-critical units frozen", order=80, needs=("align", "units"),
                      units=True),
        ),
        headlines=(Headline(("protect",), ".report:row_protect", 70),),
    )
)  # fmt: skip
