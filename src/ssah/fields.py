"""Config field types several recipes share: the type, its constraint, how a string is read, and its help,
declared once. A recipe's config writes ``metric: Metric = "fluctuation"``; the CLI flag, the YAML key and the
Python keyword all come from that one line (see :mod:`ssah.config`).

Strings are accepted where a structured value is meant (``shares: scu=0.013,ru=0.15``, ``categories: SCU,RU``),
so the same text works as a ``--flag``, in YAML and as a ``key=value`` override.

The plug-in fields (metric, rule, normalisation, judge) read their registries (:mod:`ssah.plugins`): a name is
checked against what is registered when the config is validated, and the help and JSON schema list the registered
names, so a user's ``register_metric("mine", ...)`` makes ``metric: mine`` valid with no change here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ssah.config import Section
from ssah.data.chat import TokenRegion
from ssah.errors import UserError
from ssah.interventions import AblationMode
from ssah.judges import judge_specs
from ssah.metrics import METRICS
from ssah.plugins import Registry
from ssah.rules import DEFAULT_NORMALIZATION, NORMALIZATIONS, RULES, Ranking
from ssah.units import Granularity as GranularityName

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ssah.data import PromptSet
    from ssah.evaluate import EvalData
    from ssah.generate import GenerationConfig


def parse_unit_shares(value: Any, *, what: str, flag: str, whole: bool = False) -> list[float]:
    """Shares of all units from ``"0.5%,1.3%"``, ``"0.005,0.013"`` or a list of either, sorted, without repeats;
    each in (0, 1), or (0, 1] with ``whole``. ``what`` and ``flag`` name the value in the one-line errors."""
    import math

    items = [str(x) for x in value] if isinstance(value, list | tuple) else str(value).split(",")
    out: list[float] = []
    for raw in (i.strip() for i in items):
        if not raw:
            continue
        try:
            share = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise UserError(f"bad {what} {raw!r}: write shares of all units as 0.5% or 0.005") from None
        if math.isnan(share) or not (0 < share <= 1 if whole else 0 < share < 1):
            raise UserError(f"{what} {raw!r} is outside (0, 100%{']' if whole else ')'}: give a share of all units, "
                            "e.g. 1% or 0.01")  # fmt: skip
        out.append(share)
    if not out:
        raise UserError(f"no {what}s given: pass e.g. {flag} 0.5%,1.3%")
    return sorted(set(out))


def split_commas(value: Any) -> Any:
    """``"a,b"`` or ``["a,b", "c"]`` -> ``["a", "b", "c"]`` (blank items dropped); other values unchanged."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list | tuple):
        out: list[Any] = []
        for item in value:
            parts = item.replace(";", ",").split(",") if isinstance(item, str) else [item]
            out += [p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip()]
        return out
    return value


