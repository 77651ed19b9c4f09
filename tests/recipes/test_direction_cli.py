"""`ssah direction` end to end on a tiny model: the run folder, the saved direction, results in the one shape,
verdicts consistent with their numbers, re-rendering from results alone, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import ssah.recipes.direction.run as recipe
from ssah.cli import main
from ssah.direction import load_direction
from ssah.models import load_model
from ssah.recipes.direction.report import render
from ssah.registry import get_recipe

FAST = ["--quick", "--train", "6", "--val", "4", "--eval-limit", "4", "--eval-max-new-tokens", "4", "--kl-tokens", "3"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def direction_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("direction") / "run"
    assert main(["direction", "tiny-random-llama", "--out", str(out), *FAST, "--no-progress"]) == 0
    return out


def test_run_folder(direction_run: Path) -> None:
    for name in ("results.json", "report.md", "config.yaml", "manifest.json", "direction.safetensors",
                 "direction.json", "plots/asr_vs_kl.png"):  # fmt: skip
        assert (direction_run / name).is_file(), name
    res = json.loads((direction_run / "results.json").read_text())
    lm = load_model("tiny-random-llama", device="cpu")
    saved = load_direction(direction_run, fingerprint=lm.fingerprint)
    assert (saved.layer, saved.position) == (res["selection"]["layer"], res["selection"]["position"])
    groups = [r["group"] for r in res["conditions"]]
    assert groups.count("random") == 3 and groups.count("addition-random") == 3
    for row in res["conditions"]:
        for key in ("asr", "overrefusal", "harmless_refusal"):
            if key in row:
                assert set(row[key]) == {"k", "n", "rate", "ci95", "outcomes", "prompts"}
        assert set(row["kl"]["reply"]) == {"mean", "ci95", "n", "interval"}
    base = next(r for r in res["conditions"] if r["group"] == "baseline")
    assert base["kl"]["reply"]["mean"] < 1e-5  # the unedited model against its own reference
    assert res["orthogonalization"]["max_abs_logprob_difference_vs_hooks"] < 1e-3
    assert res["weights"]["unchanged"]
    for v in res["verdicts"].values():
        lo, hi = v["comparison"]["ci95"]
        assert (v["verdict"] == "reproduced") == ((lo > 0) if v["expected"] == "higher" else (hi < 0))


def test_render_from_results_alone(direction_run: Path, tmp_path: Path) -> None:
    res = json.loads((direction_run / "results.json").read_text())
    text = get_recipe("direction").renderer()(res, tmp_path)
    assert text == render(res, tmp_path) and "| direction ablation |" in text
    assert (tmp_path / "plots" / "asr_vs_kl.png").is_file()


def test_recipe_imports_no_other_recipe() -> None:
    tree = ast.parse(Path(recipe.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("ssah.recipes.") and not n.startswith("ssah.recipes.direction")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--harmless", "EMPTY"], "no rows"),
        (["--seeds", "2"], "'seeds'"),
        (["--train", "500"], "train + validation + test need"),
        (["--eval-judge", "keyword:nope"], "nope"),
        (["--max-layer-share", "0"], "max_layer_share"),
    ],
)
def test_bad_input_writes_nothing(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    if "EMPTY" in extra:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        extra = [x if x != "EMPTY" else str(empty) for x in extra]
    out = tmp_path / "bad"
    code, _, err = run(["direction", "tiny-random-llama", "--out", str(out), *FAST, *extra], capsys)
    assert code == 2, err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()
