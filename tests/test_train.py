"""Training loop on tiny models: response-only loss, frozen / units-only / LoRA training, exact resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from ssah.arch import get_adapter
from ssah.categorize import categorize, load_categorization
from ssah.cli import main
from ssah.data import Example, PromptSet, collate, encode_set
from ssah.errors import DataError, UnitFileError, UserError
from ssah.interventions import unit_param_masks
from ssah.measure import safety_ranking
from ssah.models import model_fingerprint
from ssah.recipes.train.run import save_trained_model
from ssah.scoring import Scores
from ssah.tiny import build_tiny_model
from ssah.training import (
    DataPlan,
    TrainConfig,
    fsdp_requested,
    parse_lora,
    parse_unit_spec,
    partial_dir,
    resolve_unit_spec,
    response_loss,
    train_model,
    unit_spec_selection,
)
from ssah.units import UnitSpace

EXAMPLES = (
    Example("What is 2 + 2?", "2 + 2 = 4."),
    Example("Say hello.", "Hello there!"),
    Example("What colour is the sky?", "The sky is blue."),
    Example("Name the capital of France.", "Paris is the capital of France."),
)
DATA = PromptSet("toy", "memory", EXAMPLES * 3)


def cfg(**kw: Any) -> TrainConfig:
    base: dict[str, Any] = {"model": "tiny-random-llama", "lr": 3e-3, "batch_size": 4, "schedule": "constant"}
    return TrainConfig(**{**base, **kw})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def unit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A unit file and safety scores for tiny-random-llama (random scores, categorised by the ssah rule)."""
    model, _ = build_tiny_model("llama")
    groups = get_adapter(model).groups()
    space = UnitSpace.from_groups(groups, "neuron", model_fingerprint(model), "tiny-random-llama")
    g = torch.Generator().manual_seed(1)
    safety = {sh.key: torch.rand(sh.size, generator=g, dtype=torch.float64) for sh in space.shapes}
    utility = {sh.key: torch.rand(sh.size, generator=g, dtype=torch.float64) for sh in space.shapes}
    s = Scores(space, safety, "fluctuation", 1, "x")
    u = Scores(space, utility, "fluctuation", 1, "x")
    cats = categorize(s, u, shares={"scu": 0.05, "ucu": 0.1, "ru": 0.2})
    root = tmp_path_factory.mktemp("units")
    (root / "scores").mkdir()
    s.save(root / "scores" / "safety.safetensors")
    u.save(root / "scores" / "utility.safetensors")
    cats.save(root / "units.safetensors")
    return root / "units.safetensors"


# -- pieces ---------------------------------------------------------------------------------------------------
def test_parse_unit_spec_and_lora() -> None:
    path, items = parse_unit_spec("runs/u/units.safetensors:SCU,CU@0.06")
    assert path == Path("runs/u/units.safetensors")
    assert [(i.category, i.share, i.of) for i in items] == [("SCU", None, "all"), ("CU", 0.06, "all")]
    (cu,) = parse_unit_spec("u.safetensors:CU@6%cu")[1]
    assert (cu.share, cu.of) == (pytest.approx(0.06), "category")
    for bad in ("u.safetensors", "u.safetensors:", "u.safetensors:CU@0", "u:CU@150%", "u:XYZ@1%", "u:CU@x"):
        with pytest.raises(UserError):
            parse_unit_spec(bad)
    lora = parse_lora("r=4,alpha=8,dropout=0.1,targets=q_proj+v_proj")
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (4, 8.0, 0.1, ["q_proj", "v_proj"])
    assert parse_lora("16").r == 16
    with pytest.raises(UserError):
        parse_lora("rank=4")


def test_unit_spec_share_of_all_units_vs_of_cu(unit_file: Path) -> None:
    """``CU@25%`` takes 25% of ALL units from CU (the paper's "SCU + 6%" reading), ``CU@25%cu`` 25% of CU, both
    the top of CU by the categorisation's own safety ranking (normalised I_S - I_U)."""
    model, _ = build_tiny_model("llama")
    scu = resolve_unit_spec(f"{unit_file}:scu", model)
    cu = resolve_unit_spec(f"{unit_file}:CU", model)
    of_all = unit_spec_selection(f"{unit_file}:CU@25%", model)
    of_cu = resolve_unit_spec(f"{unit_file}:CU@25%cu", model)
    total = cu.space.total
    assert len(of_all.units) == round(0.25 * total) and of_all.counts == {"CU@25%": round(0.25 * total)}
    assert len(of_cu) == round(0.25 * len(cu)) < len(of_all.units)
    assert len(of_all.units & cu) == len(of_all.units) and len(of_cu & cu) == len(of_cu)
    assert resolve_unit_spec(f"{unit_file}:SCU,CU@0.25", model) == scu | of_all.units
    rank = safety_ranking(
        load_categorization(unit_file, cu.space),
        *(Scores.load(unit_file.parent / "scores" / f"{w}.safetensors", cu.space) for w in ("safety", "utility")),
    )
    assert rank[of_all.units.mask].min() >= rank[(cu - of_all.units).mask].max()  # the top of CU by safety rank
    assert of_cu.mask.logical_and(~of_all.units.mask).sum() == 0  # the smaller cut is inside the larger one
    summary = of_all.summary()
    assert summary["count"] == len(of_all.units) and summary["share_of_units"] == pytest.approx(0.25, abs=1 / total)


