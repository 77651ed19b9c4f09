"""Hostile but fair input, concurrent runs and damaged files: every case ends in one ``error:`` line, exit code 2,
no traceback and nothing written; two runs into one folder cannot mix; the same run twice gives the same bytes.

The bad inputs are one table (``CASES``) run through :func:`assert_user_error`; the files they need (model
folders, data files, configs, unit files, checkpoints, demo folders, damaged or not) are built once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hostile_cases
from helpers import assert_user_error
from ssah.cli import main
from ssah.safefiles import canonical_safetensors, save_safetensors

TRAIN = ["--max-steps", "2", "--checkpoint-every", "1", "--batch-size", "2", "--limit", "4", "--max-length", "256"]
UNITS = ["--limit", "4", "--max-length", "64", "--no-progress"]


# -- the files the cases need -------------------------------------------------------------------------------
@dataclass
class World:
    root: Path

    def __call__(self, rel: str) -> str:
        return str(self.root / rel)


def _write_unit_variants(root: Path) -> None:
    """A valid unit file of tiny-random-llama, and copies damaged one way each."""
    from ssah.arch import get_adapter
    from ssah.categorize import categorize
    from ssah.models import load_model
    from ssah.units import UnitSpace

    lm = load_model("tiny-random-llama", device="cpu")
    space = UnitSpace.from_groups(get_adapter(lm.model).groups(), "neuron", lm.fingerprint, lm.name)
    g = torch.Generator().manual_seed(0)
    cats = categorize(torch.rand(space.total, generator=g), torch.rand(space.total, generator=g), space=space)
    good = root / "units" / "good.safetensors"
    good.parent.mkdir()
    cats.save(good)
    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def variant(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        save_safetensors(tensors, root / "units" / f"{name}.safetensors", meta)

    variant("float-masks", {k: v.float() for k, v in tensors.items()}, meta)
    variant("all-in-every-category", {k: torch.ones_like(v) for k, v in tensors.items()}, meta)
    variant("no-fingerprint", tensors, {**meta, "model_fingerprint": ""})
    variant("no-granularity", tensors, {k: v for k, v in meta.items() if k != "granularity"})
    variant("no-structure-hash", tensors, {k: v for k, v in meta.items() if k != "structure_hash"})
    variant("structure-not-json", tensors, {**meta, "structure": "[[0, 'attn'"})
    edited = json.loads(meta["structure"])
    edited[0][2] += 1
    variant("structure-edited", tensors, {**meta, "structure": json.dumps(edited, separators=(",", ":"))})
    variant("missing-tensor", {k: v for k, v in tensors.items() if k != sorted(tensors)[0]}, meta)
    (root / "units" / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def _write_models(root: Path) -> None:
    from safetensors.torch import load_file

    from ssah.tiny import build_tiny_model

    model, tok = build_tiny_model("llama")
    good = root / "models" / "good"
    model.save_pretrained(good)
    tok.save_pretrained(good)
    for name in ("empty", "garbage", "truncated", "pickle-only", "bad-config"):
        shutil.copytree(good, root / "models" / name)
    (root / "models" / "empty" / "model.safetensors").write_bytes(b"")
    (root / "models" / "garbage" / "model.safetensors").write_bytes(os.urandom(2048))
    blob = (good / "model.safetensors").read_bytes()
    (root / "models" / "truncated" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    pickled = root / "models" / "pickle-only"
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    (root / "models" / "bad-config" / "config.json").write_text("[]")
    from transformers import BertConfig, BertModel

    bert = root / "models" / "bert"  # a family transformers loads and ssah has no adapter for
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, is_decoder=True)
    BertModel(cfg).save_pretrained(bert)
    tok.save_pretrained(bert)


def _write_data(root: Path) -> None:
    d = root / "data"
    d.mkdir()

    def jsonl(name: str, rows: list[object]) -> None:
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("prompt-number.jsonl", [{"prompt": "How do I bake bread?"}, {"prompt": 42}])
    jsonl("prompt-bool.jsonl", [{"prompt": True}])
    jsonl("prompt-list.jsonl", [{"prompt": ["a", "b"]}])
    jsonl("response-object.jsonl", [{"prompt": "hi", "response": {"text": "hello"}}])
    jsonl("no-responses.jsonl", [{"prompt": "How do I bake bread?"}, {"prompt": "Name a color."}])
    (d / "extra-cells.csv").write_text("prompt,response\nhello,world,surplus\n")
    (d / "duplicate-header.csv").write_text("prompt,prompt\na,b\n")
    (d / "latin1.csv").write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    c = root / "configs"
    c.mkdir()
    (c / "seed-true.yaml").write_text("model: tiny-random-llama\nseed: true\n")
    (c / "limit-true.yaml").write_text("model: tiny-random-llama\nlimit: true\n")
    (c / "seed-huge.yaml").write_text("model: tiny-random-llama\nseed: 99999999999\n")
    (c / "lr-nan.yaml").write_text("model: tiny-random-llama\nlr: .nan\n")
    (c / "latin1.yaml").write_bytes("model: tiny-random-llama\nsystem: caf\xe9\n".encode("latin-1"))
    (c / "a-list.yaml").write_text("- model\n- tiny-random-llama\n")
    (c / "folder.yaml").mkdir()
    (root / "a-file").write_text("not a folder\n")
    (root / "existing").mkdir()
    (root / "existing" / "kept.txt").write_text("keep me\n")
    (root / "cwd").mkdir()


def _write_checkpoints(root: Path) -> None:
    """A finished tiny training run, copied into two unfinished ones (``run.partial``) with damaged checkpoints."""
    assert main(["train", "tiny-random-llama", "--out", str(root / "trained"), *TRAIN, "--no-progress"]) == 0
    for name in ("ck-optimizer", "ck-state", "ck-log"):
        partial = root / name / "run.partial"
        shutil.copytree(root / "trained", partial)
    (root / "ck-optimizer" / "run.partial" / "checkpoints" / "step-2" / "optimizer.pt").write_bytes(b"garbage")
    (root / "ck-state" / "run.partial" / "checkpoints" / "step-2" / "state.json").write_text("[]")
    (root / "ck-log" / "run.partial" / "train_log.jsonl").write_text("{not json\n")


def _write_demo(root: Path) -> None:
    (root / "demo-list").mkdir()
    (root / "demo-list" / "demo.json").write_text("[]")
    (root / "demo-seed").mkdir()
    state = {"model": "tiny-random-llama", "quick": True, "seed": 0, "stages": {}}
    (root / "demo-seed" / "demo.json").write_text(json.dumps(state))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    os.environ["SSAH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    _write_models(root)
    _write_data(root)
    _write_unit_variants(root)
    _write_checkpoints(root)
    _write_demo(root)
    hostile_cases.write_files(root)  # issue 31: direction and judge files, plans, locks, labelled data
    return World(root)


# -- the table ----------------------------------------------------------------------------------------------
Case = tuple[str, Callable[[World], list[str]], str]
U = ["units", "tiny-random-llama"]
NO_GPU = not torch.cuda.is_available()

CASES: list[Case] = [
    # click's usage errors: one line too, naming the command's --help
    ("usage-bad-int", lambda w: [*U, "--seed", "abc", "--out", w("o")], "see ssah units --help"),
    ("usage-threads-zero", lambda w: ["--threads", "0", *U, "--out", w("o")], "--threads"),
    ("usage-unknown-command", lambda w: ["nosuch-command"], "No such command"),
    ("usage-unknown-option", lambda w: [*U, "--no-such-option", "--out", w("o")], "no-such-option"),
    # output folders (checked before any work)
    ("out-empty", lambda w: [*U, "--out", "", *UNITS], "names no new folder"),
    ("out-dot", lambda w: [*U, "--out", ".", *UNITS], "names no new folder"),
    ("out-dotdot", lambda w: [*U, "--out", "..", *UNITS], "names no new folder"),
    ("out-cwd-by-path", lambda w: [*U, "--out", w("cwd"), *UNITS], "current folder or one above"),
    ("out-under-file", lambda w: [*U, "--out", w("a-file/run"), *UNITS], "which is a file"),
    ("out-deep-under-file", lambda w: [*U, "--out", w("a-file/x/y/run"), *UNITS], "which is a file"),
    ("out-is-file", lambda w: [*U, "--out", w("a-file"), *UNITS], "is a file"),
    ("out-exists", lambda w: [*U, "--out", w("existing"), *UNITS], "already exists"),
    ("train-out-empty", lambda w: ["train", "tiny-random-llama", "--out", "", *TRAIN], "names no new folder"),
    ("demo-out-under-file", lambda w: ["demo", "--model", "tiny-random-llama", "--out", w("a-file/d")], "a file"),
    # seeds, devices, numbers
    ("seed-negative", lambda w: [*U, "--seed", "-1", "--out", w("o"), *UNITS], "'seed'"),
    ("seed-2**32", lambda w: [*U, "--seed", str(2**32), "--out", w("o"), *UNITS], "'seed'"),
    ("train-seed-negative", lambda w: ["train", "tiny-random-llama", "--seed", "-5", "--out", w("o")], "'seed'"),
    ("device-meta", lambda w: [*U, "--device", "meta", "--out", w("o"), *UNITS], "'meta' cannot run"),
    ("device-unknown", lambda w: [*U, "--device", "gpu0", "--out", w("o"), *UNITS], "unknown device"),
    ("device-cuda-index", lambda w: [*U, "--device", "cuda:99", "--out", w("o"), *UNITS], "'cuda:99'"),
    ("weight-decay-nan", lambda w: ["train", "tiny-random-llama", "--weight-decay", "nan", "--out", w("o")], "finite"),
    ("lr-inf", lambda w: ["train", "tiny-random-llama", "--lr", "inf", "--out", w("o")], "finite"),
    ("temperature-inf", lambda w: ["eval", "tiny-random-llama", "--temperature", "inf", "--out", w("o")], "finite"),
    ("top-p-nan", lambda w: ["eval", "tiny-random-llama", "--top-p", "nan", "--out", w("o")], "finite"),
    ("benign-ratio-nan", lambda w: ["align", "tiny-random-llama", "--benign-ratio", "nan", "--out", w("o")], "finite"),
    # config files
    ("config-seed-true", lambda w: ["units", "--config", w("configs/seed-true.yaml"), "--out", w("o")], "'seed'"),
    ("config-limit-true", lambda w: ["units", "--config", w("configs/limit-true.yaml"), "--out", w("o")], "'limit'"),
    ("config-seed-huge", lambda w: ["units", "--config", w("configs/seed-huge.yaml"), "--out", w("o")], "'seed'"),
    ("config-lr-nan", lambda w: ["train", "--config", w("configs/lr-nan.yaml"), "--out", w("o")], "finite"),
    ("config-not-utf8", lambda w: ["units", "--config", w("configs/latin1.yaml"), "--out", w("o")], "not UTF-8"),
    ("config-a-list", lambda w: ["units", "--config", w("configs/a-list.yaml"), "--out", w("o")], "mapping"),
    ("config-a-folder", lambda w: ["units", "--config", w("configs/folder.yaml"), "--out", w("o")], "not found"),
    # data
    ("data-spec-empty", lambda w: [*U, "--safety", "", "--out", w("o")], "empty data spec"),
    ("prompt-number", lambda w: [*U, "--safety", w("data/prompt-number.jsonl"), "--out", w("o")], "number"),
    ("prompt-bool", lambda w: [*U, "--safety", w("data/prompt-bool.jsonl"), "--out", w("o")], "boolean"),
    ("prompt-list", lambda w: [*U, "--safety", w("data/prompt-list.jsonl"), "--out", w("o")], "list"),
    ("response-object", lambda w: [*U, "--safety", w("data/response-object.jsonl"), "--out", w("o")], "object"),
    ("csv-extra-cells", lambda w: [*U, "--safety", w("data/extra-cells.csv"), "--out", w("o")], "3 cells"),
    ("csv-duplicate-header", lambda w: [*U, "--safety", w("data/duplicate-header.csv"), "--out", w("o")], "twice"),
    ("csv-not-utf8", lambda w: [*U, "--safety", w("data/latin1.csv"), "--out", w("o")], "not UTF-8"),
    (
        "tokens-response-without-responses",
        lambda w: [*U, "--safety", w("data/no-responses.jsonl"), "--tokens", "response", "--out", w("o"), *UNITS],
        "tokens 'response' counts response tokens only",
    ),
    # model folders
    ("model-empty-safetensors", lambda w: ["info", w("models/empty")], "is empty"),
    ("model-garbage-safetensors", lambda w: ["info", w("models/garbage")], "damaged or not safetensors"),
    ("model-truncated-safetensors", lambda w: ["info", w("models/truncated")], "damaged or not safetensors"),
    ("model-pickle-without-flag", lambda w: ["info", w("models/pickle-only")], "--allow-pickle"),
    ("model-config-a-list", lambda w: ["info", w("models/bad-config")], "could not load model"),
    ("model-unsupported-family", lambda w: ["info", w("models/bert")], "Unsupported model_type 'bert'"),
    ("units-on-damaged-model", lambda w: ["units", w("models/garbage"), "--out", w("o"), *UNITS], "damaged"),
    # unit files
    ("units-float-masks", lambda w: ["show", w("units/float-masks.safetensors")], "not a bool mask"),
    ("units-not-a-partition", lambda w: ["show", w("units/all-in-every-category.safetensors")], "none or several"),
    ("units-no-fingerprint", lambda w: ["show", w("units/no-fingerprint.safetensors")], "'model_fingerprint'"),
    ("units-no-granularity", lambda w: ["show", w("units/no-granularity.safetensors")], "'granularity'"),
    ("units-no-structure-hash", lambda w: ["show", w("units/no-structure-hash.safetensors")], "'structure_hash'"),
    ("units-structure-not-json", lambda w: ["show", w("units/structure-not-json.safetensors")], "not JSON"),
    ("units-structure-edited", lambda w: ["show", w("units/structure-edited.safetensors")], "disagree"),
    ("units-missing-tensor", lambda w: ["show", w("units/missing-tensor.safetensors")], "missing"),
    ("units-garbage", lambda w: ["show", w("units/garbage.safetensors")], "not a safetensors"),
    (
        "train-freeze-float-masks",
        lambda w: [
            "train",
            "tiny-random-llama",
            "--freeze",
            w("units/float-masks.safetensors") + ":SCU",
            "--out",
            w("o"),
            *TRAIN,
        ],
        "not a bool mask",
    ),
    # checkpoints and run state
    (
        "resume-optimizer-garbage",
        lambda w: ["train", "tiny-random-llama", "--out", w("ck-optimizer/run"), "--resume", *TRAIN, "--no-progress"],
        "is damaged",
    ),
    (
        "resume-state-a-list",
        lambda w: ["train", "tiny-random-llama", "--out", w("ck-state/run"), "--resume", *TRAIN, "--no-progress"],
        "not an ssah training checkpoint",
    ),
    (
        "resume-log-garbage",
        lambda w: ["train", "tiny-random-llama", "--out", w("ck-log/run"), "--resume", *TRAIN, "--no-progress"],
        "step log",
    ),
    (
        "resume-other-settings",
        lambda w: ["train", "tiny-random-llama", "--out", w("ck-log/run"), "--resume", *TRAIN, "--lr", "1e-3"],
        "started with lr=",
    ),
    ("resume-nothing", lambda w: ["train", "tiny-random-llama", "--out", w("none/run"), "--resume", *TRAIN], "nothing"),
    ("demo-json-a-list", lambda w: ["demo", "--model", "tiny-random-llama", "--out", w("demo-list")], "not a demo"),
    (
        "demo-other-seed",
        lambda w: ["demo", "--model", "tiny-random-llama", "--out", w("demo-seed"), "--seed", "1"],
        "not seed=1",
    ),
    (
        "demo-stages-empty",
        lambda w: ["demo", "--model", "tiny-random-llama", "--out", w("d"), "--stages", ""],
        "no stage",
    ),
    (
        "demo-stage-needs-another",
        lambda w: ["demo", "--model", "tiny-random-llama", "--out", w("demo-new"), "--stages", "ablate"],
        "needs stage align",
    ),
]
CASES += hostile_cases.CASES  # one row or more per cause of issue 31 (the newer surfaces)
if NO_GPU:
    CASES.append(("device-cuda-without-gpu", lambda w: [*U, "--device", "cuda", "--out", w("o"), *UNITS], "no CUDA"))
if Path("/sys").is_dir():  # a place nobody can write, root included
    CASES.append(("out-read-only", lambda w: [*U, "--out", "/sys/ssah-run", *UNITS], "cannot write"))


@pytest.mark.parametrize(("name", "args", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    name: str,
    args: Callable[[World], list[str]],
    needle: str,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(world.root / "cwd")
    assert_user_error(args(world), needle, watch=world.root, capsys=capsys)


def test_unsupported_family_prints_only_the_error(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' load report (dozens of lines for a foreign checkpoint) is held back before the error."""
    assert main(["info", world("models/bert")]) == 2
    out, err = capsys.readouterr()
    assert len((out + err).strip().splitlines()) == 1, out + err


