"""A recipe of one's own: one package outside ssah, found through the ``ssah.recipes`` entry point group, appears in
the CLI, ``ssah configs``, the demo's stages and science table, and ``ssah report`` - no ssah file edited."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

import ssah.registry as registry
from ssah.cli import main

INIT = """
from ssah.recipes import DemoStage, Headline, Recipe, register_recipe

register_recipe(
    Recipe(
        name="foo",
        help="Count the foos (a user's recipe).",
        package=__name__,
        config=".recipe:FooConfig",
        run=".recipe:run_foo",
        render=".recipe:render",
        summary=".recipe:summary",
        stages=(DemoStage("foo", "Counting the foos", order=95, model="base"),),
        headlines=(Headline(("foo",), ".recipe:row", 95),),
    )
)
"""

RECIPE = """
from pydantic import Field

from ssah.config import BaseConfig
from ssah.recipes import Experiment, execute, get_recipe
from ssah.runs import check_output_folder


class FooConfig(BaseConfig):
    out: str = Field("runs/foo", description="Run folder to write.")
    overwrite: bool = Field(False, description="Replace an existing run folder.")
    seed: int = Field(0, description="Random seed.")
    size: int = Field(1, description="How many foos to count.")

    def check(self) -> None:
        check_output_folder(self.out, self.overwrite)


def run_foo(cfg):
    results = {"foos": cfg.size, "seconds": {"total": 0.0}}
    return execute(get_recipe("foo"), cfg, lambda c, clock: Experiment(results, {"name": "none"}, {}))


def render(results, run_dir):
    return f"# foo\\n\\n{results['foos']} foos counted.\\n"


def summary(result):
    print(f"counted {result.results['foos']} foos into {result.out}")


def row(r):
    return {"effect": "foos", "published": "-", "ours": str(r["foos"]), "control": "none", "verdict": None,
            "judge": None}
"""


@pytest.fixture
def user_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package ``foo_recipe`` with its shipped config and an installed distribution's entry point, on sys.path;
    the registry is loaded again (as in a new process) and put back afterwards."""
    pkg = tmp_path / "site" / "foo_recipe"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "recipe.py").write_text(RECIPE)
    (pkg / "configs" / "quick.yaml").write_text("# Two foos, quickly.\nsize: 2\n")
    dist = tmp_path / "site" / "foo_recipe-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: foo-recipe\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ssah.recipes]\nfoo = foo_recipe\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_RECIPES", dict(registry.recipes()))
    monkeypatch.setattr(registry, "_loaded", False)
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("foo_recipe")]:
        del sys.modules[name]


def test_a_users_recipe_is_found_everywhere(user_recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["foo", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--size" in help_text and "Two foos, quickly." in help_text  # its options and its shipped config

    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    assert "foo/quick" in listed and "Two foos, quickly." in listed and "ablate/quick" in listed

    assert main(["demo", "--stages", "nope", "--out", str(user_recipe / "demo")]) == 2
    assert "budget, foo" in capsys.readouterr().err  # the demo's stage list, after the built-in stages
    from ssah.recipes.demo.run import stage_names

    assert stage_names()[-1] == "foo"

    out = user_recipe / "runs" / "foo"
    assert main(["foo", "--quick", "--out", str(out)]) == 0
    assert f"counted 2 foos into {out}" in capsys.readouterr().out  # its summary
    assert json.loads((out / "results.json").read_text())["foos"] == 2
    assert json.loads((out / "manifest.json").read_text())["command"] == "foo"
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "2 foos counted." in (out / "report.md").read_text()
    assert registry.load_run(out).config.size == 2

    from ssah.reports.science import headlines

    demo = user_recipe / "demo"
    (demo / "foo").mkdir(parents=True)
    (demo / "foo" / "results.json").write_text((out / "results.json").read_text())
    assert [h["effect"] for h in headlines(demo)] == ["foos"]  # its row of the science table
