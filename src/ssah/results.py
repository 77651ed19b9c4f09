"""Typed run results: what every recipe's ``run(config)`` returns, and what :func:`load_run` reads back from a run
folder.

A :class:`RunResult` holds the run folder, the recipe's name, the typed config that ran, ``results.json`` as written
(plain JSON values), ``manifest.json``, and every verdict of the one rule (:func:`ssah.measure.verdict`) found in the
results, parsed back into :class:`ssah.measure.Verdict` objects and named by where they sit
(``"verdicts.scu_vs_random.asr"``). The dict stays the record (the reports read it); the typed parts are views of
it, so a result returned by a run and the same folder read back later are equal.

    result = run_ablate(AblateConfig(model="smollm2-135m-instruct", out="runs/ablate"))
    result.verdicts["verdicts.scu_vs_random.asr"].verdict   # 'reproduced' / 'not reproduced' / 'inconclusive'
    again = ssah.load_run("runs/ablate")                    # the same RunResult, config re-validated
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from ssah.errors import UserError

if TYPE_CHECKING:
    from ssah.measure import Proportion, Verdict

ConfigT = TypeVar("ConfigT", bound=BaseModel)

PLOT_SUFFIXES = (".png", ".svg")
# The validation context under which a recorded config is read back: checks of the machine it runs on (is this
# CUDA device here?) are skipped, since the run may have been made elsewhere.
RECORDED = {"recorded": True}


@dataclass(frozen=True, repr=False, eq=False)
class RunResult(Generic[ConfigT]):
    """One finished run: its folder, recipe, typed config, ``results.json``, manifest and parsed verdicts.

    Two results are equal when folder, recipe, config, results and manifest are (the verdicts are read from the
    results); results are compared as JSON text, so a NaN (a perplexity that was not measured) equals itself."""

    out: Path  # the run folder
    recipe: str  # the registered recipe that wrote it (``ssah.registry``), e.g. "ablate", "judge validate"
    config: ConfigT  # the resolved config that ran
    results: dict[str, Any]  # results.json as written (plain JSON values)
    manifest: dict[str, Any] = field(default_factory=dict)  # versions, seed, data and model identities, timing
    verdicts: dict[str, Verdict] = field(init=False)  # every verdict of the rule in ``results``, by its path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "verdicts", dict(find_verdicts(self.results)))

    # -- the files of the folder -------------------------------------------------------------------------------
    @property
    def report_path(self) -> Path:
        """``report.md`` (rebuilt by ``ssah report RUN_DIR``)."""
        return self.out / "report.md"

    @property
    def html_path(self) -> Path:
        """The self-contained ``report.html`` (plots inlined)."""
        return self.out / "report.html"

    @property
    def plots(self) -> list[Path]:
        """The plots the report drew (in the folder and its ``plots/``), sorted by path."""
        found = [p for where in (self.out, self.out / "plots") if where.is_dir() for p in where.iterdir()]
        return sorted(p for p in found if p.suffix in PLOT_SUFFIXES and p.is_file())

    # -- the numbers ---------------------------------------------------------------------------------------------
    @property
    def table(self) -> list[dict[str, Any]] | None:
        """The recipe's summary table (``results["table"]``: one row per condition) where it writes one."""
        table = self.results.get("table")
        return table if isinstance(table, list) else None

    @property
    def seconds(self) -> float | None:
        """The run's total time in seconds, as it recorded it."""
        s = self.results.get("seconds")
        total = s.get("total") if isinstance(s, Mapping) else s
        return float(total) if isinstance(total, int | float) else None

    def get(self, key: str) -> Any:
        """The value at a dotted path of ``results`` (``"initial.asr"``; list items by index, ``"cells.0"``, or by
        their ``name``, as :attr:`verdicts` names them); a ``KeyError`` naming the part that is missing."""
        node: Any = self.results
        for i, part in enumerate(key.split(".")):
            named = (
                [x for x in node if isinstance(x, Mapping) and x.get("name") == part] if isinstance(node, list) else []
            )
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
            elif named:
                node = named[0]
            else:
                where = ".".join(key.split(".")[:i]) or "results"
                have = ", ".join(map(str, list(node)[:12])) if isinstance(node, Mapping) else type(node).__name__
                raise KeyError(f"{self.recipe} results have no {part!r} under {where} (there: {have})")
        return node

    def proportion(self, key: str) -> Proportion:
        """The :class:`ssah.measure.Proportion` stored at a dotted path (``result.proportion("after.refusal")``)."""
        from ssah.measure import Proportion

        value = self.get(key)
        if not isinstance(value, Mapping) or not {"k", "n"} <= set(value):
            raise TypeError(f"{self.recipe} results: {key} is not a proportion (no k and n)")
        return Proportion.from_dict(value)

    def summary(self) -> str:
        """A few lines: the recipe, the folder and every verdict with its difference and interval."""
        lines = [f"{self.recipe} run in {self.out}" + (f" ({self.seconds:.0f} s)" if self.seconds is not None else "")]
        for name, v in self.verdicts.items():
            c = v.comparison
            lo, hi = (100 * x for x in c.ci95)
            lines.append(
                f"  {name}: {v.verdict} (difference {100 * c.difference:+.1f} points, 95% interval "
                f"[{lo:+.1f}, {hi:+.1f}], published direction {v.expected})"
            )
        return "\n".join(lines)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunResult):
            return NotImplemented
        mine, theirs = (self.out, self.recipe, self.config), (other.out, other.recipe, other.config)
        return mine == theirs and _json(self.results) == _json(other.results) and self.manifest == other.manifest

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for v in self.verdicts.values():
            counts[v.verdict] = counts.get(v.verdict, 0) + 1
        said = ", ".join(f"{n} {word}" for word, n in counts.items()) or "none"
        return f"RunResult(recipe={self.recipe!r}, out={str(self.out)!r}, verdicts: {said})"


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, allow_nan=True)


