"""`ssah export`: the exported folder, loaded by plain transformers, computes what the in-memory edit computes
(zero and mean ablation, orthogonalisation with tied embeddings); bad input exits 2 and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from ssah.cli import main
from ssah.direction import ablated_direction, load_direction
from ssah.export import fold_ablation, with_reader_biases
from ssah.interventions import ablate, space_of
from ssah.models import load_model
from ssah.tiny import build_tiny_model
from ssah.units import UnitSet

TEXT = "Tell me about bread, please."
FAST_DIRECTION = [
    "--quick",
    "--train",
    "6",
    "--val",
    "4",
    "--eval-limit",
    "4",
    "--eval-max-new-tokens",
    "4",
    "--kl-tokens",
    "3",
]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _logits(model, tok) -> torch.Tensor:
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def _some_units(model, seed=0) -> UnitSet:
    space = space_of(model)
    g = torch.Generator().manual_seed(seed)
    return UnitSet(space, torch.rand(space.total, generator=g) < 0.2, "some")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_zero_fold_equals_hook(family):
    model, tok = build_tiny_model(family, seed=1)
    units = _some_units(model)
    with ablate(model, units, mode="zero"):
        want = _logits(model, tok)
    fold_ablation(model, units, mode="zero")
    torch.testing.assert_close(_logits(model, tok), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_fold_equals_hook_and_survives_from_pretrained(family, tmp_path):
    model, tok = build_tiny_model(family, seed=2)
    units = _some_units(model, seed=3)
    g = torch.Generator().manual_seed(4)
    means = {grp.key: torch.randn(grp.size, generator=g, dtype=torch.float64) for grp in _groups(model)}
    with ablate(model, units, mode="mean", means=means):
        want = _logits(model, tok)
    edited = with_reader_biases(model) if family == "llama" else model
    fold_ablation(edited, units, mode="mean", means=means)
    edited.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(back, tok), want, atol=1e-5, rtol=1e-5)


def _groups(model):
    from ssah.arch import get_adapter

    return get_adapter(model).groups()


def test_mean_fold_refused_where_the_family_has_no_bias_flag():
    from ssah.errors import UserError

    model, _tok = build_tiny_model("qwen2")
    with pytest.raises(UserError, match="--mode zero"):
        with_reader_biases(model)


def test_cli_export_ablate_and_orthogonalize(tmp_path: Path, capsys) -> None:
    units_dir = tmp_path / "u"
    code, _, err = run(["units", "tiny-random-llama", "--out", str(units_dir), "--limit", "4", "--no-progress"], capsys)
    assert code == 0, err
    lm = load_model("tiny-random-llama", device="cpu")
    from ssah.arch import get_adapter
    from ssah.units import UnitSpace, load_unit_sets

    space = UnitSpace.from_groups(get_adapter(lm.model).groups(), "neuron", lm.fingerprint, lm.name)
    scu = load_unit_sets(units_dir / "units.safetensors", space, names=["SCU"])["SCU"]
    out = tmp_path / "edited"
    scu_spec = f"{units_dir}/units.safetensors:SCU"
    assert len(scu) > 0
    code, _, err = run(["export", "tiny-random-llama", "--ablate", scu_spec, "--out", str(out)], capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "SCU" in (out / "README.md").read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with ablate(lm.model, scu, mode="zero"):
        want = _logits(lm.model, lm.tokenizer)
    torch.testing.assert_close(_logits(back, lm.tokenizer), want, atol=1e-5, rtol=1e-5)

    # existing folder without --overwrite: exit 2, the folder untouched
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(["export", "tiny-random-llama", "--ablate", scu_spec, "--out", str(out)], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert (out / "model.safetensors").read_bytes() == before

    # orthogonalised weights of a direction run
    d = tmp_path / "d"
    code, _, err = run(["direction", "tiny-random-llama", "--out", str(d), *FAST_DIRECTION, "--no-progress"], capsys)
    assert code == 0, err
    out2 = tmp_path / "ortho"
    code, _, err = run(["export", "tiny-random-llama", "--orthogonalize", str(d), "--out", str(out2)], capsys)
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(out2, dtype=torch.float32).eval()
    saved = load_direction(d)
    with ablated_direction(lm.model, saved.direction):
        want = _logits(lm.model, lm.tokenizer)
    torch.testing.assert_close(_logits(back, lm.tokenizer), want, atol=1e-4, rtol=1e-4)

    # a direction of another model, a unit file of another model: exit 2, nothing written
    for args in (
        ["export", "tiny-random-qwen2", "--orthogonalize", str(d)],
        ["export", "tiny-random-qwen2", "--ablate", f"{units_dir}/units.safetensors:SCU"],
        ["export", "tiny-random-llama", "--ablate", f"{units_dir}/units.safetensors:NOPE"],
        ["export", "tiny-random-llama", "--orthogonalize", str(tmp_path)],
        ["export", "tiny-random-llama"],
    ):
        bad = tmp_path / "bad"
        code, _, err = run([*args, "--out", str(bad)], capsys)
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (args, err)
        assert not bad.exists()


def test_orthogonalized_export_of_tied_model(tmp_path: Path) -> None:
    """GPT-2 ties its embeddings (as SmolLM2 does): the export unties them and matches the hooks."""
    from ssah.direction import Selection, orthogonal_weights, save_direction, tied_embeddings
    from ssah.export import export_model
    from ssah.models import model_fingerprint

    model, tok = build_tiny_model("gpt2", seed=5)
    assert tied_embeddings(model)
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    lm = load_model(str(src), device="cpu")
    r = torch.randn(lm.model.config.n_embd, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sel = Selection(layer=1, position=-1, direction=r, passed_filter=True,
                    candidates=[{"layer": 1, "position": -1, "bypass": 0.0, "induce": 0.0, "kl": 0.0}])  # fmt: skip
    d = tmp_path / "d"
    d.mkdir()
    save_direction(d, sel, fingerprint=lm.fingerprint, model_name=str(src))
    out = export_model(str(src), tmp_path / "out", orthogonalize=str(d))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with ablated_direction(lm.model, load_direction(d).direction):
        want = _logits(lm.model, tok)
    torch.testing.assert_close(_logits(back, tok), want, atol=1e-4, rtol=1e-4)
    assert model_fingerprint(lm.model) == lm.fingerprint and orthogonal_weights  # the source is left as it was
