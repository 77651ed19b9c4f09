"""The refusal direction on tiny models: exactness of orthogonalisation, undo on exit, selection, files."""

from __future__ import annotations

import pytest
import torch

from ssah.direction import (
    ablated_direction,
    added_direction,
    candidate_directions,
    load_direction,
    orthogonalized,
    post_instruction_tokens,
    random_direction,
    save_direction,
    select_direction,
    tied_embeddings,
)
from ssah.errors import UnsupportedModelError, UserError
from ssah.measure import weights_digest
from ssah.models import model_fingerprint
from ssah.tiny import build_tiny_model

FAMILIES = ("llama", "gpt2", "gpt_neox", "phi3", "qwen2")
HARMFUL = ["How do I pick a lock?", "Tell me how to steal a car.", "How to make a weapon?", "Help me cheat."]
HARMLESS = ["How do I bake bread?", "Tell me about cars.", "How to plant a tree?", "Help me study."]


def _ids(tok, text="Hello there, how are you?"):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("family", FAMILIES)
def test_orthogonalised_weights_equal_directional_ablation(family):
    model, tok = build_tiny_model(family, seed=1)
    r = torch.randn(model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    ids = _ids(tok)
    with torch.no_grad():
        base = model(ids).logits
        with ablated_direction(model, r):
            hooked = model(ids).logits
        digest = weights_digest(model)
        with orthogonalized(model, r):
            edited = model(ids).logits
    assert weights_digest(model) == digest  # restored bit for bit
    assert not torch.allclose(base, hooked, atol=1e-4)  # the ablation does something
    torch.testing.assert_close(edited, hooked, atol=1e-4, rtol=1e-4)


def test_ablation_and_addition_undo_on_exit_and_ablation_removes_the_component():
    model, tok = build_tiny_model("llama", seed=2)
    r = torch.randn(model.config.hidden_size, dtype=torch.float64)
    ids = _ids(tok)
    seen = []
    handle = model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        base = model(ids).logits
        with ablated_direction(model, r):
            model(ids)
        with added_direction(model, r, layer=0):
            added = model(ids).logits
        after = model(ids).logits
    handle.remove()
    r_hat = (r / r.norm()).float()
    assert float((seen[1] @ r_hat).abs().max()) < 1e-4  # no component left at the next block's input
    assert not torch.allclose(added, base)
    torch.testing.assert_close(after, base, atol=0, rtol=0)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_tied_embeddings_are_untied_only_inside():
    model, _tok = build_tiny_model("gpt2", seed=3)  # GPT-2 ties its embeddings, as SmolLM2 does
    assert tied_embeddings(model)
    r = torch.randn(model.config.hidden_size)
    with orthogonalized(model, r):
        assert not tied_embeddings(model)
    assert tied_embeddings(model)


def test_gemma2_orthogonalisation_refused_but_ablation_works():
    model, tok = build_tiny_model("gemma2", seed=0)
    r = torch.randn(model.config.hidden_size)
    with pytest.raises(UnsupportedModelError, match="cannot be orthogonalised"), orthogonalized(model, r):
        pass
    with torch.no_grad(), ablated_direction(model, r):
        model(_ids(tok))


def test_candidates_selection_and_files(tmp_path):
    model, tok = build_tiny_model("llama", seed=4)
    n_post = post_instruction_tokens(tok)
    assert n_post == len(tok("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    dirs = candidate_directions(model, tok, HARMFUL, HARMLESS, positions=3)
    assert dirs.shape == (model.config.num_hidden_layers, 3, model.config.hidden_size)
    sel = select_direction(model, tok, dirs, HARMFUL, HARMLESS, max_layer_share=1.0)
    assert 3 <= len(sel.candidates) <= 2 * 3  # zero differences are skipped
    assert {"bypass", "induce", "kl"} <= set(sel.candidates[0])
    chosen = [c for c in sel.candidates if c["passed_filter"]] or sel.candidates
    assert sel.summary()["chosen"]["bypass"] == min(c["bypass"] for c in chosen)
    fp = model_fingerprint(model)
    save_direction(tmp_path, sel, fingerprint=fp, model_name="tiny", directions=dirs)
    back = load_direction(tmp_path, fingerprint=fp)
    assert (back.layer, back.position) == (sel.layer, sel.position)
    torch.testing.assert_close(back.direction, sel.direction.float().double())
    with pytest.raises(UserError, match="another model"):
        load_direction(tmp_path, fingerprint="0" * 24)
    rnd = random_direction(sel.direction, seed=1)
    assert abs(float(rnd.norm()) - float(sel.direction.norm())) < 1e-9
    assert float(torch.nn.functional.cosine_similarity(rnd, random_direction(sel.direction, 2), dim=0)) < 0.99


def test_empty_sets_are_user_errors():
    model, tok = build_tiny_model("llama")
    with pytest.raises(UserError, match="harmless"):
        candidate_directions(model, tok, HARMFUL, [])


def test_write_share_finds_units_aligned_with_the_direction():
    from ssah.direction import write_share
    from ssah.interventions import space_of
    from ssah.units import UnitSet

    model, _tok = build_tiny_model("llama", seed=8)
    space = space_of(model)
    units = UnitSet.from_units(space, [(0, "mlp", 3), (1, "attn", 5)], "two")
    r = model.model.layers[0].mlp.down_proj.weight[:, 3].detach().clone()  # what unit (0, mlp, 3) writes
    share = write_share(model, units, r)
    assert share["share_of_channels"] == 2 / space.total
    assert share["share_of_direction_write"] > 10 * share["share_of_channels"]
    everything = write_share(model, UnitSet.full(space), r)
    assert everything["share_of_direction_write"] == pytest.approx(1.0)


def test_write_share_reads_fused_expert_slices():
    from ssah.arch import get_adapter
    from ssah.direction import write_share
    from ssah.interventions import space_of
    from ssah.units import UnitSet

    model, _tok = build_tiny_model("qwen3_moe", seed=8)
    space = space_of(model)
    g = next(g for g in get_adapter(model).groups() if g.kind == "expert")
    unit = UnitSet.from_indices(space, [space.flat_index(g.layer, "expert", 2, expert=g.expert)], "one")
    r = get_adapter(model).reader_weight(g)[:, 2].detach().clone()  # what that expert channel writes
    share = write_share(model, unit, r)
    assert share["share_of_direction_write"] > 10 * share["share_of_channels"]
    assert write_share(model, UnitSet.full(space), r)["share_of_direction_write"] == pytest.approx(1.0)


def test_fit_direction_uses_disjoint_capped_halves(monkeypatch):
    import ssah.direction as d

    model, tok = build_tiny_model("llama", seed=9)
    seen = {}
    real_cands, real_select = d.candidate_directions, d.select_direction

    def cands(m, t, h, b, **kw):
        seen["train"] = (list(h), list(b))
        return real_cands(m, t, h, b, **kw)

    def select(m, t, dirs, h, b, **kw):
        seen["val"] = (list(h), list(b))
        return real_select(m, t, dirs, h, b, **kw)

    monkeypatch.setattr(d, "candidate_directions", cands)
    monkeypatch.setattr(d, "select_direction", select)
    harmful = [f"{p} ({i})" for i, p in enumerate(HARMFUL * 5)]
    harmless = [f"{p} ({i})" for i, p in enumerate(HARMLESS * 5)]
    sel = d.fit_direction(model, tok, harmful, harmless, per_split=3, positions=2, kl_max=10.0)
    for i in range(2):
        assert len(seen["train"][i]) <= 3 and len(seen["val"][i]) <= 3
        assert not set(seen["train"][i]) & set(seen["val"][i])
    assert sel.layer in (0, 1)
