"""`ssah train`: fine-tune a model (all parameters, all but frozen units, only some units, or LoRA) into a run folder.

The run lives in ``<out>.partial/`` while it trains (checkpoints and ``train_log.jsonl`` survive a kill there, and
``--resume`` continues from the newest checkpoint) and is renamed to ``<out>`` once complete::

    <out>/model/            safetensors weights, config and tokenizer: plain ``from_pretrained`` loads it
          train_log.jsonl   one line per optimizer step (loss, learning rate, step time, tokens)
          results.json      steps, losses, trainable share, settings, timing
          config.yaml  manifest.json  report.md  checkpoints/ (the last one, or all with keep_checkpoints)

Under ``accelerate launch`` every process trains and only the main one writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from ssah.data import PromptSet, load_prompts
from ssah.errors import DataError, UserError
from ssah.measure import Selection
from ssah.models import load_model, resolve_device
from ssah.recipes.train import RECIPE
from ssah.registry import load_run
from ssah.results import RunResult
from ssah.runs import RunDir, manifest, write_run
from ssah.training import TrainConfig, TrainResult, checkpoint_dirs, partial_dir, train_model, unit_spec_selection

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainRunDir", "run_train", "save_trained_model"]


class TrainRunDir(RunDir):
    """A run folder built in ``<out>.partial`` (a stable name, unlike :class:`RunDir`'s per-process staging
    folder), so that a killed training run can be resumed; ``commit`` renames it to ``<out>``.

    Staging is :class:`RunDir`'s: ``out``'s lock is held for the whole run (a second run into the same folder
    fails at once), ``<out>.partial`` is created with ``os.mkdir`` (exclusive) unless resuming, and ownership is
    checked before the final rename.
    """

    def __init__(self, out: str | os.PathLike[str], *, overwrite: bool = False, resume: bool = False) -> None:
        self.resume = resume
        super().__init__(out, overwrite=overwrite)

    def _staging_path(self) -> Path:
        return partial_dir(self.out)

    def _make_staging(self) -> None:
        if self.resume:
            if not self.path.is_dir():
                raise UserError(f"nothing to resume: {self.path} does not exist; run without --resume to start")
            return
        if self.path.exists():
            if not self.overwrite:
                raise UserError(
                    f"an unfinished run is in {self.path}: pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(self.path)
        os.mkdir(self.path)

    def abort(self) -> None:
        """Keep the folder when it holds a checkpoint (``--resume`` continues from it); remove it otherwise."""
        if checkpoint_dirs(self.path):
            log.warning("training stopped; continue it with --resume (checkpoints in %s)", self.path)
        elif self.lock.owned():
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock.release()


def save_trained_model(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str]) -> Path:
    """Save a trained model (safetensors) with its tokenizer, loadable by plain ``from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"saving the model into {folder} wrote no safetensors file; check the model class")
    return folder


def _unit_summary(sel: Selection | None, spec: str | None, trainable: Mapping[str, Any], frozen: bool) -> Any:
    """The unit spec as run: counts per part, the share of all units and of the parameters (frozen for
    ``--freeze``, trained for ``--only``)."""
    if sel is None:
        return None
    params = trainable["total"] - trainable["params"] if frozen else trainable["params"]
    return {
        "spec": spec,
        "name": sel.units.name,
        "units": len(sel.units),
        "fraction": sel.units.fraction,
        "share_of_units": sel.units.fraction,
        "parts": sel.counts,
        "params": params,
        "share_of_params": params / trainable["total"] if trainable["total"] else 0.0,
        "granularity": sel.units.space.granularity,
    }


