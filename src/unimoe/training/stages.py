"""What each training stage builds and trains.

Every parameter belongs to one named group (``param_group``): encoders, connectors, embeddings,
attention, norms, ffn (dense FFNs), experts, expert_lora, routers, lora. A stage is a set of trainable
groups; everything else is frozen, and ``configure_stage`` checks the outcome before training starts.

- ``align`` (stage 1): connectors (with their query embeddings).
- ``experts`` (stage 2): the dense FFN of every layer and the connectors of the expert's modalities.
- ``unified`` (stage 3): routers, connectors, PEFT LoRA on the LLM's linear layers, and the experts
  through in-expert LoRA, fully, or not at all (``unified.experts``).
- ``instruct``: the dense counterpart of stage 3, instruction tuning of a model without experts:
  connectors, PEFT LoRA on the LLM's linear layers and, with ``unified.experts=full``, the dense FFNs
  fully. It is the dense baseline that the ablation (``unimoe.ablation``) compares against.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..modalities import MODALITIES
from ..modeling.configuration_unimoe import UniMoeConfig
from ..modeling.modeling_unimoe import UniMoeForConditionalGeneration
from ..modeling.moe import GroupedExperts, UniMoeSparseMoeBlock
from ..presets import build_model, get_config
from ..processing.processor import SETTINGS_FILE, UniMoeProcessor
from ..seeding import seed_everything
from .recipe import ModelSpec, Recipe, RecipeError, UnifiedSpec

logger = logging.getLogger(__name__)

GROUPS = (
    "encoders",
    "connectors",
    "embeddings",
    "attention",
    "norms",
    "ffn",
    "experts",
    "expert_lora",
    "routers",
    "lora",
    "unused",
)


def _subtree_groups(base: UniMoeForConditionalGeneration) -> dict[nn.Module, str]:
    """Modules whose whole subtree belongs to one group, found by identity and type."""
    mm = base.model
    groups: dict[nn.Module, str] = {m: "encoders" for m in mm.encoders()}
    groups.update({m: "connectors" for m in mm.connectors()})
    if hasattr(mm, "speech_connector"):  # the query connector never reads token embeddings
        groups[mm.speech_connector.decoder.embed_tokens] = "unused"
    groups[mm.get_input_embeddings()] = groups[base.lm_head] = "embeddings"
    for layer in mm.language_model.layers:
        groups[layer.self_attn] = "attention"
        groups[layer.mlp] = "ffn"
        if isinstance(layer.mlp, UniMoeSparseMoeBlock):
            groups[layer.mlp.gate] = "routers"
    return groups


def parameter_groups(model: nn.Module) -> dict[str, str]:
    """``{parameter name: group}`` for a ``UniMoeForConditionalGeneration`` (PEFT-wrapped or not),
    decided by module structure: the encoders and connectors the model lists, the decoder's attention,
    FFN, router, norm and embedding modules, PEFT's adapter layers, the experts' LoRA factors."""
    subtree = _subtree_groups(unwrap_peft(model))
    out: dict[str, str] = {}

    def visit(module: nn.Module, prefix: str, inherited: str) -> None:
        group = subtree.get(module, inherited)
        if isinstance(module, LlamaRMSNorm) and group == "unused":
            group = "norms"
        if isinstance(module, GroupedExperts):
            lora = {id(p) for p in module.lora_parameters()}
            for name, p in module.named_parameters(recurse=False):
                out[prefix + name] = "expert_lora" if id(p) in lora else "experts"
            return
        adapters = (
            set(getattr(module, "adapter_layer_names", ())) if isinstance(module, BaseTunerLayer) else set()
        )
        for name, _ in module.named_parameters(recurse=False):
            out[prefix + name] = group
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.", "lora" if name in adapters else group)

    visit(model, "", "unused")
    return out


def parameter_table(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{group: (trainable, total)}`` parameter counts, groups in ``GROUPS`` order (empty ones left out)."""
    counts = {g: [0, 0] for g in GROUPS}
    groups = parameter_groups(model)
    for name, p in model.named_parameters():
        entry = counts[groups[name]]
        entry[1] += p.numel()
        if p.requires_grad:
            entry[0] += p.numel()
    return {g: (c[0], c[1]) for g, c in counts.items() if c[1]}


