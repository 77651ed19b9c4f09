"""Configs as the single source of options: shipped YAML configs, key=value overrides, one precedence rule, the CLI
generated from the config classes, and every bad input through the config path as one line, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ssah.cli import main
from ssah.cliutil import _fields, _flag
from ssah.config import BaseConfig, load_config, parse_overrides, sections
from ssah.data import load_prompts
from ssah.errors import UserError
from ssah.fields import CalibrationSection, EvalSection
from ssah.recipes.ablate.run import AblateConfig
from ssah.recipes.protect.run import ProtectConfig
from ssah.registry import Recipe, get_recipe, recipes, shipped_configs

TINY = "tiny-random-llama"


def _yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# (args after the command, the key the one-line error must name); every case fails before anything is written
BAD: dict[str, tuple[list[str], str]] = {
    "unknown key override": (["units", TINY, "seedz=3"], "'seedz'"),
    "unknown nested key": (["protect", TINY, "lora.rank=4"], "'lora.rank'"),
    "wrong type override": (["units", TINY, "limit=many"], "'limit'"),
    "wrong nested type": (["protect", TINY, "lora.r=big"], "'lora.r'"),
    "bool for a number": (["units", TINY, "seed=true"], "'seed'"),
    "constraint": (["ablate", TINY, "seeds=2"], "'seeds'"),
    "choice": (["units", TINY, "metric=psychic"], "unknown metric 'psychic'"),
    "override without =": (["units", TINY, "limit", "6"], "'limit'"),
    "no such shipped config": (["ablate", TINY, "--config", "huge"], "'huge'"),
    "recipe without that config": (["units", TINY, "--config", "quick"], "'quick'"),
    "missing config file": (["units", TINY, "--config", "nope.yaml"], "nope.yaml"),
    "quick and config": (["ablate", TINY, "--quick", "--config", "full"], "--quick"),
    "unknown key in a file": (["units", "--config", "FILE:{seedz: 3}"], "'seedz'"),
    "wrong type in a file": (["units", TINY, "--config", "FILE:{limit: [1, 2]}"], "'limit'"),
    "missing model": (["units", "limit=4"], "'model'"),
    # sections (eval.KEY): the error names the full dotted key
    "unknown section key": (["ablate", TINY, "eval.limt=3"], "key 'eval.limt': did you mean 'eval.limit'?"),
    "a section's key at top level": (["ablate", TINY, "limit=3"], "did you mean 'calibration.limit' or 'eval.limit'?"),
    "section wrong type": (["ablate", TINY, "eval.limit=many"], "bad config value for 'eval.limit'"),
    "section constraint": (["direction", TINY, "eval.limit=0"], "'eval.limit': Input should be greater than"),
    "section bool for a number": (["budget", TINY, "eval.max_new_tokens=true"], "'eval.max_new_tokens'"),
    "section flag wrong type": (["protect", TINY, "--eval-limit", "x"], "'--eval-limit'"),
    "section in a file": (["align", TINY, "--config", "FILE:{eval: {limits: 3}}"], "'eval.limits'"),
    "section given whole": (["ablate", TINY, "eval=5"], "'eval'"),
    "section override without =": (["ablate", TINY, "eval.limit", "64"], "'eval.limit' is not key=value"),
    "unknown judge in a section": (["ablate", TINY, "--quick", "eval.judge=nope"], "nope"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_input_is_one_line_naming_the_key(case: str, tmp_path: Path, user_error) -> None:
    args, needle = BAD[case]
    args = [_yaml(tmp_path / "c.yaml", yaml.safe_load(a[5:])) if a.startswith("FILE:") else a for a in args]
    work = tmp_path / "work"
    work.mkdir()
    user_error([*args, "--out", str(work / "out"), "--no-progress"], needle, watch=work)


def test_precedence_defaults_config_flags_overrides(tmp_path: Path) -> None:
    """class defaults < shipped or YAML config < flags < key=value overrides; nested keys merge key by key."""
    base = {"model": TINY}
    assert AblateConfig.resolve("ablate", None, base).eval.limit == 32  # the recipe's default (a full run)
    quick = AblateConfig.resolve("ablate", "quick", base)
    assert (quick.eval.limit, quick.eval.max_new_tokens, quick.seeds, quick.random_for) == (16, 32, 3, ["SCU"])
    assert AblateConfig.resolve("ablate", "ablate/quick", base) == quick  # the name as `ssah configs` lists it
    flagged = AblateConfig.resolve("ablate", "quick", {**base, "eval": {"limit": 10}})
    assert (flagged.eval.limit, flagged.eval.max_new_tokens, flagged.seeds) == (10, 32, 3)
    flags = {**base, "eval": {"limit": 10}}
    over = AblateConfig.resolve("ablate", "quick", flags, ["eval.limit=7", "dose=[0.01, 0.02]"])
    assert (over.eval.limit, over.eval.max_new_tokens, over.seeds, over.dose) == (7, 32, 3, [0.01, 0.02])
    # a partial section keeps the recipe's other defaults (its default instance), not the section class's
    only = AblateConfig.resolve("ablate", None, base, ["eval.max_new_tokens=8"])
    assert (only.eval.limit, only.eval.batch_size, only.eval.utility) == (32, 32, ["perplexity:builtin:task"])
    assert AblateConfig(model=TINY, eval={"limit": 4}).eval.max_new_tokens == 64  # and from Python
    path = _yaml(tmp_path / "p.yaml", {"model": TINY, "lora": {"r": 4, "alpha": 8}, "steps": "2,1"})
    p = ProtectConfig.resolve("protect", path, {}, ["lora.alpha=32"])
    assert (p.lora.r, p.lora.alpha, p.steps) == (4, 32.0, [1, 2])


def test_cli_precedence_and_quick_shorthand(tmp_path: Path, monkeypatch, capsys) -> None:
    """The same rule through the command line: what reaches the recipe's run function is the resolved config."""
    seen: list[AblateConfig] = []

    def fake_run(cfg: AblateConfig) -> Path:
        seen.append(cfg)
        return tmp_path

    monkeypatch.setattr("ssah.recipes.ablate.run.run_ablate", fake_run)
    monkeypatch.setattr(Recipe, "summarize", lambda self, result: None)  # the fake runs wrote nothing to sum up
    file = _yaml(tmp_path / "a.yaml", {"model": TINY, "eval": {"limit": 20, "max_new_tokens": 8}, "seeds": 4})
    args = ["ablate", "--config", file, "--eval-limit", "10", "--seeds", "6", "seeds=7"]
    assert main(args) == 0, capsys.readouterr()
    assert (seen[-1].model, seen[-1].eval.limit, seen[-1].seeds, seen[-1].eval.max_new_tokens) == (TINY, 10, 7, 8)
    assert main([*args, "eval.limit=5"]) == 0  # key=value over the flag
    assert (seen[-1].eval.limit, seen[-1].eval.max_new_tokens, seen[-1].eval.batch_size) == (5, 8, 32)
    assert main(["ablate", TINY, "--quick"]) == 0
    assert main(["ablate", TINY, "--config", "quick"]) == 0
    assert seen[-1] == seen[-2] and seen[-1].eval.limit == 16
    assert main(["ablate", TINY, "--categories", "SCU,RU", "--dose", "1%", "categories=[UCU]"]) == 0
    assert seen[-1].categories == ["UCU"] and seen[-1].dose == [0.01]


