"""Configs as the single source of options: shipped YAML configs, key=value overrides, one precedence rule, the CLI
generated from the config classes, and every bad input through the config path as one line, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import ssah.commands.summaries
from ssah.cli import main
from ssah.config import BaseConfig, load_config, parse_overrides, shipped_configs
from ssah.errors import UserError
from ssah.experiments.ablate import AblateConfig
from ssah.experiments.protect import ProtectConfig
from ssah.recipes import RECIPES, get_recipe

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
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_input_is_one_line_naming_the_key(case: str, tmp_path: Path, capsys) -> None:
    args, needle = BAD[case]
    work = tmp_path / "work"
    work.mkdir()
    args = [_yaml(tmp_path / "c.yaml", yaml.safe_load(a[5:])) if a.startswith("FILE:") else a for a in args]
    out = work / "out"
    code = main([*args, "--out", str(out), "--no-progress"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert needle in lines[0], lines[0]
    assert not any(work.iterdir())


def test_precedence_defaults_config_flags_overrides(tmp_path: Path) -> None:
    """class defaults < shipped or YAML config < flags < key=value overrides; nested keys merge key by key."""
    base = {"model": TINY}
    assert AblateConfig.resolve("ablate", None, base).limit == 32  # the field's default (a full run)
    quick = AblateConfig.resolve("ablate", "quick", base)
    assert (quick.limit, quick.seeds, quick.random_for) == (16, 3, ["SCU"])
    assert AblateConfig.resolve("ablate", "ablate/quick", base) == quick  # the name as `ssah configs` lists it
    flagged = AblateConfig.resolve("ablate", "quick", {**base, "limit": 10})
    assert (flagged.limit, flagged.seeds) == (10, 3)
    over = AblateConfig.resolve("ablate", "quick", {**base, "limit": 10}, ["limit=7", "dose=[0.01, 0.02]"])
    assert (over.limit, over.seeds, over.dose) == (7, 3, [0.01, 0.02])
    path = _yaml(tmp_path / "p.yaml", {"model": TINY, "lora": {"r": 4, "alpha": 8}, "steps": "2,1"})
    p = ProtectConfig.resolve("protect", path, {}, ["lora.alpha=32"])
    assert (p.lora.r, p.lora.alpha, p.steps) == (4, 32.0, [1, 2])


def test_cli_precedence_and_quick_shorthand(tmp_path: Path, monkeypatch, capsys) -> None:
    """The same rule through the command line: what reaches the recipe's run function is the resolved config."""
    seen: list[AblateConfig] = []

    def fake_run(cfg: AblateConfig) -> Path:
        seen.append(cfg)
        return tmp_path

    monkeypatch.setattr("ssah.experiments.ablate.run_ablate", fake_run)
    monkeypatch.setattr(ssah.commands.summaries, "SUMMARIES", {})
    file = _yaml(tmp_path / "a.yaml", {"model": TINY, "limit": 20, "seeds": 4, "max_new_tokens": 8})
    assert main(["ablate", "--config", file, "--limit", "10", "--seeds", "6", "seeds=7"]) == 0, capsys.readouterr()
    assert (seen[-1].model, seen[-1].limit, seen[-1].seeds, seen[-1].max_new_tokens) == (TINY, 10, 7, 8)
    assert main(["ablate", TINY, "--quick"]) == 0
    assert main(["ablate", TINY, "--config", "quick"]) == 0
    assert seen[-1] == seen[-2] and seen[-1].limit == 16
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
        assert (got.model_dump() if isinstance(got, BaseConfig) else got) == value or value is None or key == "dose"


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


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_field_is_a_flag_with_its_help(name: str, capsys, monkeypatch) -> None:
    """The CLI is generated from the config: a --flag per field (help and default from the field)."""
    cls = get_recipe(name).config_class()
    monkeypatch.setenv("COLUMNS", "400")  # rich shortens long flag names to fit the terminal
    assert main([*name.split(), "--help"]) == 0
    text = capsys.readouterr().out
    for field_name, field in cls.model_fields.items():
        if field_name in cls.cli_arguments or field_name in cls.cli_skip():
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flag = str(extra.get("flag") or "--" + field_name.replace("_", "-")).split("/")[0]
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
