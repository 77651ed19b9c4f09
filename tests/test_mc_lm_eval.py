"""ssah's multiple-choice scoring against lm-evaluation-harness itself, through ``ssah.evaluate.lm_eval_bridge`` on
a tiny in-memory model: per item, ssah's outcomes equal lm-eval's ``acc`` and ``acc_norm`` (its published
definition: argmax of the log-likelihoods, and of the log-likelihoods divided by each choice's length in
characters), and ssah's PIQA items are the requests lm-eval's own ``piqa`` task builds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ssah.data.tasks import MultipleChoiceItem, load_multiple_choice
from ssah.evaluate import (
    MC_DELIMITER,
    MC_TEMPLATE,
    lm_eval_bridge,
    multiple_choice_accuracy,
    multiple_choice_outcomes,
)

# PIQA-like items whose choices differ in length, several with multi-byte characters (é is 2 bytes, — and ’ are 3),
# so that characters, bytes and len(" " + choice) all differ; some have three options
MC_DOCS: list[tuple[str, list[str], int]] = [
    ("Make a caf\u00e9 au lait", ["mix coffee and hot milk", "pour milk"], 0),
    ("Open a jar", ["twist", "tap the lid\u2014then twist it firmly"], 1),
    ("Write r\u00e9sum\u00e9 headings", ["bold", "na\u00efve caps"], 0),
    ("Clean a pan", ["soak it", "scrub it with salt and a lemon half", "burn it"], 1),
    ("Dry shoes", ["newspaper", "a hair dryer on the \u2018cool\u2019 setting"], 1),
    ("Cut bread", ["a saw", "a serrated knife"], 1),
    ("Cool soup", ["ice", "stir it\u2014slowly\u2014in a wide bowl"], 0),
    ("Fix a squeak", ["oil", "WD\u201140 on the hinge", "shout"], 1),
    ("Keep herbs fresh", ["in water like flowers", "dry"], 0),
    ("Peel garlic", ["shake it in a jar", "\u00e9cras\u00e9"], 0),
    ("Light a match", ["strike", "rub it on glass"], 0),
    ("Find a stud", ["knock", "use a magnet on the drywall screws"], 1),
    ("Sharpen a pencil", ["a knife", "a sharpener", "teeth"], 1),
    ("Unstick a zipper", ["graphite", "pull hard\u2014very hard"], 0),
    ("Chill a drink fast", ["wet towel in the freezer", "fan"], 0),
    ("Fold a shirt", ["roll", "fold sleeves in, then thirds"], 1),
    ("Stop a nosebleed", ["pinch the soft part and lean forward", "\u00e9t\u00e9"], 0),
    ("Soften butter", ["grate it", "microwave\u2014ten seconds"], 1),
    ("Boil an egg", ["9 min", "nine minutes in boiling water"], 1),
    ("Hang a picture", ["nail", "a level, a pencil and two nails"], 1),
    ("Remove a splinter", ["tweezers", "tape"], 0),
    ("Warm hands", ["rub them", "caf\u00e9 cup"], 0),
    ("Seal a bag", ["clip", "fold the top twice and use a clothespin"], 1),
    ("Wake up early", ["alarm across the room", "na\u00efvet\u00e9"], 0),
]


def _items() -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem(q, tuple(c), lab) for q, c, lab in MC_DOCS]


def _task(name: str, docs: Sequence[dict[str, Any]], **config: Any) -> dict[str, Any]:
    """A zero-shot multiple-choice lm-eval task over in-memory docs (no download)."""
    import datasets

    data = datasets.Dataset.from_list(list(docs))
    return {
        "task": name,
        "custom_dataset": lambda **_: {"test": data},
        "test_split": "test",
        "output_type": "multiple_choice",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        **config,
    }


def _run(model: Any, tok: Any, task: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval's results and per-item samples (in doc order) for one task dict, through ssah's bridge; a task
    manager without lm-eval's built-in tasks skips indexing them all (about 25 s), which a dict task never needs."""
    from lm_eval.tasks import TaskManager

    out = lm_eval_bridge(model, tok, [task], log_samples=True, task_manager=TaskManager(include_defaults=False))
    return out["results"][task["task"]], sorted(out["samples"][task["task"]], key=lambda s: s["doc_id"])


