"""`ssah direction`: the refusal direction (Arditi et al.): ablate, add, orthogonalise."""

from ssah.registry import Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="direction",
        help="The refusal direction (Arditi et al.): ablate, add, orthogonalise; ASR, KL, refusals.",
        package=__name__,
        config=".run:DirectionConfig",
        run=".run:run_direction",
        render=".report:render",
        summary=".report:summary",
    )
)
