"""Two CPU processes (gloo): DDP and FSDP2 train like one process and keep frozen units bit-identical.

Launchers: ``accelerate launch --multi_gpu`` (DDP; ``--cpu`` would start accelerate's single-process launcher),
``torchrun ... --fsdp`` and ``accelerate launch --use_fsdp --fsdp_version 2`` (FSDP2, exact resume).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ssah.cli import main
from ssah.interventions import space_of, unit_param_masks
from ssah.tiny import build_tiny_model
from ssah.units import load_unit_sets

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = [
    "tiny-random-llama",
    "--data",
    "builtin:task",
    "--limit",
    "16",
    "--max-steps",
    "3",
    "--grad-accum",
    "2",
    "--weight-decay",
    "0.1",
    "--lr",
    "1e-3",
    "--no-progress",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _accelerate(*args: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--main_process_port", str(_free_port()), *args]


def _torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A unit file and the single-process reference run (batch 4 = 2 processes x 2)."""
    root = tmp_path_factory.mktemp("dist")
    assert main(["units", "tiny-random-llama", "--limit", "6", "--no-progress", "--out", str(root / "u")]) == 0
    freeze = f"{root / 'u/units.safetensors'}:SCU,CU@0.1"
    assert main(["train", *TRAIN, "--batch-size", "4", "--freeze", freeze, "--out", str(root / "one")]) == 0
    return root


def _check_against_one(root: Path, name: str) -> None:
    """Frozen SCU slices bit-identical to the start, every weight as in the one-process run (tolerance)."""
    got = load_file(str(root / name / "model/model.safetensors"))
    one = load_file(str(root / "one/model/model.safetensors"))
    start, _ = build_tiny_model("llama")
    base = start.state_dict()
    units = load_unit_sets(root / "u/units.safetensors", space_of(start), allow_other_weights=True)
    masks = unit_param_masks(start, units["SCU"])  # SCU is frozen whole (CU only in part): check it exactly
    assert masks and len(units["SCU"]) > 0
    for key, mask in masks.items():
        assert torch.equal(got[key][mask], base[key][mask]), key
    changed = 0
    for key, w in one.items():
        assert torch.allclose(got[key], w, atol=1e-5), key  # same data, same steps: same weights
        changed += int(not torch.equal(got[key], base[key]))
    assert changed > 0
    res = json.loads((root / name / "results.json").read_text())
    assert res["frozen_max_drift"] == 0.0


def test_ddp_two_processes_match_one_and_keep_frozen_units(runs: Path) -> None:
    freeze = f"{runs / 'u/units.safetensors'}:SCU,CU@0.1"
    args = [*TRAIN, "--batch-size", "2", "--freeze", freeze, "--out", str(runs / "ddp")]
    _launch(_accelerate("--multi_gpu", "-m", "ssah", "train", *args))
    assert json.loads((runs / "ddp/manifest.json").read_text())["world_size"] == 2
    assert json.loads((runs / "ddp/results.json").read_text())["fsdp"] is False
    _check_against_one(runs, "ddp")


def test_fsdp2_two_processes_match_one_and_keep_frozen_units(runs: Path) -> None:
    freeze = f"{runs / 'u/units.safetensors'}:SCU,CU@0.1"
    args = [*TRAIN, "--batch-size", "2", "--freeze", freeze, "--fsdp", "--out", str(runs / "fsdp")]
    _launch(_torchrun("-m", "ssah", "train", *args))
    res = json.loads((runs / "fsdp/results.json").read_text())
    assert res["fsdp"] is True and json.loads((runs / "fsdp/manifest.json").read_text())["world_size"] == 2
    _check_against_one(runs, "fsdp")
    # the gathered full state dict: plain transformers loads it, under the plain class name
    assert json.loads((runs / "fsdp/model/config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_pretrained(runs / "fsdp/model")


WORKER = textwrap.dedent(
    '''
    """FSDP2 from accelerate's environment: exact resume with frozen units, units-only and LoRA training."""
    import sys
    from pathlib import Path

    import torch
    from accelerate import PartialState

    from ssah.data import load_prompts
    from ssah.interventions import unit_param_masks
    from ssah.tiny import build_tiny_model
    from ssah.training import TrainConfig, resolve_unit_spec, train_model

    out, units = Path(sys.argv[1]), sys.argv[2]
    state = PartialState(cpu=True)
    data = load_prompts("builtin:task", limit=16)
    base = dict(model="tiny-random-llama", max_steps=4, batch_size=2, lr=1e-2, weight_decay=0.1, progress=False)
    cfg = TrainConfig(**base, checkpoint_every=2, warmup=1)


    class Killed(Exception):
        pass


    def kill(record):
        if record["step"] == 3:  # one step past the checkpoint at 2
            raise Killed


    def run(cfg, run_dir=None, on_step=None, spec=units, how="freeze"):
        model, tok = build_tiny_model("llama")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        sets = {how: resolve_unit_spec(spec, model)} if spec else {}
        res = train_model(model, tok, data, cfg, run_dir=run_dir, progress=False, on_step=on_step, **sets)
        assert res.fsdp and res.model is model and type(model).__name__ == "LlamaForCausalLM", res.fsdp
        masks = unit_param_masks(model, sets[how]) if spec else {}
        return res, before, {n: p.detach().clone() for n, p in model.named_parameters()}, masks


    ref, start, want, masks = run(cfg)
    try:
        run(cfg, out / "run.partial", kill)
        raise SystemExit("the run was not killed")
    except Killed:
        pass
    state.wait_for_everyone()
    res, _, got, _ = run(cfg.model_copy(update={"resume": True}), out / "run.partial")
    assert res.resumed_from == 2 and res.losses == ref.losses, (res.resumed_from, res.losses, ref.losses)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    assert res.frozen_max_drift == 0.0 and masks
    assert all(torch.equal(got[n][m], start[n][m]) for n, m in masks.items())

    only, start, got, masks = run(TrainConfig(**base), spec=units.replace("SCU,CU@0.1", "RU"), how="only")
    assert all(torch.equal(got[n][~masks[n]], start[n][~masks[n]]) if n in masks else torch.equal(got[n], start[n])
               for n in start)
    assert any(not torch.equal(got[n][m], start[n][m]) for n, m in masks.items())
    lora, start, got, _ = run(TrainConfig(**base, lora="r=4,dropout=0.0"), spec=None)
    assert got.keys() == start.keys() and any(not torch.equal(got[n], start[n]) for n in start)
    if state.is_main_process:
        print("fsdp worker ok", flush=True)
    '''
)


def test_fsdp2_from_accelerate_config_resumes_exactly_and_trains_units_and_lora(runs: Path, tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    units = f"{runs / 'u/units.safetensors'}:SCU,CU@0.1"
    _launch(_accelerate("--use_fsdp", "--fsdp_version", "2", str(worker), str(tmp_path), units))
