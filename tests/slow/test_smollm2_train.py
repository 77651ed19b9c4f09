"""`ssah train` on SmolLM2-135M-Instruct: frozen units stay bit-identical, a killed run resumes exactly.

A few optimizer steps on short examples (batch 2, 3 steps, 96 tokens); the unit file comes from a small `ssah units`
run (4 calibration examples: any unit set serves to check exactness). Torch runs on one thread here: on a shared
2-core machine two OpenMP threads made a step 3-10x slower (4-6 s against 14-54 s). Marked slow: `make test-all`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ssah.cli import main
from ssah.interventions import unit_param_masks
from ssah.models import load_model
from ssah.training import partial_dir, resolve_unit_spec

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
STEPS = ["--max-steps", "3", "--checkpoint-every", "2"]
COMMON = [
    "--data",
    "builtin:task",
    "--limit",
    "8",
    "--batch-size",
    "2",
    "--max-length",
    "96",
    "--lr",
    "1e-4",
    "--weight-decay",
    "0.1",
    "--no-progress",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module's runs (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A freeze spec on a unit file of SmolLM2 made by a short `ssah units` run."""
    out = tmp_path_factory.mktemp("smollm2-units") / "u"
    assert main(["units", MODEL, "--limit", "4", "--no-progress", "--out", str(out)]) == 0
    return f"{out / 'units.safetensors'}:SCU,CU@0.06"


@pytest.fixture(scope="module")
def reference(spec: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted frozen-units run and how long it took."""
    out = tmp_path_factory.mktemp("smollm2-train") / "ref"
    t0 = time.time()
    assert main(["train", MODEL, "--freeze", spec, *STEPS, *COMMON, "--out", str(out)]) == 0
    return out, time.time() - t0


def test_freeze_keeps_smollm2_units_bit_identical_while_the_rest_moves(spec: str, reference) -> None:
    out, seconds = reference
    lm = load_model(MODEL, dtype="float32", device="cpu")
    base = lm.model.state_dict()
    units = resolve_unit_spec(spec, lm.model, fingerprint=lm.fingerprint, model_name=lm.name)
    masks = unit_param_masks(lm.model, units)
    trained = load_file(str(out / "model" / "model.safetensors"))
    assert len(units) > 0 and masks
    for name, mask in masks.items():
        assert torch.equal(trained[name][mask], base[name][mask]), name  # frozen slices: bit-identical
        assert not torch.equal(trained[name][~mask], base[name][~mask]), name  # the rest of the matrix trained
    moved = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert "model.embed_tokens.weight" in moved and len(moved) > len(masks)
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "freeze" and res["frozen_max_drift"] == 0.0 and res["steps"] == 3
    assert res["freeze"]["units"] == len(units)
    print(f"\nSmolLM2 frozen-units training, 3 steps: {seconds:.1f} s ({res['seconds']['train']:.1f} s training)")


def test_resume_after_a_kill_gives_the_uninterrupted_weights(spec: str, reference, tmp_path: Path, monkeypatch) -> None:
    import ssah.recipes.train.run as recipe

    ref, _ = reference
    real = recipe.train_model

    def killed_at_3(*a: Any, **kw: Any) -> Any:
        def on_step(record: dict[str, Any]) -> None:
            if record["step"] == 3:  # after step 3, one past the checkpoint at 2
                raise KeyboardInterrupt

        return real(*a, **kw, on_step=on_step)

    out = tmp_path / "ft"
    args = ["train", MODEL, "--freeze", spec, *STEPS, *COMMON, "--out", str(out)]
    monkeypatch.setattr(recipe, "train_model", killed_at_3)
    assert main(args) == 130
    assert not out.exists() and (partial_dir(out) / "checkpoints" / "step-2").is_dir()
    monkeypatch.setattr(recipe, "train_model", real)
    t0 = time.time()
    assert main([*args, "--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == 2 and res["steps"] == 3
    assert res["final_loss"] == json.loads((ref / "results.json").read_text())["final_loss"]
    got = load_file(str(out / "model" / "model.safetensors"))
    want = load_file(str(ref / "model" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    print(f"\nSmolLM2 resume of the last step: {time.time() - t0:.1f} s")
