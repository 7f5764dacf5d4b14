"""Sparse upcycling: an MoE language model built from a dense LLaMA and per-expert FFN weights; and
widening, a dense model whose FFNs are ``factor`` times wider and compute the same function."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_unimoe_text import UniMoeTextConfig
from .conversion import load_state_dict_files
from .modeling_unimoe_text import UniMoeForCausalLM

FfnSource = Mapping[str, torch.Tensor] | str | Path

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _load_ffn_source(source: FfnSource) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        return load_state_dict_files(source)
    return source


def _ffn_weight(source: Mapping[str, torch.Tensor], layer: int, proj: str, origin: str) -> torch.Tensor:
    """Finds ``layers.{layer}.mlp.{proj}.weight`` under any prefix (``model.``, ``base_model.model.``...)."""
    suffix = f"layers.{layer}.mlp.{proj}.weight"
    hits = [v for k, v in source.items() if k == suffix or k.endswith("." + suffix)]
    if len(hits) != 1:
        raise KeyError(f"{origin}: expected one '{suffix}', found {len(hits)}")
    return hits[0]


def upcycle_llama(
    dense: LlamaForCausalLM | UniMoeForCausalLM | str | Path,
    num_experts: int,
    ffn_sources: Sequence[FfnSource] | None = None,
    **moe_options,
) -> UniMoeForCausalLM:
    """Builds a ``UniMoeForCausalLM`` from a dense LLaMA (a model or a path to one; a
    ``UniMoeForCausalLM`` without MoE layers is a dense LLaMA too).

    Attention, norms, embeddings and LM head are copied. On MoE layers each expert is a copy of the
    dense FFN, or of the FFN of ``ffn_sources[i]`` for expert i (state dicts or paths holding
    ``...layers.{L}.mlp.{gate,up,down}_proj.weight``, e.g. the stage-2 modality experts; repeat a
    source to fill two slots). Dense layers keep the dense FFN. Routers start fresh.
    ``moe_options`` are ``UniMoeTextConfig`` fields (``router``, ``num_experts_per_tok``, ``moe_layers``...).
    """
    if isinstance(dense, (str, Path)):
        dense = LlamaForCausalLM.from_pretrained(dense, dtype=torch.float32)
    if isinstance(dense, UniMoeForCausalLM) and dense.config.moe_layer_indices():
        raise ValueError("upcycle_llama needs a dense model; this one already has MoE layers")
    if ffn_sources is not None and len(ffn_sources) != num_experts:
        raise ValueError(f"ffn_sources lists {len(ffn_sources)} experts, num_experts is {num_experts}")
    dense_config: LlamaConfig = dense.config
    base = {k: v for k, v in dense_config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    base.pop("architectures", None)
    config = UniMoeTextConfig(**{**base, "num_experts": num_experts, "moe_layers": "all", **moe_options})
    config.architectures = [UniMoeForCausalLM.__name__]
    model = UniMoeForCausalLM(config).to(dense.dtype)
    sources = [_load_ffn_source(s) for s in ffn_sources] if ffn_sources is not None else None

    dense_state = dense.state_dict()
    own = model.state_dict()
    with torch.no_grad():
        for key, tensor in own.items():
            if key in dense_state:
                tensor.copy_(dense_state[key])
        for layer in config.moe_layer_indices():
            for proj in _PROJECTIONS:
                if sources is None:
                    weights = [dense_state[f"model.layers.{layer}.mlp.{proj}.weight"]] * num_experts
                else:
                    weights = [
                        _ffn_weight(s, layer, proj, f"ffn_sources[{i}]") for i, s in enumerate(sources)
                    ]
                own[f"model.layers.{layer}.mlp.experts.{proj}"].copy_(torch.stack(weights))
    return model


def extract_ffn_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The dense FFN weights of a LLaMA-style model, ``model.layers.{L}.mlp.{proj}.weight``: one
    stage-2 expert file."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if ".mlp." in k and k.rsplit(".", 2)[-2] in _PROJECTIONS and ".experts." not in k
    }


def widen_ffn(dense: UniMoeForCausalLM, factor: int) -> UniMoeForCausalLM:
    """A copy of the dense ``dense`` whose FFNs are ``factor`` times wider and compute the same function.

    Each FFN's gate and up rows are repeated ``factor`` times and its down columns repeated and divided
    by ``factor``: every hidden unit appears ``factor`` times at 1/``factor`` of its weight. A top-k MoE
    whose experts have the dense width activates k FFNs per token, so ``factor=k`` gives the dense model
    the same active parameters per token; it starts where the MoE starts (k copies of one FFN).
    """
    if factor < 1:
        raise ValueError(f"widen_ffn: factor must be >= 1, got {factor}")
    if dense.config.moe_layer_indices():
        raise ValueError("widen_ffn needs a dense model; this one has MoE layers")
    config = copy.deepcopy(dense.config)
    config.intermediate_size = dense.config.intermediate_size * factor
    model = UniMoeForCausalLM(config).to(dense.dtype)
    state = {}
    for key, tensor in dense.state_dict().items():
        proj = key.rsplit(".", 2)[-2] if ".mlp." in key else None
        if proj in ("gate_proj", "up_proj"):
            tensor = tensor.repeat(factor, 1)  # [I, D] -> [factor*I, D]
        elif proj == "down_proj":
            tensor = tensor.repeat(1, factor) / factor  # [D, I] -> [D, factor*I]
        state[key] = tensor
    model.load_state_dict(state)
    return model
