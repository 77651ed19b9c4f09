"""Tune the `ssah align` recipe: several training settings on one base model, each measured along its run.

Measures, does not assert. The base model is loaded and evaluated once; each variant trains a copy in memory (the
weights are restored bit for bit afterwards) and is evaluated after the steps listed in ``--at`` (with a constant
schedule the model after k steps is the model a k-step run makes, so one run gives a trajectory). Every number
is a count with its 95% interval on held-out sets that the training mix never contains: harmful refusal,
borderline-safe and ordinary over-refusal, ordinary answers correct and the perplexity ratio of reference answers.

    python benchmarks/align_recipe.py --variant "borderline_ratio=0.3,benign_ratio=0.3,train.lr=3e-5" \\
        --variant "borderline_ratio=0.4,benign_ratio=0.2" --at 10,20,30 --eval-limit 60 [--extra-safe xstest]

Writes one JSON line per (variant, step) to stdout and ``--out`` (default align_recipe.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_variant(text: str) -> dict[str, Any]:
    """``key=value,train.lr=3e-5`` -> settings, as ``key=value`` overrides are read (dotted keys for a section)."""
    from ssah.config import parse_overrides

    return parse_overrides([x.strip() for x in text.split(",") if x.strip()])


def summary(cfg: Any, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    from ssah.recipes.align.run import target_checks

    keys = ("refusal", "borderline_overrefusal", "overrefusal", "extra_overrefusal", "benign_accuracy")
    out: dict[str, Any] = {k: after[k] for k in keys if after.get(k) is not None}
    out["perplexity"] = after["perplexity"]
    out["targets"] = {k: v["verdict"] for k, v in target_checks(cfg, before, after).items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--variant", action="append", default=[], help="settings of one run, key=value,...")
    ap.add_argument("--at", default="20", help="steps after which to evaluate (the run trains to the largest)")
    ap.add_argument("--eval-limit", type=int, default=None, help="prompts per held-out set (stratified sample)")
    ap.add_argument("--extra-safe", default=None, help="extra safe set, e.g. xstest (shared data)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="align_recipe.jsonl")
    args = ap.parse_args()

    import torch

    from ssah.config import merge
    from ssah.measure import restored_weights
    from ssah.models import load_model
    from ssah.recipes.align.run import AlignConfig, evaluate_model, load_held_out, safety_sft
    from ssah.recipes.align.run import _training_mix as training_mix

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    steps = sorted(int(x) for x in args.at.split(","))
    held_out = {"limit": args.eval_limit, "extra_safe": args.extra_safe, "max_new_tokens": args.max_new_tokens}
    common = {"model": args.model, "eval": held_out, "progress": False, "cache": False}
    base_cfg = AlignConfig(**common)
    lm = load_model(args.model, dtype="float32", device="cpu")
    sets = load_held_out(base_cfg, training_mix(base_cfg))
    t0 = time.time()
    before = evaluate_model(lm.model, lm.tokenizer, base_cfg, sets)
    rows = [{"variant": "base", "step": 0, "seconds": round(time.time() - t0, 1), **summary(base_cfg, before, before)}]
    print(json.dumps(rows[-1]), flush=True)
    for text in args.variant or [""]:
        cfg = AlignConfig(**merge(common, parse_variant(text)), steps=steps[-1])
        mix = training_mix(cfg)
        load_held_out(cfg, mix)  # the same held-out sets, checked against this mix too
        clock = {"start": time.time(), "eval": 0.0}

        def on_step(record: dict[str, Any], cfg: AlignConfig = cfg, text: str = text, clock: dict = clock) -> None:
            step = int(record.get("step", 0))
            if step not in steps:
                return
            t2 = time.time()
            after = evaluate_model(lm.model, lm.tokenizer, cfg, sets)
            trained = round(t2 - clock["start"] - clock["eval"], 1)
            clock["eval"] += time.time() - t2
            row = {"variant": text, "step": step, "loss": record.get("loss"), "train_seconds": trained}
            rows.append(row | {"eval_seconds": round(time.time() - t2, 1), **summary(cfg, before, after)})
            print(json.dumps(rows[-1]), flush=True)

        with restored_weights(lm.model):
            safety_sft(cfg, lm.model, lm.tokenizer, mix, on_step=on_step)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
