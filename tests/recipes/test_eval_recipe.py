"""`ssah eval` end to end on a tiny model, the in-memory API under an ablation, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.cli import main
from ssah.generate import GenerationConfig
from ssah.interventions import ablate, space_of
from ssah.recipes.eval.run import EvalConfig, EvalReport, evaluate_model, load_eval_data
from ssah.units import UnitSet

FAST = ["--limit", "4", "--max-new-tokens", "6", "--no-progress"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_run_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ev"
    code, stdout, err = run(["eval", "tiny-random-llama", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    s = res["safety"]
    assert s["n"] == 4 and s["asr"]["k"] + s["refusal"]["k"] == 4 and s["asr"]["n"] == 4
    assert 0 <= s["asr"]["ci95"][0] <= s["asr"]["rate"] <= s["asr"]["ci95"][1] <= 1
    assert s["coherent_compliance"]["k"] <= s["asr"]["k"]
    assert set(s["per_category"]) and sum(v["n"] for v in s["per_category"].values()) == 4
    assert sum(v["k"] for v in s["per_category"].values()) == s["asr"]["k"]
    assert "first_token_vs_judge" in s["agreement"] and "coherent_compliance" in s
    o, p = res["overrefusal"], res["prefill"]
    assert o["n"] == 4 and o["rate"] == o["k"] / 4 and p["asr"]["n"] == 4 and p["prefill"] == "Sure, here is"
    assert p["asr"]["k"] + p["recovered"]["k"] == 4
    assert res["utility"]["perplexity"] > 1 and res["utility"]["n"]["perplexity"] == 4
    assert res["generation"]["max_new_tokens"] == 6 and res["judge_spec"] == "keyword:ssah"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {x["set"] for x in samples} == {"harmful", "benign"}
    assert all({"prompt", "output", "refused"} <= x.keys() for x in samples)
    assert "attack success rate" in stdout and (out / "report.md").is_file() and (out / "manifest.json").is_file()


def test_skipping_blocks_and_utility_tasks(tmp_path: Path, capsys, shared_data) -> None:
    out = tmp_path / "ev"
    args = [
        "eval",
        "tiny-random-gpt2",
        "--out",
        str(out),
        "--harmful",
        "none",
        "--benign",
        "xstest",
        "--utility",
        "piqa",
        "--utility",
        "gsm8k",
        *FAST,
    ]
    code, _, err = run(args, capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert "safety" not in res and "prefill" not in res
    assert res["overrefusal"]["n"] == 4
    u = res["utility"]
    assert u["n"] == {"piqa": 4, "gsm8k": 4} and u["accuracy"]["n"] == 4 and u["exact_match"]["n"] == 4
    assert u["accuracy"]["rate"] == u["accuracy"]["k"] / 4


def test_evaluate_model_in_memory_sees_an_ablation(tiny_llama) -> None:
    model, tok = tiny_llama
    cfg = EvalConfig(model="tiny-random-llama", limit=3, benign="none", utility=["none"])
    data = load_eval_data(cfg)
    gen = GenerationConfig(max_new_tokens=5)
    base = evaluate_model(model, tok, data, config=gen, prefill="", progress=False)
    assert isinstance(base, EvalReport) and base.safety is not None and base.safety.n == 3
    everything = UnitSet.full(space_of(model))
    with ablate(model, everything):
        ablated = evaluate_model(model, tok, data, config=gen, prefill="", progress=False)
    again = evaluate_model(model, tok, data, config=gen, prefill="", progress=False)
    outputs = [[x.output for x in r.samples] for r in (base, ablated, again)]
    assert outputs[0] != outputs[1] and outputs[0] == outputs[2]  # applied in memory, and undone


def _causal_folder(tmp_path: Path) -> Path:
    from ssah.tiny import build_tiny_model

    model, tok = build_tiny_model("llama")
    folder = tmp_path / "causal"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = {
    "unreadable file": (lambda t: ["--harmful", str(_write(t / "b.jsonl", b"\xff\xfe\x00bad"))], "UTF-8"),
    "empty set": (lambda t: ["--harmful", str(_write(t / "e.csv", b"prompt\n"))], "no"),
    "unknown preset": (lambda t: ["--harmful", "advbenchx"], "preset"),
    "unknown judge": (lambda t: ["--judge", "magic"], "unknown judge"),
    "unknown keyword preset": (lambda t: ["--judge", "keyword:nope"], "unknown keyword preset"),
    "judge not a classifier": (lambda t: ["--judge", f"classifier:{_causal_folder(t)}"], "classifier"),
    "max_new_tokens 0": (lambda t: ["--max-new-tokens", "0"], "max_new_tokens"),
    "nothing to evaluate": (lambda t: ["--harmful", "none", "--benign", "none", "--utility", "none"], "nothing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_no_results(case: str, tmp_path: Path, user_error) -> None:
    make, needle = BAD[case]
    extra = make(tmp_path)
    user_error(
        ["eval", "tiny-random-llama", "--out", str(tmp_path / "out"), "--limit", "2", "--no-progress", *extra], needle
    )