def _pairs(parse: Callable[[list[str]], dict[str, Any]]) -> Callable[[Any], Any]:
    """A before-validator reading ``"a=1,b=2"`` (or a list of ``a=1`` items) with ``parse``; mappings pass."""

    def read(value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            items = split_commas(value)
            odd = next((x for x in items if not isinstance(x, str)), None)
            if odd is not None:
                raise ValueError(f"write key=value items, e.g. a=1,b=2, not {type(odd).__name__} {str(odd)[:60]!r}")
            return parse(items)
        return value

    return read


def _shares(items: list[str]) -> dict[str, Any]:
    from ssah.categorize import parse_shares

    return parse_shares(",".join(items))


def _columns(items: list[str]) -> dict[str, Any]:
    from ssah.data import parse_column_mapping

    return parse_column_mapping(items)


def _judge_columns(items: list[str]) -> dict[str, Any]:
    from ssah.data import parse_column_mapping

    return parse_column_mapping(items, ("prompt", "reply", "label"))


def registered(registry: Registry[Any]) -> Callable[[str], str]:
    """The validator of a config field holding a name of ``registry``: checked against what is registered when a
    config is validated; the error is ``BaseConfig.build``'s one line, "unknown metric 'x': use one of ..."."""

    def check(value: str) -> str:
        if value not in registry:
            raise PydanticCustomError(
                "literal_error", "Input should be one of {expected}", {"expected": registry.choices()}
            )
        return value

    return check


def listed(registry: Registry[Any], about: str, *, detail: bool = False) -> dict[str, Any]:
    """The ``Field`` arguments of such a field: its help (``about: a | b | c``, with each one's line if ``detail``)
    and its JSON schema's ``enum``, both read from ``registry``."""

    def schema(json: dict[str, Any]) -> None:
        json["enum"] = list(registry.names())

    names = " | ".join(f"{n} ({registry.about(n)})" for n in registry) if detail else registry.choices(" | ")
    return {"description": f"{about}: {names}", "json_schema_extra": schema}


def _shares_help() -> str:
    """The help of ``shares``: each registered rule's shares and defaults."""
    rules = "; ".join(f"{name} {','.join(f'{k}={v:g}' for k, v in RULES.get(name).shares.items())}" for name in RULES)
    return f"Rule shares as name=fraction (default: the rule's; {rules})."


CommaList = Annotated[list[str], BeforeValidator(split_commas)]
Count = Annotated[int, Field(ge=1)]  # a number of steps, examples, tokens or seeds (0 is a user error)
Seeds = Annotated[int, Field(ge=3, description="Random-control seeds (one draw each; at least 3).")]
MetricName = Annotated[str, AfterValidator(registered(METRICS)), Field(**listed(METRICS, "Unit score"))]
Metric = MetricName
CategoryRule = Annotated[str, AfterValidator(registered(RULES)), Field(**listed(RULES, "Categorisation rule"))]
Shares = Annotated[dict[str, float], BeforeValidator(_pairs(_shares)), Field(description=_shares_help())]
Normalizations = Annotated[
    str,
    AfterValidator(registered(NORMALIZATIONS)),
    Field(**listed(NORMALIZATIONS, "Score normalisation", detail=True)),
]
Rankings = Annotated[Ranking, Field(description="Rank units globally or per module: global | per-module")]
Granularity = Annotated[GranularityName, Field(description="Units are single channels or heads: neuron | head")]
Tokens = Annotated[TokenRegion, Field(description="Tokens counted: prompt+response | response | prompt | all")]
Strata = Annotated[
    Literal["layer-kind", "layer", "kind", "none"],
    Field(description="Random controls keep the count per: layer-kind | layer | kind | none (uniform)."),
]
Ablation = Annotated[
    AblationMode, Field(description="zero | mean (FLAP-style: a removed channel reads its calibration mean).")
]
Schedule = Annotated[
    Literal["linear", "cosine", "constant"], Field(description="LR schedule: linear | cosine | constant")
]
Columns = Annotated[
    dict[str, str],
    BeforeValidator(_pairs(_columns)),
    Field(description="Map a column, e.g. prompt=goal (repeatable).", json_schema_extra={"flag": "--column"}),
]
JudgeColumns = Annotated[
    dict[str, str],
    BeforeValidator(_pairs(_judge_columns)),
    Field(
        description="Map a column of the labelled files, e.g. reply=answer_text or label=human (repeatable; fields "
        "prompt, reply, label).",
        json_schema_extra={"flag": "--column"},
    ),
]
JudgeSpec = Annotated[str, Field(description=f"Refusal judge: {judge_specs(' | ')}")]
System = Annotated[str | None, Field(description="System prompt (default: the template's).")]
MaxLength = Annotated[int, Field(ge=8, description="Truncate examples to this many tokens.")]


def _auto_batch(value: Any) -> Any:
    """``auto`` or a whole number of at least 1 (as text from the CLI, or a number)."""
    text = str(value).strip().lower()
    if text == "auto":
        return text
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"pass a positive number or auto, not {value!r}")
    return int(text)


AutoBatch = Annotated[
    int | Literal["auto"],
    BeforeValidator(_auto_batch),
    Field(
        description="Examples per batch, or auto: the largest that fits (from `ssah info --plan`, halved on "
        "out-of-memory, remembered in the cache); auto is the default on GPUs."
    ),
]


class UnitCategoryFields(BaseModel):
    """The options that say how units are scored and categorised, shared by every recipe that finds units (units,
    ablate, transfer, budget, protect). A recipe's config lists it before its own base class
    (``class UnitsConfig(UnitCategoryFields, ModelRunConfig)``), so these fields follow the model options."""

    metric: Metric = "fluctuation"
    rule: CategoryRule = "ssah"
    shares: Shares = Field(default_factory=dict)
    normalization: Normalizations = DEFAULT_NORMALIZATION
    ranking: Rankings = "global"


