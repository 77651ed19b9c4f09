"""`--bf16` (bf16 autocast, fp32 weights) against fp32: generation and fine-tuning speed, and what changes.

Measures, does not assert. One fp32 model; timed runs alternate (fp32, bf16, bf16, fp32, ...) so that load from
other processes on a shared machine hits both alike, and the ratios come from one run. Generation: greedy replies
to harmful and borderline-benign prompts, how many are identical, and whether the keyword judge's refusal verdicts
agree. Fine-tuning: the same SFT steps from the same weights (restored bit for bit between runs), seconds per step
and the loss after the last step under each precision.

    python benchmarks/bench_mixed_precision.py [--model smollm2-135m-instruct] [--prompts 16] [--steps 4]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16, help="harmful and borderline-benign prompts each")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32, help="generation batch")
    ap.add_argument("--steps", type=int, default=4, help="SFT steps per timed training run (batch 8)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per precision (interleaved)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="runs/benchmarks/mixed_precision.json")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ssah.data import load_prompts
    from ssah.data.training import alignment_mix
    from ssah.generate import GenerationConfig, generate
    from ssah.judges import get_judge
    from ssah.measure import restored_weights
    from ssah.models import load_model
    from ssah.training import TrainConfig, train_model

    lm = load_model(args.model, device="cpu", dtype="float32")
    prompts = [*load_prompts("builtin:harmful").take(args.prompts).prompts()]
    prompts += load_prompts("builtin:borderline").take(args.prompts).prompts()
    judge = get_judge("keyword:ssah")
    mix = alignment_mix(seed=0)

    def gen(bf16: bool) -> tuple[float, list[str]]:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bf16=bf16)
        t = time.perf_counter()
        out = generate(lm.model, lm.tokenizer, prompts, config=cfg, progress=False)
        return time.perf_counter() - t, [g.output for g in out]

    def train(bf16: bool) -> tuple[float, float]:
        tcfg = TrainConfig(model=args.model, max_steps=args.steps, lr=5e-5, schedule="constant", bf16=bf16)
        with restored_weights(lm.model):
            t = time.perf_counter()
            res = train_model(lm.model, lm.tokenizer, mix, tcfg, progress=False)
            return (time.perf_counter() - t) / args.steps, res.losses[-1]

    names = {False: "fp32", True: "bf16-autocast"}
    gen_s: dict[bool, list[float]] = {False: [], True: []}
    step_s: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, list[str]] = {}
    loss: dict[bool, float] = {}
    order = [False, True, True, False] * args.rounds
    gen(False)  # warm-up: first-call costs (allocator, kernels) hit neither side
    for bf16 in order[: 2 * args.rounds]:
        seconds, outputs[bf16] = gen(bf16)
        gen_s[bf16].append(seconds)
    train(True)  # warm-up: the first bf16 run compiles oneDNN's bf16 kernels (about a second per step here)
    for bf16 in order[: 2 * args.rounds]:
        seconds, loss[bf16] = train(bf16)
        step_s[bf16].append(seconds)

    refused = {b: [v.refused for v in judge.judge(prompts, outputs[b])] for b in outputs}
    n = args.prompts
    result = {
        "model": args.model,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "prompts": 2 * n,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "generation_seconds": {names[b]: statistics.median(v) for b, v in gen_s.items()},
        "step_seconds": {names[b]: statistics.median(v) for b, v in step_s.items()},
        "generation_speedup": statistics.median(gen_s[False]) / statistics.median(gen_s[True]),
        "training_speedup": statistics.median(step_s[False]) / statistics.median(step_s[True]),
        "identical_replies": sum(a == b for a, b in zip(outputs[False], outputs[True], strict=True)),
        "refusal_verdicts_agree": sum(a == b for a, b in zip(refused[False], refused[True], strict=True)),
        "refusals_harmful": {names[b]: sum(r[:n]) for b, r in refused.items()},
        "refusals_borderline": {names[b]: sum(r[n:]) for b, r in refused.items()},
        "final_loss": {names[b]: round(v, 4) for b, v in loss.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
