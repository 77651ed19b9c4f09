"""Two CPU processes (torchrun, gloo): the same training as one process, with frozen units bit-identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ssah.cli import main
from ssah.interventions import space_of, unit_param_masks
from ssah.tiny import build_tiny_model
from ssah.units import load_unit_sets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TRAIN = [
    "tiny-random-llama",
    "--data",
    "builtin:task",
    "--limit",
    "16",
    "--max-steps",
    "3",
    "--weight-decay",
    "0.1",
    "--lr",
    "1e-3",
    "--no-progress",
]


def test_ddp_two_processes_match_one_and_keep_frozen_units(tmp_path: Path) -> None:
    assert main(["units", "tiny-random-llama", "--limit", "6", "--no-progress", "--out", str(tmp_path / "u")]) == 0
    freeze = f"{tmp_path / 'u/units.safetensors'}:SCU,CU@0.1"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "ssah",
        "train",
        *TRAIN,
        "--batch-size",
        "2",
        "--freeze",
        freeze,
        "--out",
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(["train", *TRAIN, "--batch-size", "4", "--freeze", freeze, "--out", str(tmp_path / "one")]) == 0

    ddp = load_file(str(tmp_path / "ddp/model/model.safetensors"))
    one = load_file(str(tmp_path / "one/model/model.safetensors"))
    start, _ = build_tiny_model("llama")
    base = start.state_dict()
    units = load_unit_sets(tmp_path / "u/units.safetensors", space_of(start), allow_other_weights=True)
    frozen = units["SCU"] | units["CU"]  # a superset of what was frozen: check only SCU's slices exactly
    masks = unit_param_masks(start, units["SCU"])
    assert masks and len(frozen) > 0
    for name, mask in masks.items():
        assert torch.equal(ddp[name][mask], base[name][mask]), name
    changed = 0
    for name, w in one.items():
        assert torch.allclose(ddp[name], w, atol=1e-5), name  # same data, same steps: same weights
        changed += int(not torch.equal(w, base[name]))
    assert changed > 0