def run_train(cfg: TrainConfig) -> RunResult[TrainConfig]:
    """Run the recipe and write the run folder; returns its RunResult (on every process of a distributed run: the
    others read the folder back once the main process has committed it)."""
    from accelerate import PartialState

    t0 = time.time()
    # on a CPU-only machine accelerate starts a (gloo) process group only when asked for the CPU up front
    state = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
    cfg.check()
    state.wait_for_everyone()  # every process checks the folders before the main one creates OUT.partial
    set_seed(cfg.seed)
    data: PromptSet = load_prompts(cfg.data, columns=cfg.columns or None, limit=cfg.limit, name="train")
    if len(data) == 0:
        raise DataError(f"the training data {cfg.data} is empty: pass a data set with at least one example")
    if not data.has_responses:
        raise DataError(
            f"training needs a response for every example, and {cfg.data} lacks some: "
            "use a data set with a response column (or --column response=NAME)"
        )
    lm = load_model(
        cfg.model,
        dtype=cfg.dtype,
        device=str(state.device) if state.num_processes > 1 and cfg.device == "auto" else cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
    )

    def resolve(spec: str | None) -> Selection | None:
        if not spec:
            return None
        return unit_spec_selection(
            spec, lm.model, fingerprint=lm.fingerprint, model_name=lm.name, allow_other_weights=cfg.allow_other_weights
        )

    freeze_sel, only_sel = resolve(cfg.freeze), resolve(cfg.only)
    freeze = freeze_sel.units if freeze_sel is not None else None
    only = only_sel.units if only_sel is not None else None
    if only is not None and len(only) == 0:
        raise UserError(f"no units to train: {cfg.only} names no unit; choose a non-empty category or share")
    model_info = {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint, "family": lm.family}

    main = state.is_main_process
    run: TrainRunDir | None = None
    if main:
        run = TrainRunDir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume)
        if not cfg.resume:  # a resumed run keeps its folder as it is until its checkpoint has loaded
            run.write_yaml("config.yaml", cfg.model_dump())
    state.wait_for_everyone()
    path = partial_dir(cfg.out)
    try:
        result = train_model(
            lm.model, lm.tokenizer, data, cfg, freeze=freeze, only=only, run_dir=path, progress=cfg.progress
        )
    except BaseException:
        if run is not None:
            run.abort()
        raise
    if run is None:
        state.wait_for_everyone()  # the main process has committed the folder, or failed
        try:
            return load_run(cfg.out)
        except UserError:
            raise UserError(f"the main process did not finish {cfg.out}: see its error") from None
    try:
        save_trained_model(result.model, lm.tokenizer, run.file("model"))
        results = _results(cfg, result, data, model_info, freeze_sel, only_sel)
        results["seconds"] = {
            "load_model": round(lm.load_seconds, 3),
            "train": round(result.seconds, 3),
            "total": round(time.time() - t0, 3),
        }
        device = next(result.model.parameters()).device
        used = {"train": {"source": data.source, "sha256": data.fingerprint(), "examples": len(data)}}
        how = {"command": "train", "seed": cfg.seed, "started": t0, "world_size": state.num_processes}
        mf = manifest(**how, device=device, model=model_info, data=used)
        run_result = write_run(run, RECIPE.name, config=cfg, results=results, manifest=mf, render=RECIPE.renderer())
        run.commit()
    except BaseException:
        run.abort()
        raise
    finally:
        with contextlib.suppress(Exception):
            state.wait_for_everyone()
    return run_result


def _results(
    cfg: TrainConfig,
    result: TrainResult,
    data: PromptSet,
    model_info: dict[str, Any],
    freeze_sel: Selection | None,
    only_sel: Selection | None,
) -> dict[str, Any]:
    """``results.json`` of a run (but its timing)."""
    return {
        "model": model_info,
        "data": {"source": data.source, "examples": len(data), "sha256": data.fingerprint()},
        **result.summary(),
        "freeze": _unit_summary(freeze_sel, cfg.freeze, result.trainable, frozen=True),
        "only": _unit_summary(only_sel, cfg.only, result.trainable, frozen=False),
        "lora": cfg.lora.model_dump() if cfg.lora is not None else None,
        "settings": cfg.settings(),
    }
