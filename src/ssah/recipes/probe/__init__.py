"""`ssah probe`: where harmful and harmless prompts separate along the reasoning direction."""

from ssah.registry import DemoStage, Headline, Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="probe",
        help="Where harmful and harmless prompts separate along the reasoning direction.",
        package=__name__,
        config=".run:ProbeConfig",
        run=".run:run_probe",
        render=".report:render",
        summary=".report:summary",
        stages=(
            DemoStage("probe", "Probing the reasoning direction, aligned vs unaligned", order=40, needs=("align",),
                      compare=True),
        ),
        headlines=(Headline(("probe",), ".report:row_probe", 90),),
    )
)  # fmt: skip
