"""`ssah protect` on tiny models: the run folder, every cell, frozen slices against the original weights, weights
restored between settings, stratified random controls over seeds, verdicts from the one rule, the dose curve inside
one run, evaluating in the training callback (freeze / only / LoRA), and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import measured
from ssah.arch import get_adapter
from ssah.categorize import categorize
from ssah.data import Example, PromptSet, collate, encode_set
from ssah.errors import UserError
from ssah.inference import frozen_eval
from ssah.interventions import unit_param_masks
from ssah.measure import Verdict
from ssah.models import model_fingerprint
from ssah.recipes.protect.report import design, render
from ssah.recipes.protect.run import CONTROLS, SETTINGS, ProtectConfig, run_protect, verdicts
from ssah.registry import load_run
from ssah.scoring import Scores
from ssah.tiny import build_tiny_model
from ssah.training import TrainConfig, train_model
from ssah.units import UnitSet, UnitSpace

TINY = "tiny-random-llama"
# the smallest run that still exercises everything: 2 step counts, 3 prompts per set, 2 new tokens
SMALL = {
    "steps": [1, 2],
    "eval": {"limit": 3, "max_new_tokens": 2},
    "utility_limit": 3,
    "calibration": {"limit": 8},
    "train": {"batch_size": 2, "lr": 1e-3},
    "seeds": 3,  # the least random-control seeds a run may have
    "kinds": ["benign", "attack"],
    "settings": list(SETTINGS),
    "progress": False,
}
SMALL_CLI = [
    "--steps",
    "1,2",
    "--train-batch-size",
    "2",
    "--eval-limit",
    "3",
    "--utility-limit",
    "3",
    "--eval-max-new-tokens",
    "2",
    "--calibration-limit",
    "8",
    "--train-lr",
    "1e-3",
    "--quick",
    "--no-progress",
]


def _unit_file(root: Path, seed: int = 0) -> Path:
    """A unit file with safety scores for tiny-random-llama built with ``seed`` (random scores, ssah rule)."""
    model, _ = build_tiny_model("llama", seed=seed)
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron", model_fingerprint(model), TINY)
    g = torch.Generator().manual_seed(1)
    s = Scores(
        space,
        {sh.key: torch.rand(sh.size, generator=g, dtype=torch.float64) for sh in space.shapes},
        "fluctuation",
        1,
        "x",
    )
    u = Scores(
        space,
        {sh.key: torch.rand(sh.size, generator=g, dtype=torch.float64) for sh in space.shapes},
        "fluctuation",
        1,
        "x",
    )
    cats = categorize(s, u, shares={"scu": 0.05, "ucu": 0.1, "ru": 0.2})
    (root / "scores").mkdir(parents=True)
    s.save(root / "scores" / "safety.safetensors")
    u.save(root / "scores" / "utility.safetensors")
    cats.save(root / "units.safetensors")
    return root / "units.safetensors"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Every setting on both data kinds (units computed here), with each fine-tuned model checked against the
    original weights right after its training."""
    out = tmp_path_factory.mktemp("protect") / "run"
    original, _ = build_tiny_model("llama")
    ref = {n: p.detach().clone() for n, p in original.named_parameters()}
    checks: dict[str, Any] = {}

    def inspect(kind: str, setting: str, model: torch.nn.Module, frozen: UnitSet | None) -> None:
        # every setting starts from the ORIGINAL weights: a frozen slice equal to the original proves the restore
        changed = any(not torch.equal(p.detach(), ref[n]) for n, p in model.named_parameters())
        worst = None
        if frozen is not None:
            masks = unit_param_masks(model, frozen)
            worst = max(float((model.get_parameter(n).detach()[m] - ref[n][m]).abs().max()) for n, m in masks.items())
            checks.setdefault(f"{kind}/{setting}/sets", []).append(frozen)
        checks[f"{kind}/{setting}"] = {"changed": changed, "frozen_worst": worst}

    cfg = ProtectConfig(model=TINY, out=str(out), **SMALL)
    run_protect(cfg, after_setting=inspect)
    return out, checks


