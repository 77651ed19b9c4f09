"""GPU check: ssah's main paths on a real-size model with random weights, measured beside the memory plan.

Builds a model from its config (no weights, no network; the byte-level tiny tokenizer supplies token ids), then
runs, each timed with its peak memory next to ``ssah info --plan``'s prediction: unit scoring (statistics hooks),
batched greedy generation, ablation of 1% of the units (checked to change the logits and to be undone), and a few
AdamW steps with 1.3% of the units frozen (checked bit-identical). Writes ``gpu_check.json`` into ``--out``.

Needs only torch, transformers, accelerate, peft and safetensors, plus ssah from the tree (PYTHONPATH=src).
Sized for well under 8 minutes on one H200 with the default Llama-3-8B in bfloat16; ``--config tiny --device cpu``
runs the same code in seconds (the fast test suite does).

    PYTHONPATH=src python benchmarks/gpu_check.py --out $OUT [--config llama3-8b|qwen2.5-7b|tiny] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
}


def _config(name: str) -> Any:
    from ssah.plan import config_from_dict
    from ssah.tiny import tiny_config

    if name == "tiny":
        return tiny_config("llama")
    if name not in CONFIGS:
        raise SystemExit(f"error: unknown --config {name!r}: use tiny or {', '.join(CONFIGS)}")
    return config_from_dict(CONFIGS[name])


class Meter:
    """Time and peak memory of one stage: CUDA's peak allocated bytes, or the process's peak RSS on the CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> Meter:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_kind = "cuda_max_allocated"
        else:  # whole-process peak (monotone over the run): an upper bound for this stage
            self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            self.peak_kind = "process_max_rss"
        self.seconds = time.perf_counter() - self.t0


