"""``bf16`` (mixed precision) is one option on every model-run config, and each recipe hands it to the generation
and training it runs (a recipe that dropped it would silently run fp32)."""

from __future__ import annotations

from typing import Any

import pytest


def _configs() -> list[tuple[str, Any, list[str]]]:
    from ssah.recipes.ablate.run import AblateConfig
    from ssah.recipes.budget.run import BudgetConfig
    from ssah.recipes.direction.run import DirectionConfig
    from ssah.recipes.eval.run import EvalConfig
    from ssah.recipes.protect.run import ProtectConfig
    from ssah.recipes.transfer.run import TransferConfig

    return [
        ("ablate", AblateConfig, ["eval.greedy"]),
        ("budget", BudgetConfig, ["eval.greedy", "train_config:full", "train_config:ru"]),
        ("direction", DirectionConfig, ["eval.greedy"]),
        ("eval", EvalConfig, ["generation"]),
        ("protect", ProtectConfig, ["train_config:full", "train_config:lora"]),
        ("transfer", TransferConfig, ["train_config"]),
    ]


@pytest.mark.parametrize("name", ["ablate", "budget", "direction", "eval", "protect", "transfer"])
@pytest.mark.parametrize("bf16", [False, True])
def test_recipes_hand_bf16_to_generation_and_training(name: str, bf16: bool) -> None:
    _, cls, getters = next(c for c in _configs() if c[0] == name)
    cfg = cls(model="tiny-random-llama", bf16=bf16)
    for getter in getters:
        method, _, arg = getter.partition(":")
        # a recipe's generation is its eval section's decoding under the run's settings
        greedy = method == "eval.greedy"
        built = cfg.eval.greedy(cfg) if greedy else getattr(cfg, method)(*([arg] if arg else []))
        assert built.bf16 is bf16, f"{name}.{getter} dropped bf16"


def test_align_hands_bf16_to_its_training_and_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssah.recipes.align import run as align

    seen: dict[str, Any] = {}
    monkeypatch.setattr(align, "train_model", lambda model, tok, mix, tcfg, **kw: seen.setdefault("train", tcfg))
    align.safety_sft(align.AlignConfig(model="tiny-random-llama", bf16=True), None, None, None)  # type: ignore[arg-type]
    assert seen["train"].bf16 is True


def test_every_bf16_training_run_on_one_model_autocasts() -> None:
    """accelerate marks a model it prepared and skips it the next time; the trainer clears the mark, so a second
    and third run on the same model (protect's settings, budget's conditions) are mixed precision too."""
    import torch

    from ssah.data import Example, PromptSet
    from ssah.measure import restored_weights
    from ssah.tiny import build_tiny_model
    from ssah.training import TrainConfig, train_model

    model, tok = build_tiny_model("llama")
    data = PromptSet("toy", "memory", (Example("What is 2 + 2?", "2 + 2 = 4."), Example("Say hello.", "Hello!")) * 2)
    seen: list[torch.dtype] = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        for bf16 in (True, False, True):
            seen.clear()
            cfg = TrainConfig(model="tiny", max_steps=1, batch_size=2, bf16=bf16)
            with restored_weights(model):
                train_model(model, tok, data, cfg, progress=False)
            assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}, f"run with bf16={bf16}"
    finally:
        handle.remove()


@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)],
)
def test_native_bf16_reads_the_cpu_flags(flags: set[str], native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 is native only with AVX512-BF16 or AMX; an AVX2-only CPU (or unreadable flags) gets fp32."""
    from ssah import models

    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    models.native_bf16.cache_clear()
    try:
        assert models.native_bf16("cpu") is native
        assert models.resolve_bf16(None, "cpu") is native  # auto follows the hardware
        assert models.resolve_bf16(True, "cpu") is True and models.resolve_bf16(False, "cpu") is False  # forced wins
    finally:
        models.native_bf16.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_demo_bf16_defaults_to_the_hardware(native: bool, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's default (auto) runs bf16 only where the device runs it natively; --no-bf16 still forces fp32."""
    import json

    from ssah import models
    from ssah.cli import main

    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "native_bf16", lambda device="auto": native)
    for args, want in (([], native), (["--no-bf16"], False)):
        out = tmp_path / f"demo{len(args)}"
        argv = ["demo", "--model", "tiny-random-llama", "--out", str(out), "--stages", "eval-base", *args]
        assert main(argv) == 0
        assert json.loads((out / "demo.json").read_text())["bf16"] is want
