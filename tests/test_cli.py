"""`ssah units` end to end on a tiny model, and every bad-input case: one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from ssah.cli import main

FAST = ["--limit", "6", "--no-progress", "--max-length", "128"]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_units_run_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, stdout, err = run(["units", "tiny-random-llama", "--out", str(out), "--stability", *FAST], capsys)
    assert code == 0, err
    for rel in (
        "units.safetensors",
        "scores/safety.safetensors",
        "scores/utility.safetensors",
        "results.json",
        "manifest.json",
        "config.yaml",
        "report.md",
        "plots/units_by_layer.png",
    ):
        assert (out / rel).is_file(), rel
    res = json.loads((out / "results.json").read_text())
    total = res["model"]["units_total"]
    assert sum(v["count"] for v in res["categories"].values()) == total
    assert set(res["categories"]) == {"SCU", "UCU", "CU", "RU"}
    assert res["categories"]["RU"]["count"] == round(0.148 * total)
    assert len(res["by_layer"]) == res["model"]["layers"] == 2
    assert res["by_layer"][0]["SCU"].keys() == {"attn", "mlp"}
    assert res["tokens"]["safety"] > 0 and res["tokens"]["utility"] > 0
    assert res["metric"] == "fluctuation" and res["rule"] == "ssah" and res["shares"]["scu"] == 0.013
    assert res["model"]["fingerprint"] and res["model"]["name"] == "tiny-random-llama"
    assert 0.0 <= res["stability"]["SCU"]["jaccard"] <= 1.0
    man = json.loads((out / "manifest.json").read_text())
    assert man["seed"] == 0 and "torch" in man["versions"] and len(man["data"]["safety"]["sha256"]) == 64
    assert "git_revision" in man
    with safe_open(str(out / "units.safetensors"), framework="pt") as f:
        assert "SCU.layers.1.mlp" in f.keys() and "RU.layers.0.attn" in f.keys()
        assert f.get_tensor("CU.layers.0.mlp").dtype == torch.bool
    assert "SCU" in stdout and "wrote" in stdout
    assert not list(tmp_path.glob(".*partial*"))


def test_same_config_gives_same_units_and_config_file_works(tmp_path: Path, capsys) -> None:
    a = tmp_path / "a"
    assert run(["units", "tiny-random-qwen2", "--out", str(a), "--metric", "wanda", *FAST], capsys)[0] == 0
    cfg = yaml.safe_load((a / "config.yaml").read_text())
    cfg["out"] = str(tmp_path / "b")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert run(["units", "--config", str(tmp_path / "c.yaml")], capsys)[0] == 0
    with (
        safe_open(str(a / "units.safetensors"), "pt") as fa,
        safe_open(str(tmp_path / "b/units.safetensors"), "pt") as fb,
    ):
        assert set(fa.keys()) == set(fb.keys())
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    # an option on the command line wins over the config file
    assert (
        run(
            [
                "units",
                "--config",
                str(tmp_path / "c.yaml"),
                "--out",
                str(tmp_path / "d"),
                "--rule",
                "wei-set-difference",
            ],
            capsys,
        )[0]
        == 0
    )
    assert json.loads((tmp_path / "d/results.json").read_text())["rule"] == "wei-set-difference"
    assert json.loads((tmp_path / "d/results.json").read_text())["metric"] == "wanda"


def test_head_granularity_and_other_rules(tmp_path: Path, capsys) -> None:
    out = tmp_path / "h"
    code, _, err = run(
        [
            "units",
            "tiny-random-gpt2",
            "--out",
            str(out),
            "--granularity",
            "head",
            "--rule",
            "pruning-sets",
            "--shares",
            "sparsity=0.3",
            "--ranking",
            "per-module",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["granularity"] == "head" and res["shares"] == {"sparsity": 0.3}


def test_show_checks_the_model(tmp_path: Path, capsys, user_error) -> None:
    out = tmp_path / "run"
    assert run(["units", "tiny-random-llama", "--out", str(out), *FAST], capsys)[0] == 0
    code, stdout, _ = run(["show", str(out / "units.safetensors"), "--model", "tiny-random-llama"], capsys)
    assert code == 0 and "SCU" in stdout
    user_error(["show", str(out / "units.safetensors"), "--model", "tiny-random-mistral"], "another model")


def _bert_folder(tmp_path: Path) -> Path:
    from transformers import BertConfig, BertLMHeadModel

    from ssah.tiny import tiny_tokenizer

    folder = tmp_path / "bert"
    cfg = BertConfig(
        vocab_size=260,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        is_decoder=True,
    )
    BertLMHeadModel(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _pickle_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    return folder


BAD_CASES = {
    "missing model": (lambda t: ["units", str(t / "no-such-model")], "not found"),
    "unsupported family": (lambda t: ["units", str(_bert_folder(t))], "supported families"),
    "pickled weights": (lambda t: ["units", str(_pickle_folder(t))], "--allow-pickle"),
    "empty data file": (
        lambda t: ["units", "tiny-random-llama", "--safety", str(_write(t / "e.jsonl", ""))],
        "no rows",
    ),
    "malformed data file": (
        lambda t: ["units", "tiny-random-llama", "--safety", str(_write(t / "m.jsonl", "{oops\n"))],
        "line 1",
    ),
    "missing column": (
        lambda t: ["units", "tiny-random-llama", "--safety", str(_write(t / "c.csv", "foo,bar\n1,2\n"))],
        "--column",
    ),
    "share out of range": (lambda t: ["units", "tiny-random-llama", "--shares", "scu=1.5"], "outside 0..1"),
    "shares sum past 1": (lambda t: ["units", "tiny-random-llama", "--shares", "scu=0.5,ucu=0.4,ru=0.3"], "past 1"),
    "unknown metric": (lambda t: ["units", "tiny-random-llama", "--metric", "vibes"], "unknown metric"),
    "unit file for another model": (
        lambda t: ["show", str(_units_of(t, "tiny-random-llama")), "--model", "tiny-random-gpt2"],
        "another",
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _units_of(tmp_path: Path, model: str) -> Path:
    out = tmp_path / "units-src"
    assert main(["units", model, "--out", str(out), *FAST]) == 0
    return out / "units.safetensors"


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case: str, tmp_path: Path, user_error) -> None:
    make_args, needle = BAD_CASES[case]
    args = make_args(tmp_path)
    if args[0] == "units":
        args += ["--out", str(tmp_path / "out"), "--no-progress"]
    user_error(args, needle)


def test_existing_output_needs_overwrite(tmp_path: Path, capsys, user_error) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(["units", "tiny-random-llama", "--out", str(out), *FAST], "--overwrite")
    assert run(["units", "tiny-random-llama", "--out", str(out), "--overwrite", *FAST], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and (out / "units.safetensors").is_file()


def test_usage_errors_exit_2(user_error) -> None:
    user_error(["units", "tiny-random-llama", "--batch-size", "many"], "'batch_size'")
    user_error(["no-such-command"], "no-such-command")


def test_global_threads_option(capsys, monkeypatch) -> None:
    """`ssah --threads N` (or SSAH_THREADS) sets torch's CPU threads for the command; 0 is refused with exit 2."""
    before = torch.get_num_threads()
    try:
        code, out, _ = run(["--threads", "1", "models"], capsys)
        assert code == 0 and "tiny-random-llama" in out
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("SSAH_THREADS", "1")
        assert run(["models"], capsys)[0] == 0
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("SSAH_THREADS")
        code, _, err = run(["--threads", "0", "models"], capsys)
        assert code == 2 and "--threads" in err
    finally:
        torch.set_num_threads(before)