def test_unit_spec_needs_scores_for_a_share(unit_file: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "units.safetensors"
    shutil.copy(unit_file, bare)
    model, _ = build_tiny_model("llama")
    assert len(resolve_unit_spec(f"{bare}:SCU", model)) > 0  # whole categories need no scores
    with pytest.raises(UnitFileError, match="scores"):
        resolve_unit_spec(f"{bare}:SCU,CU@6%", model)


def test_train_cli_records_unit_shares(unit_file: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["train", "tiny-random-llama", "--data", str(data_file), "--max-steps", "1", *FAST]
    assert main([*common, "--out", str(out), "--freeze", f"{unit_file}:SCU,CU@6%"]) == 0
    res = json.loads((out / "results.json").read_text())
    fr, tr = res["freeze"], res["trainable"]
    total = round(fr["units"] / fr["share_of_units"])
    assert fr["parts"]["CU@6%"] == round(0.06 * total)
    assert fr["units"] == sum(fr["parts"].values()) and 0.06 < fr["share_of_units"] < 0.2
    assert fr["params"] == tr["total"] - tr["params"] > 0 and fr["share_of_params"] == pytest.approx(1 - tr["share"])


def test_data_plan_is_deterministic_and_covers_each_epoch() -> None:
    _, tok = build_tiny_model("llama")
    enc = encode_set(tok, DATA)
    a = DataPlan(enc, batch_size=4, grad_accum=2, seed=3, max_steps=7)
    b = DataPlan(enc, batch_size=4, grad_accum=2, seed=3, max_steps=7)
    assert a.steps_per_epoch == 2 and a.total_steps == 7
    assert [a.step(s) for s in range(7)] == [b.step(s) for s in range(7)]
    epoch0 = sorted(i for s in range(2) for mb in a.step(s) for i in mb[0])
    assert epoch0 == list(range(12))
    assert a.order(0) != a.order(1)
    assert DataPlan(enc, batch_size=4, grad_accum=1, seed=0, epochs=2).total_steps == 6


def test_response_only_loss_matches_manual_cross_entropy() -> None:
    model, tok = build_tiny_model("llama")
    enc = encode_set(tok, DATA[:3])
    batch = collate(enc, tok.pad_token_id, padding_side="right")
    loss, count = response_loss(model, batch)
    expected, n = torch.zeros((), dtype=torch.float64), 0
    for e in enc:
        ids = torch.tensor([e.input_ids])
        logits = model(input_ids=ids).logits[0].double()
        for t in range(1, len(e.input_ids)):
            if e.response_mask[t]:  # only response tokens are predicted; prompt and padding never count
                expected += F.cross_entropy(logits[t - 1 : t], ids[0, t : t + 1], reduction="sum")
                n += 1
    assert count == n == sum(sum(e.response_mask) for e in enc)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    # what the model predicts after prompt tokens (and after the last token) does not matter: noise there is ignored,
    # and the vocabulary projection runs only at the columns that predict a response token in some row
    predicts_response = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_response[:, :-1] = batch["labels"][:, 1:] != -100
    cols = predicts_response.any(dim=0).nonzero().flatten()
    assert 0 < cols.numel() < batch["labels"].shape[1]
    widths: list[int] = []

    def perturb(_m: torch.nn.Module, _args: Any, logits: torch.Tensor) -> torch.Tensor:
        widths.append(logits.shape[1])
        mask = predicts_response if logits.shape[1] == predicts_response.shape[1] else predicts_response[:, cols]
        noise = 10 * torch.randn(*logits.shape, generator=torch.Generator().manual_seed(0))
        return logits + noise * (~mask).unsqueeze(-1)

    handle = model.lm_head.register_forward_hook(perturb)
    try:
        assert torch.equal(response_loss(model, batch)[0], loss)
        assert widths == [cols.numel()]
    finally:
        handle.remove()


# -- training modes -------------------------------------------------------------------------------------------
def test_full_training_lowers_the_loss() -> None:
    model, tok = build_tiny_model("llama")
    res = train_model(model, tok, DATA, cfg(max_steps=20), progress=False)
    assert res.steps == 20 and len(res.losses) == 20
    assert res.final_loss < 0.5 * res.first_loss
    assert res.trainable == {"params": res.trainable["total"], "total": res.trainable["total"], "share": 1.0}
    assert all({"step", "loss", "lr", "step_seconds", "tokens"} <= r.keys() for r in res.log)
    assert not model.training  # the mode it came in with


def test_freeze_embeddings_cosine_warmup_and_bf16() -> None:
    model, tok = build_tiny_model("llama")
    before = params(model)
    settings = cfg(max_steps=4, freeze_embeddings=True, schedule="cosine", warmup=1, bf16=True)
    res = train_model(model, tok, DATA, settings, progress=False)
    after = params(model)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # untied head trains
    lrs = [r["lr"] for r in res.log]
    assert lrs[0] < lrs[1] == pytest.approx(3e-3) and lrs[1] > lrs[2] > lrs[3] > 0
    assert all(p.requires_grad for p in model.parameters())  # flags given back
    assert "forward" not in model.__dict__  # no autocast wrapper left on the model
    assert model.lm_head(torch.zeros(1, 64)).dtype == torch.float32


def test_freeze_keeps_unit_slices_bit_identical_under_weight_decay(unit_file: Path) -> None:
    model, tok = build_tiny_model("llama")
    units = resolve_unit_spec(f"{unit_file}:SCU,CU@0.25", model)
    masks = unit_param_masks(model, units)
    before = params(model)
    res = train_model(model, tok, DATA, cfg(max_steps=5, lr=1e-2, weight_decay=0.1), freeze=units, progress=False)
    after = params(model)
    for name, mask in masks.items():
        assert torch.equal(after[name][mask], before[name][mask]), name
        assert not torch.equal(after[name][~mask], before[name][~mask]), name
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    frozen = sum(int(m.sum()) for m in masks.values())
    assert res.trainable["params"] == res.trainable["total"] - frozen
    assert res.frozen_max_drift == 0.0


def test_only_trains_unit_slices_and_saves_a_plain_model(unit_file: Path, tmp_path: Path) -> None:
    model, tok = build_tiny_model("llama")
    units = resolve_unit_spec(f"{unit_file}:RU", model)
    masks = unit_param_masks(model, units)
    before = params(model)
    res = train_model(model, tok, DATA, cfg(max_steps=5, lr=1e-2, weight_decay=0.1), only=units, progress=False)
    after = params(model)
    assert after.keys() == before.keys()  # deltas merged: the original parameter names
    for name in before:
        mask = masks.get(name, torch.zeros_like(before[name], dtype=torch.bool))
        assert torch.equal(after[name][~mask], before[name][~mask]), name
        if name in masks:
            assert not torch.equal(after[name][mask], before[name][mask]), name
    assert res.trainable["params"] == sum(int(m.sum()) for m in masks.values())
    assert 0 < res.trainable["share"] < 0.5
    folder = save_trained_model(model, tok, tmp_path / "model")
    assert (folder / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([encode_set(tok, DATA[:1])[0].input_ids])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_trains_and_merges_into_a_plain_model(tmp_path: Path) -> None:
    model, tok = build_tiny_model("llama")
    before = params(model)
    res = train_model(model, tok, DATA, cfg(max_steps=15, lr=1e-2, lora="r=4,alpha=8,dropout=0.0"), progress=False)
    assert res.final_loss < res.first_loss
    assert res.model is model and type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert params(model).keys() == before.keys()
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert 0 < res.trainable["share"] < 0.2
    plain = AutoModelForCausalLM.from_pretrained(save_trained_model(model, tok, tmp_path / "m"))
    ids = torch.tensor([encode_set(tok, DATA[:1])[0].input_ids])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_train_model_rejects_bad_input_and_leaves_the_model_alone(unit_file: Path) -> None:
    model, tok = build_tiny_model("llama")
    before = params(model)
    scu, ru = resolve_unit_spec(f"{unit_file}:SCU", model), resolve_unit_spec(f"{unit_file}:RU", model)
    with pytest.raises(UserError, match="not both"):
        train_model(model, tok, DATA, cfg(max_steps=1), freeze=scu, only=ru)
    with pytest.raises(DataError, match="empty"):
        train_model(model, tok, PromptSet("none", "memory", ()), cfg(max_steps=1))
    for lr in (0.0, -1e-5):  # the config refuses a learning rate that is not positive (or nan) before any training
        with pytest.raises(ValidationError, match="greater than 0"):
            cfg(max_steps=1, lr=lr)
    with pytest.raises(ValidationError, match="finite"):
        cfg(max_steps=1, lr=float("nan"))
    with pytest.raises(UserError, match="is empty"):
        train_model(model, tok, DATA, cfg(max_steps=1), only=ru - ru)
    with pytest.raises(UserError, match="LoRA"):
        train_model(model, tok, DATA, cfg(max_steps=1, lora="r=4"), freeze=scu)
    other, _ = build_tiny_model("mistral")
    with pytest.raises(UnitFileError, match="another model"):  # same layout, other weights
        resolve_unit_spec(f"{unit_file}:SCU", other, fingerprint=model_fingerprint(other))
    with pytest.raises(UserError, match="unknown category 'XYZ'"):
        resolve_unit_spec(f"{unit_file}:XYZ", model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_fsdp_flag_in_one_process_trains_unsharded_and_reads_accelerate_env(monkeypatch) -> None:
    plain, tok = build_tiny_model("llama")
    flagged, _ = build_tiny_model("llama")
    a = train_model(plain, tok, DATA, cfg(max_steps=2), progress=False)
    b = train_model(flagged, tok, DATA, cfg(max_steps=2, fsdp=True), progress=False)
    assert b.fsdp is False and b.summary()["fsdp"] is False and a.losses == b.losses
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), flagged.parameters(), strict=True))
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested(cfg()) and fsdp_requested(cfg(fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested(cfg())
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="FSDP2 only"):
        fsdp_requested(cfg())


class Killed(Exception):
    """Stands in for a kill after a checkpoint."""


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_resume_reaches_the_same_weights(mode: str, tmp_path: Path) -> None:
    extra: dict[str, Any] = {"lora": "r=4,dropout=0.2"} if mode == "lora" else {"weight_decay": 0.1}
    settings = cfg(max_steps=6, batch_size=2, grad_accum=2, warmup=2, schedule="linear", checkpoint_every=3, **extra)
    ref, tok = build_tiny_model("llama")
    ref_res = train_model(ref, tok, DATA, settings, progress=False)

    run = tmp_path / "run.partial"
    first, _ = build_tiny_model("llama")

    def kill(record: dict[str, Any]) -> None:
        if record["step"] == 4:  # one step past the checkpoint at 3: its log line must be dropped on resume
            raise Killed

    with pytest.raises(Killed):
        train_model(first, tok, DATA, settings, run_dir=run, progress=False, on_step=kill)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-3"]

    resumed, _ = build_tiny_model("llama")
    res = train_model(resumed, tok, DATA, settings.model_copy(update={"resume": True}), run_dir=run, progress=False)
    assert res.resumed_from == 3
    got, want = params(resumed), params(ref)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == ref_res.losses
    with pytest.raises(UserError, match="started with lr"):
        other, _ = build_tiny_model("llama")
        train_model(other, tok, DATA, settings.model_copy(update={"resume": True, "lr": 1e-3}), run_dir=run)


# -- CLI ------------------------------------------------------------------------------------------------------
FAST = ["--no-progress", "--max-length", "128", "--batch-size", "4", "--lr", "3e-3"]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in EXAMPLES * 2))
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_run_folder(tmp_path: Path, unit_file: Path, data_file: Path, capsys) -> None:
    out = tmp_path / "ft"
    args = ["train", "tiny-random-llama", "--data", str(data_file), "--freeze", f"{unit_file}:SCU,CU@0.06", "--fsdp"]
    code, stdout, err = run([*args, "--max-steps", "4", "--checkpoint-every", "2", "--out", str(out), *FAST], capsys)
    assert code == 0, err
    for rel in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "train_log.jsonl"):
        assert (out / rel).is_file(), rel
    for rel in ("results.json", "config.yaml", "manifest.json", "report.md"):
        assert (out / rel).is_file(), rel
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-4"]
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "freeze" and res["steps"] == 4 and res["final_loss"] < res["first_loss"]
    assert 0 < res["trainable"]["share"] < 1 and res["freeze"]["units"] > 0 and res["frozen_max_drift"] == 0.0
    assert res["settings"]["lr"] == 3e-3
    assert res["settings"]["fsdp"] is True and res["fsdp"] is False  # asked for, but one process trains unsharded
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert "trained tiny-random-llama (freeze)" in stdout and "wrote" in stdout
    assert not partial_dir(out).exists()
    AutoModelForCausalLM.from_pretrained(out / "model")


