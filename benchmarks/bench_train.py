"""Training-step cost of frozen-units and units-only training against plain full fine-tuning, and optimizer size.

Measures, does not assert: prints a table and writes JSON (default ``runs/benchmarks/train.json``). Units come
from ``ssah units`` on the same model (computed once into ``runs/benchmarks/units`` if missing).

    python benchmarks/bench_train.py [--model smollm2-135m-instruct] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="runs/benchmarks/train.json")
    args = ap.parse_args()

    from ssah.cli import main as cli
    from ssah.data import load_prompts
    from ssah.models import load_model
    from ssah.train import TrainConfig, resolve_unit_spec, train_model

    units = Path("runs/benchmarks/units")
    if not (units / "units.safetensors").is_file():
        assert cli(["units", args.model, "--out", str(units), "--no-progress", "--overwrite"]) == 0
    data = load_prompts("builtin:task")
    rows = {}
    for mode in ("full", "freeze SCU+CU@0.06", "only RU"):
        lm = load_model(args.model, dtype="float32", device="cpu")
        freeze = only = None
        if mode.startswith("freeze"):
            freeze = resolve_unit_spec(f"{units}/units.safetensors:SCU,CU@0.06", lm.model, fingerprint=lm.fingerprint)
        elif mode.startswith("only"):
            only = resolve_unit_spec(f"{units}/units.safetensors:RU", lm.model, fingerprint=lm.fingerprint)
        cfg = TrainConfig(
            model=args.model,
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-5,
            weight_decay=0.01,
            progress=False,
        )
        res = train_model(lm.model, lm.tokenizer, data, cfg, freeze=freeze, only=only, progress=False)
        step_s = [r["step_seconds"] for r in res.log][1:]  # the first step pays one-time set-up
        trained = int(res.trainable["params"])
        rows[mode] = {
            "median_step_s": round(statistics.median(step_s), 3),
            "trained_params": trained,
            "trained_share": round(float(res.trainable["share"]), 4),
            "adamw_state_mb": round(2 * 4 * trained / 2**20, 1),
            "frozen_max_drift": res.frozen_max_drift,
        }
    base = rows["full"]
    for r in rows.values():
        r["step_time_vs_full"] = round(r["median_step_s"] / base["median_step_s"], 3)
        r["optimizer_state_vs_full"] = round(r["trained_params"] / base["trained_params"], 4)
    result = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "modes": rows}
    for mode, r in rows.items():
        print(
            f"{mode:22s} step {r['median_step_s']:.2f} s ({r['step_time_vs_full']:.3f}x full)  "
            f"trained {100 * r['trained_share']:.2f}%  AdamW state {r['adamw_state_mb']} MB "
            f"({r['optimizer_state_vs_full']:.4f}x full)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
