"""Fine-tuning on one loop (accelerate): full, frozen-units, units-only and LoRA training, with exact resume.

Trainable sets: ``all`` (every parameter, optionally not the input embeddings and with them a tied head),
``freeze`` (all but a :class:`~ssah.units.UnitSet`, whose reader columns and writer rows stay bit-identical),
``only`` (just a unit set, through per-unit deltas merged at the end) and ``lora`` (peft adapters, merged at the
end). With several processes (``torchrun`` or ``accelerate launch``) the model is replicated (DDP) or, with
``fsdp``, sharded with FSDP2.

Modules, one job each:

- :mod:`~ssah.training.config`: :class:`TrainConfig` (its :class:`TrainSection` is what recipes nest under
  ``train``), :class:`LoraSettings` (-> ``peft.LoraConfig``);
- :mod:`~ssah.training.unit_specs`: ``UNITS_FILE:SCU,CU@6%`` -> the unit set to freeze or train;
- :mod:`~ssah.training.data_plan`: which examples each rank sees in each step (a function of the seed);
- :mod:`~ssah.training.loss`: response-only cross-entropy;
- :mod:`~ssah.training.trainable`: what trains in each mode;
- :mod:`~ssah.training.distributed`: accelerate, FSDP2 sharding;
- :mod:`~ssah.training.checkpoints`: checkpoints, exact resume, the staging folder;
- :mod:`~ssah.training.loop`: :func:`train_model`;
- :mod:`~ssah.training.pairs`: preference pairs built at run time (refusal over the model's own compliant reply,
  answer over a refusal);
- :mod:`~ssah.training.preference`: :func:`preference_step`, DPO with trl's DPOTrainer under the same unit masks;
- :mod:`~ssah.training.results`: :class:`TrainResult`.

``train_model`` trains a model in memory (experiment loops call it); ``ssah.recipes.train.run.run_train`` is the
`ssah train` recipe.
"""

from ssah.training.checkpoints import checkpoint_dirs, partial_dir
from ssah.training.config import LoraSettings, TrainConfig, TrainSection, parse_lora
from ssah.training.data_plan import DataPlan
from ssah.training.distributed import fsdp_requested
from ssah.training.loop import train_model
from ssah.training.loss import response_loss
from ssah.training.pairs import Pair, pairs_jsonl, preference_pairs
from ssah.training.preference import METHODS, DpoSection, Method, preference_step, uses_dpo
from ssah.training.results import TrainResult
from ssah.training.unit_specs import (
    load_ranked_categories,
    parse_unit_spec,
    resolve_unit_spec,
    unit_set_digest,
    unit_spec_selection,
)

__all__ = [
    "METHODS",
    "DataPlan",
    "DpoSection",
    "LoraSettings",
    "Method",
    "Pair",
    "TrainConfig",
    "TrainResult",
    "TrainSection",
    "checkpoint_dirs",
    "fsdp_requested",
    "load_ranked_categories",
    "pairs_jsonl",
    "parse_lora",
    "parse_unit_spec",
    "partial_dir",
    "preference_pairs",
    "preference_step",
    "resolve_unit_spec",
    "response_loss",
    "train_model",
    "unit_set_digest",
    "unit_spec_selection",
    "uses_dpo",
]