def format_parameter_table(table: dict[str, tuple[int, int]]) -> str:
    """The table as aligned text lines, with a total."""
    rows = [(g, t, n) for g, (t, n) in table.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [f"{'group':<12} {'trainable':>14} {'total':>14}"]
    lines += [f"{g:<12} {t:>14,} {n:>14,}" for g, t, n in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# building models


def _apply_text_overrides(config: UniMoeConfig, overrides: dict) -> UniMoeConfig:
    for key, value in overrides.items():
        if not hasattr(config.text_config, key):
            raise RecipeError(f"model.text_overrides: unknown language-model setting {key!r}")
        setattr(config.text_config, key, value)
    return config


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RecipeError(
            f"{what} from {source} does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _load_pretrained_parts(
    model: UniMoeForConditionalGeneration, spec: ModelSpec, dtype: torch.dtype
) -> None:
    """Loads the LLM, CLIP, Whisper and BEATs checkpoints named by ``spec`` into ``model``."""
    from transformers import CLIPVisionModel, LlamaForCausalLM, WhisperModel

    from ..modeling.beats import BEATsModel

    if spec.llm_path:
        llm = LlamaForCausalLM.from_pretrained(spec.llm_path, dtype=dtype)
        _load_part(model.text_model(), llm.state_dict(), "model.llm_path", spec.llm_path)
    if spec.vision_path:
        clip = CLIPVisionModel.from_pretrained(spec.vision_path, dtype=dtype)
        _load_part(model.model.vision_tower, clip.state_dict(), "model.vision_path", spec.vision_path)
    if spec.speech_path:
        whisper = WhisperModel.from_pretrained(spec.speech_path, dtype=dtype)
        _load_part(
            model.model.speech_encoder, whisper.encoder.state_dict(), "model.speech_path", spec.speech_path
        )
        decoder = model.model.speech_connector.decoder  # the connector starts from Whisper's decoder
        _load_part(decoder, whisper.decoder.state_dict(), "model.speech_path (decoder)", spec.speech_path)
    if spec.audio_path:
        beats = BEATsModel.from_official_checkpoint(spec.audio_path)
        _load_part(model.model.audio_encoder, beats.state_dict(), "model.audio_path", spec.audio_path)


def load_model(
    spec: ModelSpec, extra_text_overrides: dict | None = None
) -> tuple[UniMoeForConditionalGeneration, UniMoeProcessor]:
    """The model and processor ``spec`` names (preset, our checkpoint, or a shape plus pretrained parts).

    ``spec.seed`` seeds every weight made here and afterwards (a preset's, those a checkpoint lacks such
    as new in-expert LoRA, PEFT adapters), so that they are the same in every process and every run."""
    seed_everything(spec.seed)
    dtype = getattr(torch, spec.dtype)
    overrides = {**spec.text_overrides, **(extra_text_overrides or {})}
    if spec.path:
        path = Path(spec.path)
        if not (path / "config.json").is_file():
            raise RecipeError(f"model.path {path}: no config.json (expected a save_pretrained folder)")
        config = _apply_text_overrides(UniMoeConfig.from_pretrained(path), overrides)
        model = UniMoeForConditionalGeneration.from_pretrained(path, config=config, dtype=dtype)
        if (path / SETTINGS_FILE).is_file():
            processor = UniMoeProcessor.from_pretrained(path)
        else:
            processor = UniMoeProcessor.for_config(config)
        if spec.max_length:
            processor.settings.max_length = spec.max_length
        return model, processor
    name = spec.preset or spec.config_preset
    try:
        config = _apply_text_overrides(get_config(name), overrides)
    except KeyError as err:
        raise RecipeError(f"model: {err.args[0]}") from err
    model = build_model(config, spec.seed, dtype)
    tokenizer = None
    tokenizer_path = spec.tokenizer_path or spec.llm_path
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if spec.config_preset:
        _load_pretrained_parts(model, spec, dtype)
        parts = {"llm_path": "language_model", "vision_path": "vision_tower", "speech_path": "speech_encoder"}
        parts["audio_path"] = "audio_encoder"
        for key, module in parts.items():
            if hasattr(model.model, module) and not getattr(spec, key):
                logger.warning("model.%s not given: %s keeps random weights", key, module)
    return model, UniMoeProcessor.for_config(config, tokenizer=tokenizer, max_length=spec.max_length)


# ---------------------------------------------------------------------------------------------
# trainability


def set_trainable(model: nn.Module, groups: Iterable[str], connectors: Iterable[str] | None = None) -> None:
    """Trains exactly the parameters of ``groups``; with ``connectors`` (module names such as
    ``image_projector``) only those connectors among the ``connectors`` group."""
    groups = set(groups)
    chosen = parameter_groups(model)
    if connectors is not None:
        mm = unwrap_peft(model).model
        allowed = {id(p) for c in connectors for p in getattr(mm, c).parameters()}
    for name, p in model.named_parameters():
        on = chosen[name] in groups
        if on and chosen[name] == "connectors" and connectors is not None:
            on = id(p) in allowed
        p.requires_grad_(on)


def connector_modules(modalities: Iterable[str], model: UniMoeForConditionalGeneration) -> list[str]:
    """Connector module names serving ``modalities`` that ``model`` has."""
    names = {MODALITIES[m].connector for m in modalities if m in MODALITIES}
    return sorted(n for n in names if hasattr(model.model, n))


def unified_text_overrides(model_spec: ModelSpec, unified: UnifiedSpec) -> dict:
    """Language-model settings stage 3 adds on load: in-expert LoRA (when chosen and the recipe does not
    set it) and the aux-loss coefficient."""
    extra: dict = {"router_aux_loss_coef": unified.aux_loss_coef}
    if unified.experts == "lora" and "expert_lora_rank" not in model_spec.text_overrides and model_spec.path:
        current = UniMoeConfig.from_pretrained(model_spec.path).text_config.expert_lora_rank
        if not current:
            spec = unified.expert_lora
            extra.update(
                expert_lora_rank=spec.rank, expert_lora_alpha=spec.alpha, expert_lora_dropout=spec.dropout
            )
    return extra


def _lora_target_regex(targets: list[str]) -> str:
    names = "|".join(sorted(set(targets)))
    return rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def configure_unified(model: UniMoeForConditionalGeneration, unified: UnifiedSpec) -> nn.Module:
    """Stage 3: checks the model is an MoE, wraps it with PEFT LoRA and sets what trains."""
    text = model.config.text_config
    if not text.moe_layer_indices():
        raise RecipeError(
            "stage 'unified' needs a model with MoE layers, but this one is dense: build it from the "
            "stage-2 experts with `unimoe upcycle` and point model.path at the result"
        )
    groups = {"routers", "connectors", "lora"}
    if unified.experts == "lora":
        if not text.expert_lora_rank:
            raise RecipeError("unified.experts=lora but the model has no in-expert LoRA (expert_lora_rank=0)")
        groups.add("expert_lora")
    elif unified.experts == "full":
        if text.expert_lora_rank:
            raise RecipeError(
                f"unified.experts=full, but the model carries in-expert LoRA (rank {text.expert_lora_rank}); "
                "use unified.experts=lora or a checkpoint without expert LoRA"
            )
        groups.add("experts")
    return _with_lora(model, unified, groups)


def configure_instruct(model: UniMoeForConditionalGeneration, unified: UnifiedSpec) -> nn.Module:
    """Dense instruction tuning: checks the model is dense, wraps it with PEFT LoRA and sets what trains
    (``unified.experts=full`` trains the dense FFNs fully)."""
    moe = model.config.text_config.moe_layer_indices()
    if moe:
        raise RecipeError(
            f"stage 'instruct' tunes a dense model, but this one has MoE layers {moe}: use stage 'unified'"
        )
    if unified.experts == "lora" and unified.lora is None:
        raise RecipeError("stage 'instruct' with unified.experts=lora needs unified.lora (its targets)")
    groups = {"connectors", "lora"} | ({"ffn"} if unified.experts == "full" else set())
    return _with_lora(model, unified, groups)


def _with_lora(model: UniMoeForConditionalGeneration, unified: UnifiedSpec, groups: set[str]) -> nn.Module:
    """``model`` wrapped with ``unified.lora`` (if set), with ``groups`` trainable and the rest frozen."""
    wrapped: nn.Module = model
    if unified.lora is not None:
        lora = unified.lora
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_lora_target_regex(lora.targets),
            bias="none",
        )
        wrapped = get_peft_model(model, config)
    set_trainable(wrapped, groups)
    return wrapped


def configure_stage(
    recipe: Recipe, model: UniMoeForConditionalGeneration, connectors: list[str] | None = None
) -> nn.Module:
    """Freezes and unfreezes ``model`` for ``recipe.stage`` (stage 2: ``connectors`` are the expert's)
    and returns the module to train (PEFT-wrapped in stage 3). Refuses inconsistent combinations."""
    moe = model.config.text_config.moe_layer_indices()
    if recipe.stage == "language":  # the LLM alone, e.g. on text before alignment; media paths frozen
        set_trainable(model, {"embeddings", "attention", "norms", "ffn", "experts", "routers"})
        return model
    if recipe.stage == "align":
        set_trainable(model, {"connectors"})
        return model
    if recipe.stage == "experts":
        if moe:
            raise RecipeError(
                f"stage 'experts' trains dense FFNs, but the model has MoE layers {moe}: start from the "
                "dense stage-1 model (model.text_overrides.moe_layers: none)"
            )
        set_trainable(model, {"ffn", "connectors"}, connectors or [])
        return model
    if recipe.stage == "instruct":
        return configure_instruct(model, recipe.unified)
    return configure_unified(model, recipe.unified)


def unwrap_peft(module: nn.Module) -> UniMoeForConditionalGeneration:
    """The model under a PEFT wrapper (or the module itself)."""
    return module.get_base_model() if isinstance(module, PeftModel) else module


def merge_for_release(module: nn.Module) -> UniMoeForConditionalGeneration:
    """Folds PEFT LoRA and in-expert LoRA into the weights: a plain ``UniMoeForConditionalGeneration``."""
    model = module.merge_and_unload() if isinstance(module, PeftModel) else module
    model.text_model().merge_expert_lora()
    return model
