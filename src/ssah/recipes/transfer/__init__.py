"""`ssah transfer`: do fine-tuning attacks turn safety units into utility units?"""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="transfer",
        help="Do fine-tuning attacks turn safety units into utility units?",
        package=__name__,
        config=".run:TransferConfig",
        run=".run:run_transfer",
        render=".report:render",
        summary=".report:summary",
        stages=(
            DemoStage("transfer", "Attribute transfer after a short benign fine-tune", order=70, needs=("align",)),
        ),
        headlines=(Headline(("transfer",), ".report:row_transfer", 60),),
    )
)