@pytest.mark.parametrize(("recipe", "name"), [(r, n) for r, names in shipped_configs().items() for n in names])
def test_every_shipped_config_validates_against_its_recipe(recipe: str, name: str) -> None:
    cls = get_recipe(recipe).config_class()
    values = load_config(recipe, name)
    assert values, f"{recipe}/{name} is empty"
    assert set(values) <= set(cls.model_fields)
    required = {"data": ["x.csv"]} if "data" in cls.cli_arguments else {"model": TINY}
    cfg = cls.resolve(recipe, name, required)
    for key, value in values.items():  # every key reaches the config (no silently ignored setting)
        got = getattr(cfg, key)
        if isinstance(got, BaseConfig) and isinstance(value, dict):  # a section: every key the file sets
            assert set(value) <= set(type(got).model_fields), f"{recipe}/{name}: {key}"
            got, value = got.model_dump(include=set(value)), {k: v for k, v in value.items() if v is not None}
            got = {k: v for k, v in got.items() if k in value}
        assert got == value or value is None or key == "dose"


def test_configs_command_lists_and_prints(capsys) -> None:
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out
    for expected in ("ablate/quick", "ablate/full", "protect/paper", "probe/quick", "budget/quick"):
        assert expected in listed
    assert len(listed.splitlines()) == sum(len(v) for v in shipped_configs().values())
    assert main(["configs", "ablate/quick"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seeds"] == 3
    assert main(["configs", "nosuch/quick"]) == 2
    assert "'quick'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(recipes()))
def test_every_field_is_a_flag_with_its_help(name: str, capsys, monkeypatch) -> None:
    """The CLI is generated from the config: a --flag per field (help and default from the field)."""
    cls = get_recipe(name).config_class()
    monkeypatch.setenv("COLUMNS", "400")  # rich shortens long flag names to fit the terminal
    assert main([*name.split(), "--help"]) == 0
    text = capsys.readouterr().out
    nested = sections(cls)
    fields = [(k, f) for k, f in cls.model_fields.items() if k not in nested]
    fields += [(f"{k}.{n}", f) for k, (_, sub) in nested.items() for n, f in sub.model_fields.items()]
    for field_name, field in fields:
        if field_name in cls.cli_arguments or field_name in cls.cli_skip():
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = str(extra.get("flag") or "--" + field_name.replace("_", "-").replace(".", "-")).split("/")[0]
        assert flag in text, f"{name}: {flag}"
        if name != "train":  # TrainConfig (ssah.train) is described by its own module
            assert field.description, f"{name}.{field_name} has no help"


def test_overrides_are_read_as_yaml() -> None:
    assert parse_overrides(["a=7", "b.c=x", "b.d=[1, 2]", "e=", "f=null", "g=1%,5%"]) == {
        "a": 7,
        "b": {"c": "x", "d": [1, 2]},
        "e": "",
        "f": None,
        "g": "1%,5%",
    }
    with pytest.raises(UserError, match="'seeds' is not key=value"):
        parse_overrides(["seeds"])


def test_section_flag_and_override_reach_the_same_field(tmp_path: Path, monkeypatch) -> None:
    """``--eval-limit 9`` and ``eval.limit=9`` set the one field ``cfg.eval.limit`` (and nothing else)."""
    seen: list[AblateConfig] = []
    monkeypatch.setattr("ssah.recipes.ablate.run.run_ablate", lambda cfg: seen.append(cfg) or tmp_path)
    monkeypatch.setattr(Recipe, "summarize", lambda self, result: None)  # the fake runs wrote nothing to sum up
    assert main(["ablate", TINY, "--eval-limit", "9"]) == 0
    assert main(["ablate", TINY, "eval.limit=9"]) == 0
    assert seen[0] == seen[1] and seen[0].eval.limit == 9
    assert seen[0].model_dump(exclude={"eval"}) == AblateConfig(model=TINY).model_dump(exclude={"eval"})
    assert seen[0].eval.model_dump(exclude={"limit"}) == AblateConfig(model=TINY).eval.model_dump(exclude={"limit"})


@pytest.mark.parametrize("name", sorted(recipes()))
def test_generated_flags_are_unique_and_sections_have_a_panel(name: str, capsys, monkeypatch) -> None:
    """No two config fields share a flag; a section's flags are listed in a panel of their own."""
    cls = get_recipe(name).config_class()
    flags = [_flag(key, field).split("/")[0] for _, key, field, _, _ in _fields(cls)]
    assert len(flags) == len(set(flags))
    if sections(cls):
        monkeypatch.setenv("COLUMNS", "200")
        assert main([*name.split(), "--help"]) == 0
        text = capsys.readouterr().out
        for key, (_, sub) in sections(cls).items():
            assert f"{sub.title} ({key}.KEY)" in text


def test_two_fields_with_one_flag_are_refused() -> None:
    class Clash(BaseConfig):
        eval_limit: int = 1
        eval: EvalSection = EvalSection()

    with pytest.raises(RuntimeError, match="--eval-limit"):
        _fields(Clash)


def test_section_flags_show_and_set_the_recipe_defaults(tmp_path: Path, monkeypatch) -> None:
    """A section's flag shows the recipe's default (its default instance, None included) and a bool section field
    gets its --no- form; both reach the nested field."""
    from ssah.recipes.align.run import AlignConfig

    shown = {key: default for _, key, _, default, _ in _fields(AlignConfig)}
    assert shown["train.max_grad_norm"] is None and shown["train.lr"] == 5e-5 and shown["eval.max_new_tokens"] == 48
    assert {key: d for _, key, _, d, _ in _fields(AblateConfig)}["eval.limit"] == 32
    seen: list[AlignConfig] = []
    monkeypatch.setattr("ssah.recipes.align.run.run_align", lambda cfg: seen.append(cfg) or tmp_path)
    monkeypatch.setattr(Recipe, "summarize", lambda self, result: None)  # the fake runs wrote nothing to sum up
    assert main(["align", TINY, "--no-train-freeze-embeddings", "--train-lr", "1e-4", "train.warmup=2"]) == 0
    t = seen[-1].train
    assert (t.freeze_embeddings, t.lr, t.warmup, t.schedule, t.max_grad_norm) == (False, 1e-4, 2, "constant", None)


def test_eval_section_decodes_under_the_run_settings() -> None:
    """``cfg.eval.greedy(cfg)``: the section's reply length and batch, the recipe's seed and system prompt."""
    cfg = AblateConfig(model=TINY, seed=5, system="Be brief.", eval={"max_new_tokens": 7})
    g = cfg.eval.greedy(cfg)
    assert (g.max_new_tokens, g.batch_size, g.seed, g.system, g.do_sample) == (7, 32, 5, "Be brief.", False)
    assert EvalSection().greedy().system is None


def test_calibration_section_is_one_declaration_for_every_unit_finding_recipe(tmp_path: Path) -> None:
    """ablate, protect, budget and transfer nest it (each with its defaults); units has the same keys at top level;
    ``limit`` keeps examples evenly spaced through each set; an empty file is a data error naming it."""
    from ssah.recipes.budget.run import BudgetConfig
    from ssah.recipes.transfer.run import TransferConfig
    from ssah.recipes.units.run import UnitsConfig

    for cls in (AblateConfig, ProtectConfig, BudgetConfig, TransferConfig):
        assert sections(cls)["calibration"][1] is CalibrationSection, cls
    assert (
        AblateConfig(model=TINY).calibration.batch_size == 32 and ProtectConfig(model=TINY).calibration.batch_size == 8
    )
    units = UnitsConfig(model=TINY, limit=10, safety="builtin:harmful")
    assert units.calibration is units and set(CalibrationSection.model_fields) <= set(UnitsConfig.model_fields)
    safety, utility = units.load()
    harmful = load_prompts("builtin:harmful")  # 150, sorted by category: the first 10 would be one category
    assert [ex.prompt for ex in safety] == [harmful[15 * i].prompt for i in range(10)] and len(utility) == 10
    assert len({ex.category for ex in safety}) == 10
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.jsonl has no rows"):
        CalibrationSection(safety=str(empty)).load()