def test_cli_resume_after_a_kill(tmp_path: Path, data_file: Path, capsys, monkeypatch) -> None:
    import ssah.recipes.train.run as recipe

    common = ["train", "tiny-random-llama", "--data", str(data_file), "--max-steps", "4", "--checkpoint-every", "2"]
    code, _, err = run([*common, "--out", str(tmp_path / "ref"), *FAST], capsys)
    assert code == 0, err

    real = recipe.train_model

    def killed_at_3(*a: Any, **kw: Any) -> Any:
        def on_step(record: dict[str, Any]) -> None:
            if record["step"] == 3:
                raise KeyboardInterrupt

        return real(*a, **kw, on_step=on_step)

    monkeypatch.setattr(recipe, "train_model", killed_at_3)
    out = tmp_path / "ft"
    code, _, err = run([*common, "--out", str(out), *FAST], capsys)
    assert code == 130 and not out.exists() and (partial_dir(out) / "checkpoints" / "step-2").is_dir()
    code, _, err = run([*common, "--out", str(out), *FAST], capsys)  # no --resume: refuses to clobber
    assert code == 2 and "--resume" in err
    monkeypatch.setattr(recipe, "train_model", real)
    code, _, err = run([*common, "--out", str(out), "--resume", *FAST], capsys)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["resumed_from"] == 2
    a = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_cli_lora_and_only(tmp_path: Path, unit_file: Path, data_file: Path, capsys) -> None:
    base = ["train", "tiny-random-llama", "--data", str(data_file), "--max-steps", "2", *FAST]
    code, _, err = run([*base, "--lora", "r=4", "--out", str(tmp_path / "lora")], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "lora" / "results.json").read_text())
    assert res["mode"] == "lora" and res["lora"]["r"] == 4 and res["trainable"]["share"] < 0.2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in n for n in model.state_dict())
    code, _, err = run([*base, "--only", f"{unit_file}:RU", "--out", str(tmp_path / "ru")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ru" / "results.json").read_text())["mode"] == "only"


def _bad_cases(unit_file: Path, data_file: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty.jsonl").write_text("")
    units = str(unit_file)
    d = ["--data", str(data_file)]
    return {
        "other model": (["tiny-random-mistral", *d, "--freeze", f"{units}:SCU"], "another model"),
        "unknown category": (["tiny-random-llama", *d, "--freeze", f"{units}:XYZ@1%"], "unknown category 'XYZ'"),
        "share too large": (["tiny-random-llama", *d, "--only", f"{units}:CU@150%"], "outside (0, 1]"),
        "empty data": (["tiny-random-llama", "--data", str(tmp / "empty.jsonl")], "no rows"),
        "no responses": (["tiny-random-llama", "--data", "builtin:harmful"], "response"),
        "freeze and only": (["tiny-random-llama", *d, "--freeze", f"{units}:SCU", "--only", f"{units}:RU"], "not both"),
        "lr zero": (["tiny-random-llama", *d, "--lr", "0"], "'lr'"),
        "lr negative": (["tiny-random-llama", *d, "--lr", "-1e-5"], "'lr'"),
        "lora and freeze": (["tiny-random-llama", *d, "--lora", "r=4", "--freeze", f"{units}:SCU"], "--lora"),
        "lora and only": (["tiny-random-llama", *d, "--lora", "r=4", "--only", f"{units}:RU"], "--lora"),
        "bad lora": (["tiny-random-llama", *d, "--lora", "rank=4"], "LoRA setting"),
        "nothing to resume": (["tiny-random-llama", *d, "--resume"], "nothing to resume"),
        "bad spec": (["tiny-random-llama", *d, "--freeze", units], "unit spec"),
    }


CASES = [
    "other model",
    "unknown category",
    "share too large",
    "empty data",
    "no responses",
    "freeze and only",
    "lr zero",
    "lr negative",
    "lora and freeze",
    "lora and only",
    "bad lora",
    "nothing to resume",
    "bad spec",
]


@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input(case: str, tmp_path: Path, unit_file: Path, data_file: Path, capsys) -> None:
    args, needle = _bad_cases(unit_file, data_file, tmp_path)[case]
    out = tmp_path / "outs" / "ft"
    code, _, err = run(["train", *args, "--max-steps", "1", "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "outs").exists()  # nothing written, not even a staging folder