def find_verdicts(results: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Verdict]]:
    """Every verdict of the one rule (a ``Verdict.to_dict()`` shape, extra keys allowed) anywhere in ``results``,
    with its dotted path; list items are named by their ``name`` when they have one, else by their index.
    Entries that only say ``inconclusive`` because no comparison could be made (no control run) are not verdicts
    of the rule and are left in ``results``."""
    from ssah.measure import VERDICTS, Verdict

    if isinstance(results, Mapping):
        c = results.get("comparison")
        if results.get("verdict") in VERDICTS and "expected" in results and isinstance(c, Mapping):
            yield ".".join(path), Verdict.from_dict(results)
            return
        for key, value in results.items():
            yield from find_verdicts(value, (*path, str(key)))
    elif isinstance(results, list):
        for i, value in enumerate(results):
            name = value.get("name") if isinstance(value, Mapping) else None
            yield from find_verdicts(value, (*path, name if isinstance(name, str) and name else str(i)))


# -- reading a run folder ----------------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}".replace("\n", " ")) from exc
    except RecursionError:
        raise UserError(f"cannot read {what} {path}: nested too deeply to be a file ssah wrote") from None


def read_manifest(run_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """A run folder's recipe name (the command its ``manifest.json`` names) and manifest; a one-line
    ``UserError`` when it has none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder (no such folder): pass a folder written by an ssah command")
    manifest_file = run_dir / "manifest.json"
    if not manifest_file.is_file():
        raise UserError(f"{run_dir} is not a run folder (no manifest.json): pass a folder written by an ssah command")
    man = read_json(manifest_file, "the manifest")
    command = man.get("command") if isinstance(man, dict) else None
    if not isinstance(command, str) or not command.strip():
        raise UserError(f"{manifest_file} names no valid command (found {command!r}): is it an ssah run folder?")
    return command, man


def read_config(run_dir: str | Path, config_class: type[ConfigT], recipe: str = "") -> ConfigT:
    """The config a run folder recorded (``config.yaml``), validated by ``config_class`` as recorded: checks of
    this machine (devices) are skipped; a one-line ``UserError`` when it is missing or no longer fits."""
    path = Path(run_dir) / "config.yaml"
    what = f"`ssah {recipe}`'s " if recipe else ""
    if not path.is_file():
        raise UserError(f"{path.parent} has no config.yaml: it records no config; rerun it with this ssah version")
    from ssah.validate import load_yaml

    try:
        values = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}): was it edited? rerun the experiment") from None
    try:
        return config_class.model_validate(values if values is not None else {}, context=RECORDED)
    except (ValidationError, UserError, ValueError, TypeError, AttributeError) as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "config"
            why = f"{where}: {str(err['msg']).removeprefix('Value error, ')}"
        else:
            why = str(exc)
        raise UserError(
            f"{path} does not fit {what}{config_class.__name__} ({why}): was it written by another ssah version? "
            "rerun the experiment, or read its results.json directly"
        ) from None
