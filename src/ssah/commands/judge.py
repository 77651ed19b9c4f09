"""`ssah judge validate` / `ssah judge train`: generated from their recipes ("judge validate", "judge train")."""

from __future__ import annotations

import typer

from ssah.cliutil import RecipeGroup, app


class JudgeGroup(RecipeGroup):
    prefix = "judge "


judge_app = typer.Typer(
    cls=JudgeGroup,
    no_args_is_help=True,
    help="Refusal judges: validate them against human labels, train the learned judge.",
)
app.add_typer(judge_app, name="judge")
