"""`ssah eval`: ASR, over-refusal and utility of one model."""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="eval",
        help="ASR, over-refusal and utility of one model.",
        package=__name__,
        config=".run:EvalConfig",
        run=".run:run_eval",
        render=".report:render",
        summary=".report:summary",
        memory=("eval",),
        stages=(
            DemoStage("eval-base", "Evaluating the unaligned model", order=20, model="base", dtype=True),
            DemoStage("eval-aligned", "Evaluating the aligned model", order=30, needs=("align",), dtype=True),
        ),
        headlines=(Headline(("eval-base", "eval-aligned"), ".report:row_overrefusal", 20),),
    )
)
