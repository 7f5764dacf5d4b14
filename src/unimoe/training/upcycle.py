"""From stage 2 to stage 3: a dense multimodal model plus per-expert FFN files -> a multimodal MoE.

The language model is upcycled with ``upcycle_llama``: on every MoE layer expert i is a copy of the FFN
in ``experts[i]`` (repeat a file to fill two slots), routers start fresh, attention/norms/embeddings
come from the base. Encoders are the base's. Connectors come from the base unless connector files
are given; then each connector weight is taken from the files that contain it:

- ``average`` (default): the element-wise mean over those files. Experts that share a connector
  (image and video both train the image projector) all started from the same stage-1 weights, so
  their fine-tuned copies stay close and their mean is a fair merge;
- ``first``: the first listed file that contains it (per modality: list the preferred file first).

Weights no file contains stay as in the base.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..modeling.modeling_unimoe import UniMoeForConditionalGeneration
from ..modeling.upcycling import extract_ffn_state_dict, upcycle_llama, widen_ffn
from ..processing.processor import SETTINGS_FILE, UniMoeProcessor

logger = logging.getLogger(__name__)

CONNECTOR_MERGES = ("average", "first")
BASE_FFN = "base"  # an ``experts`` entry naming the base model's own FFN


def merge_connector_states(
    states: Sequence[dict[str, torch.Tensor]], mode: str = "average"
) -> dict[str, torch.Tensor]:
    """One connector state dict from several stage-2 connector files (see the module docstring)."""
    if mode not in CONNECTOR_MERGES:
        raise ValueError(f"connector merge must be one of {CONNECTOR_MERGES}, got {mode!r}")
    keys = sorted({k for s in states for k in s})
    merged = {}
    for key in keys:
        values = [s[key] for s in states if key in s]
        if mode == "first" or len(values) == 1:
            merged[key] = values[0]
        else:
            merged[key] = torch.stack([v.float() for v in values]).mean(0).to(values[0].dtype)
    return merged


def upcycle(
    base: str | Path,
    experts: Sequence[str | Path],
    out: str | Path,
    connectors: Sequence[str | Path] = (),
    connector_merge: str = "average",
    router: str = "topk_softmax",
    top_k: int = 2,
    moe_layers: str | list[int] = "all",
    expert_lora_rank: int = 0,
    **moe_options,
) -> Path:
    """Writes a multimodal MoE checkpoint (model + processor) to ``out`` and returns ``out``.

    ``base``: a dense model of ours (stage-1 ``final/``); ``experts``: stage-2 FFN files, one per
    expert slot, in order (the entry ``"base"`` fills a slot with the base model's own FFN, as the
    released v1 does for its fourth expert); ``connectors``: stage-2 connector files merged by ``connector_merge``;
    ``router``, ``top_k``, ``moe_layers``, ``expert_lora_rank`` and ``moe_options`` are
    ``UniMoeTextConfig`` settings of the new language model.
    """
    base, out = Path(base), Path(out)
    if not experts:
        raise ValueError("upcycle needs at least one expert FFN file")
    missing = [str(p) for p in [*experts, *connectors] if str(p) != BASE_FFN and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"upcycle: files not found: {missing}")
    model = UniMoeForConditionalGeneration.from_pretrained(base)
    if model.config.text_config.moe_layer_indices():
        raise ValueError(f"{base}: the base model already has MoE layers; upcycle starts from a dense model")
    dense = model.text_model()
    base_ffn = extract_ffn_state_dict(dense)
    language_model = upcycle_llama(
        dense,
        num_experts=len(experts),
        ffn_sources=[base_ffn if str(p) == BASE_FFN else Path(p) for p in experts],
        router=router,
        num_experts_per_tok=top_k,
        moe_layers=moe_layers,
        expert_lora_rank=expert_lora_rank,
        **moe_options,
    )
    model.set_text_model(language_model)
    if connectors:
        state = merge_connector_states([load_file(str(p)) for p in connectors], connector_merge)
        result = model.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"connector files hold weights the model lacks: {result.unexpected_keys[:5]}")
    sources = {"experts": [str(p) for p in experts], "connectors": [str(p) for p in connectors]}
    _save(model, base, out, {**sources, "connector_merge": connector_merge})
    logger.info(
        "upcycled %s with %d experts (connectors: %s) -> %s", base, len(experts), connector_merge, out
    )
    return out


def widen(base: str | Path, out: str | Path, factor: int) -> Path:
    """Writes ``base`` (a dense model of ours) with FFNs ``factor`` times wider and the same outputs to
    ``out`` (``widen_ffn``): the dense baseline with a top-``factor`` MoE's active parameters."""
    base, out = Path(base), Path(out)
    model = UniMoeForConditionalGeneration.from_pretrained(base)
    model.set_text_model(widen_ffn(model.text_model(), factor))
    _save(model, base, out, {"widen_ffn": factor})
    logger.info("widened the FFNs of %s %dx -> %s", base, factor, out)
    return out


def _save(model: UniMoeForConditionalGeneration, base: Path, out: Path, sources: dict) -> None:
    """Writes the model, the base's processor and ``upcycle.json`` (where every part came from)."""
    model.save_pretrained(out)
    if (base / SETTINGS_FILE).is_file():
        processor = UniMoeProcessor.from_pretrained(base)
    else:
        processor = UniMoeProcessor.for_config(model.config)
    processor.save_pretrained(out)
    (out / "upcycle.json").write_text(json.dumps({"base": str(base), **sources}, indent=1))
