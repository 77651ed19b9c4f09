"""The recipe registry: every experiment ssah can run, found by name, registered by the recipe itself.

A recipe is one package: the built-in ones are the folders ``ssah/recipes/<name>/``, a user's is any importable
package. Its ``__init__.py`` registers it once, with one :class:`Recipe` value through :func:`register_recipe`
(the same call for built-in and user recipes)::

    from ssah.recipes import DemoStage, Recipe, register_recipe

    register_recipe(Recipe(
        name="foo", help="One line for `ssah --help`.", package=__name__,
        config=".recipe:FooConfig", run=".recipe:run_foo", render=".recipe:render", summary=".recipe:summary",
        stages=(DemoStage("foo", "Measuring foo", order=95),),
    ))

The CLI (one command per recipe), ``ssah configs`` (the YAML files in the package's ``configs/`` folder),
``ssah report``, :func:`load_run`, the demo's stages and science table, the end-of-command summaries and the
memory plan of ``ssah info --plan`` (its rows) read this registry; none lists recipes of its own.

Discovery, on the first access (:func:`recipes`): the built-in packages in :data:`BUILTIN` are imported, then
every entry point of the group ``ssah.recipes`` (``[project.entry-points."ssah.recipes"] foo = "my_pkg.foo"``:
loading it imports the package, which registers itself; an entry point may also name a :class:`Recipe`). A
program may instead call :func:`register_recipe` itself at any time. A recipe names its objects as
``"module:attribute"`` strings (``".run:UnitsConfig"`` is relative to its ``package``), imported on first use, so
``import ssah`` and ``ssah --help`` stay cheap (no torch) and a broken optional recipe cannot stop the others.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ssah.errors import UserError
from ssah.results import RunResult, read_config, read_json, read_manifest

Renderer = Callable[[dict[str, Any], Path], str]
Ref = Any  # a "module:attribute" string (".module:attribute" relative to the recipe's package) or the object

ENTRY_POINTS = "ssah.recipes"
_NAMES = ("units", "eval", "probe", "ablate", "train", "align", "transfer", "protect", "direction", "localize")
_NAMES += ("budget", "demo")
BUILTIN = tuple(f"ssah.recipes.{n}" for n in (*_NAMES, "judge"))  # the built-in recipe packages, in listing order


def resolve(ref: Ref, package: str = "") -> Any:
    """The object a reference names: ``"module:attribute"``, ``".module:attribute"`` (relative to ``package``),
    or the object itself."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module_name, package or None), attribute)


@dataclass(frozen=True)
class DemoStage:
    """One stage of ``ssah demo``: the recipe run into ``<demo>/<name>`` with the demo's settings (out, seed,
    device, ...), its shipped ``quick`` config under a quick demo, on the ``"base"`` or the ``"aligned"`` model
    (the align stage's), with the demo's dtype / the units stage's unit file / the base model to compare with where
    asked, the ``fixed`` settings, and what ``options(ctx)`` adds (``ctx``: the demo's settings ``ctx.cfg``, its
    folder ``ctx.out``, ``ctx.folder(stage)``). Stages run in ``order``; ``needs`` names stages that must be done
    first."""

    name: str
    title: str
    order: int = 1000
    model: str = "aligned"
    needs: tuple[str, ...] = ()
    dtype: bool = False
    units: bool = False
    compare: bool = False
    fixed: Mapping[str, Any] = field(default_factory=dict)
    options: Ref | None = None


@dataclass(frozen=True)
class Headline:
    """One row of the demo's science table: ``row(*results)`` of the results of the demo stages ``stages`` (a
    dict with effect, published, ours, control, verdict, judge; None: no row), placed by ``order``; left out when
    one of the stages did not run."""

    stages: tuple[str, ...]
    row: Ref
    order: int = 1000


@dataclass(frozen=True)
class Recipe:
    """One experiment: its name (the command, ``"judge validate"`` for a subcommand), its one-line ``help``, where
    its config class, run function, report renderer and end-of-command summary live, its demo stages and its rows of
    the demo's science table."""

    name: str
    help: str
    config: Ref
    run: Ref  # run(config) -> RunResult: writes the run folder (usually through ssah.protocol.execute)
    render: Ref | None = None  # render(results, run_dir) -> markdown; None: the report cannot be rebuilt
    summary: Ref | None = None  # summary(RunResult) prints the command's last lines; None: prints nothing
    package: str = ""  # the recipe's package: relative references, and its shipped configs
    configs: str = "configs"  # the folder of the package that holds its shipped YAML configs
    results_file: str = "results.json"  # the file of the run folder that holds its results
    # False: the CLI holds the --out folder's lock for the whole command (ssah.runs.held_output); True: the run
    # takes it itself at its start (train: only its main process under accelerate; demo: a folder it resumes)
    locks_itself: bool = False
    stages: tuple[DemoStage, ...] = ()
    headlines: tuple[Headline, ...] = ()
    memory: tuple[str, ...] = ()  # the rows of the memory plan (ssah.plan.COMMANDS) its command needs

    def config_class(self) -> Any:
        """The recipe's pydantic config class."""
        return resolve(self.config, self.package)

    def runner(self) -> Callable[..., RunResult[Any]]:
        """The recipe's ``run(config) -> RunResult`` function (it writes the run folder, ``RunResult.out``)."""
        return resolve(self.run, self.package)  # type: ignore[no-any-return]

    def renderer(self) -> Renderer:
        """The recipe's ``render(results, run_dir) -> markdown``; a ``UserError`` when it has none."""
        if self.render is None:
            raise UserError(f"the `{self.name}` report cannot be rebuilt from results.json: run the command again")
        return resolve(self.render, self.package)  # type: ignore[no-any-return]

    def summarize(self, result: RunResult[Any]) -> None:
        """Print the command's closing lines (nothing when the recipe has no summary)."""
        if self.summary is not None:
            resolve(self.summary, self.package)(result)

    def resolve(self, ref: Ref) -> Any:
        """One of the recipe's own references (a stage's options, a headline's row)."""
        return resolve(ref, self.package)


