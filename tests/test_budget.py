"""`ssah budget` on a tiny model: the run folder, the shares trained, fresh weights per condition, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.cli import main

FAST = ["--steps", "2", "--eval-limit", "3", "--max-new-tokens", "3", "--limit", "8", "--no-progress"]


def test_budget_runs_every_condition_and_trains_the_expected_share(tmp_path: Path, capsys) -> None:
    out = tmp_path / "b"
    assert main(["budget", "tiny-random-llama", "--out", str(out), *FAST]) == 0
    for f in ("config.yaml", "manifest.json", "results.json", "report.md", "plots/budget.png", "units.safetensors"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in res["conditions"]}
    assert list(rows) == ["base", "full", "ru", "random"]
    assert rows["base"]["training"] is None
    for name in ("full", "ru", "random"):
        t = rows[name]["training"]
        assert t["steps"] == 2 and t["seconds"] > 0
        e = rows[name]["eval"]
        assert e["n_harmful"] == 3 and e["n_benign"] == 3 and e["perplexity"] > 0
        assert 0 <= e["refusal_ci95"]["low"] <= e["refusal_rate"] <= e["refusal_ci95"]["high"] <= 1
    full, ru, rnd = (rows[n]["training"]["trainable"] for n in ("full", "ru", "random"))
    # RU-only trains far fewer parameters than full SFT; the random control the same number of units
    assert ru["params"] < 0.2 * full["params"] and rnd["params"] < 0.2 * full["params"]
    u = res["units"]
    assert u["found_on_base"] and u["count"] == round(0.148 * u["units_total"])
    assert u["random_by_kind"]["attn"] + u["random_by_kind"]["mlp"] == u["count"]
    assert rows["full"]["training"]["lr"] == 3e-5 and rows["ru"]["training"]["lr"] == res["settings"]["lr_units"]
    assert rows["full"]["training"]["freeze_embeddings"] and not rows["ru"]["training"]["freeze_embeddings"]
    assert set(res["comparison"]["tax"]) == {"full", "ru", "random"}
    assert "ru_reached_full_refusal" in res["comparison"]
    report = (out / "report.md").read_text()
    assert "RU-only" in report and "plots/budget.png" in report and "Random units" in report
    assert "alignment budget" in capsys.readouterr().out


def test_budget_share_matches_the_trained_units_exactly(tmp_path: Path, tiny_llama) -> None:
    """The units-only share equals the entries of the units' reader columns and writer rows."""
    from ssah.experiments.budget import BudgetConfig, run_budget
    from ssah.interventions import train_only_units
    from ssah.models import load_model
    from ssah.units import load_unit_sets, read_unit_file_metadata

    cfg = BudgetConfig(
        model="tiny-random-llama",
        out=str(tmp_path / "b"),
        conditions=["ru"],
        steps=1,
        eval_limit=2,
        max_new_tokens=2,
        limit=6,
        progress=False,
    )
    res = json.loads((run_budget(cfg) / "results.json").read_text())
    assert [r["name"] for r in res["conditions"]] == ["base", "ru"]
    lm = load_model("tiny-random-llama")
    meta = read_unit_file_metadata(tmp_path / "b/units.safetensors")
    assert meta["sets"].split(",") == ["RU", "random"]
    from ssah.interventions import space_of

    sets = load_unit_sets(tmp_path / "b/units.safetensors", space_of(lm.model), allow_other_weights=True)
    deltas = train_only_units(lm.model, sets["RU"])
    assert res["conditions"][1]["training"]["trainable"]["params"] == deltas.trainable_parameters
    deltas.merge()


def test_budget_with_a_unit_file_and_one_condition(tmp_path: Path) -> None:
    assert main(["units", "tiny-random-llama", "--out", str(tmp_path / "u"), "--limit", "6", "--no-progress"]) == 0
    out = tmp_path / "b"
    spec = f"{tmp_path / 'u/units.safetensors'}:SCU"
    assert main(["budget", "tiny-random-llama", "--out", str(out), "--units", spec, "--condition", "ru", *FAST]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["units"]["source"] == spec and not res["units"]["found_on_base"]
    assert res["units"]["count"] == round(0.013 * res["units"]["units_total"])
    assert [r["name"] for r in res["conditions"]] == ["base", "ru"]


def test_every_condition_starts_from_the_base_weights(tmp_path: Path, monkeypatch) -> None:
    import ssah.experiments.budget as budget
    from ssah.models import load_model, model_fingerprint

    seen: list[tuple[str, str]] = []
    real = budget.train_model

    def spy(model, tokenizer, data, cfg, **kw):  # type: ignore[no-untyped-def]
        seen.append((model_fingerprint(model), "only" if kw.get("only") is not None else "all"))
        return real(model, tokenizer, data, cfg, **kw)

    monkeypatch.setattr(budget, "train_model", spy)
    assert main(["budget", "tiny-random-llama", "--out", str(tmp_path / "b"), *FAST]) == 0
    base = load_model("tiny-random-llama").fingerprint
    assert seen == [(base, "all"), (base, "only"), (base, "only")]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--condition", "lora"], "conditions"),
        (["--lr-units", "0"], "lr-units"),
        (["--steps", "0"], "steps"),
        (["--eval-benign", "builtin:utility"], "training prompts"),
        (["--units", "nofile"], "unit spec"),
        (["--units", "/nonexistent/units.safetensors:RU"], "units.safetensors"),
        (["--data", "builtin:harmful"], "response"),
        (["--judge", "keyword:nope"], "nope"),
    ],
)
def test_budget_bad_input(extra: list[str], needle: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["budget", "tiny-random-llama", "--out", str(out), *FAST, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))
