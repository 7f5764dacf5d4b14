"""``train(recipe)``: runs a stage end to end and writes its outputs.

Output folder layout (``train.output_dir``)::

    recipe.yaml                 the resolved recipe (file + overrides)
    metrics.jsonl, tb/          per-step log and TensorBoard events
    checkpoints/[expert/]step-N atomic checkpoints (``train.save_every``)
    final/                      stages 1, 3 and instruct: model + processor, loadable with ``from_pretrained``
    experts/{name}.safetensors  stage 2: FFN weights ``model.layers.{L}.mlp.{proj}.weight`` per expert
    connectors/{name}.safetensors  stage 2: the connectors trained with that expert
    experts.json                stage 2: the experts in the recipe's order (duplicates kept)
    summary.json                the ``TrainResult``
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ..data.dataset import SupervisedDataset, load_records, record_modalities
from ..modeling.upcycling import extract_ffn_state_dict
from .engine import Engine, resolve_backend
from .recipe import ExpertSpec, Recipe, load_recipe
from .stages import (
    configure_stage,
    connector_modules,
    format_parameter_table,
    load_model,
    merge_for_release,
    parameter_table,
    unified_text_overrides,
    unwrap_peft,
)
from .trainer import StepModule, Trainer, TrainResult

logger = logging.getLogger(__name__)


def train(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = ()) -> TrainResult:
    """Runs a recipe (a YAML path, a mapping or a ``Recipe``) with ``key=value`` overrides."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    out = Path(recipe.train.output_dir)
    engine = Engine(
        resolve_backend(recipe.train.distributed, recipe.train.deepspeed_config),
        recipe.train.precision,
        recipe.train.deepspeed_config,
    )
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    if recipe.stage == "experts":
        result = _train_experts(recipe, engine)
    else:
        result = _train_single(recipe, engine)
    if engine.is_main:
        (out / "summary.json").write_text(json.dumps(_jsonable(result), indent=1))
        logger.info(
            "done: %d steps, final loss %.4f, %d skipped sample(s), %.1f s",
            result.steps,
            result.losses[-1] if result.losses else float("nan"),
            result.skipped,
            result.wall_seconds,
        )
    engine.barrier()
    return result


def _jsonable(result: TrainResult) -> dict[str, Any]:
    data = dataclasses.asdict(result)
    return {
        k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k.endswith("_files") else v)
        for k, v in data.items()
    }


def _build(recipe: Recipe, connectors: list[str] | None = None):
    """The stage's model (configured: frozen/trainable, PEFT-wrapped in stage 3) and processor."""
    extra = unified_text_overrides(recipe.model, recipe.unified) if recipe.stage == "unified" else None
    model, processor = load_model(recipe.model, extra)
    module = configure_stage(recipe, model, connectors)
    return module, processor


def _log_parameters(module: nn.Module, engine: Engine, tag: str | None = None) -> None:
    if engine.is_main:
        title = f"parameters ({tag})" if tag else "parameters"
        logger.info("%s:\n%s", title, format_parameter_table(parameter_table(module)))


def _final_module(engine: Engine, trainer: Trainer, rebuild) -> nn.Module | None:
    """The trained model (PEFT-wrapped or not), whole and on CPU, on the main process; None elsewhere."""
    if engine.sharded:
        state = engine.full_state_dict()
        if not engine.is_main:
            return None
        fresh = StepModule(rebuild())
        fresh.load_state_dict(state)
        return fresh.model
    return trainer.model.cpu() if engine.is_main else None


def _train_single(recipe: Recipe, engine: Engine) -> TrainResult:
    """Stages 1 and 3: one model, one loop, then ``final/`` (LoRA merged in stage 3)."""
    module, processor = _build(recipe)
    _log_parameters(module, engine)
    data = recipe.data
    dataset = SupervisedDataset.from_file(
        data.train, processor, data.media_root, data.tasks, data.max_samples, data.cache_encoded
    )
    trainer = Trainer(recipe, engine, module, processor, dataset)
    result = trainer.fit()
    final = _final_module(engine, trainer, lambda: _build(recipe)[0])
    final_dir = Path(recipe.train.output_dir) / "final"
    if final is not None:
        if recipe.stage in ("unified", "instruct") and recipe.unified.merge:
            model = merge_for_release(final)
        else:
            model = unwrap_peft(final)
        model.save_pretrained(final_dir)
        processor.save_pretrained(final_dir)
    engine.barrier()
    result.final_dir = final_dir
    return result


# ---------------------------------------------------------------------------------------------
# stage 2