def test_run_folder_has_every_cell_with_intervals(full_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = full_run
    for rel in (
        "config.yaml",
        "manifest.json",
        "results.json",
        "report.md",
        "samples.jsonl",
        "units.safetensors",
        "scores/safety.safetensors",
        "scores/utility.safetensors",
        "plots/protect_benign.png",
        "plots/protect_attack.png",
    ):
        assert (out / rel).is_file(), rel
    res = json.loads((out / "results.json").read_text())
    cells = {(c["kind"], c["setting"], c["steps"]) for c in res["cells"]}
    assert cells == {(k, s, n) for k in ("benign", "attack") for s in SETTINGS for n in (1, 2)}
    for c in [*res["cells"], res["initial"]]:
        for key in ("asr", "coherent_compliance", "overrefusal"):
            low, high = c[key]["ci95"]
            assert 0 <= low <= c[key]["rate"] + 1e-12 and c[key]["rate"] <= high <= 1 and c[key]["n"] == 3
        assert c["perplexity"] > 0
    assert all(0 < c["trained_share"] <= 1 for c in res["cells"])
    assert res["seconds"]["total"] > 0 and res["settings"]["steps"] == [1, 2]
    assert set(res["verdict"]) == {"benign", "attack"}
    assert res["verdict"]["attack"]["comparisons"] and res["weights_restored"] is True
    for kind in ("benign", "attack"):  # one run per seed for each random control, one for every other setting
        for s in SETTINGS:
            draws = {r["draw"] for r in res["runs"] if r["kind"] == kind and r["setting"] == s}
            assert draws == ({0, 1, 2} if s in CONTROLS else {None}), (kind, s)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["kind"] for s in samples} == {"initial", "benign", "attack"}
    report = (out / "report.md").read_text()
    assert "plots/protect_attack.png" in report and "Verdict" in report and "random" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "protect"


def test_frozen_slices_bit_identical_and_lora_share_small(full_run: tuple[Path, dict[str, Any]]) -> None:
    out, checks = full_run
    res = json.loads((out / "results.json").read_text())
    for kind in ("benign", "attack"):
        for s in ("freeze-scu", "freeze-scu-cu", "freeze-scu-all-cu", "random", "random-all-cu"):
            assert checks[f"{kind}/{s}"]["frozen_worst"] == 0.0, (kind, s)
            assert checks[f"{kind}/{s}"]["changed"], (kind, s)  # the rest did train
        assert checks[f"{kind}/full"]["changed"] and checks[f"{kind}/lora"]["changed"]
    runs = {(r["kind"], r["setting"]): r for r in res["runs"]}
    for (_, s), r in runs.items():
        if s.startswith(("freeze", "random")):
            assert r["frozen_check"]["bit_identical"] and r["frozen_check"]["entries"] > 0
    share = {s: runs[("attack", s)]["trainable"]["share"] for s in SETTINGS}
    assert share["full"] == 1.0
    assert share["lora"] < 0.2 and share["lora"] < share["freeze-scu-all-cu"] < share["freeze-scu"] < 1.0
    frozen = res["units"]["frozen"]
    assert frozen["random"]["count"] == frozen["freeze-scu-cu"]["count"]  # same-size controls
    assert frozen["random-all-cu"]["count"] == frozen["freeze-scu-all-cu"]["count"]
    assert frozen["freeze-scu"]["count"] < frozen["freeze-scu-cu"]["count"] < frozen["freeze-scu-all-cu"]["count"]
    # SCU + 6% of ALL units from CU: the CU part is 6% of every unit, not 6% of CU
    total = res["units"]["units_total"]
    assert frozen["freeze-scu-cu"]["parts"] == {"SCU": frozen["freeze-scu"]["count"], "CU@6%": round(0.06 * total)}
    assert "% of units)" in res["settings"]["labels"]["freeze-scu-cu"]  # labelled with the real share
    for r in res["runs"]:  # shares of units and of parameters reported for every run
        if r["frozen_units"]:
            assert r["frozen_share_of_units"] == pytest.approx(r["frozen_units"] / total)
            assert r["frozen_share_of_params"] == pytest.approx(1 - r["trainable"]["share"])
            assert r["frozen_share_of_params"] > 0
    # the report is rebuilt from results alone
    assert render(res, out).startswith("# Protected fine-tuning")


def test_random_controls_match_the_frozen_set_per_layer_kind_cell(full_run: tuple[Path, dict[str, Any]]) -> None:
    out, checks = full_run
    res = json.loads((out / "results.json").read_text())
    for control, like in CONTROLS.items():
        (target,) = checks[f"attack/{like}/sets"]
        draws = checks[f"attack/{control}/sets"]
        assert len(draws) == 3 and len({d.mask.numpy().tobytes() for d in draws}) == 3  # three different draws
        for d in draws:
            assert d.counts_by_group() == target.counts_by_group()  # same count in every (layer, kind) cell
        recorded = res["units"]["controls"][control]
        assert recorded["of"] == like and [d["seed"] for d in recorded["draws"]] == [0, 1, 2]
        assert all(d["strata"] == "layer-kind" and d["count"] == len(target) for d in recorded["draws"])


