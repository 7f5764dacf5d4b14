"""Training recipes: typed dataclasses read from YAML, with dotted ``key=value`` overrides.

A recipe is data: every field is a plain value (strings choose implementations). ``load_recipe``
merges the YAML file, then the overrides, then builds the dataclasses; unknown keys, wrong types and
inconsistent settings raise ``RecipeError`` naming the offending keys, before anything is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UniMoeConfigError
from ..modalities import token_groups

STAGES = ("language", "align", "experts", "unified", "instruct")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp2", "deepspeed")
SCHEDULERS = ("cosine", "linear", "constant")
EXPERT_TRAINING = ("lora", "full", "frozen")


class RecipeError(UniMoeConfigError):
    """An invalid or inconsistent recipe; the message names the keys at fault."""


@dataclass
class ModelSpec:
    """Where the model comes from.

    Exactly one source: ``preset`` (random init of a named shape, e.g. ``tiny``), ``path`` (a
    checkpoint of ours written by ``save_pretrained``), or ``config_preset`` (a named real-scale shape)
    with pretrained parts: ``llm_path`` (LLaMA/Vicuna HF checkpoint), ``vision_path`` (CLIP),
    ``speech_path`` (Whisper), ``audio_path`` (official BEATs checkpoint).
    """

    preset: str | None = None
    path: str | None = None
    config_preset: str | None = None
    llm_path: str | None = None
    vision_path: str | None = None
    speech_path: str | None = None
    audio_path: str | None = None
    tokenizer_path: str | None = None
    text_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    max_length: int | None = None
    seed: int = 0


@dataclass
class DataSpec:
    """Training data: a JSON list or JSONL file of records; media paths relative to ``media_root``
    (default: the data file's folder). ``cache_encoded`` keeps encoded samples in memory (small data);
    ``cache_features`` also keeps the outputs of the frozen encoders for them, on the model's device
    (``unimoe.modeling.feature_cache``), so that later epochs run only the trainable parts."""

    train: str | None = None
    media_root: str | None = None
    tasks: list[str] | None = None
    max_samples: int | None = None
    group_by_modality: bool = True
    group_by_length: bool = True
    num_workers: int = 0
    cache_encoded: bool = False
    cache_features: bool = False


@dataclass
class ExpertSpec:
    """One stage-2 expert: the records it trains on (by ``task`` and/or by media ``modalities``) and
    the connectors trained with it (default: those of the modalities in its records)."""

    name: str = ""
    tasks: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    connectors: list[str] | None = None


@dataclass
class LoraSpec:
    """PEFT LoRA on linear layers of the language model (stage 3). ``targets`` are module names inside a
    decoder layer: ``q_proj k_proj v_proj o_proj`` (attention) and ``gate_proj up_proj down_proj`` (the
    FFN of dense layers; MoE experts use in-expert LoRA instead)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ExpertLoraSpec:
    """LoRA inside each expert (``text_config.expert_lora_rank``), added when the checkpoint has none."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05


@dataclass
class UnifiedSpec:
    """Stage 3: routers and connectors train fully; attention through ``lora``; experts through
    in-expert LoRA (``experts: lora``), fully (``full``) or not at all (``frozen``). Stage ``instruct``
    (dense) reads the same settings, with ``experts`` standing for the dense FFNs (``full``: trained
    fully; otherwise through ``lora`` if its targets name them)."""

    experts: str = "lora"
    expert_lora: ExpertLoraSpec = field(default_factory=ExpertLoraSpec)
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    aux_loss_coef: float = 0.01
    merge: bool = True


@dataclass
class OptimSpec:
    """AdamW and its learning-rate schedule (linear warmup, then ``scheduler`` decay).

    ``fused``: torch's fused AdamW kernel (one kernel per step on CPU and CUDA instead of a Python
    loop over parameters); ``null`` uses it wherever every parameter is a plain CPU or CUDA tensor.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    fused: bool | None = None


