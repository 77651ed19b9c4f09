"""`ssah export`: an edited model as a plain Hugging Face folder (safetensors, tokenizer, config, a short card).

Two edits are folded into the weights, each exactly equal to its in-memory hook version:

- an ablation of units (``interventions.ablate``): ``zero`` zeroes each ablated unit's reader slice (the column
  of ``o_proj`` / ``down_proj``, the row of a GPT-2 ``Conv1D``); ``mean`` (FLAP's bias compensation) adds
  ``W[:, j] * mean_j`` of every ablated channel to the reader's output bias, then zeroes the slice. A reader
  without a bias gets one through the family's config flag (Llama: ``attention_bias`` / ``mlp_bias``; the flag
  also adds zero biases to the other projections it governs, which change nothing); a family without such a flag
  cannot carry the bias in a plain folder, so its mean export is refused (export ``--mode zero`` instead).
- weight orthogonalisation against a refusal direction (``ssah.direction.orthogonal_weights``); tied embeddings
  are untied (``tie_word_embeddings: false``) so the output head keeps its weights, as in the hook version.

Every bad input fails before anything is written; the folder is staged and renamed into place (``RunDir``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssah.arch import get_adapter
from ssah.errors import UserError
from ssah.units import UnitSet

# Config flags that give a family's attention / MLP output projections a bias.
READER_BIAS_FLAGS: dict[str, tuple[str, ...]] = {
    "llama": ("attention_bias", "mlp_bias"),
}


def _readers(model: nn.Module, units: UnitSet) -> list[tuple[Any, torch.Tensor]]:
    """(group, channel mask) of every group with ablated channels."""
    adapter = get_adapter(model)
    masks = units.channel_masks()
    return [(g, masks[g.key]) for g in adapter.groups() if bool(masks[g.key].any())]


def _reader_weight_bias(model: nn.Module, g: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's reader weight and output bias: the module's, or a fused expert's slices ``down_proj[e]`` and
    ``down_proj_bias[e]`` (None where the experts have no biases)."""
    mod: Any = model.get_submodule(g.reader_module)
    if not g.fused:
        return mod.weight, getattr(mod, "bias", None)
    bias = mod.down_proj_bias[g.expert] if getattr(mod, "has_bias", False) else None
    return mod.down_proj[g.expert], bias


def needs_reader_bias(model: nn.Module, units: UnitSet) -> bool:
    """Whether folding a mean ablation of ``units`` needs a bias the model's readers do not have."""
    return any(_reader_weight_bias(model, g)[1] is None for g, _ in _readers(model, units))


