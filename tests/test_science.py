"""The science table (one row per result of the paper: published, ours with its interval, the named control, the
verdict by the one rule, the judge with its agreement) and `ssah report RUN --readme FILE`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import measured
from ssah.cli import main
from ssah.commands.report import FULL_END, FULL_START, README_END, README_START, readme_block
from ssah.measure import ControlDistribution, Proportion, compare, compare_measured, verdict
from ssah.recipes.ablate.report import row_ablate
from ssah.recipes.eval.report import row_overrefusal
from ssah.recipes.units.report import row_calibration, row_stability
from ssah.recipes.units.run import overlap_across_safety_sets
from ssah.reports.science import all_of, headlines, judge_cell, science_table
from ssah.units import GroupShape, UnitSet, UnitSpace

JUDGE = "keyword:ssah"


def _v(effect: Any, control: Any, expected: str = "higher") -> dict[str, Any]:
    return verdict(compare(effect, control), expected).to_dict()  # type: ignore[arg-type]


def _ablate(scu: int) -> dict[str, Any]:
    controls = ControlDistribution((measured(2, 24, start=3),) * 3)  # three seeds on the same 24 prompts
    asr = verdict(compare_measured(measured(scu, 24), controls), "higher").to_dict()
    return {
        "verdicts": {"scu_vs_random": {"asr": asr}},
        "settings": {"seeds": 3, "control_strata": "layer-kind", "judge": JUDGE},
    }


def _units(k: int, n: int) -> dict[str, Any]:
    found, chance = Proportion(k, n), Proportion(13, 1000)
    st = {"jaccard": 0.25, "chance": 0.0065, "found_again": found.to_dict(), "found_again_by_chance": chance.to_dict()}
    return {"categories": {"SCU": {"fraction": 0.013}}, "stability": {"SCU": st | {"verdict": _v(found, chance)}}}


def test_judge_cell_names_the_judge_and_its_agreement() -> None:
    measured = {"agreement": 0.9, "ci95": [0.85, 0.94], "n": 200}
    assert judge_cell("guard:x", measured) == "`guard:x`: 90% [85, 94] agreement with people (n=200)"
    assert judge_cell("classifier:/m", {}) == "`classifier:/m` (agreement with people not measured)"
    assert judge_cell(None) is None


def test_reproduced_row_ablation_beats_its_stratified_random_control() -> None:
    assert row_ablate(_ablate(20)) == {
        "effect": "ablating the few SCU breaks refusal (Table 1)",
        "published": "ASR +56 / +71 points after ablating SCU (Llama-2-7B-Chat / Llama-3-8B-Instruct)",
        "ours": "SCU-ablated ASR 83% vs random 8%: +75.0 points [+45.5, +88.1]",  # paired, 24 prompts once
        "control": "random units, same count per (layer, kind), 3 seeds",
        "verdict": "reproduced",
        "judge": judge_cell(JUDGE),
    }
    assert judge_cell(JUDGE).startswith("`keyword:ssah`: ")  # the shipped agreement measurement is found


def test_inconclusive_row_stability_of_a_few_scu_and_the_share_is_not_a_finding() -> None:
    assert row_stability(_units(0, 4)) == {
        "effect": "SCU are small and stable: one data half's SCU found again on the other half",
        "published": "SCU are 1.3-1.4% of units (here 1.30%: a share chosen as an input of the method, not a "
        "finding); stability not reported (reviewers asked)",
        "ours": "found again 0.0% [0, 49] vs 1.30% [0.76, 2.21] by chance; Jaccard 0.25 vs 0.006",
        "control": "a random set of the same count (unstratified chance share)",
        "verdict": "inconclusive",
        "judge": None,
    }
    assert row_stability(_units(1, 4))["verdict"] == "reproduced"
    assert row_stability({"categories": {}, "stability": None}) is None  # not measured: no row


def _space() -> UnitSpace:
    return UnitSpace([GroupShape(layer, kind, 40) for layer in range(3) for kind in ("attn", "mlp")], "neuron")


class _Cats(dict):
    space: UnitSpace


def _cats(space: UnitSpace, idx: list[int]) -> _Cats:
    mask = torch.zeros(space.total, dtype=torch.bool)
    mask[idx] = True
    empty = UnitSet(space, torch.zeros(space.total, dtype=torch.bool), "e")
    cats = _Cats(SCU=UnitSet(space, mask, "SCU"), UCU=empty, CU=empty, RU=empty)
    cats.space = space
    return cats


def test_not_reproduced_row_calibration_sets_when_one_pair_is_below_its_control() -> None:
    space = _space()
    a = list(range(0, 20)) + list(range(40, 60))
    b = list(range(20, 40)) + list(range(60, 80))  # the same cells, other units
    found = {"builtin:safety": _cats(space, a), "advbench-safety": _cats(space, a), "harmbench-safety": _cats(space, b)}
    cal = overlap_across_safety_sets(found, seeds=5)
    row = row_calibration({"calibration_sets": cal})
    assert row is not None
    assert [p["verdict"]["verdict"] for p in cal["pairs"]] == ["reproduced", "not reproduced", "not reproduced"]
    assert row["verdict"] == "not reproduced"
    assert row["control"] == "random units, same count per (layer, kind), 5 seeds"
    assert row["ours"].startswith(
        "SCU of one set found again with the other: builtin:safety -> advbench-safety: 100.0% [91, 100] vs "
    )
    assert "builtin:safety -> harmbench-safety: 0.0% [0, 9] vs " in row["ours"]
    assert row_calibration({"calibration_sets": None}) is None


def test_no_verdict_row_the_safety_tax_has_no_published_number() -> None:
    base = {**Proportion(1, 24).to_dict()}
    aligned = {**Proportion(20, 24).to_dict()}
    row = row_overrefusal({"overrefusal": base}, {"overrefusal": aligned, "judge_spec": "guard:g"})
    assert row["verdict"] is None and row["control"] == "the unaligned model (baseline)"
    assert row["ours"] == (
        "over-refusal 4.2% [1, 20] -> 83.3% [64, 93] on 24 borderline prompts (the short SFT over-generalises: "
        "see the evaluations below)"
    )
    assert row["judge"] == "`guard:g` (agreement with people not measured)"


def test_all_of_combines_repeated_tests() -> None:
    assert all_of([]) is None
    assert all_of(["reproduced", "reproduced"]) == "reproduced"
    assert all_of(["reproduced", "inconclusive"]) == "inconclusive"
    assert all_of(["reproduced", "not reproduced", "inconclusive"]) == "not reproduced"


def test_science_table_has_a_column_per_part_and_escapes_pipes() -> None:
    row = row_ablate(_ablate(20)) | {"ours": "a | b"}
    lines = science_table([row, row_stability(_units(0, 4))]).splitlines()
    assert lines[0] == "| result | published | ours (95% interval) | control | verdict | judge (agreement) |"
    assert "a \\| b" in lines[2] and "| **reproduced** |" in lines[2]
    assert lines[3].endswith("| inconclusive | - |")


# ------------------------------------------------------------------------------------------- README block


def _demo_folder(root: Path, *, command: str = "demo") -> Path:
    """A finished demo folder with two stages (ablate, units), written by hand."""
    out = root / "demo"
    for stage, results in (("ablate", _ablate(20)), ("units", _units(0, 4))):
        (out / stage).mkdir(parents=True)
        (out / stage / "results.json").write_text(json.dumps(results))
        (out / stage / "manifest.json").write_text(json.dumps({"command": stage}))
    results = {"model": "tiny-random-llama", "quick": True, "seed": 3, "stages": {}, "headlines": []}
    (out / "results.json").write_text(json.dumps(results))
    manifest = {"command": command, "seed": 3, "started": "2026-11-30T17:07:03+0000", "git_revision": "097ad41c6ee5aa"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


README = "# ssah\n\nintro\n\n## Results\n\n{s}\nold table\n{e}\n\nmore text\n"


def test_readme_block_replaces_only_the_marked_block_and_is_deterministic(tmp_path: Path, capsys) -> None:
    run = _demo_folder(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README.format(s=README_START, e=README_END))
    assert main(["report", str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split(README_START)
    block, tail = rest.split(README_END)
    assert head == "# ssah\n\nintro\n\n## Results\n\n" and tail == "\n\nmore text\n"
    assert "old table" not in block
    assert (
        "Measured by `ssah demo --model tiny-random-llama --seed 3` (quick settings, model `tiny-random-llama`, "
        "seed 3) on 2026-11-30, ssah revision `097ad41c6ee5`" in block
    )
    assert block.count("\n| ") == 3  # header and the two rows of the stages present
    assert "ablating the few SCU" in block and "small and stable" in block
    # same run folder (also copied elsewhere) -> same bytes
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["report", str(copy), "--readme", str(readme)]) == 0
    assert readme.read_bytes() == text.encode()
    assert readme_block(run) == README_START + block + README_END
    assert not (run / "report.md").exists()  # --readme writes the README only


def test_a_full_demo_writes_its_own_block_and_leaves_the_quick_one(tmp_path: Path, capsys) -> None:
    quick, full = _demo_folder(tmp_path / "q"), _demo_folder(tmp_path / "f")
    results = json.loads((full / "results.json").read_text())
    (full / "results.json").write_text(json.dumps({**results, "quick": False}))
    readme = tmp_path / "README.md"
    readme.write_text(README.format(s=README_START, e=README_END) + f"\n{FULL_START}\nold full\n{FULL_END}\n")
    assert main(["report", str(full), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" in text and "old full" not in text  # the quick block is untouched
    assert "`ssah demo --model tiny-random-llama --seed 3 --full` (full settings" in text.split(FULL_START)[1]
    assert main(["report", str(quick), "--readme", str(readme)]) == 0
    both = readme.read_text()
    assert "old table" not in both and both.split(FULL_START)[1] == text.split(FULL_START)[1]
    capsys.readouterr()
    readme.write_text(README.format(s=README_START, e=README_END))  # no full block: refused, file untouched
    assert main(["report", str(full), "--readme", str(readme)]) == 2
    assert FULL_START in capsys.readouterr().err and "old table" in readme.read_text()


@pytest.mark.parametrize(
    ("case", "needle"),
    [("no markers", "needs one line"), ("end before start", "needs one line"), ("not a demo", "not a demo run")],
)
def test_readme_refusals_leave_the_file_untouched(tmp_path: Path, capsys, case: str, needle: str) -> None:
    run = _demo_folder(tmp_path, command="units" if case == "not a demo" else "demo")
    readme = tmp_path / "README.md"
    text = {
        "no markers": "# ssah\n\nno block here\n",
        "end before start": README.format(s=README_END, e=README_START),
        "not a demo": README.format(s=README_START, e=README_END),
    }[case]
    readme.write_text(text)
    capsys.readouterr()
    assert main(["report", str(run), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert readme.read_text() == text


def test_headlines_leave_out_rows_of_stages_not_run(tmp_path: Path) -> None:
    rows = headlines(_demo_folder(tmp_path))
    assert [r["effect"].split(":")[0] for r in rows] == [
        "SCU are small and stable",
        "ablating the few SCU breaks refusal (Table 1)",
    ]
