"""Rows of the bad-input table (``tests/test_hostile.py``) for the surfaces of issue 31: direction and judge files,
overrides and config files, ``info --plan`` configs, locks, judge columns and folds, direction splits, export sets.

:func:`write_files` writes the damaged files once per module (under the table's world folder); ``CASES`` are
``(name, args(world), needle)`` rows like the table's own, one or more per cause of the issue.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# an alias bomb: 7 levels of 9 aliases each expand to 9**7 (4.8 million) strings from a few hundred bytes
_LEVELS = "abcdefg"
BOMB_FLOW = (
    "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol], "
    + ", ".join(f"&{b} [{','.join([f'*{a}'] * 9)}]" for a, b in itertools.pairwise(_LEVELS))
    + "]"
)
BOMB_YAML = "model: tiny-random-llama\nsystem: " + BOMB_FLOW + "\n"


def _labelled(path: Path, reply_column: str = "completion", extra: bool = False) -> None:
    rows = []
    for i in range(5):
        rows.append([f"How do I do thing {i}?", "I'm sorry, I can't help with that.", "2_full_refusal"])
        rows.append([f"How do I do thing {i}?", f"Sure: step one is {i}.", "1_full_compliance"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", reply_column, "final_label"])
        w.writerows(rows)
        if extra:
            w.writerow(["one", "two", "2_full_refusal", "a fourth cell"])


def _directions(root: Path, fingerprint: str, hidden: int) -> None:
    from ssah.direction import DIRECTION_FILE, DIRECTION_FORMAT
    from ssah.safefiles import save_safetensors

    meta = {"format": DIRECTION_FORMAT, "fingerprint": fingerprint, "model_name": "tiny-random-llama"}
    meta |= {"layer": "1", "position": "-1"}
    r = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    inf = r.clone()
    inf[3] = float("inf")
    variants: dict[str, tuple[torch.Tensor, dict[str, str]]] = {
        "ok": (r, meta),
        "inf": (inf, meta),
        "wide": (torch.randn(hidden + 3), meta),
        "no-layer": (r, {k: v for k, v in meta.items() if k != "layer"}),
        "layer-text": (r, {**meta, "layer": "twelve"}),
        "zero": (torch.zeros(hidden), meta),
        "no-fingerprint": (r, {**meta, "fingerprint": ""}),
    }
    for name, (tensor, m) in variants.items():
        folder = root / "dirs" / name
        folder.mkdir(parents=True)
        save_safetensors({"direction": tensor}, folder / DIRECTION_FILE, m)


def _judges(root: Path, fingerprint: str, hidden: int) -> None:
    from ssah.judges.learned import HEAD_FILE, SETTINGS_FILE

    head = {"weight": torch.ones(hidden), "bias": torch.zeros(1), "mean": torch.zeros(hidden)}
    head["scale"] = torch.ones(hidden)
    settings: dict[str, Any] = {"base_model": "tiny-random-llama", "base_fingerprint": fingerprint, "layer": 0}
    settings |= {"pooling": "mean", "threshold": 0.5, "format_version": 1}
    nan_mean = {**head, "mean": torch.full((hidden,), float("nan"))}
    wide = {k: torch.ones(hidden + 1) if k != "bias" else v for k, v in head.items()}
    variants: dict[str, tuple[dict[str, torch.Tensor], Any]] = {
        "blank-fingerprint": (head, {**settings, "base_fingerprint": ""}),
        "threshold-text": (head, {**settings, "threshold": "0.5"}),
        "layer-true": (head, {**settings, "layer": True}),
        "unknown-key": (head, {**settings, "thresold": 0.4}),
        "settings-a-list": (head, [1, 2]),
        "head-wide": (wide, settings),
        "head-nan": (nan_mean, settings),
        "layer-too-deep": (head, {**settings, "layer": 99}),
    }
    from safetensors.torch import save_file

    for name, (h, s) in variants.items():
        folder = root / "judges" / name
        folder.mkdir(parents=True)
        save_file(h, str(folder / HEAD_FILE))
        (folder / SETTINGS_FILE).write_text(json.dumps(s))
    (root / "judges" / "settings-truncated").mkdir()
    save_file(head, str(root / "judges" / "settings-truncated" / HEAD_FILE))
    (root / "judges" / "settings-truncated" / SETTINGS_FILE).write_text(json.dumps(settings)[:30])


def write_files(root: Path) -> None:
    """Every file the rows below read, under ``root`` (the table's world folder)."""
    from ssah.models import load_model

    lm = load_model("tiny-random-llama", device="cpu")
    hidden = int(lm.model.get_input_embeddings().weight.shape[1])
    _directions(root, lm.fingerprint, hidden)
    _judges(root, lm.fingerprint, hidden)
    _labelled(root / "labelled" / "ok.csv")
    _labelled(root / "labelled" / "ragged.csv", extra=True)
    c = root / "configs31"
    c.mkdir()
    (c / "bomb.yaml").write_text(BOMB_YAML)
    (c / "self-alias.yaml").write_text("model: tiny-random-llama\nsystem: &a [*a]\n")
    (c / "deep.yaml").write_text("model: tiny-random-llama\nsystem: " + "[" * 5000 + "]" * 5000 + "\n")
    p = root / "plans"
    p.mkdir()
    good = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    (p / "negative-hidden.json").write_text(json.dumps({**good, "hidden_size": -64}))
    (p / "zero-heads.json").write_text(json.dumps({**good, "num_attention_heads": 0}))
    (p / "heads-not-dividing.json").write_text(json.dumps({**good, "num_attention_heads": 5}))
    (p / "layers-text.json").write_text(json.dumps({**good, "num_hidden_layers": "2"}))
    (p / "truncated.json").write_text(json.dumps(good)[:25])
    (p / "folder").mkdir()
    (p / "folder" / "config.json").write_text(json.dumps({**good, "hidden_size": 0}))
    garbage = root / "models" / "pickle-garbage"
    garbage.mkdir(parents=True)
    for f in (root / "models" / "good").iterdir():
        if f.suffix != ".safetensors":
            (garbage / f.name).write_bytes(f.read_bytes())
    (garbage / "pytorch_model.bin").write_bytes(random.Random(0).randbytes(4096))  # fails in the unpickler
    (root / "victim.txt").write_text("a file the lock link points at\n")
    (root / "lock-dir").mkdir()
    (root / ".lock-dir-run.lock").mkdir()
    (root / ".lock-link-run.lock").symlink_to(root / "victim.txt")


Case = tuple[str, Callable[[Any], list[str]], str]
U = ["units", "tiny-random-llama"]
UNITS = ["--limit", "4", "--max-length", "64", "--no-progress"]


def _export_dir(name: str) -> Callable[[Any], list[str]]:
    return lambda w: ["export", "tiny-random-llama", "--orthogonalize", w(f"dirs/{name}"), "--out", w("o")]


def _judge(name: str) -> Callable[[Any], list[str]]:
    return lambda w: ["judge", "validate", w("labelled/ok.csv"), "--judge", f"learned:{w('judges/' + name)}",
                      "--out", w("o")]  # fmt: skip


def _plan(name: str) -> Callable[[Any], list[str]]:
    return lambda w: ["info", w(f"plans/{name}"), "--plan"]


CASES: list[Case] = [
    # 1. files ssah wrote earlier, validated when read back
    ("direction-inf", _export_dir("inf"), "NaN or infinite"),
    ("direction-other-width", _export_dir("wide"), "has shape"),
    ("direction-no-layer", _export_dir("no-layer"), "'layer'"),
    ("direction-layer-text", _export_dir("layer-text"), "not a whole number"),
    ("direction-all-zero", _export_dir("zero"), "all zeros"),
    ("direction-no-fingerprint", _export_dir("no-fingerprint"), "fingerprint"),
    ("judge-blank-fingerprint", _judge("blank-fingerprint"), "empty base_fingerprint"),
    ("judge-threshold-text", _judge("threshold-text"), "threshold='0.5'"),
    ("judge-layer-true", _judge("layer-true"), "layer=True"),
    ("judge-unknown-key", _judge("unknown-key"), "unknown key 'thresold'"),
    ("judge-settings-a-list", _judge("settings-a-list"), "not hold a JSON object"),
    ("judge-settings-truncated", _judge("settings-truncated"), "not valid JSON"),
    ("judge-head-other-width", _judge("head-wide"), "features"),
    ("judge-head-nan", _judge("head-nan"), "NaN or infinite"),
    ("judge-layer-too-deep", _judge("layer-too-deep"), "does not exist"),
    ("model-pickle-garbage", lambda w: ["info", w("models/pickle-garbage"), "--allow-pickle"], "pickled weights"),
    # 2. every item's type
    ("override-shares-numbers", lambda w: [*U, "shares=[1, 2]", "--out", w("o")], "'shares'"),
    ("override-columns-number", lambda w: [*U, "columns=[7]", "--out", w("o")], "'columns'"),
    ("override-huge-number", lambda w: [*U, f"limit={10**30}", "--out", w("o")], "too large"),
    ("labelled-ragged-row", lambda w: ["judge", "validate", w("labelled/ragged.csv"), "--out", w("o")], "more cells"),
    # 3. aliases expanded past a size, refused before validation (the line stays short: see test_hostile_surfaces)
    ("config-alias-bomb", lambda w: ["units", "--config", w("configs31/bomb.yaml"), "--out", w("o")], "expands to"),
    ("override-alias-bomb", lambda w: [*U, f"system={BOMB_FLOW}", "--out", w("o")], "expands to"),
    ("config-self-alias", lambda w: ["units", "--config", w("configs31/self-alias.yaml"), "--out", w("o")], "itself"),
    ("config-nested-deep", lambda w: ["units", "--config", w("configs31/deep.yaml"), "--out", w("o")], "nested"),
    # 4. info --plan checks the config's numbers first
    ("plan-negative-hidden", _plan("negative-hidden.json"), "hidden_size"),
    ("plan-zero-heads", _plan("zero-heads.json"), "num_attention_heads"),
    ("plan-heads-not-dividing", _plan("heads-not-dividing.json"), "does not divide"),
    ("plan-layers-text", _plan("layers-text.json"), "num_hidden_layers"),
    ("plan-truncated-json", _plan("truncated.json"), "not valid JSON"),
    ("plan-folder-zero-hidden", _plan("folder"), "hidden_size"),
    # 5. locks: never followed through a link, never a folder
    ("lock-is-a-folder", lambda w: [*U, "--out", w("lock-dir-run"), *UNITS], "is a folder"),
    ("lock-is-a-link", lambda w: [*U, "--out", w("lock-link-run"), *UNITS], "symbolic link"),
    (
        "export-lock-is-a-link",
        lambda w: ["export", "tiny-random-llama", "--orthogonalize", w("dirs/ok"), "--out", w("lock-link-run")],
        "symbolic link",
    ),
    # 6. the column mapping knows the fields ssah judge reads
    (
        "judge-column-unknown-field",
        lambda w: ["judge", "validate", w("labelled/ok.csv"), "--column", "answer=x", "--out", w("o")],
        "prompt, reply, label",
    ),
    (
        "judge-column-missing",
        lambda w: ["judge", "validate", w("labelled/ok.csv"), "--column", "reply=nosuch", "--out", w("o")],
        "no column 'nosuch'",
    ),
    # 7. minimums where a recipe fits or chooses on data
    (
        "direction-train-1",
        lambda w: ["direction", "tiny-random-llama", "--train", "1", "--val", "1", "--out", w("o")],
        "at least 2",
    ),
    (
        "judge-folds-over-rows",
        lambda w: [
            "judge",
            "train",
            w("labelled/ok.csv"),
            "--folds",
            "50",
            "--base-model",
            "tiny-random-llama",
            "--out",
            w("o"),
        ],
        "more than the 10",
    ),
    # 8. a wrong set name says so (not "units from another model")
    (
        "export-unknown-set",
        lambda w: ["export", "tiny-random-llama", "--ablate", w("units/good.safetensors") + ":XYZ", "--out", w("o")],
        "'XYZ' is not in",
    ),
]