def _prediction(needs: list[dict[str, Any]], command: str, batch: int) -> dict[str, int]:
    n = next(x for x in needs if x["command"] == command)
    return {"fixed": n["fixed"], "per_row": n["per_row"], "total_at_batch": n["fixed"] + batch * n["per_row"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    ap.add_argument("--config", default="llama3-8b", help=f"tiny, {', '.join(CONFIGS)}")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per scoring / training example")
    ap.add_argument("--score-examples", type=int, default=32)
    ap.add_argument("--score-batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the stages left after this many seconds")
    args = ap.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible: pass --device cpu (with --config tiny)", file=sys.stderr)
        return 2
    import transformers
    from transformers import AutoModelForCausalLM

    from ssah.data import Example, PromptSet
    from ssah.generate import GenerationConfig, generate
    from ssah.interventions import ablate, freeze_units, space_of
    from ssah.plan import plan
    from ssah.scoring import score_units
    from ssah.tiny import tiny_tokenizer
    from ssah.units import UnitSet

    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(args.config)
    settings = {"seq_len": args.seq_len, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    predicted = plan(config, dtypes=(args.dtype,), batch_size=1, **settings)
    needs = predicted["needs"]
    report: dict[str, Any] = {
        "config": args.config,
        "dtype": args.dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version},
        "settings": vars(args),
        "plan": {"params": predicted["shape"]["params"], "weights_bytes": needs[0]["weights"]},
        "stages": {},
        "skipped": [],
    }

    def save() -> None:
        report["seconds_total"] = round(time.perf_counter() - t_start, 2)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    def over_budget(stage: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            report["skipped"].append(stage)
            return True
        return False

    tok = tiny_tokenizer()
    with Meter(device) as m:
        torch.manual_seed(0)
        with torch.device(device):  # random init straight on the device
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        built_on = str(next(model.parameters()).device)
        if next(model.parameters()).device.type != device.type:  # a transformers that ignores the device context
            model = model.to(device)
        model.eval()
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report["stages"]["build"] = {
        "seconds": round(m.seconds, 2),
        "params": params,
        "weights_bytes": weights,
        "weights_vs_plan": round(weights / needs[0]["weights"], 4),
        "built_on": built_on,
        "peak_bytes": m.peak,
        "peak_kind": m.peak_kind,
    }
    save()

    # units scoring: byte-level tokens, so a text of n characters is about n tokens
    text = "The quick brown fox jumps over the lazy dog. "
    body = (text * (args.seq_len // len(text) + 1))[: max(args.seq_len - 24, 8)]
    examples = tuple(Example(body[: len(body) - i], "Fine.") for i in range(args.score_examples))
    data = PromptSet("synthetic", "memory:synthetic", examples)
    if not over_budget("units"):
        with Meter(device) as m:
            scores = score_units(model, tok, data, batch_size=args.score_batch, max_length=args.seq_len, progress=False)
        report["stages"]["units"] = {
            "seconds": round(m.seconds, 2),
            "tokens": scores.tokens,
            "tokens_per_s": round(scores.tokens / m.seconds, 1),
            "batch_size": args.score_batch,
            "peak_bytes": m.peak,
            "peak_kind": m.peak_kind,
            "plan": _prediction(needs, "units", args.score_batch),
        }
        save()

    prompts = [body[: args.prompt_len - 16 - i] for i in range(args.gen_batch)]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=args.gen_batch)
    if not over_budget("generate"):
        with Meter(device) as m:
            gens = generate(model, tok, prompts, config=cfg, progress=False)
        new = sum(g.new_tokens for g in gens)
        report["stages"]["generate"] = {
            "seconds": round(m.seconds, 2),
            "new_tokens": new,
            "tokens_per_s": round(new / m.seconds, 1),
            "batch_size": args.gen_batch,
            "peak_bytes": m.peak,
            "peak_kind": m.peak_kind,
            "plan": _prediction(needs, "eval", args.gen_batch),
        }
        save()

    space = space_of(model)
    units = UnitSet.from_indices(
        space,
        torch.randperm(space.total, generator=torch.Generator().manual_seed(0))[: max(1, space.total // 100)],
        "random-1%",
    )
    ids = torch.tensor([tok(body[: args.prompt_len])["input_ids"]] * 4, device=device)
    if not over_budget("ablate"):
        with torch.no_grad():
            before = model(ids, logits_to_keep=1).logits.float()
            with Meter(device) as m, ablate(model, units):
                ablated = model(ids, logits_to_keep=1).logits.float()
                gens = generate(model, tok, prompts[:8], config=GenerationConfig(max_new_tokens=16), progress=False)
            after = model(ids, logits_to_keep=1).logits.float()
        report["stages"]["ablate"] = {
            "seconds": round(m.seconds, 2),
            "units": len(units),
            "logits_changed": bool((ablated - before).abs().max() > 0),
            "undone_exactly": bool(torch.equal(before, after)),
            "peak_bytes": m.peak,
            "peak_kind": m.peak_kind,
        }
        save()

    if not over_budget("train_frozen"):
        frozen_set = UnitSet.from_indices(space, list(range(0, space.total, 77)), "every-77th")  # 1.3%
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        batch = torch.tensor([tok(body[: args.seq_len])["input_ids"]] * args.train_batch, device=device)
        losses = []
        with Meter(device) as m, freeze_units(model, frozen_set) as frozen:
            for _ in range(args.train_steps):
                loss = model(batch, labels=batch).loss
                loss.backward()
                opt.step()
                frozen.restore()
                opt.zero_grad(set_to_none=True)
                losses.append(round(float(loss.detach()), 4))
            drift = frozen.max_drift()
        model.eval()
        tokens = args.train_steps * batch.numel()
        report["stages"]["train_frozen"] = {
            "seconds": round(m.seconds, 2),
            "steps": args.train_steps,
            "tokens_per_s": round(tokens / m.seconds, 1),
            "batch_size": args.train_batch,
            "losses": losses,
            "frozen_entries": frozen.frozen_parameters,
            "frozen_max_drift": drift,
            "peak_bytes": m.peak,
            "peak_kind": m.peak_kind,
            "plan": _prediction(needs, "train-frozen", args.train_batch),
        }
        del opt
    save()
    for name, st in report["stages"].items():
        plan_total = st.get("plan", {}).get("total_at_batch")
        # on a GPU the peak is this stage's; on the CPU it is the process's peak RSS (no per-stage figure)
        ratio = f", measured / plan {st['peak_bytes'] / plan_total:.2f}" if plan_total and device.type == "cuda" else ""
        print(f"{name:13s} {st['seconds']:8.2f} s  peak {st['peak_bytes'] / 2**30:7.2f} GiB{ratio}")
    print(f"wrote {out / 'gpu_check.json'} in {report['seconds_total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