class CalibrationSection(Section):
    """The data units are scored on, declared once for every recipe that finds units (``calibration.limit``,
    ``--calibration-safety`` ...; ``ssah units`` has these at top level). A recipe with other defaults gives a
    default instance: ``calibration: CalibrationSection = CalibrationSection(batch_size=32)``."""

    title = "Calibration (finding units)"
    safety: str = Field(
        "builtin:safety",
        description="Safety calibration set: builtin:NAME, a preset (advbench-safety, harmbench-safety) or a "
        "CSV/JSON/JSONL file.",
    )
    utility: str = Field("builtin:utility", description="Utility calibration set: builtin:NAME, a preset or a file.")
    limit: Count | None = Field(None, description="N examples of each set, evenly spaced through it (null: all).")
    tokens: Tokens = "prompt+response"
    batch_size: Count = Field(8, description="Examples per scoring forward pass.")

    def load(self, columns: Mapping[str, str] | None = None) -> tuple[PromptSet, PromptSet]:
        """The safety and utility sets, each cut to ``limit`` examples evenly spaced through it (files are
        often sorted by category)."""
        from ssah.data import load_prompts

        safety, utility = (
            load_prompts(spec, columns=columns or None, name=name).spread(self.limit)
            for name, spec in (("safety", self.safety), ("utility", self.utility))
        )
        return safety, utility


class EvalSection(Section):
    """How a model's replies are measured, declared once for every recipe that evaluates (``eval.limit`` ...;
    ``ssah eval`` has these at top level). A recipe with other defaults gives a default instance:
    ``eval: EvalSection = EvalSection(limit=32)``."""

    title = "Evaluation"
    harmful: str = Field(
        "builtin:harmful", description="Harmful prompts (ASR): builtin:NAME, a preset (advbench, ...), a file, or none."
    )
    benign: str = Field(
        "builtin:borderline",
        description="Safe prompts, refusing one is over-refusal: builtin:borderline, builtin:benign, xstest, a file, "
        "or none.",
    )
    limit: Count | None = Field(None, description="Prompts (items) per evaluation set (null: all).")
    max_new_tokens: Count = Field(64, description="Tokens generated per reply.")
    batch_size: Count = Field(16, description="Prompts per batch (generation and the evaluation's forward passes).")
    judge: JudgeSpec = "keyword:ssah"
    allow_overlap: bool = Field(
        False,
        description="Compute verdicts even when evaluation prompts also calibrated units or chose a setting "
        "(refused by default); the report then prints the overlap as a caveat.",
    )

    def greedy(self, run: BaseModel | None = None) -> GenerationConfig:
        """Greedy decoding with this section's reply length and batch size, under the settings of ``run`` (the
        recipe's config: its seed, system prompt and bf16 autocast), so that no recipe hands them over one by one."""
        from ssah.generate import GenerationConfig

        seed, system, bf16 = getattr(run, "seed", 0), getattr(run, "system", None), getattr(run, "bf16", False)
        g = GenerationConfig(
            max_new_tokens=self.max_new_tokens, seed=seed, batch_size=self.batch_size, system=system, bf16=bf16
        )
        g.check()
        return g

    def check_judge(self) -> None:
        """Fail now, before any data or model is loaded, on a judge spec that can never work (the error lists the
        valid judges, or the keyword presets)."""
        from ssah.judges import check_judge_spec

        check_judge_spec(self.judge)


class UtilityEvalSection(EvalSection):
    """An evaluation that also measures utility (perplexity, multiple choice, exact match)."""

    utility: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = Field(
        default_factory=lambda: ["perplexity"],
        description="perplexity[:SPEC] | piqa | mc:FILE | gsm8k[:FILE] | none (repeatable).",
    )

    def load(self, recipe: str) -> EvalData:
        """The evaluation sets, the harmful, benign and perplexity ones each spread over its file to ``limit``
        (files are often sorted by category); ``recipe`` names the command in the error when there are no
        harmful prompts (every recipe that ablates measures ASR)."""
        from ssah.evaluate import load_eval_sets

        data = load_eval_sets(self.harmful, self.benign, self.utility)
        if data.harmful is None:
            raise UserError(f"{recipe} measures safety on harmful prompts: --eval-harmful cannot be none")
        for name in ("harmful", "benign", "perplexity"):
            if (ps := getattr(data, name)) is not None:
                setattr(data, name, ps.spread(self.limit))
        return data
