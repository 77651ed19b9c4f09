"""`--batch-size auto`: start from the plan, halve on out-of-memory (faked here), remember the size, and say so in
one line when even 1 does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssah.cli import main
from ssah.errors import UserError
from ssah.generate import GenerationConfig, generate, generation_batch_size
from ssah.models import load_model
from ssah.plan import (
    auto_scoring_batch_size,
    batch_key,
    find_batch_size,
    model_shape,
    plan_needs,
    remembered_batch_sizes,
    start_from_plan,
)
from ssah.scoring import score_units

PROMPTS = [f"Question number {i}: what is {i} times {i + 1}?" + " Think." * (i % 4) for i in range(9)]


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake, for the test)")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def lm():
    return load_model("tiny-random-llama", device="cpu")


def test_halves_on_oom_and_remembers() -> None:
    tried: list[int] = []

    def run(b: int) -> str:
        tried.append(b)
        if b > 5:
            raise oom()
        return f"ok at {b}"

    assert find_batch_size(run, start=32, key="k") == (4, "ok at 4")
    assert tried == [32, 16, 8, 4]
    assert remembered_batch_sizes() == {"k": 4}
    tried.clear()
    assert find_batch_size(run, start=32, key="k")[0] == 4 and tried == [4]  # starts where it ended
    tried.clear()
    assert find_batch_size(run, start=2, key="k")[0] == 2 and tried == [2]  # never above the start


def test_other_errors_pass_through() -> None:
    def run(b: int) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_batch_size(run, start=8)


def test_even_one_does_not_fit_is_a_user_error() -> None:
    def run(b: int) -> None:
        raise oom()

    with pytest.raises(UserError, match="even 1"):
        find_batch_size(run, start=4, what="a generation batch")


def test_start_from_plan(lm) -> None:
    need = next(n for n in plan_needs(model_shape(lm.model.config), "float32", seq_len=100) if n.command == "units")
    fixed = need.statistics + need.gradients + need.optimizer
    assert start_from_plan(lm.model, "units", free=fixed + 10 * need.per_row, seq_len=100) == 8
    assert start_from_plan(lm.model, "units", free=fixed + need.per_row // 2, seq_len=100) == 1
    assert start_from_plan(lm.model, "units", free=2**50, seq_len=100) == 256


def test_generate_auto_resumes_after_oom_with_identical_greedy_output(lm, monkeypatch) -> None:
    model, tok = lm
    cfg = GenerationConfig(max_new_tokens=6, batch_size=1)
    reference = generate(model, tok, PROMPTS, config=cfg, progress=False)
    real = type(model).generate
    sizes: list[int] = []

    def fake(self, *args, **kwargs):
        rows = int(kwargs["input_ids"].shape[0])
        sizes.append(rows)
        if rows > 2:
            raise oom()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", fake)
    got = generate(model, tok, PROMPTS, config=GenerationConfig(max_new_tokens=6, batch_size="auto"), progress=False)
    assert [g.output for g in got] == [g.output for g in reference]
    assert sizes[0] > 2 and max(sizes[sizes.index(2) :]) == 2  # halved down to 2, then ran at 2
    assert list(remembered_batch_sizes().values()) == [2]


def test_generation_batch_size_probe(lm, monkeypatch) -> None:
    model, tok = lm
    real = type(model).generate

    def fake(self, *args, **kwargs):
        if int(kwargs["input_ids"].shape[0]) > 3:
            raise oom()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", fake)
    assert generation_batch_size(model, tok, PROMPTS, GenerationConfig(max_new_tokens=3, batch_size="auto")) == 2
    assert generation_batch_size(model, tok, PROMPTS, GenerationConfig(max_new_tokens=3, batch_size=5)) == 5


def test_scoring_auto_with_fake_oom(lm) -> None:
    from ssah.data import Example, PromptSet

    model, tok = lm
    data = PromptSet("toy", "memory:toy", tuple(Example(p, "Fine.") for p in PROMPTS))

    def limit(_m, args, kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise oom()

    handle = model.register_forward_pre_hook(limit, with_kwargs=True)
    try:
        size = auto_scoring_batch_size(model, tok, [data], max_length=128)
        assert size in (2, 3) and size == 2  # a power of two from the plan, halved below the limit
        key = batch_key(model, "units", max(len(t) for t in [tok(p)["input_ids"] for p in PROMPTS]))
        assert any(k.startswith("units|") for k in remembered_batch_sizes()) and key.startswith("units|")
        scores = score_units(model, tok, data, batch_size=size, progress=False)
        assert scores.tokens > 0
    finally:
        handle.remove()


def test_cli_auto_runs_and_records_the_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "u"
    args = ["units", "tiny-random-llama", "--out", str(out), "--limit", "4", "--no-progress", "--batch-size", "auto"]
    assert main(args) == 0, capsys.readouterr().err
    size = yaml.safe_load((out / "config.yaml").read_text())["batch_size"]
    assert isinstance(size, int) and size >= 1
    out = tmp_path / "e"
    args = ["eval", "tiny-random-llama", "--out", str(out), "--limit", "3", "--max-new-tokens", "3"]
    assert main([*args, "--utility", "none", "--no-progress", "--batch-size", "auto"]) == 0
    assert isinstance(yaml.safe_load((out / "config.yaml").read_text())["batch_size"], int)


def test_cli_auto_where_one_does_not_fit(tmp_path: Path, user_error, monkeypatch) -> None:
    from transformers import LlamaForCausalLM

    def fake(self, *args, **kwargs):
        raise oom()

    monkeypatch.setattr(LlamaForCausalLM, "generate", fake)
    out = tmp_path / "e"
    args = ["eval", "tiny-random-llama", "--out", str(out), "--limit", "3", "--max-new-tokens", "3"]
    user_error([*args, "--utility", "none", "--no-progress", "--batch-size", "auto"], "even 1")


@pytest.mark.parametrize("bad", ["0", "many", "-3"])
def test_bad_batch_size(bad: str, tmp_path: Path, user_error) -> None:
    user_error(["units", "tiny-random-llama", "--out", str(tmp_path / "u"), "--batch-size", bad], "'batch_size'")


def test_auto_is_the_default_on_gpus_only(lm, monkeypatch) -> None:
    import ssah.inference
    from ssah.plan import wants_auto_batch
    from ssah.recipes.eval.run import EvalConfig
    from ssah.recipes.units.run import UnitsConfig

    unset, given = UnitsConfig.build({"model": "m"}), UnitsConfig.build({"model": "m", "batch_size": 8})
    auto = EvalConfig.build({"model": "m", "batch_size": "auto"})
    assert not wants_auto_batch(unset, lm.model) and not wants_auto_batch(given, lm.model)  # CPU: as before
    assert wants_auto_batch(auto, lm.model)
    monkeypatch.setattr(ssah.inference, "model_device", lambda model: torch.device("cuda"))
    assert wants_auto_batch(unset, lm.model) and not wants_auto_batch(given, lm.model)  # GPU: auto unless given