@dataclass
class TrainSpec:
    """The loop: batch sizes, length, precision, distribution, logging and checkpoints.

    ``batch_size`` is per process; the global batch is ``batch_size * processes * grad_accum``.
    ``max_steps`` (optimizer steps) overrides ``epochs``. ``resume``: ``false``, ``true`` (a checkpoint
    must exist) or ``auto`` (resume if one exists).
    """

    output_dir: str | None = None
    seed: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    shuffle: bool = True
    precision: str = "auto"
    gradient_checkpointing: bool = False
    distributed: str = "auto"
    deepspeed_config: str | None = None
    log_every: int = 1
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool | str = False
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Recipe:
    """A whole training run: the stage and its model, data, optimiser and loop settings."""

    stage: str = "align"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    experts: list[ExpertSpec] = field(default_factory=list)
    unified: UnifiedSpec = field(default_factory=UnifiedSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what ``recipe.yaml`` in the output folder holds)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# overrides


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["train.max_steps=5", "data.train=/x.json"]`` -> ``[(["train", "max_steps"], 5), ...]``;
    values are parsed as YAML scalars/lists (``5``, ``true``, ``null``, ``[a, b]``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: cannot parse the value: {err}") from err
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with dotted overrides applied (missing intermediate mappings are created;
    whether a key exists is checked later, against the schema)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for path, value in parse_overrides(overrides):
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# dict -> dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; errors name ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "4e-5" as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise RecipeError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def build_dataclass(cls: type, data: Any, where: str = "recipe") -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys raise ``RecipeError`` naming them."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = "" if where == "recipe" else f"{where}."
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise RecipeError(f"unknown recipe key(s): {keys} (known under {where}: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], name if where == "recipe" else f"{where}.{name}")
    return cls(**kwargs)


def load_recipe(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """A validated ``Recipe`` from a YAML path (or a mapping) plus ``key=value`` overrides."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping")
    recipe = build_dataclass(Recipe, apply_overrides(data, overrides))
    ds = recipe.train.deepspeed_config
    if ds and not isinstance(source, Mapping) and not Path(ds).is_absolute() and not Path(ds).exists():
        recipe.train.deepspeed_config = str(Path(source).parent / ds)  # relative to the recipe file
    validate(recipe)
    return recipe


# ---------------------------------------------------------------------------------------------
# consistency


def _choice(value: Any, choices: Sequence[Any], key: str) -> list[str]:
    return [] if value in choices else [f"{key} must be one of {list(choices)}, got {value!r}"]


def _check_model(m: ModelSpec) -> list[str]:
    sources = [k for k in ("preset", "path", "config_preset") if getattr(m, k)]
    problems = []
    if len(sources) != 1:
        problems.append(
            f"model: give exactly one of model.preset, model.path, model.config_preset (got {sources or 'none'})"
        )
    parts = [k for k in ("llm_path", "vision_path", "speech_path", "audio_path") if getattr(m, k)]
    if parts and not m.config_preset:
        problems.append(f"model.{parts[0]} needs model.config_preset (pretrained parts fill a named shape)")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    return problems


def _check_stage(r: Recipe) -> list[str]:
    problems = []
    default_unified = UnifiedSpec()
    if r.stage == "experts":
        if not r.experts:
            problems.append("stage 'experts' needs a non-empty 'experts' list (name + tasks/modalities)")
        seen: dict[str, ExpertSpec] = {}
        for i, e in enumerate(r.experts):
            if not e.name:
                problems.append(f"experts[{i}]: needs a name")
            if not e.tasks and not e.modalities:
                problems.append(f"experts[{i}] ({e.name}): give tasks and/or modalities to select its data")
            bad = [m for m in [*e.modalities, *(e.connectors or [])] if m not in token_groups()]
            if bad:
                problems.append(f"experts[{i}] ({e.name}): unknown modalities {bad}")
            if e.name in seen and seen[e.name] != e:
                problems.append(f"experts[{i}]: name {e.name!r} repeats with a different definition")
            seen.setdefault(e.name, e)
    elif r.experts:
        problems.append(f"'experts' is only used by stage 'experts', but stage is {r.stage!r}")
    if r.stage not in ("unified", "instruct") and r.unified != default_unified:
        problems.append(
            f"'unified' settings only apply to stages 'unified' and 'instruct', but stage is {r.stage!r}"
        )
    if r.stage in ("unified", "instruct"):
        problems += _choice(r.unified.experts, EXPERT_TRAINING, "unified.experts")
    return problems


def validate(r: Recipe) -> None:
    """Raises ``RecipeError`` listing every inconsistency of the recipe."""
    t, o = r.train, r.optim
    problems = _choice(r.stage, STAGES, "stage") + _check_model(r.model) + _check_stage(r)
    problems += _choice(t.precision, PRECISIONS, "train.precision")
    problems += _choice(t.distributed, DISTRIBUTED, "train.distributed")
    problems += _choice(o.scheduler, SCHEDULERS, "optim.scheduler")
    problems += _choice(t.resume, (False, True, "auto"), "train.resume")
    if not r.data.train:
        problems.append("data.train is required (a JSON or JSONL file of records)")
    if not t.output_dir:
        problems.append("train.output_dir is required")
    if r.data.cache_features and not r.data.cache_encoded:
        problems.append(
            "data.cache_features keeps encoder outputs per cached sample: it needs data.cache_encoded=true"
        )
    for key in ("batch_size", "grad_accum", "epochs", "log_every", "keep_checkpoints"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps must be >= 1, got {t.max_steps}")
    if t.distributed == "deepspeed" and not t.deepspeed_config:
        problems.append("train.distributed=deepspeed needs train.deepspeed_config (a DeepSpeed JSON)")
    if t.deepspeed_config and not Path(t.deepspeed_config).is_file():
        problems.append(f"train.deepspeed_config: file not found: {t.deepspeed_config}")
    if o.lr <= 0 or not 0 <= o.warmup_ratio < 1 or len(o.betas) != 2:
        problems.append("optim: lr > 0, 0 <= warmup_ratio < 1 and two betas are required")
    if problems:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(problems))