def test_allow_pickle_is_honoured(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", world("models/pickle-only"), "--allow-pickle"]) == 0
    assert "family: llama" in capsys.readouterr().out


# -- staging ------------------------------------------------------------------------------------------------
def _fork(target: Callable[[], int], log: Path) -> int:
    """Run ``target`` in a forked child process (the modules are already imported: starts in milliseconds) with
    its stdout and stderr in ``log``; returns the child's PID, to be waited on with ``os.waitpid``."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child exits right after
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            code = target()
        except BaseException:  # report and exit, whatever happened
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_two_runs_into_one_folder_at_once_never_mix(tmp_path: Path) -> None:
    """Two training processes (different seeds) start into one --out at the same moment: one wins whole, the other
    ends with one error line and exit code 2, and nothing of either is left beside the folder.

    Real processes, not forks: a forked child of a process whose torch thread pool has run can deadlock."""
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "ssah", "train", "tiny-random-llama", "--out", str(out), *TRAIN, "--no-progress"]
    procs = {
        seed: subprocess.Popen(
            [*cmd, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for seed in (1, 2)
    }
    texts = {seed: p.communicate(timeout=600)[0] for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 2], (codes, texts)
    (winner,) = [seed for seed, code in codes.items() if code == 0]
    (loser,) = [seed for seed, code in codes.items() if code == 2]
    assert "Traceback" not in texts[loser], texts[loser]
    assert len([line for line in texts[loser].splitlines() if line.startswith("error:")]) == 1, texts[loser]
    config = (out / "config.yaml").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    results_json = json.loads((out / "results.json").read_text())
    assert f"seed: {winner}\n" in config and manifest["seed"] == winner
    assert results_json["settings"]["seed"] == winner and (out / "model" / "model.safetensors").is_file()
    log_steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == [1, 2]  # one run's log, not two interleaved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder, lock or partial left


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_live_run_blocks_the_folder_and_a_dead_one_does_not(tmp_path: Path, capsys) -> None:
    from ssah.runs import FolderLock

    out = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def hold() -> int:
        FolderLock(out).acquire()
        os.write(ready_w, b"1")
        os.read(hold_r, 1)  # until the test has tried; then die without releasing, like kill -9
        os.kill(os.getpid(), 9)
        return 0

    holder = _fork(hold, tmp_path.parent / f"{tmp_path.name}-holder.log")
    try:
        assert os.read(ready_r, 1) == b"1"
        line = assert_user_error([*U, "--out", str(out), *UNITS], "another ssah run", watch=tmp_path, capsys=capsys)
        assert f"PID {holder}" in line
    finally:
        os.write(hold_w, b"1")
        _exit_code(holder)
    # killed: its lock file and a staging folder stay behind, and neither stops the next run
    (tmp_path / f".run.partial-{holder}").mkdir()
    (tmp_path / f".run.partial-{holder}" / "half.json").write_text("{")
    assert (tmp_path / ".run.lock").is_file()
    assert main([*U, "--out", str(out), *UNITS]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_run_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """A run that fails after staging began removes its staging folder and its lock."""
    import ssah.recipes.units.report as units_report

    def boom(*_a: object, **_k: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(units_report, "render", boom)  # the report is written last, inside the staging folder
    assert main([*U, "--out", str(tmp_path / "run"), *UNITS]) == 130
    assert list(tmp_path.iterdir()) == []


# -- byte reproducibility -----------------------------------------------------------------------------------
def test_the_same_unit_run_twice_gives_identical_bytes(tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        assert main([*U, "--out", str(tmp_path / name), *UNITS]) == 0
    for rel in ("units.safetensors", "scores/safety.safetensors", "scores/utility.safetensors"):
        a, b = ((tmp_path / n / rel).read_bytes() for n in ("a", "b"))
        assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest(), rel


def test_canonical_writer_ignores_insertion_order(tmp_path: Path) -> None:
    """A Scores-like file (float64 vectors per group, metadata) saved twice with keys inserted in other orders."""
    values = {f"layers.{i}.{k}": torch.rand(5 + i, dtype=torch.float64) for i in range(3) for k in ("attn", "mlp")}
    meta = {"metric": "fluctuation", "dataset": "builtin:safety", "tokens": "123", "region": "prompt+response"}
    first = save_safetensors(values, tmp_path / "a.safetensors", meta)
    second = save_safetensors(
        dict(reversed(list(values.items()))), tmp_path / "b.safetensors", dict(reversed(list(meta.items())))
    )
    assert first.read_bytes() == second.read_bytes()
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == meta
        assert all(torch.equal(f.get_tensor(k), v) for k, v in values.items())
    blob = canonical_safetensors({"b": torch.zeros(2), "a": torch.tensor([True])}, {"z": "1", "a": "2"})
    n = int.from_bytes(blob[:8], "little")
    header = blob[8 : 8 + n].decode()
    assert n % 8 == 0 and header.index('"__metadata__"') < header.index('"a"') < header.index('"b"')
    assert header.index('"a":"2"') < header.index('"z":"1"')


# -- prompts longer than the model's context ----------------------------------------------------------------
def test_every_encode_path_cuts_to_the_context(tiny_llama) -> None:
    """The one place (``fit_context``): examples keep their start, prompts keep their end (question and header)."""
    from ssah.data import Example, PromptSet
    from ssah.data.chat import encode_prompts, encode_set, fit_context, format_chat

    _, tok = tiny_llama
    long = "word " * 300
    data = PromptSet("long", "memory", (Example(long, "fine"), Example("short", "ok")))
    full = encode_set(tok, data)
    cut = encode_set(tok, data, max_length=1000, context=64)
    assert len(full[0]) > 64 and len(cut[0]) == 64 and cut[0].input_ids == full[0].input_ids[:64]
    assert cut[1].input_ids == full[1].input_ids  # short ones untouched
    text = format_chat(tok, long)
    (ids,) = encode_prompts(tok, [text], context=64, reserve=8)
    (whole,) = encode_prompts(tok, [text], context=None)
    assert len(ids) == 56 and ids == whole[-56:]
    with pytest.raises(Exception, match="no room"):
        fit_context([[1, 2]], 8, reserve=8)


def test_units_on_prompts_longer_than_the_context(tmp_path: Path, capsys) -> None:
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "word " * 700, "response": "fine " * 5}) + "\n" for _ in range(2)))
    args = ["--safety", str(long), "--utility", str(long), "--max-length", "4000", "--no-progress"]
    assert main(["units", "tiny-random-gpt2", "--out", str(tmp_path / "run"), *args]) == 0, capsys.readouterr()


def test_eval_on_prompts_longer_than_the_context(tmp_path: Path, capsys) -> None:
    """Generation, the first-token score and perplexity all cut to the model's 512 positions (tiny GPT-2)."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "word " * 700}) + "\n" for _ in range(2)))
    answers = tmp_path / "answers.jsonl"  # a long response: perplexity is measured on its first tokens
    answers.write_text("".join(json.dumps({"prompt": "Say it.", "response": "fine " * 700}) + "\n" for _ in range(2)))
    args = ["--harmful", str(long), "--benign", "none", "--utility", f"perplexity:{answers}", "--max-new-tokens", "4"]
    assert main(["eval", "tiny-random-gpt2", "--out", str(tmp_path / "run"), "--no-progress", *args]) == 0, (
        capsys.readouterr()
    )
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["safety"]["n"] == 2 and res["utility"]["perplexity"] > 0
