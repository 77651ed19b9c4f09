"""`ssah judge validate` / `ssah judge train`: refusal judges against human labels, and the learned judge."""

from ssah.registry import Recipe, register_recipe

VALIDATE = register_recipe(
    Recipe(
        name="judge validate",
        help="Agreement of judges with human labels.",
        package=__name__,
        config=".run:JudgeValidateConfig",
        run=".run:run_judge_validate",
        render=".report:render",
        summary=".report:summary_validate",
        configs="configs/validate",
    )
)
TRAIN = register_recipe(
    Recipe(
        name="judge train",
        help="Train the learned judge on labelled replies.",
        package=__name__,
        config=".run:JudgeTrainConfig",
        run=".run:run_judge_train",
        summary=".report:summary_train",
        configs="configs/train",
        results_file="training.json",
    )
)