def _old_rule(lls: Sequence[float], choices: Sequence[str]) -> int:
    """ssah's former acc_norm: log-likelihood per UTF-8 byte of " " + choice, first maximum."""
    scores = [ll / len((MC_DELIMITER + c).encode("utf-8")) for ll, c in zip(lls, choices, strict=True)]
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def test_multiple_choice_equals_lm_eval_per_item() -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness ([eval] extra) is not installed")
    from ssah.tiny import build_tiny_model

    model, tok = build_tiny_model("llama")
    items = _items()
    docs = [{"goal": q, "choices": c, "label": lab} for q, c, lab in MC_DOCS]
    task = _task(
        "ssah_mc_check",
        docs,
        doc_to_text="Question: {{goal}}\nAnswer:",
        doc_to_choice="choices",
        doc_to_target="label",
    )
    res, samples = _run(model, tok, task)
    assert [s["doc_id"] for s in samples] == list(range(len(items)))
    # lm-eval scored exactly the continuations ssah scores
    for item, s in zip(items, samples, strict=True):
        expected = [(MC_TEMPLATE.format(question=item.question), MC_DELIMITER + c) for c in item.choices]
        assert [tuple(a) for a in s["arguments"]] == expected
    norm = multiple_choice_outcomes(model, tok, items, normalize=True)
    raw = multiple_choice_outcomes(model, tok, items, normalize=False)
    assert norm == [s["acc_norm"] == 1.0 for s in samples]
    assert raw == [s["acc"] == 1.0 for s in samples]
    assert multiple_choice_accuracy(model, tok, items) == pytest.approx(res["acc_norm,none"], abs=1e-12)
    assert multiple_choice_accuracy(model, tok, items, normalize=False) == pytest.approx(res["acc,none"], abs=1e-12)
    # the items discriminate: ssah's former rule (per byte of " " + choice) disagrees with lm-eval somewhere
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    old = [_old_rule(ll, item.choices) == item.label for ll, item in zip(lls, items, strict=True)]
    assert old != norm


def _piqa_rows(root: Path) -> tuple[list[dict[str, Any]], list[int]]:
    rows = [json.loads(ln) for ln in (root / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines() if ln]
    labels = [int(x) for x in (root / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()]
    return rows, labels


def test_piqa_items_are_lm_eval_piqa_requests(shared_data: Path) -> None:
    """ssah's PIQA items (template, delimiter, raw goal and solutions: about 6% of the solutions end in a space)
    give the requests and per-item acc / acc_norm of lm-eval's own piqa task config, read from the installed
    package, on a subset that holds such solutions."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness ([eval] extra) is not installed")
    import lm_eval
    import yaml

    from ssah.tiny import build_tiny_model

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "piqa" / "piqa.yaml").read_text())
    rows, labels = _piqa_rows(shared_data)
    _, all_items = load_multiple_choice("piqa")
    # short items (the tiny model's context is 512 tokens, one per byte): the first ones, and ones with a spaced end
    short = [i for i, r in enumerate(rows) if len((r["goal"] + r["sol1"] + r["sol2"]).encode("utf-8")) < 300]
    spaced = [i for i in short if any(rows[i][k] != rows[i][k].rstrip() for k in ("sol1", "sol2"))]
    pick = sorted(set(short[:6]) | set(spaced[:6]))
    assert spaced, "the PIQA data has no solution ending in a space: this check needs one"
    keys = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "metric_list")
    task = _task("ssah_piqa_check", [dict(rows[i], label=labels[i]) for i in pick])
    task.update({k: config[k] for k in keys if k in config})
    model, tok = build_tiny_model("llama")
    _, samples = _run(model, tok, task)
    items = [all_items[i] for i in pick]
    assert [it.label for it in items] == [labels[i] for i in pick]
    for item, s in zip(items, samples, strict=True):
        expected = [(MC_TEMPLATE.format(question=item.question), MC_DELIMITER + c) for c in item.choices]
        assert [tuple(a) for a in s["arguments"]] == expected
    assert any(a[1].endswith(" ") for s in samples for a in s["arguments"])
    assert multiple_choice_outcomes(model, tok, items) == [s["acc_norm"] == 1.0 for s in samples]
    assert multiple_choice_outcomes(model, tok, items, normalize=False) == [s["acc"] == 1.0 for s in samples]
