"""`ssah transfer` on tiny models: the run folder, the 4x4 matrix, the control, a given fine-tune, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssah.categorize import CATEGORIES
from ssah.cli import main
from ssah.measure import Proportion, compare, verdict

FAST = ["--calibration-limit", "8", "--steps", "2", "--no-progress"]


def _check_matrix(block: dict, units: int) -> None:
    counts = block["counts"]
    assert len(counts) == 4 and all(len(r) == 4 for r in counts)
    assert sum(map(sum, counts)) == units == block["units_total"]
    for i, c in enumerate(CATEGORIES):
        assert sum(counts[i]) == block["before"][c]
        assert sum(r[i] for r in counts) == block["after"][c]
        if block["before"][c]:
            assert sum(block["row_shares"][i]) == pytest.approx(1.0, abs=1e-3)


def test_transfer_fine_tunes_in_memory_and_writes_a_complete_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t"
    assert main(["transfer", "tiny-random-llama", "--out", str(out), *FAST]) == 0
    for f in ("config.yaml", "manifest.json", "results.json", "report.md", "plots/transition.png"):
        assert (out / f).is_file(), f
    assert (out / "plots/moved_by_layer.png").is_file()
    res = json.loads((out / "results.json").read_text())
    units = res["model"]["units_total"]
    # the matrix is 4x4, rows sum to the before-category counts, the total is every unit
    for key in ("transition", "control", "matched"):
        _check_matrix(res[key], units)
    before = res["transition"]["before"]
    assert before == {c: res["transition"]["before"][c] for c in CATEGORIES}
    assert res["finetuned"]["in_memory"] and res["finetuned"]["training"]["steps"] == 2
    assert not res["finetuned"]["same_weights"]
    assert 0 <= res["scu_overlap"]["jaccard"] <= 1 and 0 < res["scu_overlap"]["chance"] < 1
    assert set(res["moved_by_layer"]) >= {"SCU->CU", "CU->UCU"}
    for pair, rows in res["moved_by_layer"].items():
        p = res["transition"]["pairs"][pair]
        assert sum(r["attn"] + r["mlp"] for r in rows) == (p["k"] if p else 0)
    # the verdict: the move across the fine-tune vs the same move by data noise, same denominator, the one rule
    paper = res["paper"]
    assert paper["scu_to_cu"] == res["transition"]["pairs"]["SCU->CU"]
    for pair in ("SCU->CU", "CU->UCU"):
        t = paper["tests"][pair]
        assert t["effect"] == res["matched"]["pairs"][pair] and t["control"] == res["control"]["pairs"][pair]
        assert t["effect"]["n"] == t["control"]["n"] == res["control"]["before"][pair.split("->")[0]]
        redo = verdict(compare(Proportion.from_dict(t["effect"]), Proportion.from_dict(t["control"])), "higher")
        assert t["verdict"] == redo.verdict and t["comparison"]["ci95"] == list(redo.comparison.ci95)
    assert paper["verdict"] == paper["tests"]["SCU->CU"]["verdict"]
    assert res["matched"]["before"] == res["control"]["before"]
    assert 0 <= res["stability"]["jaccard_scu"] <= 1
    assert res["seconds"]["total"] > 0 and res["categorization"]["limit"] == 8
    report = (out / "report.md").read_text()
    assert "fine-tuned in memory" in report and "plots/transition.png" in report
    assert paper["verdict"] in report
    printed = capsys.readouterr().out
    assert "SCU -> CU" in printed and str(out) in printed


def test_no_control_is_inconclusive_and_render_redraws_from_results(tmp_path: Path, capsys) -> None:
    from ssah.recipes.transfer.report import render

    out = tmp_path / "t"
    assert main(["transfer", "tiny-random-llama", "--out", str(out), "--no-control", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["control"] is None and res["matched"] is None and res["stability"] is None
    assert res["paper"]["verdict"] == "inconclusive"
    for t in res["paper"]["tests"].values():
        assert t["verdict"] == "inconclusive" and t["reason"] == "no control" and t["control"] is None
    assert "paper's claim (over half of SCU -> CU, beyond data noise): inconclusive" in capsys.readouterr().out
    again = tmp_path / "again"
    text = render(res, again)
    assert (again / "plots/transition.png").is_file() and (again / "plots/moved_by_layer.png").is_file()
    assert text.startswith("# Attribute transfer")


def test_transfer_with_a_given_fine_tune_and_the_same_categorisation_as_units(tmp_path: Path, tiny_llama) -> None:
    """A saved fine-tune is read as is; the base categorisation equals `ssah units` with the same settings."""
    import copy

    from ssah.categorize import load_categorization
    from ssah.interventions import space_of

    model, tok = tiny_llama
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "down_proj" in name:
                p.mul_(1.5)
    ft.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    out = tmp_path / "t"
    args = ["--calibration-limit", "6", "--no-progress"]
    assert main(["transfer", "tiny-random-llama", "--finetuned", str(tmp_path / "ft"), "--out", str(out), *args]) == 0
    res = json.loads((out / "results.json").read_text())
    assert not res["finetuned"]["in_memory"] and res["finetuned"]["training"] is None
    _check_matrix(res["transition"], res["model"]["units_total"])
    # the same calibration through `ssah units`, whose calibration options are at top level
    assert main(["units", "tiny-random-llama", "--out", str(tmp_path / "u"), "--limit", "6", "--no-progress"]) == 0
    space = space_of(model)
    units = load_categorization(tmp_path / "u/units.safetensors", space, allow_other_weights=True)
    before = load_categorization(out / "units_before.safetensors", space, allow_other_weights=True)
    for c in CATEGORIES:
        assert units[c] == before[c], c


def test_transition_summary_counts() -> None:
    from ssah.categorize import categorize
    from ssah.recipes.transfer.run import moved_by_layer, transition_summary
    from ssah.units import GroupShape, UnitSpace

    space = UnitSpace([GroupShape(0, "attn", 50, 1), GroupShape(0, "mlp", 50, 1), GroupShape(1, "mlp", 100, 1)])
    g = torch.Generator().manual_seed(0)
    s, u = torch.rand(space.total, generator=g), torch.rand(space.total, generator=g)
    shares = {"scu": 0.1, "ucu": 0.2, "ru": 0.2}
    a = categorize(s, u, shares=shares, space=space)
    b = categorize(s + 0.3 * torch.rand(space.total, generator=g), u, shares=shares, space=space)
    t = transition_summary(a, b)
    _check_matrix(t, 200)
    assert t["moved"] == 200 - sum(t["counts"][i][i] for i in range(4))
    same = transition_summary(a, a)
    assert same["moved"] == 0 and same["overlap"]["SCU"]["jaccard"] == 1.0
    by_layer = moved_by_layer(a, b)
    for pair, rows in by_layer.items():
        assert len(rows) == 2 and sum(r["attn"] + r["mlp"] for r in rows) == t["pairs"][pair]["k"]
    scu = t["pairs"]["SCU->CU"]
    assert scu["n"] == t["before"]["SCU"] == len(a["SCU"]) and scu["k"] == len(a["SCU"] & b["CU"])


def test_paper_tests_give_each_verdict_from_constructed_moves() -> None:
    from ssah.recipes.transfer.run import paper_tests

    def block(scu_cu: tuple[int, int], cu_ucu: tuple[int, int]) -> dict:
        return {"pairs": {"SCU->CU": Proportion(*scu_cu).to_dict(), "CU->UCU": Proportion(*cu_ucu).to_dict()}}

    tests = paper_tests(block((60, 100), (30, 400)), block((10, 100), (28, 400)))
    assert tests["SCU->CU"]["verdict"] == "reproduced"  # 60% vs 10% of the same 100 SCU: beyond noise
    assert tests["CU->UCU"]["verdict"] == "not reproduced"  # 7.5% vs 7%: within 5 points of noise
    assert paper_tests(block((10, 100), (3, 400)), block((60, 100), (3, 400)))["SCU->CU"]["verdict"] == "not reproduced"
    assert paper_tests(block((5, 10), (3, 40)), block((3, 10), (3, 40)))["SCU->CU"]["verdict"] == "inconclusive"
    none = paper_tests(block((60, 100), (30, 400)), None)
    assert {t["verdict"] for t in none.values()} == {"inconclusive"} and none["SCU->CU"]["reason"] == "no control"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--finetuned", "tiny-random-gpt2"], "gpt2"),
        (["--finetuned", "tiny-random-qwen2"], "fine-tuned model"),
        (["--metric", "nope"], "metric"),
        (["--steps", "0"], "steps"),
        (["--calibration-limit", "1"], "--calibration-limit 2 or more"),
        (["--finetuned", "/nonexistent/model"], "not found"),
    ],
)
def test_transfer_bad_input(extra: list[str], needle: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(
        ["transfer", "tiny-random-llama", "--out", str(out), "--calibration-limit", "4", "--no-progress", *extra]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_transfer_refuses_another_unit_layout(tmp_path: Path, capsys) -> None:
    import transformers

    from ssah.tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = 3
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    code = main(["transfer", "tiny-random-llama", "--finetuned", str(tmp_path / "other"), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unit layout" in err[0], err
    assert not out.exists()
