"""Logits only where they are read (`ssah.inference.logits_at`) against the full vocabulary projection.

Measures, does not assert. The same code runs twice on one model: as it is (``logits_to_keep`` honoured) and
through a wrapper whose forward drops ``logits_to_keep``, so the model projects every position and `logits_at`
cuts them afterwards (what every pass did before). Timed runs alternate (kept, full, full, kept, ...) so that
load from other processes hits both alike. Measured: perplexity of the task set's reference replies; KL on
harmless prompts (teacher-forced 16-token replies; the reference is taken the kept way, so the full way must give
KL 0); a training step (forward + backward of the response loss, batches of 8 from the alignment mix). The values
of each way are recorded: they must agree.

    python benchmarks/bench_logits.py [--model smollm2-135m-instruct] [--examples 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=16, help="task examples, harmless prompts, and SFT examples / 2")
    ap.add_argument("--batch-size", type=int, default=32, help="perplexity and KL batch (ablate's quick config)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per way (interleaved)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="runs/benchmarks/logits.json")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ssah.data import collate, encode_set, load_prompts
    from ssah.data.training import alignment_mix
    from ssah.evaluate import kl_divergence, kl_reference, perplexity
    from ssah.inference import pad_id
    from ssah.models import load_model
    from ssah.training import response_loss

    class FullLogits(torch.nn.Module):
        """The model with ``logits_to_keep`` dropped: every position is projected onto the vocabulary."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: Any) -> Any:
            kwargs.pop("logits_to_keep", None)
            return self.inner(**kwargs)

        def __getattr__(self, name: str) -> Any:  # config, get_input_embeddings, ... of the wrapped model
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    lm = load_model(args.model, device="cpu", dtype="float32")
    models = {"kept": lm.model, "full": FullLogits(lm.model)}
    task = load_prompts("builtin:task").spread(args.examples)
    reference = kl_reference(lm.model, lm.tokenizer, load_prompts("builtin:benign").spread(args.examples),
                             batch_size=args.batch_size)  # fmt: skip
    mix = alignment_mix(seed=0)
    encoded = encode_set(lm.tokenizer, mix.spread(2 * args.examples))
    batches = [collate(encoded[k : k + 8], pad_id(lm.tokenizer)) for k in range(0, len(encoded), 8)]

    def train_step(model: Any) -> float:
        total = 0.0
        for batch in batches:
            loss, _ = response_loss(model, {k: v for k, v in batch.items() if k != "count_mask"})
            loss.backward()
            total += float(loss.detach())
        lm.model.zero_grad(set_to_none=True)
        return total

    tasks: dict[str, Callable[[Any], float]] = {
        "perplexity": lambda m: perplexity(m, lm.tokenizer, task, batch_size=args.batch_size),
        "kl": lambda m: float(sum(kl_divergence(m, lm.tokenizer, reference).reply)),
        "training": train_step,
    }
    result: dict[str, Any] = {
        "model": args.model,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "examples": args.examples,
        "rounds": args.rounds,
    }
    for name, fn in tasks.items():
        fn(models["kept"])  # warm-up: first-call costs hit neither side
        seconds: dict[str, list[float]] = {"kept": [], "full": []}
        values: dict[str, float] = {}
        for way in ["kept", "full", "full", "kept"] * ((args.rounds + 1) // 2):
            if len(seconds[way]) == args.rounds:
                continue
            t = time.perf_counter()
            values[way] = fn(models[way])
            seconds[way].append(time.perf_counter() - t)
        kept, full = (statistics.median(seconds[w]) for w in ("kept", "full"))
        result[name] = {"seconds": {"kept": kept, "full": full}, "speedup": full / kept, "values": values}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
