"""bfloat16 against float32 on the CPU: generation and scoring speed, and whether the results change.

Measures, does not assert. Both models are loaded once; timed runs alternate between the dtypes (fp32, bf16,
bf16, fp32, ...) so that load from other processes on a shared machine hits both alike, and the ratios come from
one run. Reports the speed-up of generation and of unit scoring, how many greedy replies are identical, the
agreement of the keyword judge's refusal verdicts, ASR and over-refusal under each dtype, and how much the unit
categories move (Spearman correlation of the scores, Jaccard overlap of SCU / RU). Statistics are float64 under
both dtypes (the hooks convert each block), so the difference comes from the forward pass alone.

    python benchmarks/bench_bf16.py [--model smollm2-135m-instruct] [--prompts 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _spearman(a, b) -> float:  # type: ignore[no-untyped-def]
    """Rank correlation of two score vectors (ties broken by position; scores are continuous here)."""
    import torch

    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16, help="harmful and borderline-benign prompts each")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=24, help="examples of each calibration set for scoring")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per dtype (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/benchmarks/bf16.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ssah.categorize import categorize
    from ssah.data import load_prompts
    from ssah.generate import GenerationConfig, generate
    from ssah.judges import get_judge
    from ssah.models import load_model
    from ssah.scoring import score_units

    dtypes = ("float32", "bfloat16")
    models = {d: load_model(args.model, device="cpu", dtype=d) for d in dtypes}
    harmful = load_prompts("builtin:harmful").take(args.prompts).prompts()
    benign = load_prompts("builtin:borderline").take(args.prompts).prompts()
    prompts = harmful + benign
    safety = load_prompts("builtin:safety").take(args.calibration)
    utility = load_prompts("builtin:utility").take(args.calibration)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    for d in dtypes:  # warm-up (first-call kernel selection)
        generate(models[d].model, models[d].tokenizer, prompts[:2], config=cfg, progress=False)

    gen_times: dict[str, list[float]] = {d: [] for d in dtypes}
    score_times: dict[str, list[float]] = {d: [] for d in dtypes}
    outputs: dict[str, list] = {}
    scores: dict[str, tuple] = {}
    for r in range(args.rounds):
        order = dtypes if r % 2 == 0 else dtypes[::-1]
        for d in order:
            m, tok = models[d].model, models[d].tokenizer
            t = time.perf_counter()
            outputs[d] = generate(m, tok, prompts, config=cfg, progress=False)
            gen_times[d].append(time.perf_counter() - t)
        for d in order:
            m, tok = models[d].model, models[d].tokenizer
            t = time.perf_counter()
            s = score_units(m, tok, safety, batch_size=8, max_length=256, progress=False)
            u = score_units(m, tok, utility, batch_size=8, max_length=256, progress=False)
            score_times[d].append(time.perf_counter() - t)
            scores[d] = (s, u)

    judge = get_judge("keyword:ssah")
    verdicts = {d: [v.refused for v in judge.judge(prompts, [g.output for g in outputs[d]])] for d in dtypes}
    n = len(harmful)
    agree = sum(a == b for a, b in zip(verdicts["float32"], verdicts["bfloat16"], strict=True))
    identical = sum(a.output == b.output for a, b in zip(outputs["float32"], outputs["bfloat16"], strict=True))
    new_tokens = {d: sum(g.new_tokens for g in outputs[d]) for d in dtypes}

    cats = {d: categorize(*scores[d]) for d in dtypes}
    overlap = {}
    for c in ("SCU", "RU"):
        a, b = cats["float32"].sets[c], cats["bfloat16"].sets[c]
        overlap[c] = round(len(a & b) / max(len(a | b), 1), 3)
    s32, s16 = scores["float32"][0].flat(), scores["bfloat16"][0].flat()
    u32, u16 = scores["float32"][1].flat(), scores["bfloat16"][1].flat()
    stats_dtype = str(s16.dtype).removeprefix("torch.")

    g32, g16 = statistics.median(gen_times["float32"]), statistics.median(gen_times["bfloat16"])
    c32, c16 = statistics.median(score_times["float32"]), statistics.median(score_times["bfloat16"])
    result = {
        "model": args.model,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "generation_s": {"float32": round(g32, 2), "bfloat16": round(g16, 2)},
        "generation_speedup_bf16": round(g32 / g16, 2),
        "generation_speedup_per_round": [
            round(a / b, 2) for a, b in zip(gen_times["float32"], gen_times["bfloat16"], strict=True)
        ],
        "new_tokens": new_tokens,
        "scoring_s": {"float32": round(c32, 2), "bfloat16": round(c16, 2)},
        "scoring_speedup_bf16": round(c32 / c16, 2),
        "identical_greedy_replies": f"{identical}/{len(prompts)}",
        "refusal_verdict_agreement": f"{agree}/{len(prompts)}",
        "asr": {d: round(1 - sum(verdicts[d][:n]) / n, 3) for d in dtypes},
        "overrefusal": {d: round(sum(verdicts[d][n:]) / n, 3) for d in dtypes},
        "refusals_harmful": {d: f"{sum(verdicts[d][:n])}/{n}" for d in dtypes},
        "statistics_dtype_under_bf16": stats_dtype,
        "score_spearman": {"safety": round(_spearman(s32, s16), 4), "utility": round(_spearman(u32, u16), 4)},
        "category_jaccard_fp32_vs_bf16": overlap,
    }
    for k, v in result.items():
        print(f"{k:34s} {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
