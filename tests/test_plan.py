"""`ssah info --plan`: parameter memory of real configs (written here, no weights, no network) against counts
computed by hand from the architecture, and the plan's arithmetic and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssah.cli import main
from ssah.errors import ModelError
from ssah.plan import BYTES, config_from_dict, model_shape, plan, plan_needs

# config.json of each model as published (the fields that shape the network).
LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
QWEN25_7B = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}
GEMMA2_9B = {
    "model_type": "gemma2",
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "max_position_embeddings": 8192,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
    "tie_word_embeddings": True,
}


def hand_count(c: dict, *, qkv_bias: bool = False, norms_per_layer: int = 2) -> int:
    """Parameters of a Llama-style decoder from its config, by hand: embeddings (+ an untied head), per block
    q / k / v / o and gate / up / down projections, biases, RMSNorm weights, and the final norm."""
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // heads
    emb = c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2)
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + ((heads * d + 2 * kv * d) if qkv_bias else 0)
    mlp = 3 * h * i
    return emb + n * (attn + mlp + norms_per_layer * h) + h


CASES = {
    # published totals: 8.03B, 70.6B, 7.62B, 9.24B
    "llama3-8b": (LLAMA3_8B, hand_count(LLAMA3_8B), 8_030_261_248),
    "llama3-70b": (LLAMA3_70B, hand_count(LLAMA3_70B), 70_553_706_496),
    "qwen2.5-7b": (QWEN25_7B, hand_count(QWEN25_7B, qkv_bias=True), 7_615_616_512),
    "gemma2-9b": (GEMMA2_9B, hand_count(GEMMA2_9B, norms_per_layer=4), 9_241_705_984),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    config, by_hand, published = CASES[request.param]
    return request.param, config, model_shape(config_from_dict(config)), by_hand, published


def test_parameter_memory_within_5_percent_of_hand_count(case) -> None:
    name, _config, shape, by_hand, published = case
    assert by_hand == published, name  # the hand formula reproduces the published size
    for dtype, nbytes in BYTES.items():
        weights = next(n for n in plan_needs(shape, dtype) if n.command == "units").weights
        assert abs(weights - by_hand * nbytes) <= 0.05 * by_hand * nbytes, (name, dtype)
    assert shape.params == by_hand  # in fact exact: the meta model has exactly these parameters


def test_shapes_and_units(case) -> None:
    name, config, shape, _, _ = case
    heads = config["num_attention_heads"]
    d = config.get("head_dim") or config["hidden_size"] // heads
    assert shape.layers == config["num_hidden_layers"]
    assert shape.units == shape.layers * (heads * d + config["intermediate_size"])
    assert shape.tied_embeddings == config["tie_word_embeddings"]
    # readers (o, down) and writers (v, gate, up) of the units
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"]
    expected = shape.layers * (heads * d * h + h * kv * d + 3 * h * i)
    if name == "qwen2.5-7b":
        expected += shape.layers * kv * d  # v bias
    assert shape.unit_params == expected


def test_needs_arithmetic(case) -> None:
    _, _, shape, _, _ = case
    bf16 = {n.command: n for n in plan_needs(shape, "bfloat16", batch_size=4)}
    f32 = {n.command: n for n in plan_needs(shape, "float32", batch_size=4)}
    assert f32["units"].weights == 2 * bf16["units"].weights
    full, lora, only = bf16["train-full"], bf16["train-lora"], bf16["train-only"]
    assert full.optimizer == 2 * full.gradients == 2 * shape.params * 2
    assert lora.optimizer < only.optimizer < full.optimizer
    assert bf16["train-frozen"].fixed > full.fixed
    assert bf16["units"].statistics == 2 * shape.units * 3 * 8
    for n in bf16.values():
        assert n.total == n.fixed + 4 * n.per_row
    assert full.per_row > bf16["units"].per_row  # training keeps every block's activations


def test_seventy_b_weights_fit_one_h200_only_in_bf16() -> None:
    shape = model_shape(config_from_dict(LLAMA3_70B))
    f32, bf16 = (plan_needs(shape, d, batch_size=1)[0] for d in ("float32", "bfloat16"))  # [0]: units
    assert bf16.weights < 139 * 2**30 < f32.weights  # 131.4 GiB vs 262.8 GiB against an H200's 139 GiB


def test_cli_plan_text_and_json(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA3_8B))
    assert main(["info", str(cfg), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "train-lora" in out and "bfloat16:" in out and "float32:" in out
    assert main(["info", str(cfg), "--plan", "--json", "--dtype", "bfloat16", "--batch-size", "2"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["shape"]["params"] == 8_030_261_248 and p["settings"]["batch_size"] == 2
    assert {n["dtype"] for n in p["needs"]} == {"bfloat16"}
    assert {n["command"] for n in p["needs"]} >= {"units", "eval", "ablate", "train-full", "train-lora"}


def test_plan_of_a_registry_model_matches_the_loaded_model() -> None:
    from ssah.models import load_model

    p = plan("tiny-random-gemma2")
    lm = load_model("tiny-random-gemma2", device="cpu")
    assert p["shape"]["params"] == sum(t.numel() for t in lm.model.parameters())


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nosuch-folder/x/y", "--plan"], "no config"),
        (["CFG", "--plan", "--dtype", "int3"], "unknown dtype"),
        (["CFG", "--plan", "--batch-size", "0"], "at least 1"),
        (["NOTYPE", "--plan"], "model_type"),
    ],
)
def test_plan_bad_input(args: list[str], needle: str, tmp_path: Path, user_error) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA3_8B))
    notype = tmp_path / "notype.json"
    notype.write_text(json.dumps({"hidden_size": 8}))
    args = [str(cfg) if a == "CFG" else str(notype) if a == "NOTYPE" else a for a in args]
    user_error(["info", *args], needle)


def test_unknown_model_type() -> None:
    with pytest.raises(ModelError, match="model_type"):
        config_from_dict({"model_type": "no-such-arch"})
