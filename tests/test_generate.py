"""Batched generation on tiny models: equal to one-at-a-time, order, prefill, EOS, length, sampling, errors."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from tokenizers import processors

from ssah.data import format_chat
from ssah.errors import ModelError, UserError
from ssah.generate import (
    Generation,
    GenerationConfig,
    encode_prompt,
    eos_token_ids,
    generate,
    prompt_texts,
)
from ssah.hooks import attach
from ssah.tiny import build_tiny_model, tiny_tokenizer

PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon and a knight who met at noon by the river.",
    "What is 2+2?",
    "Why?",
    "List three fruits, please, and say which one is the sweetest of them all.",
    "Ok",
    "Explain photosynthesis briefly.",
]


def one_by_one(model: Any, tok: Any, prompts: list[str], config: GenerationConfig, **kw: Any) -> list[Generation]:
    """The reference: each prompt generated alone (batch of one, no padding)."""
    return [generate(model, tok, [p], config=config, progress=False, **kw)[0] for p in prompts]


def greedy_ids(model: Any, tok: Any, text: str, steps: int) -> list[int]:
    """Plain argmax decoding without HF generate, for a single formatted text."""
    ids = torch.tensor([encode_prompt(tok, text)])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@contextmanager
def eos_after(model: Any, stop_ids: set[int], eos: int) -> Iterator[None]:
    """Make the model emit EOS right after any token in ``stop_ids`` (a deterministic stop rule per row)."""
    last: dict[str, torch.Tensor] = {}

    def record(module: Any, args: tuple[Any, ...]) -> None:
        last["ids"] = args[0][:, -1]

    def push(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        hit = torch.tensor([int(t) in stop_ids for t in last["ids"]])
        out = out.clone()
        out[hit, -1, eos] += 1e4
        return out

    emb = model.get_input_embeddings()
    handles = [emb.register_forward_pre_hook(record)]
    try:
        with attach(model, post={"lm_head": push}):
            yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2", "gpt_neox"])
def test_batched_equals_one_at_a_time(family: str) -> None:
    model, tok = build_tiny_model(family)
    config = GenerationConfig(max_new_tokens=10, batch_size=3)
    batched = generate(model, tok, PROMPTS, config=config, progress=False)
    assert batched == one_by_one(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=1))
    assert [g.prompt for g in batched] == PROMPTS
    assert all(g.prefill == "" and 1 <= g.new_tokens <= 10 for g in batched)


def test_greedy_is_plain_argmax_whatever_the_hub_config(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = build_tiny_model("llama")
    gc = model.generation_config  # a hub config that would sample, penalise repetition and cap the length
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty, gc.max_length = True, 0.2, 0.9, 5, 1.5, 30
    hf_logger = logging.getLogger("transformers")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = generate(model, tok, PROMPTS[:3], config=GenerationConfig(max_new_tokens=8), progress=False)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    for g in out:
        ids = greedy_ids(model, tok, format_chat(tok, g.prompt), 8)
        assert g.output == tok.decode(ids, skip_special_tokens=True).rstrip()


def test_order_preserved_with_duplicates_and_many_batches(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    prompts = [PROMPTS[i % len(PROMPTS)] for i in (3, 1, 1, 0, 4, 3, 6, 2)]
    out = generate(model, tok, prompts, config=GenerationConfig(max_new_tokens=4, batch_size=3), progress=False)
    assert [g.prompt for g in out] == prompts
    assert out[1] == out[2] and out[0] == out[5]


def test_empty_prompt_list(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    assert generate(model, tok, [], progress=False) == []


def test_prefill_is_seen_and_output_is_the_continuation(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    prefill = "Sure, here is"
    config = GenerationConfig(max_new_tokens=8, batch_size=4)
    out = generate(model, tok, PROMPTS, config=config, prefill=prefill, progress=False)
    plain = generate(model, tok, PROMPTS, config=config, progress=False)
    assert all(g.prefill == prefill for g in out)
    assert [g.output for g in out] != [g.output for g in plain]
    for g in out:  # same as greedy decoding from the prompt text with the prefill appended
        ids = greedy_ids(model, tok, format_chat(tok, g.prompt) + prefill, 8)
        assert g.output == tok.decode(ids, skip_special_tokens=True).rstrip()
    assert prompt_texts(tok, ["a"], [prefill], None)[0].endswith("<|im_start|>assistant\n" + prefill)


def test_prefill_per_prompt_and_batched(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    prefills = ["Sure", "", "Step 1:", "No", "I", "Here", "OK so"]
    config = GenerationConfig(max_new_tokens=6, batch_size=4)
    out = generate(model, tok, PROMPTS, config=config, prefill=prefills, progress=False)
    assert [g.prefill for g in out] == prefills
    ref = [
        generate(model, tok, [p], config=config, prefill=f, progress=False)[0]
        for p, f in zip(PROMPTS, prefills, strict=True)
    ]
    assert out == ref
    with pytest.raises(UserError, match="prefills for"):
        generate(model, tok, PROMPTS, config=config, prefill=["a", "b"], progress=False)


def test_stops_on_eos_at_once(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def favour_eos(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., eos] += 1e4
        return out

    with attach(model, post={"lm_head": favour_eos}):
        out = generate(model, tok, PROMPTS, config=GenerationConfig(max_new_tokens=20), progress=False)
    assert all(g.finished and g.new_tokens == 1 and g.output == "" for g in out)


def test_rows_finishing_at_different_steps(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    stop = set(range(0, 256, 7))
    config = GenerationConfig(max_new_tokens=24, batch_size=4)
    with eos_after(model, stop, eos):
        batched = generate(model, tok, PROMPTS, config=config, progress=False)
        single = one_by_one(model, tok, PROMPTS, GenerationConfig(max_new_tokens=24, batch_size=1))
    assert batched == single
    lengths = {g.new_tokens for g in batched}
    assert len(lengths) >= 2  # rows really stopped at different steps, so padding after EOS was exercised
    for g in batched:
        assert g.new_tokens <= 24
        assert g.finished or g.new_tokens == 24
    assert any(g.finished for g in batched) and any(g.output for g in batched if g.finished)


def test_max_new_tokens_respected(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    for n in (1, 3):
        out = generate(model, tok, PROMPTS, config=GenerationConfig(max_new_tokens=n), progress=False)
        assert all(g.new_tokens == n or (g.finished and g.new_tokens < n) for g in out)
        assert all(g.new_tokens <= n for g in out)


def test_sampling_reproducible_per_seed_and_leaves_global_rng(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama

    def run(seed: int) -> list[str]:
        config = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, seed=seed, batch_size=4)
        return [g.output for g in generate(model, tok, PROMPTS, config=config, progress=False)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = run(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert run(1) == a
    assert run(2) != a
    greedy = [g.output for g in generate(model, tok, PROMPTS, config=GenerationConfig(max_new_tokens=12))]
    assert a != greedy


def test_bf16_autocasts_decoding_and_leaves_the_weights(tiny_llama: tuple[Any, Any]) -> None:
    """``bf16=True`` runs the decoding matmuls in bf16 under autocast; the weights stay as loaded (fp32), and
    without it every matmul is fp32."""
    model, tok = tiny_llama
    seen: list[torch.dtype] = []

    def record(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        seen.append(out.dtype)

    with attach(model, post={"lm_head": record}):
        plain = generate(model, tok, ["hi there"], config=GenerationConfig(max_new_tokens=3), progress=False)
        assert set(seen) == {torch.float32}
        seen.clear()
        mixed = generate(model, tok, ["hi there"], config=GenerationConfig(max_new_tokens=3, bf16=True), progress=False)
    assert set(seen) == {torch.bfloat16} and mixed[0].new_tokens >= 1 and plain[0].new_tokens >= 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_flag_restored() -> None:
    model, tok = build_tiny_model("gpt2")
    model.train()
    generate(model, tok, ["hi"], config=GenerationConfig(max_new_tokens=2), progress=False)
    assert model.training
    model.eval()
    generate(model, tok, ["hi"], config=GenerationConfig(max_new_tokens=2), progress=False)
    assert not model.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"do_sample": True, "temperature": 0.0}, "temperature must be above 0"),
        ({"do_sample": True, "top_p": 0.0}, "top_p must be in"),
        ({"do_sample": True, "top_p": 1.5}, "top_p must be in"),
    ],
)
def test_config_errors(tiny_llama: tuple[Any, Any], kwargs: dict[str, Any], message: str) -> None:
    model, tok = tiny_llama
    config = GenerationConfig(**kwargs)
    with pytest.raises(UserError, match=message) as err:
        config.check()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=message):
        generate(model, tok, ["hi"], config=config, progress=False)


def test_greedy_ignores_sampling_settings() -> None:
    GenerationConfig(temperature=0.0, top_p=5.0).check()  # unused without sampling: no error


def test_a_single_string_or_a_non_generative_model_is_refused(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    with pytest.raises(UserError, match="not one string"):
        generate(model, tok, "hello", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="cannot generate text"):
        generate(torch.nn.Linear(2, 2), tok, ["hello"], progress=False)


def test_eos_ids_include_end_of_turn_of_the_template(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    tok = tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"  # a base tokenizer given the ChatML template: <|im_end|> still ends a turn
    ids = eos_token_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert len(ids) == len(set(ids))


def bos_adding_tokenizer(template: str | None) -> Any:
    """The tiny tokenizer, but prepending BOS like Llama's (and with the given chat template)."""
    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    tok.chat_template = template
    assert tok("a")["input_ids"][0] == bos  # the tokenizer really adds BOS by default
    return tok


