"""Models spread over devices by accelerate's big-model dispatch give the same results as on one device.

On a CPU-only machine the only split there is is CPU + disk offload: blocks mapped to ``disk`` keep their weights
in a folder and hold meta tensors between forward passes, which is what every path (statistics, reader norms,
ablation hooks, fingerprints, generation) must cope with on a multi-GPU machine too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssah.cli import main
from ssah.data import Example, PromptSet
from ssah.errors import ModelError
from ssah.generate import GenerationConfig, generate
from ssah.inference import model_device
from ssah.interventions import ablate, space_of
from ssah.models import is_dispatched, load_model, parse_max_memory, resolve_device_map
from ssah.scoring import score_units
from ssah.units import UnitSet

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
PROMPTS = ["What is two plus two?", "Name a colour.", "Write one word about the sea, please, in a short reply."]


def calib() -> PromptSet:
    return PromptSet(
        "toy", "memory:toy", tuple(Example(f"Question {i}: {i} + {i * 3}?" + " ok" * i, f"{4 * i}") for i in range(6))
    )


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch) -> None:
    """Temporary offload folders (made in the cache when no --offload-folder is given) go to a test folder."""
    monkeypatch.setenv("SSAH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def single():
    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload")
    return load_model("tiny-random-llama", device_map=SPLIT, offload_folder=str(folder))


def test_split_model_is_offloaded(split) -> None:
    assert is_dispatched(split.model)
    o_proj = split.model.get_submodule("model.layers.1.self_attn.o_proj")
    assert o_proj.weight.device.type == "meta"  # really offloaded: nothing in memory between passes
    assert model_device(split.model) == torch.device("cpu")


def test_same_scores_fingerprint_and_logits(single, split) -> None:
    assert split.fingerprint == single.fingerprint
    for metric in ("fluctuation", "wanda", "magnitude"):
        a = score_units(single.model, single.tokenizer, calib(), metric=metric, batch_size=2, progress=False)
        b = score_units(split.model, split.tokenizer, calib(), metric=metric, batch_size=2, progress=False)
        assert a.tokens == b.tokens > 0
        for key in a.values:
            assert b.values[key].dtype == torch.float64 and b.values[key].device.type == "cpu"
            assert torch.equal(a.values[key], b.values[key]), (metric, key)


def test_same_greedy_samples(single, split) -> None:
    cfg = GenerationConfig(max_new_tokens=12, batch_size=2)
    a = generate(single.model, single.tokenizer, PROMPTS, config=cfg, progress=False)
    b = generate(split.model, split.tokenizer, PROMPTS, config=cfg, progress=False)
    assert [g.output for g in a] == [g.output for g in b]
    assert all(g.new_tokens > 0 for g in b)


def test_ablation_on_dispatched_model(single, split) -> None:
    space = space_of(single.model)
    units = UnitSet.from_indices(space, list(range(0, space.total, 4)), "every-4th")
    ids = torch.tensor([[1, 5, 9, 33, 70, 100, 7]])
    with torch.no_grad():
        base = split.model(ids).logits
        with ablate(single.model, units):
            ref = single.model(ids).logits
        with ablate(split.model, units):
            got = split.model(ids).logits
        after = split.model(ids).logits
    assert torch.equal(ref, got)
    assert not torch.equal(base, got)  # the ablation did something
    assert torch.equal(base, after)  # and was undone


def test_auto_map_with_max_memory_offloads_to_disk(single, tmp_path: Path) -> None:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(single.model)
    budget = sizes[""] - sizes["model.layers.1"] // 2  # everything but about half a block fits on the CPU
    lm = load_model(
        "tiny-random-llama", device_map="auto", max_memory={"cpu": budget}, offload_folder=str(tmp_path / "o")
    )
    dmap = lm.model.hf_device_map
    assert "disk" in dmap.values() and "cpu" in dmap.values()
    cfg = GenerationConfig(max_new_tokens=8, batch_size=3)
    a = generate(single.model, single.tokenizer, PROMPTS, config=cfg, progress=False)
    b = generate(lm.model, lm.tokenizer, PROMPTS, config=cfg, progress=False)
    assert [g.output for g in a] == [g.output for g in b]


def test_folder_model_loads_through_transformers_with_a_map(single, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    single.model.save_pretrained(folder)
    single.tokenizer.save_pretrained(folder)
    lm = load_model(str(folder), device_map=SPLIT)
    assert lm.model.get_submodule("model.layers.0.mlp.down_proj").weight.device.type == "meta"
    a = score_units(single.model, single.tokenizer, calib(), batch_size=3, progress=False)
    b = score_units(lm.model, lm.tokenizer, calib(), batch_size=3, progress=False)
    assert all(torch.equal(a.values[k], b.values[k]) for k in a.values)


def test_units_cli_split_equals_single_device(tmp_path: Path, capsys) -> None:
    fast = ["--limit", "6", "--no-progress", "--max-length", "96"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    assert main(["units", "tiny-random-llama", "--out", str(tmp_path / "one"), *fast]) == 0
    code = main(
        [
            "units",
            "tiny-random-llama",
            "--out",
            str(tmp_path / "two"),
            "--device-map",
            str(map_file),
            "--offload-folder",
            str(tmp_path / "off"),
            *fast,
        ]
    )
    assert code == 0, capsys.readouterr().err
    one, two = load_file(tmp_path / "one" / "units.safetensors"), load_file(tmp_path / "two" / "units.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    cfg = (tmp_path / "two" / "config.yaml").read_text()
    assert "device_map" in cfg


def test_parse_max_memory() -> None:
    assert parse_max_memory("cpu=2GiB, disk=1MB") == {"cpu": 2 * 2**30, "disk": 10**6}
    assert parse_max_memory(None) is None
    for bad in ("cpu", "cpu=lots", "cpu=-1GB", "=1GB"):
        with pytest.raises(ModelError):
            parse_max_memory(bad)


def test_explicit_map_must_cover_every_weight(single) -> None:
    with pytest.raises(ModelError, match="every weight"):
        resolve_device_map(single.model, {"model.layers": "cpu"})
    with pytest.raises(ModelError, match="does not have"):
        resolve_device_map(single.model, {"": "cpu", "model.nope": "cpu"})
    with pytest.raises(ModelError, match="whole model on disk"):
        resolve_device_map(single.model, {"": "disk"})


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device-map", "MAP"], "does not exist"),  # the map names cuda:3
        (["--device-map", "auto", "--max-memory", "cpu=1KiB"], "one decoder block"),
        (["--device-map", "auto", "--max-memory", "7=1GiB"], "does not exist"),
        (["--max-memory", "cpu=1GiB"], "--device-map"),
        (["--device-map", "nosuch.json"], "JSON file"),
        (["--device-map", "auto", "--device", "cpu"], "not both"),
    ],
)
def test_bad_placement_is_one_line_exit_2(args: list[str], needle: str, tmp_path: Path, capsys) -> None:
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({**SPLIT, "model.layers.1": "cuda:3"}))
    args = [str(bad_map) if a == "MAP" else a for a in args]
    out = tmp_path / "run"
    code = main(["units", "tiny-random-llama", "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()


def _drop_volatile(obj):
    """results.json without timings, times and where it ran (what legitimately differs between two runs)."""
    if isinstance(obj, dict):
        return {
            k: _drop_volatile(v)
            for k, v in obj.items()
            if k not in ("seconds", "device", "created", "time", "out", "run_dir", "path")
        }
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def test_ablate_cli_split_equals_single_device(tmp_path: Path, capsys) -> None:
    fast = ["--quick", "--eval-limit", "3", "--eval-max-new-tokens", "4", "--calibration-limit", "6", "--dose", "5%"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    assert main(["ablate", "tiny-random-llama", "--out", str(tmp_path / "one"), "--no-progress", *fast]) == 0
    args = ["--device-map", str(map_file), "--no-progress", *fast]
    code = main(["ablate", "tiny-random-llama", "--out", str(tmp_path / "two"), *args])
    assert code == 0, capsys.readouterr().err
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert _drop_volatile(one) == _drop_volatile(two)


def test_eval_cli_split_equals_single_device(tmp_path: Path, capsys) -> None:
    fast = ["--limit", "4", "--max-new-tokens", "6", "--no-progress", "--batch-size", "3"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    assert main(["eval", "tiny-random-llama", "--out", str(tmp_path / "one"), *fast]) == 0
    code = main(["eval", "tiny-random-llama", "--out", str(tmp_path / "two"), "--device-map", str(map_file), *fast])
    assert code == 0, capsys.readouterr().err
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert _drop_volatile(one) == _drop_volatile(two)
    samples = [(tmp_path / d / "samples.jsonl").read_text() for d in ("one", "two")]
    assert samples[0] == samples[1] and samples[0]


def test_freezing_on_a_dispatched_model_is_exact() -> None:
    """Every block behind accelerate's device hooks (as on several GPUs): frozen slices stay bit-identical and the
    rest trains exactly as without dispatch."""
    from accelerate import dispatch_model

    from ssah.interventions import freeze_units

    def trained(dispatched: bool) -> dict[str, torch.Tensor]:
        lm = load_model("tiny-random-llama", device="cpu")
        model = lm.model
        if dispatched:
            cpu_map = {k: "cpu" for k in SPLIT}
            model = dispatch_model(model, cpu_map, main_device="cpu", force_hooks=True)
            assert hasattr(model.model.layers[0], "_hf_hook")
        space = space_of(model)
        units = UnitSet.from_indices(space, list(range(0, space.total, 7)), "every-7th")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        ids = torch.tensor([[1, 5, 9, 33, 70, 100, 7, 8]])
        model.train()
        with freeze_units(model, units) as frozen:
            for _ in range(3):
                model(ids, labels=ids).loss.backward()
                opt.step()
                frozen.restore()
                opt.zero_grad()
            assert frozen.max_drift() == 0.0
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    plain, hooked = trained(False), trained(True)
    assert plain.keys() == hooked.keys() and all(torch.equal(plain[k], hooked[k]) for k in plain)


def test_freezing_offloaded_weights_is_a_clear_error(split) -> None:
    from ssah.errors import UserError
    from ssah.interventions import freeze_units

    space = space_of(split.model)
    with pytest.raises(UserError, match="offloaded"):
        freeze_units(split.model, UnitSet.from_indices(space, [0, 1], "two"))


def test_probe_cli_split_equals_single_device(tmp_path: Path, capsys) -> None:
    fast = ["--quick", "--limit", "4", "--bootstrap", "200", "--no-progress"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(SPLIT))
    assert main(["probe", "tiny-random-llama", "--out", str(tmp_path / "one"), *fast]) == 0
    code = main(["probe", "tiny-random-llama", "--out", str(tmp_path / "two"), "--device-map", str(map_file), *fast])
    assert code == 0, capsys.readouterr().err
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert _drop_volatile(one) == _drop_volatile(two)


def test_commands_without_placement_refuse_it() -> None:
    from ssah.errors import UserError
    from ssah.recipes.units.run import UnitsConfig
    from ssah.training import TrainConfig

    assert UnitsConfig.build({"model": "m", "device_map": "auto", "max_memory": "cpu=1GiB"}).device_map == "auto"
    with pytest.raises(UserError, match="only apply to units, eval, probe and ablate"):
        TrainConfig.build({"model": "m", "device_map": "auto"})


def test_temporary_offload_folder_is_removed_with_the_model(tmp_path: Path) -> None:
    import gc

    lm = load_model("tiny-random-llama", device_map=SPLIT)  # no offload folder: a temporary one in the cache
    folders = list((tmp_path / "cache" / "offload").iterdir())
    assert len(folders) == 1 and any(folders[0].iterdir())
    del lm
    gc.collect()
    assert not folders[0].exists()
