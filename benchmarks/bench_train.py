"""Training-step cost of frozen-units and units-only training against plain full fine-tuning, and optimizer size.

Measures, does not assert: prints a table and writes JSON (default ``runs/benchmarks/train.json``). Units come
from ``ssah units`` on the same model (computed once into ``runs/benchmarks/units`` if missing).

On a shared machine one run per mode is at the mercy of whatever else runs meanwhile, so the modes are
interleaved: ``--repeats`` rounds, each training every mode for ``--steps`` optimizer steps (in a rotated order)
on the same model and the same batches (the data order is a function of the seed). The first step of each run pays
one-time set-up and is dropped. Step ``i`` of round ``r`` of a mode is paired with step ``i`` of round ``r`` of full
fine-tuning (same tokens, close in time) and the ratio of the pair is the unit of comparison: the report gives the
median ratio and its interquartile range and min-max, and the median step time with its spread per mode. The cost
of the freezing machinery itself (gradient mask and restore, timed alone) is reported beside it. Torch runs on
``--threads`` threads (default 1): with more threads than free cores, OpenMP barriers wait for descheduled threads
and a step's time swings several-fold.

    python benchmarks/bench_train.py [--model smollm2-135m-instruct] [--steps 4] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("full", "freeze SCU+CU@0.06", "only RU")


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, quartiles and range of a sample."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": round(statistics.median(values), digits),
        "q1": round(q[0], digits),
        "q3": round(q[2], digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def machinery_ms(model: Any, freeze: Any, repeats: int = 20) -> dict[str, float]:
    """Median time of one gradient mask (all frozen parameters) and one restore, on the model as it is."""
    import torch

    from ssah.interventions import FrozenUnits, freeze_units

    frozen = freeze_units(model, freeze)
    hooks = [(frozen._params[n], FrozenUnits._grad_hook(frozen._flat[n])) for n in frozen._params]
    for p, _ in hooks:
        p.grad = torch.ones_like(p)
    mask, restore = [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for p, hook in hooks:
                hook(p)
            mask.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            frozen.restore()
            restore.append(time.perf_counter() - t0)
    finally:
        frozen.remove()
        for p, _ in hooks:
            p.grad = None
    return {
        "mask_ms": round(1000 * statistics.median(mask), 2),
        "restore_ms": round(1000 * statistics.median(restore), 2),
        "frozen_entries": frozen.frozen_parameters,
        "frozen_tensors": len(hooks),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=4, help="rounds over all modes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--units", default=None, help="ssah units folder of the model (made if missing)")
    ap.add_argument("--out", default="runs/benchmarks/train.json")
    args = ap.parse_args()

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from ssah.cli import main as cli
    from ssah.data import load_prompts
    from ssah.models import load_model
    from ssah.training import TrainConfig, resolve_unit_spec, train_model

    default_units = "runs/benchmarks/units" if args.model == ap.get_default("model") else None
    units = Path(args.units or default_units or f"runs/benchmarks/units-{Path(args.model).name}")
    if not (units / "units.safetensors").is_file():
        assert cli(["units", args.model, "--out", str(units), "--no-progress", "--overwrite"]) == 0
    data = load_prompts("builtin:task")
    lm = load_model(args.model, dtype="float32", device="cpu")
    sets = {
        "full": {},
        "freeze SCU+CU@0.06": {
            "freeze": resolve_unit_spec(f"{units}/units.safetensors:SCU,CU@0.06", lm.model, fingerprint=lm.fingerprint)
        },
        "only RU": {"only": resolve_unit_spec(f"{units}/units.safetensors:RU", lm.model, fingerprint=lm.fingerprint)},
    }
    cfg = TrainConfig(
        model=args.model, max_steps=args.steps, batch_size=args.batch_size, lr=1e-5, weight_decay=0.01, progress=False
    )
    load = [os.getloadavg()[0]]
    t_start = time.time()
    steps: dict[str, list[list[float]]] = {m: [] for m in MODES}
    info: dict[str, dict[str, Any]] = {}
    for r in range(args.repeats):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for mode in order:
            # the same model object throughout: step time does not depend on the weights' values
            res = train_model(lm.model, lm.tokenizer, data, cfg, progress=False, **sets[mode])
            steps[mode].append([rec["step_seconds"] for rec in res.log][1:])
            info[mode] = {"trainable": res.trainable, "frozen_max_drift": res.frozen_max_drift}
            print(f"round {r + 1}/{args.repeats} {mode:20s} steps {[round(s, 2) for s in steps[mode][-1]]}")
        load.append(os.getloadavg()[0])
    machinery = machinery_ms(lm.model, sets["freeze SCU+CU@0.06"]["freeze"])

    rows: dict[str, dict[str, Any]] = {}
    full_trained = int(info["full"]["trainable"]["params"])
    for mode in MODES:
        flat = [s for run in steps[mode] for s in run]
        ratios = [
            s / f for run, base in zip(steps[mode], steps["full"], strict=True) for s, f in zip(run, base, strict=True)
        ]
        trained = int(info[mode]["trainable"]["params"])
        rows[mode] = {
            "step_s": spread(flat),
            "step_time_vs_full": spread(ratios),
            "trained_params": trained,
            "trained_share": round(float(info[mode]["trainable"]["share"]), 4),
            "adamw_state_mb": round(2 * 4 * trained / 2**20, 1),  # exp_avg + exp_avg_sq, float32
            "optimizer_state_vs_full": round(trained / full_trained, 4),
            "frozen_max_drift": info[mode]["frozen_max_drift"],
        }
    full_ms = 1000 * rows["full"]["step_s"]["median"]
    machinery["share_of_full_step"] = round((machinery["mask_ms"] + machinery["restore_ms"]) / full_ms, 4)
    result = {
        "model": args.model,
        "steps_per_run": args.steps,
        "measured_steps_per_run": args.steps - 1,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "seconds": round(time.time() - t_start, 1),
        "load_average_1min": [round(x, 2) for x in load],
        "cpu_threads": torch.get_num_threads(),
        "freezing_machinery": machinery,
        "modes": rows,
    }
    print(f"\n{args.repeats} rounds x {args.steps - 1} measured steps, batch {args.batch_size}, model {args.model}")
    for mode, r in rows.items():
        s, q = r["step_s"], r["step_time_vs_full"]
        print(
            f"{mode:20s} step {s['median']:.2f} s [{s['q1']:.2f}-{s['q3']:.2f}]  vs full {q['median']:.3f}x "
            f"(IQR {q['q1']:.3f}-{q['q3']:.3f}, range {q['min']:.3f}-{q['max']:.3f})  trained "
            f"{100 * r['trained_share']:.2f}%  AdamW state {r['adamw_state_mb']} MB ({r['optimizer_state_vs_full']}x)"
        )
    m = machinery
    print(
        f"freezing machinery: mask {m['mask_ms']} ms + restore {m['restore_ms']} ms for {m['frozen_entries']} entries "
        f"in {m['frozen_tensors']} tensors = {100 * m['share_of_full_step']:.2f}% of a full step"
    )
    print(f"load average during the run: {result['load_average_1min']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