def expert_records(records: list, expert: ExpertSpec, voice_modality: str) -> list[dict]:
    """The records an expert trains on: its ``tasks`` and/or records carrying any of its ``modalities``."""
    chosen = []
    for record in records:
        if not isinstance(record, dict):
            continue
        kinds = set(record_modalities(record, voice_modality))
        if record.get("task") in expert.tasks or kinds & set(expert.modalities):
            chosen.append(record)
    return chosen


def _expert_connectors(expert: ExpertSpec, records: list[dict], model, voice_modality: str) -> list[str]:
    if expert.connectors is not None:
        return connector_modules(expert.connectors, model)
    kinds = {k for r in records for k in record_modalities(r, voice_modality)}
    return connector_modules(kinds, model)


def _train_experts(recipe: Recipe, engine: Engine) -> TrainResult:
    """Stage 2: trains each distinct expert in turn from the stage-1 model and writes its FFN and
    connector files; ``expert_files`` lists them in the recipe's order, duplicates included."""
    out = Path(recipe.train.output_dir)
    records = load_records(recipe.data.train)
    if recipe.data.tasks is not None:
        records = [r for r in records if isinstance(r, dict) and r.get("task") in recipe.data.tasks]
    media_root = recipe.data.media_root or Path(recipe.data.train).parent
    total = TrainResult(out, out, [], 0, 0, 0.0)
    files: dict[str, tuple[Path, Path]] = {}
    for expert in recipe.experts:
        if expert.name not in files:
            files[expert.name] = _train_one_expert(recipe, engine, expert, records, media_root, total)
    total.expert_files = [files[e.name][0] for e in recipe.experts]
    total.connector_files = [files[e.name][1] for e in recipe.experts]
    if engine.is_main:
        manifest = [
            {"name": e.name, "ffn": str(files[e.name][0]), "connectors": str(files[e.name][1])}
            for e in recipe.experts
        ]
        (out / "experts.json").write_text(
            json.dumps({"base": recipe.model.path, "experts": manifest}, indent=1)
        )
    return total


def _train_one_expert(recipe, engine, expert, records, media_root, total: TrainResult) -> tuple[Path, Path]:
    out = Path(recipe.train.output_dir)
    ffn_file, conn_file = (
        out / "experts" / f"{expert.name}.safetensors",
        out / "connectors" / f"{expert.name}.safetensors",
    )
    done_file = out / "experts" / f"{expert.name}.json"
    if recipe.train.resume and done_file.is_file() and ffn_file.is_file():
        _merge_results(total, TrainResult(out, out, **json.loads(done_file.read_text())))
        logger.info("expert %s already trained, reusing %s", expert.name, ffn_file)
        return ffn_file, conn_file
    model, processor = load_model(recipe.model)
    voice = processor.settings.voice_modality
    chosen = expert_records(records, expert, voice)
    if recipe.data.max_samples is not None:
        chosen = chosen[: recipe.data.max_samples]
    connectors = _expert_connectors(expert, chosen, model, voice)
    module = configure_stage(recipe, model, connectors)
    _log_parameters(module, engine, expert.name)
    dataset = SupervisedDataset(chosen, processor, media_root, recipe.data.cache_encoded)
    trainer = Trainer(recipe, engine, module, processor, dataset, tag=expert.name)
    result = trainer.fit()
    final = _final_module(
        engine, trainer, lambda: configure_stage(recipe, load_model(recipe.model)[0], connectors)
    )
    if final is not None:
        ffn_file.parent.mkdir(parents=True, exist_ok=True)
        conn_file.parent.mkdir(parents=True, exist_ok=True)
        save_file(_contiguous(extract_ffn_state_dict(final.text_model())), str(ffn_file))
        state = {k: v for k, v in final.model.state_dict().items() if k.split(".", 1)[0] in connectors}
        save_file(_contiguous(state), str(conn_file))
        keep = ("losses", "skipped", "steps", "wall_seconds", "lm_losses", "aux_losses", "skipped_examples")
        done_file.write_text(json.dumps({k: getattr(result, k) for k in keep}))
    engine.barrier()
    _merge_results(total, result)
    return ffn_file, conn_file


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _merge_results(total: TrainResult, part: TrainResult) -> None:
    total.losses += part.losses
    total.lm_losses += part.lm_losses
    total.aux_losses += part.aux_losses
    total.skipped += part.skipped
    total.skipped_examples += part.skipped_examples
    total.steps += part.steps
    total.wall_seconds += part.wall_seconds
