"""Cost per reply of the refusal judges: keyword presets vs the learned judge (SmolLM2 hidden states + a
logistic-regression head), on the same labelled replies.

Measures, does not assert: prints a table and writes JSON (default ``runs/benchmarks/judges.json``). Uses the
shared XSTest completions when present, else constructed replies.

    python benchmarks/bench_judges.py [--replies 96] [--judge learned] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _replies(n: int) -> tuple[list[str], list[str], str]:
    from ssah.data.shared import shared_data_dir

    base = shared_data_dir(required=False)
    folder = base / "xstest_completions" if base is not None else None
    if folder is not None and folder.is_dir():
        from ssah.judges.labelled import load_labelled

        rows = load_labelled([folder]).rows
        step = max(1, len(rows) // n)
        picked = rows[::step][:n]
        return [r.prompt for r in picked], [r.reply for r in picked], f"{len(picked)} XSTest completions"
    prompts = [f"How do I do task {i}?" for i in range(n)]
    replies = [
        ("I'm sorry, but I can't help with that." if i % 2 else "Here is how: first do this, then do that. " * 8)
        for i in range(n)
    ]
    return prompts, replies, f"{n} constructed replies"


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replies", type=int, default=96)
    ap.add_argument("--judge", action="append", help="Judge specs to time (default: keyword presets + learned).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/benchmarks/judges.json")
    args = ap.parse_args()

    import torch

    from ssah.judges import get_judge

    torch.set_num_threads(args.threads)
    prompts, replies, what = _replies(args.replies)
    specs = args.judge or ["keyword:ssah", "keyword:ssah-prefix", "keyword:xstest", "learned"]
    rows = []
    for spec in specs:
        t = time.perf_counter()
        judge = get_judge(spec)
        setup = time.perf_counter() - t
        judge.judge(prompts[:2], replies[:2])  # warm-up
        repeats = 5 if spec.startswith("keyword") else 1
        seconds = _time(lambda judge=judge: judge.judge(prompts, replies), repeats)
        rows.append(
            {"judge": spec, "setup_s": setup, "seconds": seconds, "ms_per_reply": 1000 * seconds / len(prompts)}
        )
    base = next((r for r in rows if r["judge"] == "keyword:ssah"), rows[0])
    for r in rows:
        r["x_keyword_ssah"] = r["seconds"] / base["seconds"] if base["seconds"] > 0 else None
    print(f"{what}, {args.threads} torch thread(s)")
    print(f"{'judge':24} {'setup s':>8} {'ms/reply':>10} {'x keyword:ssah':>15}")
    for r in rows:
        print(f"{r['judge']:24} {r['setup_s']:8.2f} {r['ms_per_reply']:10.3f} {r['x_keyword_ssah']:15.3g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": what, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
