"""The preference step (trl's DPOTrainer) on tiny models: it moves the policy toward chosen over rejected, and the
unit masks of every other fine-tune (frozen units, units only, LoRA) hold through it bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssah.arch import get_adapter
from ssah.data import Example, PromptSet
from ssah.interventions import unit_param_masks
from ssah.judges import get_judge
from ssah.tiny import build_tiny_model
from ssah.training import TrainConfig
from ssah.training.pairs import Pair, encode_pair, preference_pairs, refusal_openers
from ssah.training.preference import DpoSection, preference_step
from ssah.units import UnitSet, UnitSpace

PAIRS = [
    Pair("Say hello.", "Hello there!", "I can't help with that.", "safe"),
    Pair("What is 2 + 2?", "2 + 2 = 4.", "Sorry, I won't answer.", "safe"),
    Pair("Hurt someone.", "I can't help with that.", "Sure, here is how.", "harmful"),
    Pair("Name a colour.", "Blue.", "I must decline.", "safe"),
]


def cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**{"model": "tiny-random-llama", "max_length": 128, **kw})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def margin(model: Any, tok: Any) -> float:
    """Mean over the pairs of log p(chosen) - log p(rejected) (what DPO raises relative to the reference)."""
    total = 0.0
    for p in PAIRS:
        row = encode_pair(tok, p, system=None, max_length=128, bos_id=None)
        assert row is not None
        logps = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([row["prompt_ids"] + row[side]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            start = len(row["prompt_ids"]) - 1
            logps.append(float(logits[start:].gather(-1, ids[0, 1 + start :, None]).sum()))
        total += logps[0] - logps[1]
    return total / len(PAIRS)


def some_units(model: Any) -> UnitSet:
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron")
    return UnitSet.from_indices(space, torch.arange(0, space.total, 3), "every third")


def test_dpo_step_prefers_chosen_and_hands_back_a_plain_model() -> None:
    model, tok = build_tiny_model("llama")
    pad = model.config.pad_token_id
    before = margin(model, tok)
    res = preference_step(model, tok, PAIRS, cfg(), DpoSection(steps=6, lr=1e-3, batch_size=4, beta=0.1))
    assert res.steps == 6 and len(res.losses) == 6 and res.examples == 4
    assert res.losses[-1] < res.losses[0]  # the DPO loss falls
    assert margin(model, tok) > before + 1.0  # chosen over rejected, by log-likelihood
    assert res.log[-1]["rewards/accuracies"] == 1.0
    # nothing of the trainer is left on the model: its own forward, its config, training flags
    assert "forward" not in model.__dict__ and model.config.pad_token_id == pad
    assert all(p.requires_grad for p in model.parameters())
    assert res.trainable["share"] == 1.0


def test_frozen_units_stay_bit_identical_through_a_dpo_step() -> None:
    model, tok = build_tiny_model("llama")
    units = some_units(model)
    masks = unit_param_masks(model, units)
    before = params(model)
    dpo = DpoSection(steps=3, lr=1e-2, batch_size=2)
    res = preference_step(model, tok, PAIRS, cfg(weight_decay=0.1, freeze_embeddings=True), dpo, freeze=units)
    after = params(model)
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert not torch.equal(after[name][~mask], before[name][~mask]), name
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert res.frozen_max_drift == 0.0 and res.mode == "all"
    assert res.trainable["params"] < res.trainable["total"]


def test_units_only_dpo_moves_only_those_units_and_lora_merges() -> None:
    model, tok = build_tiny_model("llama")
    units = some_units(model)
    masks = unit_param_masks(model, units)
    before = params(model)
    res = preference_step(model, tok, PAIRS, cfg(weight_decay=0.1), DpoSection(steps=3, lr=1e-2), only=units)
    after = params(model)
    assert after.keys() == before.keys()  # deltas merged: a plain model again
    for name in before:
        mask = masks.get(name, torch.zeros_like(before[name], dtype=torch.bool))
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    assert any(not torch.equal(after[n][m], before[n][m]) for n, m in masks.items())
    assert res.trainable["params"] == sum(int(m.sum()) for m in masks.values())
    lora_model, _ = build_tiny_model("llama")
    first = params(lora_model)
    res = preference_step(lora_model, tok, PAIRS, cfg(lora="r=4,dropout=0"), DpoSection(steps=3, lr=1e-2))
    assert params(lora_model).keys() == first.keys() and res.mode == "lora" and res.trainable["share"] < 0.5
    assert any(not torch.equal(params(lora_model)[n], first[n]) for n in first)


def test_bad_unit_sets_are_refused() -> None:
    from ssah.errors import UserError

    model, tok = build_tiny_model("llama")
    units = some_units(model)
    with pytest.raises(UserError, match="not both"):
        preference_step(model, tok, PAIRS, cfg(), DpoSection(steps=1), freeze=units, only=units)
    with pytest.raises(UserError, match="LoRA"):
        preference_step(model, tok, PAIRS, cfg(lora="r=4"), DpoSection(steps=1), freeze=units)


def test_pairs_refusal_over_the_models_own_reply_and_answer_over_a_refusal(tiny_llama) -> None:
    from ssah.generate import GenerationConfig

    model, tok = tiny_llama
    data = PromptSet(
        "mix",
        "memory",
        (
            Example("Hurt someone.", "I'm sorry, but I can't help with that. Violence is illegal.", "violence"),
            Example("What is arson?", "Arson is the crime of setting fire to property.", "borderline"),
            Example("Say hello.", "Hello there!", "chat"),
        ),
    )
    pairs, counts = preference_pairs(
        model,
        tok,
        data,
        {"Hurt someone."},
        judge=get_judge("keyword:ssah"),
        generation=GenerationConfig(max_new_tokens=4),
        seed=0,
    )
    assert counts["safe"] == 2 and counts["harmful"] + counts["harmful_already_refused"] == 1
    safe = [p for p in pairs if p.kind == "safe"]
    assert [p.chosen for p in safe] == ["Arson is the crime of setting fire to property.", "Hello there!"]
    assert {p.rejected for p in safe} == {"I'm sorry, but I can't help with that."}
    for p in pairs:
        if p.kind == "harmful":  # the random tiny model does not refuse: its own reply is the rejected side
            assert p.chosen.startswith("I'm sorry") and p.rejected != p.chosen
    assert refusal_openers(["No. Not ever.", "No. Again.", "I can't! Sorry."]) == ["No.", "I can't!"]
