"""The shape of ``ssah.training`` and ``ssah.data``: the LoRA settings build one ``peft.LoraConfig``, the config
validates itself, and neither package has an import cycle (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

import ssah
from ssah.errors import UserError
from ssah.training import LoraSettings, TrainConfig, TrainSection, parse_lora

SRC = Path(ssah.__file__).parent


def test_lora_settings_build_the_peft_config() -> None:
    cfg = parse_lora("r=4,dropout=0.1").peft_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == (4, 8, 0.1, "all-linear")
    assert str(cfg.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    cfg = LoraSettings(r=2, alpha=3.0, targets=["q_proj", "v_proj"]).peft_config()
    assert (cfg.lora_alpha, set(cfg.target_modules)) == (3.0, {"q_proj", "v_proj"})
    for bad in ("r=0", "dropout=1", "alpha=-1", "r=x"):
        with pytest.raises(UserError, match="bad config value"):
            parse_lora(bad)


def test_train_config_validates_itself() -> None:
    base = {"model": "tiny-random-llama"}
    for field, value in [("lr", 0), ("batch_size", 0), ("warmup", -1), ("schedule", "step"), ("max_length", 4)]:
        with pytest.raises(ValidationError, match=field):
            TrainConfig(**base, **{field: value})
    with pytest.raises(UserError, match="not both"):
        TrainConfig(**base, freeze="u.safetensors:SCU", only="u.safetensors:RU")
    with pytest.raises(UserError, match="unit spec"):
        TrainConfig(**base, freeze="u.safetensors")
    assert TrainConfig(**base, lora="off").mode == "all" and TrainConfig(**base, lora="8").mode == "lora"
    # the fields TrainConfig declares and the optimiser's it shares with recipes (ModelRunConfig's are not ours)
    own = {**TrainConfig.__annotations__, **TrainSection.__annotations__}
    assert len(own) > 20 and all(TrainConfig.model_fields[name].description for name in own)  # the CLI's help


def _imports(path: Path, module: str) -> set[str]:
    """The ssah modules a file imports anywhere (functions included; ``TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("ssah") and m != module and not module.startswith(m + ".")}


def _module_graph() -> dict[str, set[str]]:
    files = {}
    for path in SRC.rglob("*.py"):
        parts = ("ssah", *path.relative_to(SRC).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {m: {t for t in _imports(p, m) if t in files} for m, p in files.items()}


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_training_and_data_bottom_modules_are_on_no_import_cycle() -> None:
    graph = _module_graph()
    assert "ssah.train" not in graph  # one way: the package
    mine = [m for m in graph if m.startswith("ssah.training")]
    mine += ["ssah.data.prompt_sets", "ssah.data.presets", "ssah.data.chat", "ssah.data.tasks", "ssah.data.shared"]
    cycles = [m for m in mine if _reaches(graph, m, m)]
    assert cycles == []
    assert not any(t.startswith("ssah.recipes") for m in mine for t in graph[m])  # the core imports no recipe