_RECIPES: dict[str, Recipe] = {}
_loaded = False


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (the one call for built-in and user recipes); returns it. A name taken by a
    recipe of another package is an error; registering a package's recipe again replaces it."""
    old = _RECIPES.get(recipe.name)
    if old is not None and old.package != recipe.package:
        raise UserError(f"two recipes are called {recipe.name!r} (in {old.package} and {recipe.package}): rename one")
    _RECIPES[recipe.name] = recipe
    return recipe


def _load() -> None:
    """Import the built-in recipes and the entry points of ``ssah.recipes`` (once); a user recipe that cannot be
    loaded is logged and left out."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(name)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            found = ep.load()
        except Exception as exc:  # a user's broken plug-in must not stop ssah
            logging.getLogger(__name__).warning("cannot load recipe entry point %s: %s", ep.value, exc)
            continue
        if isinstance(found, Recipe):
            register_recipe(found)


def recipes() -> dict[str, Recipe]:
    """Every registered recipe, by name (the built-in ones first, in :data:`BUILTIN`'s order, whatever order their
    packages were imported in; then the users', in registration order)."""
    _load()
    rank = {package: i for i, package in enumerate(BUILTIN)}
    return dict(sorted(_RECIPES.items(), key=lambda item: rank.get(item[1].package, len(rank))))


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ``UserError`` listing the known ones otherwise."""
    known = recipes()
    if name not in known:
        raise UserError(f"no recipe called {name!r}: the known recipes are {', '.join(sorted(known))}")
    return known[name]


def memory_rows() -> list[str]:
    """The memory plan's rows that the registered recipes need (``ssah info --plan``), in registry order."""
    return list(dict.fromkeys(row for r in recipes().values() for row in r.memory))


def demo_stages() -> list[tuple[Recipe, DemoStage]]:
    """Every recipe's demo stages, in pipeline order."""
    found = [(r, s) for r in recipes().values() for s in r.stages]
    return sorted(found, key=lambda rs: rs[1].order)


def science_rows() -> list[tuple[Recipe, Headline]]:
    """Every recipe's rows of the demo's science table, in the table's order."""
    found = [(r, h) for r in recipes().values() for h in r.headlines]
    return sorted(found, key=lambda rh: rh[1].order)


# -- shipped configs: the YAML files in each recipe's configs folder ---------------------------------------------
def _config_folder(recipe: Recipe) -> Any:
    if not recipe.package:
        return None
    folder = resources.files(recipe.package) / recipe.configs
    return folder if folder.is_dir() else None


def shipped_configs() -> dict[str, dict[str, str]]:
    """The configs shipped with the recipes: recipe name -> config name -> its first comment line."""
    out: dict[str, dict[str, str]] = {}
    for name, recipe in sorted(recipes().items()):
        folder = _config_folder(recipe)
        files = (
            sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name) if folder else []
        )
        for f in files:
            first = f.read_text(encoding="utf-8").splitlines()[:1]
            about = first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""
            out.setdefault(name, {})[f.name.removesuffix(".yaml")] = about
    return out


def shipped_config_text(recipe: str, name: str) -> str:
    """The text of a shipped config; a ``UserError`` listing the ones there are otherwise."""
    ours = shipped_configs().get(recipe, {})
    if name not in ours:
        have = ", ".join(ours) or "none"
        raise UserError(f"no shipped config {name!r} for `ssah {recipe}` (shipped: {have}): see `ssah configs`")
    return str((_config_folder(get_recipe(recipe)) / f"{name}.yaml").read_text(encoding="utf-8"))


# -- reading a run folder back through the registry (the core ``ssah.results`` knows no recipe) ----------------
def read_run_files(run_dir: str | Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A finished run folder's recipe name, manifest and results (its registered results file), without its
    config; a one-line ``UserError`` when the folder is not a finished ssah run."""
    run_dir = Path(run_dir)
    command, man = read_manifest(run_dir)
    known = recipes()
    name = known[command].results_file if command in known else "results.json"
    results_file = run_dir / name
    if not results_file.is_file():
        raise UserError(f"{run_dir} has no {name}: the `{command}` run did not finish; run it again")
    results = read_json(results_file, "the results")
    if not isinstance(results, dict):
        raise UserError(f"{results_file} does not hold a JSON object: it was not written by `ssah {command}`")
    return command, man, results


def load_run(run_dir: str | Path) -> RunResult[Any]:
    """Read a finished run folder back as the :class:`RunResult` its run returned: the recipe from
    ``manifest.json``, the config re-validated from ``config.yaml`` by the recipe's config class, the results and
    their verdicts. A one-line ``UserError`` when the folder is not a finished ssah run."""
    command, man, results = read_run_files(run_dir)
    config = read_config(run_dir, get_recipe(command).config_class(), command)
    return RunResult(out=Path(run_dir), recipe=command, config=config, results=results, manifest=man)
