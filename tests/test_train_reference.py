"""``train_model`` against an independent plain-torch loop of the same recipe: the same losses and weights, bit for bit.

The reference below is written from the documented recipe, not from the package: the data order (a
``randperm`` per epoch seeded with ``seed * 1_000_003 + epoch``), the response-token cross-entropy summed over
an optimizer step and divided by that step's response tokens, AdamW, gradient-norm clipping, the linear decay
of ``transformers.get_scheduler`` ((T - s) / T without warmup), frozen units masked in the gradient and put
back after each step, and LoRA adapters from a ``peft.LoraConfig`` built here. When the package's loop, its
accelerate plumbing or its schedule drifts from that recipe (or from what it computed before the package was
split), the weights stop matching.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ssah.arch import get_adapter
from ssah.categorize import categorize
from ssah.data import Example, PromptSet, collate, encode_set
from ssah.interventions import unit_param_masks
from ssah.models import model_fingerprint
from ssah.tiny import build_tiny_model
from ssah.training import TrainConfig, resolve_unit_spec, train_model
from ssah.units import UnitSet, UnitSpace

DATA = PromptSet(
    "toy",
    "memory",
    (
        Example("What is 2 + 2?", "2 + 2 = 4."),
        Example("Say hello.", "Hello there!"),
        Example("What colour is the sky?", "The sky is blue."),
        Example("Name the capital of France.", "Paris is the capital of France."),
    )
    * 3,
)
SEED, LR, BATCH, ACCUM, STEPS, DECAY, CLIP = 5, 1e-2, 2, 2, 6, 0.1, 1.0


def reference_loop(
    model: torch.nn.Module, tok: Any, masks: dict[str, torch.Tensor] | None = None
) -> tuple[list[float], torch.nn.Module]:
    """Plain torch: the recipe of ``ssah.training`` written out, on every parameter that requires a gradient."""
    enc = encode_set(tok, DATA, max_length=512)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=DECAY)
    micro_per_epoch = math.ceil(len(enc) / BATCH)
    steps_per_epoch = math.ceil(micro_per_epoch / ACCUM)
    saved = {n: named[n].detach().clone() for n in masks or {}}
    losses = []
    model.train()
    for step in range(STEPS):
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(len(enc), generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch)).tolist()
        micro = [order[m * BATCH : (m + 1) * BATCH] for m in range(k * ACCUM, min((k + 1) * ACCUM, micro_per_epoch))]
        count = sum(sum(enc[i].response_mask) for mb in micro for i in mb)
        for group in opt.param_groups:
            group["lr"] = LR * max(0.0, (STEPS - step) / STEPS)
        total = 0.0
        for mb in micro:
            batch = collate([enc[i] for i in mb], tok.pad_token_id, padding_side="right")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            ce = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum")
            (ce / count).backward()
            total += float(ce.detach().double())
        for name, mask in (masks or {}).items():
            named[name].grad[mask] = 0.0  # type: ignore[index]
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        with torch.no_grad():
            for name, mask in (masks or {}).items():
                named[name][mask] = saved[name][mask]  # weight decay moved them
        opt.zero_grad(set_to_none=True)
        losses.append(total / count)
    model.eval()
    return losses, model


def config(**kw: Any) -> TrainConfig:
    return TrainConfig(
        model="tiny-random-llama",
        seed=SEED,
        lr=LR,
        batch_size=BATCH,
        grad_accum=ACCUM,
        max_steps=STEPS,
        weight_decay=DECAY,
        max_grad_norm=CLIP,
        schedule="linear",
        **kw,
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = build_tiny_model("llama")
    space = UnitSpace.from_groups(get_adapter(model).groups(), "neuron", model_fingerprint(model))
    g = torch.Generator().manual_seed(1)
    s, u = torch.rand(space.total, generator=g), torch.rand(space.total, generator=g)
    path = tmp_path_factory.mktemp("units") / "units.safetensors"
    categorize(s, u, space=space, shares={"scu": 0.05, "ucu": 0.1, "ru": 0.2}).save(path)
    return path


def test_full_fine_tuning_matches_a_plain_torch_loop() -> None:
    model, tok = build_tiny_model("llama")
    res = train_model(model, tok, DATA, config(), progress=False)
    ref, _ = build_tiny_model("llama")
    losses, ref = reference_loop(ref, tok)
    assert res.losses == losses
    assert [r["lr"] for r in res.log] == pytest.approx([LR * (STEPS - s) / STEPS for s in range(STEPS)], rel=1e-12)
    assert same_weights(model, ref)


def test_frozen_units_match_a_plain_torch_loop_with_masked_gradients(units: Path) -> None:
    model, tok = build_tiny_model("llama")
    frozen: UnitSet = resolve_unit_spec(f"{units}:SCU,UCU", model)
    res = train_model(model, tok, DATA, config(), freeze=frozen, progress=False)
    ref, _ = build_tiny_model("llama")
    losses, ref = reference_loop(ref, tok, masks=unit_param_masks(ref, frozen))
    assert res.losses == losses and res.frozen_max_drift == 0.0
    assert same_weights(model, ref)


def test_lora_matches_a_plain_torch_loop_on_a_peft_model() -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = build_tiny_model("llama")
    res = train_model(model, tok, DATA, config(lora="r=4,alpha=8,dropout=0.1"), progress=False)
    ref, _ = build_tiny_model("llama")
    for p in ref.parameters():
        p.requires_grad_(False)
    torch.manual_seed(SEED)  # the adapters' initialisation and their dropout draw from the seeded generator
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(ref, lora)
    losses, peft_model = reference_loop(peft_model, tok)
    merged = peft_model.merge_and_unload()  # type: ignore[operator]
    assert res.losses == losses
    assert same_weights(model, merged)
