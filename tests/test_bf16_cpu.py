"""`--dtype bfloat16` on the CPU: the model runs in bf16, statistics and scores stay float64, text is produced."""

from __future__ import annotations

import torch

from ssah.data import Example, PromptSet
from ssah.generate import GenerationConfig, generate
from ssah.models import load_model
from ssah.scoring import collect_statistics, compute_scores
from ssah.units import UnitSpace


def test_bf16_on_cpu_keeps_float64_statistics() -> None:
    lm = load_model("tiny-random-llama", device="cpu", dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    data = PromptSet("toy", "memory:toy", tuple(Example(f"Question {i}?", "Yes.") for i in range(4)))
    stats = collect_statistics(lm.model, lm.tokenizer, data, batch_size=2, progress=False)
    assert all(s.mean.dtype == torch.float64 and s.m2.dtype == torch.float64 for s in stats.groups.values())
    from ssah.arch import get_adapter

    space = UnitSpace.from_groups(get_adapter(lm.model).groups())
    scores = compute_scores(lm.model, stats, "fluctuation", space)
    assert all(v.dtype == torch.float64 and bool((v > 0).any()) for v in scores.values.values())
    # bf16 and fp32 scores of the same weights agree closely (bf16 has an 8-bit mantissa)
    ref = load_model("tiny-random-llama", device="cpu", dtype="float32")
    ref_stats = collect_statistics(ref.model, ref.tokenizer, data, batch_size=2, progress=False)
    ref_scores = compute_scores(ref.model, ref_stats, "fluctuation", space)
    a, b = scores.flat(), ref_scores.flat()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    gens = generate(lm.model, lm.tokenizer, ["Hello?"], config=GenerationConfig(max_new_tokens=4), progress=False)
    assert gens[0].new_tokens > 0


def test_bf16_through_the_cli(tmp_path, capsys) -> None:
    from ssah.cli import main

    out = tmp_path / "u"
    args = ["units", "tiny-random-llama", "--out", str(out), "--dtype", "bfloat16", "--device", "cpu"]
    assert main([*args, "--limit", "4", "--no-progress"]) == 0, capsys.readouterr().err
    from safetensors import safe_open

    with safe_open(str(out / "scores" / "safety.safetensors"), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float64 for k in f.keys())