def test_verdict_fields_are_consistent(full_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = full_run
    res = json.loads((out / "results.json").read_text())
    assert verdicts(res) == res["verdict"]  # a pure function of the recorded counts
    for kind, v in res["verdict"].items():
        at = {(c["setting"], c["draw"]): c for c in res["cells"] if c["kind"] == kind and c["steps"] == v["steps"]}
        pairs = {(c["a"], c["b"]) for c in v["comparisons"]}
        assert pairs == {
            ("full", "initial"),
            ("freeze-scu", "full"),
            ("freeze-scu-cu", "full"),
            ("freeze-scu-all-cu", "full"),
            ("freeze-scu-cu", "random"),
            ("freeze-scu-all-cu", "random-all-cu"),
            ("lora", "full"),
        }
        for c in v["comparisons"]:
            cmp, (lo, hi) = c["comparison"], c["comparison"]["ci95"]
            assert c["verdict"] in ("reproduced", "not reproduced", "inconclusive")
            assert cmp["difference"] == pytest.approx(cmp["effect"] - cmp["control"]) and lo <= cmp["difference"] <= hi
            assert cmp["effect"] == at[(c["a"], None)]["asr"]["rate"]
            if c["b"] in CONTROLS:  # the distribution of the seeds, not their max
                rates = [at[(c["b"], i)]["asr"]["rate"] for i in range(3)]
                assert cmp["control"] == pytest.approx(sum(rates) / 3) and "seeds 1/3" in cmp["method"]
            excludes_zero_as_published = lo > 0 if c["expected"] == "higher" else hi < 0
            assert (c["verdict"] == "reproduced") == excludes_zero_as_published
            assert v["summary"].count("(95% interval") == len(v["comparisons"])


def test_typed_result_names_every_verdict_and_the_report_reads_the_design(full_run: tuple[Path, Any]) -> None:
    """``load_run`` gives each comparison as a typed Verdict named by kind and pair; the report's vocabulary
    (settings in order, kinds, controls) is in results.json, so rendering needs no import of the recipe."""
    out, _ = full_run
    r = load_run(out)
    assert r.recipe == "protect" and isinstance(r.config, ProtectConfig) and r.config.steps == [1, 2]
    comps = {(k, c["name"]): c for k, v in r.results["verdict"].items() for c in v["comparisons"]}
    assert set(r.verdicts) == {f"verdict.{k}.comparisons.{name}" for k, name in comps}
    assert ("attack", "freeze-scu-cu vs random") in comps
    for (kind, name), c in comps.items():
        v = r.verdicts[f"verdict.{kind}.comparisons.{name}"]
        assert (
            isinstance(v, Verdict) and name == f"{c['a']} vs {c['b']}" and v.to_dict() == Verdict.from_dict(c).to_dict()
        )
        assert (v.verdict, v.expected, list(v.comparison.ci95)) == (
            c["verdict"],
            c["expected"],
            c["comparison"]["ci95"],
        )
    design = r.results["design"]
    assert design == {"settings": list(SETTINGS), "kinds": ["benign", "attack"], "controls": CONTROLS,
                      "sample_chars": 160}  # fmt: skip
    assert r.plots == [out / "plots/protect_attack.png", out / "plots/protect_benign.png"]


def test_a_run_recorded_before_the_design_still_renders(full_run: tuple[Path, Any], tmp_path: Path) -> None:
    """Results written before ``design`` was recorded: the report reads the settings and kinds from the config the
    run recorded and the controls from its units, and says the same but for the sample length it cannot know."""
    out, _ = full_run
    res = json.loads((out / "results.json").read_text())
    old = {k: v for k, v in res.items() if k != "design"}
    assert design(old) == {**res["design"], "sample_chars": None}
    md = render(old, tmp_path / "old")
    assert "(outputs shortened)" in md
    assert md.replace("(outputs shortened)", "(outputs cut to 160 characters)") == render(res, tmp_path / "new")


def _cell(setting: str, k: int, draw: int | None = None, n: int = 40) -> dict[str, Any]:
    asr = measured(k, n, prompts=f"{n} prompts").to_dict()  # every cell of one run answers the same prompts
    return {"kind": "benign", "setting": setting, "draw": draw, "steps": 4, "asr": asr}


def test_verdicts_on_constructed_counts() -> None:
    """Each verdict from counts built for it: protection beats full and the random distribution; a random
    control that freezes as well gives 'not reproduced'; too few prompts give 'inconclusive' with the n needed."""
    base = {"initial": {"asr": measured(0, 40, prompts="40 prompts").to_dict()}, "settings": {"labels": {}}}
    cells = [_cell("full", 36), _cell("freeze-scu-cu", 2), *(_cell("random", k, i) for i, k in enumerate((30, 33, 35)))]
    v = verdicts({**base, "cells": cells})["benign"]
    got = {(c["a"], c["b"]): c["verdict"] for c in v["comparisons"]}
    assert got == dict.fromkeys(
        [("full", "initial"), ("freeze-scu-cu", "full"), ("freeze-scu-cu", "random")], "reproduced"
    )
    # as good as random, measured precisely enough: the interval lies within ±5 points of zero
    same = [_cell("full", 360, n=400), _cell("freeze-scu-cu", 20, n=400)]
    same += [_cell("random", k, i, n=400) for i, k in enumerate((19, 20, 21))]
    base400 = {**base, "initial": {"asr": measured(0, 400, prompts="400 prompts").to_dict()}}
    v = verdicts({**base400, "cells": same})["benign"]
    assert {(c["a"], c["b"]): c["verdict"] for c in v["comparisons"]}[("freeze-scu-cu", "random")] == "not reproduced"
    few = [_cell("full", 3, n=5), _cell("freeze-scu-cu", 1, n=5)]
    base5 = {**base, "initial": {"asr": measured(0, 5, prompts="5 prompts").to_dict()}}
    (_, prot) = verdicts({**base5, "cells": few})["benign"]["comparisons"]
    assert prot["verdict"] == "inconclusive" and prot["n_needed"] > 5
    assert "No random control was run" in verdicts({**base5, "cells": few})["benign"]["summary"]
    with pytest.raises(UserError, match="same prompts"):  # arms measured on other prompts are never compared
        verdicts({**base, "cells": few})


def test_protect_imports_no_other_recipe() -> None:
    import ast

    import ssah.recipes.protect.run as recipe

    tree = ast.parse(Path(recipe.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.startswith("ssah.recipes.") and not m.startswith("ssah.recipes.protect")], names


def test_held_out_prompts_are_not_training_prompts(tmp_path: Path) -> None:
    from ssah.recipes.protect.run import load_protect_data

    data = load_protect_data(ProtectConfig(model=TINY, out=str(tmp_path / "x"), eval={"limit": 200}))
    trained = {ex.prompt for ps in data.train.values() for ex in ps}
    for ps in (data.harmful, data.benign, data.utility):
        assert not trained & set(ps.prompts())
    assert len(data.train["attack"]) == 10 and len(data.harmful) == 75


def test_prompt_record_lists_training_and_calibration_sets(tmp_path: Path) -> None:
    """The held-out record: the evaluation sets against the training sets and the calibration sets units are found
    on; the shipped sets share no prompt."""
    from ssah.recipes.protect.run import _prompt_record, load_protect_data

    cfg = ProtectConfig(model=TINY, out=str(tmp_path / "x"), eval={"limit": 8})
    rec = _prompt_record(cfg, load_protect_data(cfg))
    assert {"training benign", "training attack", "calibration safety", "calibration utility"} <= set(rec["used"])
    assert {"harmful", "benign"} <= set(rec["evaluated"]) and rec["overlap"] == []


def test_dose_curve_inside_one_run_equals_a_run_to_that_step(tmp_path: Path) -> None:
    """Evaluating at step 1 inside the run must not change step 2 (RNG put back, eval mode restored)."""
    base = {**SMALL, "kinds": ["attack"], "settings": ["full", "lora"]}
    lora = {"r": 4, "dropout": 0.3}  # dropout draws random numbers: a perturbed RNG would show
    a = run_protect(ProtectConfig(model=TINY, out=str(tmp_path / "a"), lora=lora, **base))
    b = run_protect(ProtectConfig(model=TINY, out=str(tmp_path / "b"), lora=lora, **{**base, "steps": [2]}))
    ra, rb = a.results, b.results
    at2 = {c["setting"]: c for c in ra["cells"] if c["steps"] == 2}
    for c in rb["cells"]:
        assert c["perplexity"] == at2[c["setting"]]["perplexity"], c["setting"]
        assert c["loss"] == at2[c["setting"]]["loss"]


@pytest.mark.parametrize("mode", ["freeze", "only", "lora"])
def test_evaluating_in_on_step_sees_the_trained_model(mode: str) -> None:
    """Inside ``on_step`` the model computes what the returned (merged) model computes, frozen slices restored."""
    model, tok = build_tiny_model("llama")
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron")
    units = UnitSet.from_indices(space, range(0, space.total, 5), "every 5th")
    data = PromptSet("toy", "memory", (Example("Say hi.", "Hi there!"), Example("Two plus two?", "Four.")) * 2)
    batch = collate(encode_set(tok, data), tok.pad_token_id, padding_side="right")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen: dict[str, Any] = {}

    def on_step(record: dict[str, Any]) -> None:
        if record["step"] != 3:
            return
        with frozen_eval(model):
            seen["logits"] = model(**inputs).logits.clone()
        if mode == "freeze":
            masks = unit_param_masks(model, units)
            seen["drift"] = max(
                float((model.get_parameter(n).detach()[m] - ref[n][m]).abs().max()) for n, m in masks.items()
            )
        seen["training"] = model.training

    kw: dict[str, Any] = {"freeze": units} if mode == "freeze" else {"only": units} if mode == "only" else {}
    lora = {"r": 4} if mode == "lora" else None
    cfg = TrainConfig(model=TINY, max_steps=3, batch_size=2, lr=1e-2, schedule="constant", lora=lora, progress=False)
    result = train_model(model, tok, data, cfg, progress=False, on_step=on_step, **kw)
    with frozen_eval(result.model):
        after = result.model(**inputs).logits
    before = build_tiny_model("llama")[0](**inputs).logits
    assert seen["training"]  # the loop's training mode is back after evaluating
    assert not torch.allclose(seen["logits"], before, atol=1e-4)  # it trained
    if mode == "freeze":
        assert seen["drift"] == 0.0
        assert torch.equal(seen["logits"], after)
    else:  # deltas / adapters unmerged in the callback, merged after
        assert torch.allclose(seen["logits"], after, atol=1e-5)


def test_units_file_of_this_model_is_used(tmp_path: Path) -> None:
    units = _unit_file(tmp_path / "u")
    out = tmp_path / "run"
    small = {**SMALL, "kinds": ["attack"], "settings": ["freeze-scu-cu", "random"]}
    cfg = ProtectConfig(model=TINY, out=str(out), units=str(units), **small)
    run_protect(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["units"]["source"] == str(units)
    assert res["units"]["frozen"]["random"]["count"] == res["units"]["frozen"]["freeze-scu-cu"]["count"] > 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--cu-share", "2"], "cu_share"),
        (["--cu-share", "nan"], "cu_share"),
        (["--settings", "full,bogus"], "unknown setting"),
        (["--steps", "0"], "steps"),
        (["--kinds", "nasty"], "unknown kinds 'nasty'"),
        (["--train-lr", "0"], "'train.lr'"),
        (["--eval-limit", "0"], "eval.limit"),
        (["--seeds", "0"], "seeds"),
        (["--seeds", "2"], "'seeds': Input should be greater than or equal to 3"),
        (["--control-strata", "bogus"], "control strata"),
    ],
)
def test_bad_options(extra: list[str], needle: str, tmp_path: Path, user_error) -> None:
    user_error(["protect", TINY, "--out", str(tmp_path / "out"), *SMALL_CLI, *extra], needle)


def test_units_of_another_model_and_empty_data(tmp_path: Path, user_error) -> None:
    other = _unit_file(tmp_path / "other", seed=1)  # same layout, other weights
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for extra, needle in (
        (["--units", str(other)], "another model"),
        (["--units", str(tmp_path / "missing.safetensors")], "not found"),
        (["--data", str(empty)], "empty"),
    ):
        user_error(["protect", TINY, "--out", str(tmp_path / "out"), *SMALL_CLI, *extra], needle)


def test_quick_runs_benign_data_only_unless_told() -> None:
    """--quick fine-tunes on the benign data (the paper's setting); the full run on both kinds; --kinds wins."""
    assert ProtectConfig.resolve("protect", "quick", {"model": TINY}).kinds == ["benign"]
    assert ProtectConfig(model=TINY).kinds == ["benign", "attack"]
    assert ProtectConfig.resolve("protect", "quick", {"model": TINY, "kinds": "attack"}).kinds == ["attack"]