def with_reader_biases(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose attention and MLP output projections have (zero) biases, built from the config
    with the family's bias flags on, so a plain ``from_pretrained`` rebuilds it; UserError for other families."""
    import transformers

    family = str(getattr(model.config, "model_type", "?"))
    flags = READER_BIAS_FLAGS.get(family)
    if flags is None:
        raise UserError(
            f"{family} models have no config flag for an output-projection bias, so a mean ablation cannot be "
            "folded into a plain Hugging Face folder: export with --mode zero"
        )
    old: Any = model.config
    config = old.__class__.from_dict(old.to_dict())
    for flag in flags:
        setattr(config, flag, True)
    dtype = next(model.parameters()).dtype
    new = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise UserError(f"cannot add output biases to this {family} model: export with --mode zero")
    with torch.no_grad():
        for k in missing:
            new.get_parameter(k).zero_()
    new.tie_weights()
    return new.eval()


def fold_ablation(
    model: nn.Module, units: UnitSet, *, mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Fold an ablation of ``units`` into the weights, in place (``mean`` needs reader biases: see
    :func:`with_reader_biases`). Afterwards the model computes what ``interventions.ablate`` computes."""
    if mode not in ("zero", "mean"):
        raise UserError(f"unknown ablation mode {mode!r}: use zero or mean")
    if mode == "mean" and means is None:
        raise UserError("mean ablation needs the calibration means: pass means=channel_means(statistics)")
    with torch.no_grad():
        for g, mask in _readers(model, units):
            w, bias = _reader_weight_bias(model, g)
            cols = w if g.reader.dim == 0 else w.t()  # [in channels, out features] (Conv1D, transposed experts)
            if mode == "mean":
                assert means is not None
                if bias is None:
                    raise UserError(f"{g.key} ({g.reader_module}) has no bias to fold the channel means into")
                mean = means[g.key].to(torch.float64)
                shift = (cols.double()[mask] * mean[mask].to(cols.device).unsqueeze(-1)).sum(0)
                bias.add_(shift.to(bias.dtype))
            cols[mask] = 0


def _card(source: str, fingerprint: str, what: str) -> str:
    import ssah

    return (
        "---\nlibrary_name: transformers\ntags: [ssah, edited]\n---\n\n"
        f"# Edited copy of `{source}`\n\n"
        f"Written by `ssah export` (ssah {ssah.__version__}) from the model with ssah fingerprint `{fingerprint}`.\n\n"
        f"**Edit:** {what}\n\n"
        "The edit is folded into the weights: load this folder with plain "
        "`transformers.AutoModelForCausalLM.from_pretrained`; no ssah code and no remote code are needed.\n"
    )


def export_model(
    model_spec: str,
    out: Path,
    *,
    ablate: str | None = None,
    orthogonalize: str | None = None,
    mode: str = "zero",
    safety: str = "builtin:safety",
    utility: str = "builtin:utility",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> Path:
    """Load ``model_spec``, fold one edit into its weights and write ``out`` (see the module doc)."""
    from ssah.direction import load_direction
    from ssah.runs import held_output
    from ssah.units import read_unit_file_metadata

    if (ablate is None) == (orthogonalize is None):
        raise UserError("pass exactly one edit: --ablate UNITS_FILE:SET or --orthogonalize RUN_DIR")
    if mode not in ("zero", "mean"):
        raise UserError(f"unknown ablation mode {mode!r}: use zero or mean")
    unit_path, set_name = None, None
    if ablate is not None:
        path_text, sep, set_name = ablate.rpartition(":")
        if not sep or not path_text or not set_name:
            raise UserError(f"--ablate {ablate!r} names no unit set: write UNITS_FILE:SET, e.g. units.safetensors:SCU")
        unit_path = Path(path_text)
        meta = read_unit_file_metadata(unit_path)  # a missing or foreign file fails before the model loads
        available = [n for n in meta["sets"].split(",") if n]
        if set_name not in available:
            raise UserError(
                f"--ablate {ablate!r}: unit set {set_name!r} is not in {unit_path}; it holds {', '.join(available)}"
            )
    else:
        assert orthogonalize is not None
        load_direction(orthogonalize)  # the same for a folder without a direction, or a damaged one
    with held_output(out, overwrite):  # a second export into the same folder stops here, before loading
        return _export_held(
            model_spec,
            out,
            unit_path=unit_path,
            set_name=set_name,
            orthogonalize=orthogonalize,
            mode=mode,
            calibration=(safety, utility),
            load=dict(dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code),
            overwrite=overwrite,
        )


def _export_held(
    model_spec: str,
    out: Path,
    *,
    unit_path: Path | None,
    set_name: str | None,
    orthogonalize: str | None,
    mode: str,
    calibration: tuple[str, str],
    load: Mapping[str, Any],
    overwrite: bool,
) -> Path:
    """:func:`export_model` once its arguments are checked and ``out``'s lock is held."""
    from ssah.direction import load_direction, orthogonal_weights, tied_embeddings
    from ssah.models import load_model
    from ssah.runs import RunDir
    from ssah.units import UnitSpace, load_unit_sets, read_unit_file_metadata

    safety, utility = calibration
    lm = load_model(model_spec, device="cpu", **load)
    model: Any = lm.model
    if unit_path is not None:
        assert set_name is not None
        meta = read_unit_file_metadata(unit_path)
        space = UnitSpace.from_groups(get_adapter(model).groups(), meta["granularity"], lm.fingerprint, lm.name)  # type: ignore[arg-type]
        units = load_unit_sets(unit_path, space, names=[set_name])[set_name]  # its errors name the cause
        means = None
        if mode == "mean":
            if needs_reader_bias(model, units):
                model = with_reader_biases(model)
            means = _calibration_means(lm, safety, utility)
        fold_ablation(model, units, mode=mode, means=means)
        what = (
            f"{len(units)} units of set `{set_name}` from `{unit_path}` ablated "
            + ("(zero: their reader columns set to 0)." if mode == "zero" else
               "(mean, FLAP's bias compensation: their calibration means folded into the output biases, reader "
               f"columns set to 0; calibration {safety} + {utility}).")
        )  # fmt: skip
    else:
        assert orthogonalize is not None
        width = int(model.get_input_embeddings().weight.shape[1])
        saved = load_direction(orthogonalize, fingerprint=lm.fingerprint, hidden=width)
        tied = tied_embeddings(model)
        edited = orthogonal_weights(model, saved.direction)
        emb = model.get_input_embeddings()
        emb_name = next(n for n, p in model.named_parameters() if p is emb.weight)
        with torch.no_grad():
            if tied:
                model.config.tie_word_embeddings = False
                text = model.config.get_text_config()
                text.tie_word_embeddings = False
                emb.weight = nn.Parameter(edited.pop(emb_name))
            for name, w in edited.items():
                model.get_parameter(name).copy_(w)
        what = (
            f"weights orthogonalised against the refusal direction of `{orthogonalize}` (layer {saved.layer}, "
            f"position {saved.position}): embeddings and every attention / MLP output projection can no longer "
            "write along it" + (" (embeddings untied from the output head)." if tied else ".")
        )
    with RunDir(out, overwrite=overwrite) as run:
        model.save_pretrained(run.path, safe_serialization=True)
        lm.tokenizer.save_pretrained(run.path)
        run.write_text("README.md", _card(lm.name, lm.fingerprint, what))
    return run.out


def _calibration_means(lm: Any, safety: str, utility: str) -> dict[str, torch.Tensor]:
    """Per-channel means over the merged safety + utility calibration sets (what ``ssah ablate`` uses)."""
    from ssah.data import load_prompts
    from ssah.interventions import channel_means
    from ssah.scoring import collect_statistics

    stats = [
        collect_statistics(lm.model, lm.tokenizer, load_prompts(spec, name=name), progress=False)
        for spec, name in ((safety, "safety"), (utility, "utility"))
    ]
    return channel_means(stats[0].merge(stats[1]))
