"""Batched vs one-prompt-at-a-time generation, and first-token scoring vs generation-based judging.

Measures, does not assert: prints a table and writes JSON (default ``runs/benchmarks/eval.json``).

    python benchmarks/bench_eval.py [--model smollm2-135m-instruct] [--prompts 48] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--out", default="runs/benchmarks/eval.json")
    args = ap.parse_args()

    from ssah.data import load_prompts
    from ssah.generate import GenerationConfig, generate
    from ssah.judges import first_token_refusal_scores, get_judge
    from ssah.models import load_model

    lm = load_model(args.model, device="cpu")
    prompts = load_prompts("builtin:harmful").take(args.prompts).prompts()
    batched_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    serial_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    generate(lm.model, lm.tokenizer, prompts[:2], config=batched_cfg, progress=False)  # warm-up

    times = []
    for _ in range(3):  # median of 3: single runs of ~10 s vary by 10-15% on a shared 2-core machine
        t = time.perf_counter()
        batched = generate(lm.model, lm.tokenizer, prompts, config=batched_cfg, progress=False)
        times.append(time.perf_counter() - t)
    t_batched = statistics.median(times)
    t = time.perf_counter()
    serial = generate(lm.model, lm.tokenizer, prompts, config=serial_cfg, progress=False)
    t_serial = time.perf_counter() - t
    identical = sum(a.output == b.output for a, b in zip(batched, serial, strict=True))

    judge = get_judge("keyword:ssah")
    t = time.perf_counter()
    gens = generate(lm.model, lm.tokenizer, prompts, config=batched_cfg, progress=False)
    verdicts = judge.judge(prompts, [g.output for g in gens])
    t_gen_judge = time.perf_counter() - t
    t = time.perf_counter()
    scores = first_token_refusal_scores(lm.model, lm.tokenizer, prompts, batch_size=16)
    t_first = time.perf_counter() - t
    agree = sum((s > 0) == v.refused for s, v in zip(scores, verdicts, strict=True)) / len(prompts)

    result = {
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "serial_generation_s": round(t_serial, 2),
        "batched_generation_s": round(t_batched, 2),
        "batched_speedup": round(t_serial / t_batched, 2),
        "identical_outputs": f"{identical}/{len(prompts)}",
        "generation_plus_keyword_judge_s": round(t_gen_judge, 2),
        "first_token_score_s": round(t_first, 3),
        "first_token_speedup_vs_batched_generation": round(t_gen_judge / t_first, 1),
        "first_token_speedup_vs_serial_generation": round(t_serial / t_first, 1),
        "first_token_agreement_with_keyword_judge": round(agree, 3),
        "keyword_refusal_rate": sum(v.refused for v in verdicts) / len(prompts),
        "first_token_refusal_rate": sum(s > 0 for s in scores) / len(prompts),
    }
    for k, v in result.items():
        print(f"{k:45s} {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
