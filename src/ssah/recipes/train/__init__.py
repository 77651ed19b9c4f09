"""`ssah train`: fine-tune with units frozen (or only units trained)."""

from ssah.registry import Recipe, register_recipe

RECIPE = register_recipe(
    Recipe(
        name="train",
        help="Fine-tune with units frozen (or only units trained).",
        package=__name__,
        config=".run:TrainConfig",
        run=".run:run_train",
        render=".report:render",
        summary=".report:summary",
        memory=("train-full", "train-frozen", "train-only", "train-lora"),
        locks_itself=True,
    )
)