def test_special_tokens_not_doubled_or_added() -> None:
    chatml = tiny_tokenizer()  # ChatML: no BOS in the template, none added by the tokenizer
    text = format_chat(chatml, "hi")
    assert encode_prompt(chatml, text) == chatml(text, add_special_tokens=False)["input_ids"]

    no_bos_template = bos_adding_tokenizer(None)  # fallback template lacks BOS: added once
    text = format_chat(no_bos_template, "hi")
    ids = encode_prompt(no_bos_template, text)
    assert ids[0] == no_bos_template.bos_token_id and ids[1] != no_bos_template.bos_token_id
    assert ids[1:] == no_bos_template(text, add_special_tokens=False)["input_ids"]

    bos_template = bos_adding_tokenizer("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    text = format_chat(bos_template, "hi")  # template writes BOS: not doubled
    ids = encode_prompt(bos_template, text)
    assert ids[0] == bos_template.bos_token_id and ids.count(bos_template.bos_token_id) == 1


def test_generate_with_bos_tokenizer_matches_single(tiny_llama: tuple[Any, Any]) -> None:
    model, _ = tiny_llama
    tok = bos_adding_tokenizer(None)
    config = GenerationConfig(max_new_tokens=5, batch_size=4)
    out = generate(model, tok, PROMPTS[:5], config=config, progress=False)
    assert out == one_by_one(model, tok, PROMPTS[:5], GenerationConfig(max_new_tokens=5, batch_size=1))


def test_system_prompt_reaches_the_model(tiny_llama: tuple[Any, Any]) -> None:
    model, tok = tiny_llama
    base = generate(model, tok, PROMPTS[:3], config=GenerationConfig(max_new_tokens=8), progress=False)
    config = GenerationConfig(max_new_tokens=8, system="You are a pirate.")
    with_system = generate(model, tok, PROMPTS[:3], config=config, progress=False)
    assert [g.output for g in base] != [g.output for g in with_system]
    ids = greedy_ids(model, tok, format_chat(tok, PROMPTS[0], system="You are a pirate."), 8)
    assert with_system[0].output == tok.decode(ids, skip_special_tokens=True).rstrip()


def test_scoring_encoding_matches_generation_encoding_for_bos_tokenizers() -> None:
    from ssah.data import Example, encode_example

    for template in (None, "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"):
        tok = bos_adding_tokenizer(template)
        enc = encode_example(tok, Example("hi"))
        assert enc.input_ids == encode_prompt(tok, format_chat(tok, "hi"))
        assert enc.input_ids.count(tok.bos_token_id) == 1
        assert not enc.prompt_mask[0] and not enc.response_mask[0]


def test_prompts_are_cut_to_fit_the_context() -> None:
    from ssah.tiny import build_tiny_model

    model, tok = build_tiny_model("gpt2")  # absolute positions: overflowing them is an index error
    limit = model.config.n_positions
    long_prompt = "word " * limit
    out = generate(model, tok, [long_prompt, "hi"], config=GenerationConfig(max_new_tokens=8), progress=False)
    assert len(out) == 2 and all(g.new_tokens <= 8 for g in out)
    with pytest.raises(UserError, match="lower --max-new-tokens"):
        generate(model, tok, ["hi"], config=GenerationConfig(max_new_tokens=limit), progress=False)
