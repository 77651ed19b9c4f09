"""The `ssah train` report: what was trained, the loss, and the step log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ssah.reports.common import markdown_table
from ssah.results import RunResult


def render(results: dict[str, Any], run_dir: Path) -> str:
    """The Markdown report of a train run from its results and the step log ``run_dir/train_log.jsonl`` (no plots)."""
    log_file = Path(run_dir) / "train_log.jsonl"
    text = log_file.read_text(encoding="utf-8").splitlines() if log_file.is_file() else []
    log = [json.loads(line) for line in text if line.strip()]
    m, tr = results["model"], results["trainable"]
    units = results.get("freeze") or results.get("only")
    share = f" ({units['units']} units, {100 * units['fraction']:.2f}% of all units)" if units else ""
    what = {
        "all": "all parameters",
        "freeze": f"all but the frozen units {units['name'] if units else ''}{share}",
        "only": f"only the units {units['name'] if units else ''}{share}",
        "lora": f"LoRA adapters ({results['lora']}), merged into the weights",
    }[results["mode"]]
    rows = [[r["step"], f"{r['loss']:.4f}", f"{r['lr']:.3g}", r["tokens"], f"{r['step_seconds']:.3f}"] for r in log]
    if len(rows) > 20:
        rows = [*rows[:10], ["...", "", "", "", ""], *rows[-9:]]
    lines = [
        f"# Fine-tuning of {m['name']}",
        "",
        f"Trained {what}: {tr['params']} of {tr['total']} parameters ({100 * tr['share']:.3f}%).",
        f"Data `{results['data']['source']}` ({results['examples']} examples used, {results['skipped_examples']} "
        f"skipped), {results['steps']} optimizer steps ({results['epochs']} epochs), "
        f"{results['response_tokens']} response tokens.",
        f"Loss {results['first_loss']:.4f} at the first step, {results['final_loss']:.4f} at the last.",
    ]
    if results.get("frozen_max_drift") is not None:
        lines.append(f"Largest change of a frozen weight: {results['frozen_max_drift']:g}.")
    if results.get("resumed_from") is not None:
        lines.append(f"Resumed from the checkpoint at step {results['resumed_from']}.")
    lines += [
        "",
        markdown_table(["step", "loss", "lr", "tokens", "seconds"], rows),
        "",
        f"Took {results['seconds']['total']:.1f} s (training {results['seconds']['train']:.1f} s). "
        "The model is in `model/` (safetensors; `AutoModelForCausalLM.from_pretrained` loads it).",
    ]
    return "\n".join(lines) + "\n"


def summary(result: RunResult[Any]) -> None:
    """The command's closing lines: table or lines, and where the run folder is."""
    path, res = result.out, result.results
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    tr = res["trainable"]
    typer.echo(
        f"trained {res['model']['name']} ({res['mode']}): {res['steps']} steps, loss {res['first_loss']:.4f} -> "
        f"{res['final_loss']:.4f}, {tr['params']} of {tr['total']} parameters trained ({100 * tr['share']:.2f}%)"
    )
    typer.echo(f"wrote {path} in {res['seconds']['total']:.1f} s (model in {path / 'model'})")
