"""Scoring cost against a plain forward pass, and peak memory against the number of tokens.

Measures, does not assert: prints a table and writes JSON (default ``runs/benchmarks/scoring.json``).
The scoring pass (streaming float64 statistics by pre-hooks on every reader) runs over exactly the batches a
plain ``torch.no_grad`` forward runs over; the ratio of their times is the cost of scoring. Peak memory is
taken in fresh processes over 1x and 4x the tokens: streaming statistics should not grow with the data.

``--gradient-memory`` measures the gradient metrics instead: the peak memory (growth of the peak RSS over the
RSS after loading, in a fresh process per mode) and time of a ``snip`` pass and a ``taylor`` pass (only reader
weights require gradients, folded per layer) against a full backward of the same loss over the same batches
(every parameter requires gradients and keeps its ``.grad``, as a training step's backward does).

    python benchmarks/bench_scoring.py [--model smollm2-135m-instruct] [--repeats 3]
    python benchmarks/bench_scoring.py --gradient-memory [--model tiny-random-llama] [--examples 32]
    python benchmarks/bench_scoring.py --compare-metrics [--examples 32]

``--compare-metrics`` scores the safety set once (one pass with both kinds of gradients) and prints, for each
pair of metrics, the Spearman correlation of the unit scores and the overlap of their top 1.3% of units; the
pre-Wanda formula (mean |x| x L2 norm of the reader column) is included to show what the rename changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _data(copies: int = 1):
    from ssah.data import PromptSet, load_prompts

    s, u = load_prompts("builtin:safety"), load_prompts("builtin:utility")
    examples = (s.examples + u.examples) * copies
    return PromptSet("bench", "builtin:safety+utility", examples)


def _plain_forward(model, tok, data, batch_size: int, max_length: int) -> float:
    from ssah.data import batches, collate, encode_set

    enc = encode_set(tok, data, max_length=max_length)
    t = time.perf_counter()
    with torch.no_grad():
        for idx in batches(enc, batch_size):
            b = collate([enc[i] for i in idx], tok.pad_token_id)
            # the same forward the scoring pass makes (last-position logits only), without the statistics hooks
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t


def _scoring(model, tok, data, batch_size: int, max_length: int) -> tuple[float, int]:
    from ssah.scoring import collect_statistics

    t = time.perf_counter()
    stats = collect_statistics(model, tok, data, batch_size=batch_size, max_length=max_length, progress=False)
    return time.perf_counter() - t, stats.tokens


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _peak_child(model_name: str, copies: int, batch_size: int, max_length: int, queue) -> None:  # type: ignore[no-untyped-def]
    from ssah.models import load_model

    lm = load_model(model_name, device="cpu")
    data = _data(copies)
    baseline = _status_kb("VmRSS")
    # Reset the peak-RSS mark (Linux) so that the model load's own peak does not hide the scoring pass's.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    _, tokens = _scoring(lm.model, lm.tokenizer, data, batch_size, max_length)
    peak = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(
        {
            "copies": copies,
            "tokens": tokens,
            "rss_before_mb": round(baseline / 1024, 1),
            "peak_rss_during_scoring_mb": round(peak / 1024, 1),
            "growth_mb": round((peak - baseline) / 1024, 1),
        }
    )


def peak_memory(model_name: str, copies: int, batch_size: int, max_length: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(model_name, copies, batch_size, max_length, q))
    p.start()
    result = q.get(timeout=1800)  # a crashed child must not hang the benchmark
    p.join()
    return result


def _gradient_pass(model, tok, data, mode: str, batch_size: int, max_length: int) -> dict:
    """One gradient pass of ``mode`` (statistics, snip, taylor, full-backward) over ``data``: seconds and counts."""
    from ssah.data import batches, collate, encode_set
    from ssah.scoring import collect_statistics, gradient_mode, response_loss

    t = time.perf_counter()
    if mode != "full-backward":
        gradients = "none" if mode == "statistics" else gradient_mode(mode)
        stats = collect_statistics(
            model, tok, data, batch_size=batch_size, max_length=max_length, gradients=gradients, progress=False
        )
        return {"seconds": round(time.perf_counter() - t, 3), "examples": stats.grad_examples or len(data)}
    # the reference: the same loss (response_loss, logits only where needed) over the same batches, every
    # parameter requiring (and keeping) its gradient
    for p in model.parameters():
        p.requires_grad_(True)
    enc = encode_set(tok, data, max_length=max_length)
    examples = 0
    for idx in batches(enc, batch_size):
        b = collate([enc[i] for i in idx], tok.pad_token_id)
        loss, n, _ = response_loss(model, b)
        loss.backward()
        examples += n
    grads_mb = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None) / 2**20
    return {"seconds": round(time.perf_counter() - t, 3), "examples": examples, "grads_held_mb": round(grads_mb, 1)}


def _gradient_child(model_name: str, mode: str, examples: int, batch_size: int, max_length: int, queue) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    from ssah.models import load_model

    lm = load_model(model_name, device="cpu", dtype="float32")
    lm.model.eval()
    data = _data().take(examples)
    baseline = _status_kb("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    result = _gradient_pass(lm.model, lm.tokenizer, data, mode, batch_size, max_length)
    peak = _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params_mb = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / 2**20
    queue.put(
        {
            "mode": mode,
            **result,
            "model_params_mb": round(params_mb, 1),
            "rss_before_mb": round(baseline / 1024, 1),
            "peak_growth_mb": round((peak - baseline) / 1024, 1),
        }
    )


def gradient_memory(model_name: str, examples: int, batch_size: int, max_length: int) -> list[dict]:
    """Peak memory and time of each gradient mode, each in a fresh process (the order cannot favour one)."""
    ctx = mp.get_context("spawn")
    rows = []
    for mode in ("statistics", "snip", "taylor", "full-backward"):
        q = ctx.Queue()
        p = ctx.Process(target=_gradient_child, args=(model_name, mode, examples, batch_size, max_length, q))
        p.start()
        rows.append(q.get(timeout=1800))
        p.join()
    full = rows[-1]["peak_growth_mb"]
    for r in rows:
        r["peak_growth_over_full_backward"] = round(r["peak_growth_mb"] / full, 3) if full > 0 else None
    return rows


def _ranks(v: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(v)
    r[v.argsort()] = torch.arange(len(v), dtype=v.dtype)
    return r


def compare_metrics(model_name: str, examples: int, batch_size: int, max_length: int, top: float = 0.013) -> dict:
    """Spearman correlation and top-share overlap (Jaccard) between the metrics on one safety pass."""
    from ssah.arch import get_adapter
    from ssah.data import load_prompts
    from ssah.models import load_model
    from ssah.scoring import METRICS, collect_statistics, compute_scores
    from ssah.units import UnitSpace

    lm = load_model(model_name, device="cpu", dtype="float32")
    data = load_prompts("builtin:safety").take(examples)
    adapter = get_adapter(lm.model)
    space = UnitSpace.from_groups(adapter.groups())
    t = time.perf_counter()
    stats = collect_statistics(
        lm.model, lm.tokenizer, data, batch_size=batch_size, max_length=max_length, gradients="both", progress=False
    )
    seconds = time.perf_counter() - t
    flat = {m: compute_scores(lm.model, stats, m, space).flat() for m in METRICS}
    flat["old-wanda"] = space.join(
        {g.key: stats.groups[g.key].mean_abs * adapter.reader_column_norms(g) for g in adapter.groups()}
    )
    k = max(1, round(top * len(flat["magnitude"])))
    tops = {m: set(v.topk(k).indices.tolist()) for m, v in flat.items()}
    names = list(flat)
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = _ranks(flat[a]), _ranks(flat[b])
            rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
            pairs[f"{a} ~ {b}"] = {
                "spearman": round(rho, 3),
                f"top_{top:.1%}_jaccard": round(len(tops[a] & tops[b]) / len(tops[a] | tops[b]), 3),
            }
    return {
        "model": model_name,
        "examples": examples,
        "units": len(flat["magnitude"]),
        "top_k": k,
        "gradient_pass_s": round(seconds, 1),
        "pairs": pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/benchmarks/scoring.json")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory measurement")
    ap.add_argument("--gradient-memory", action="store_true", help="snip / taylor against a full backward")
    ap.add_argument("--compare-metrics", action="store_true", help="rank agreement between the metrics")
    ap.add_argument("--examples", type=int, default=32, help="examples of the gradient-memory / comparison passes")
    args = ap.parse_args()

    from ssah.models import load_model

    if args.compare_metrics:
        torch.set_num_threads(1)
        res = compare_metrics(args.model, args.examples, args.batch_size, args.max_length)
        for pair, v in res["pairs"].items():
            print(f"{pair:>28}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
        out = Path(args.out).with_name("scoring_metric_agreement.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if args.gradient_memory:
        rows = gradient_memory(args.model, args.examples, args.batch_size, args.max_length)
        for r in rows:
            print(
                f"{r['mode']:>14}: peak +{r['peak_growth_mb']:.0f} MB over the loaded model "
                f"({r['peak_growth_over_full_backward']}x a full backward), {r['seconds']:.1f} s"
            )
        out = Path(args.out).with_name("scoring_gradient_memory.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "examples": args.examples,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "threads": 1,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
        return

    if args.memory_only:
        print(json.dumps([peak_memory(args.model, c, args.batch_size, args.max_length) for c in (1, 4)], indent=2))
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = load_model(args.model, device="cpu")
    data = _data()
    _plain_forward(lm.model, lm.tokenizer, data.take(8), args.batch_size, args.max_length)  # warm-up
    plain, scored, tokens = [], [], 0
    for _ in range(args.repeats):  # interleaved so that machine noise hits both alike
        plain.append(_plain_forward(lm.model, lm.tokenizer, data, args.batch_size, args.max_length))
        t, tokens = _scoring(lm.model, lm.tokenizer, data, args.batch_size, args.max_length)
        scored.append(t)
    ratio = statistics.median(scored) / statistics.median(plain)
    mem = [peak_memory(args.model, c, args.batch_size, args.max_length) for c in (1, 4)]
    result = {
        "model": args.model,
        "examples": len(data),
        "tokens_counted": tokens,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "plain_forward_s": [round(x, 3) for x in plain],
        "scoring_s": [round(x, 3) for x in scored],
        "scoring_over_forward_ratio": round(ratio, 3),
        "peak_memory": mem,
        "peak_rss_ratio_4x_tokens": round(
            mem[1]["peak_rss_during_scoring_mb"] / mem[0]["peak_rss_during_scoring_mb"], 3
        ),
    }
    print(
        f"scoring / plain forward (median of {args.repeats}): {ratio:.3f}  "
        f"({statistics.median(scored):.2f} s vs {statistics.median(plain):.2f} s, {tokens} tokens)"
    )
    for m in mem:
        print(
            f"{m['tokens']} tokens: RSS {m['rss_before_mb']:.0f} MB before, "
            f"peak {m['peak_rss_during_scoring_mb']:.0f} MB while scoring (+{m['growth_mb']:.0f} MB)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
