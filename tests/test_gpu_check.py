"""benchmarks/gpu_check.sh in its CPU form (`--config tiny --device cpu`): the script the GPU check runs, end to
end, with every stage measured and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "check"
    args = ["--config", "tiny", "--device", "cpu", "--dtype", "float32", "--seq-len", "96", "--score-examples", "6"]
    args += ["--prompt-len", "48", "--new-tokens", "6", "--gen-batch", "4", "--train-steps", "2"]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"build", "units", "generate", "ablate", "train_frozen"} and not report["skipped"]
    assert stages["build"]["weights_vs_plan"] == 1.0  # the plan's parameter memory is exact
    assert stages["units"]["tokens"] > 0 and stages["units"]["tokens_per_s"] > 0
    assert stages["generate"]["new_tokens"] > 0
    assert stages["ablate"]["logits_changed"] and stages["ablate"]["undone_exactly"]
    assert stages["train_frozen"]["frozen_max_drift"] == 0.0 and stages["train_frozen"]["frozen_entries"] > 0
    for name in ("units", "generate", "train_frozen"):
        assert stages[name]["plan"]["total_at_batch"] > 0 and stages[name]["peak_bytes"] > 0


def test_gpu_check_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return  # the error case only exists without a GPU
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path), "--config", "tiny"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.strip().startswith("error:") and "--device cpu" in run.stderr
