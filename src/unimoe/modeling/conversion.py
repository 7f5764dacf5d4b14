"""Reading the official Uni-MoE checkpoints: release state-dict keys to ours.

The release stores each expert as its own module; we stack experts into ``[E, out, in]`` tensors.

* v1 (4 experts): ``model.layers.{L}.mlp.gate.weight`` and
  ``model.layers.{L}.mlp.experts.{i}.{gate,up,down}_proj.weight``.
* 8 experts (DeepSpeed-MoE layout): ``model.layers.{L}.mlp.deepspeed_moe.gate.wg.weight`` and
  ``model.layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{i}.{proj}[_lora_A|_lora_B].weight``.

Keys we do not know (connectors, encoders) pass through unchanged; LLaMA keys are already ours.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import UniMoeInputError

_V1_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_DS_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj)(?:(?:_|\.)(lora_A|lora_B))?\.weight$"
)
_DS_GATE = re.compile(r"^(model\.layers\.\d+\.mlp)\.deepspeed_moe\.gate\.wg\.weight$")
_PEFT_PREFIX = "base_model.model."


def _strip_prefix(key: str) -> str:
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    if key.startswith("model.model."):
        key = key[len("model.") :]
    return key


def convert_release_state_dict(
    state_dict: dict[str, torch.Tensor], consume: bool = False
) -> dict[str, torch.Tensor]:
    """Maps a release state dict (v1 or 8-expert keys) to ``UniMoeForCausalLM`` keys.

    Per-expert tensors are stacked along a new first dimension in expert order; an expert id
    missing from a layer raises ``KeyError`` naming it. With ``consume``, ``state_dict`` is emptied
    as it is read and each layer's per-expert tensors are freed once stacked, so that converting holds
    one copy of the weights plus one stack.
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for raw_key in list(state_dict):
        tensor = state_dict.pop(raw_key) if consume else state_dict[raw_key]
        key = _strip_prefix(raw_key)
        if m := _V1_EXPERT.match(key):
            prefix, idx, proj = m.groups()
            stacks[f"{prefix}.experts.{proj}"][int(idx)] = tensor
        elif m := _DS_EXPERT.match(key):
            prefix, idx, proj, lora = m.groups()
            name = f"{prefix}.experts.{proj}" + (f"_{lora}" if lora else "")
            stacks[name][int(idx)] = tensor
        elif m := _DS_GATE.match(key):
            out[f"{m.group(1)}.gate.weight"] = tensor
        else:
            out[key] = tensor
    for name in list(stacks):
        per_expert = stacks.pop(name)
        missing = sorted(set(range(max(per_expert) + 1)) - set(per_expert))
        if missing:
            raise KeyError(f"{name}: experts {missing} missing from the checkpoint")
        out[name] = torch.stack([per_expert.pop(i) for i in range(len(per_expert))])
    return out


def load_state_dict_files(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a checkpoint file or directory: ``*.safetensors`` / ``pytorch_model*.bin``, sharded or not."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        index = next(iter(sorted(path.glob("*.index.json"))), None)
        if index is not None:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / shard for shard in shards]
        else:
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no checkpoint files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_release_language_model(path: str | Path, config=None, strict: bool = True):
    """Builds a ``UniMoeForCausalLM`` from a release checkpoint directory (``config.json`` + weights).

    The release's ``config.json`` is read for the LLaMA shape and the expert count; pass ``config``
    to override. Keys outside the language model (connectors, encoders) are ignored here.
    """
    from .modeling_unimoe_text import UniMoeForCausalLM

    path = Path(path)
    state = convert_release_state_dict(load_state_dict_files(path))
    if config is None:
        config = release_text_config(json.loads((path / "config.json").read_text()), state)
    model = UniMoeForCausalLM(config)
    own = model.state_dict()
    lm_state = {k: v for k, v in state.items() if k in own}
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(own) - set(lm_state) - tied)
    if strict and missing:
        raise KeyError(f"{path}: missing language-model keys, e.g. {missing[:5]}")
    model.load_state_dict(lm_state, strict=False)
    return model


def release_text_config(release: dict, state: dict[str, torch.Tensor] | None = None):
    """A ``UniMoeTextConfig`` from a release ``config.json`` dict (and its converted weights, to find
    which layers are MoE and how many experts they have)."""
    from .configuration_unimoe_text import UniMoeTextConfig

    moe_layers: list[int] | str = "all"
    num_experts = release.get("num_experts", 4)
    if state is not None:
        layers = sorted(int(k.split(".")[2]) for k in state if k.endswith(".mlp.gate.weight"))
        moe_layers = layers
        if layers:
            num_experts = state[f"model.layers.{layers[0]}.mlp.gate.weight"].shape[0]
    shape_keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    )
    kwargs = {k: release[k] for k in shape_keys if k in release}
    if num_experts == 8:  # DeepSpeed's top-2 gate; its second choice is sampled (Gumbel) in training
        kwargs.update(router="softmax_topk", router_noise="gumbel")
    lora_a = [v for k, v in (state or {}).items() if k.endswith(".experts.gate_proj_lora_A")]
    if lora_a:
        rank = lora_a[0].shape[1]
        if release.get("lora_r", rank) != rank:
            raise UniMoeInputError(
                f"the experts' LoRA has rank {rank}; the config's lora_r is {release['lora_r']}"
            )
        kwargs.update(expert_lora_rank=rank, expert_lora_alpha=release.get("lora_alpha", 16.0))
        kwargs["expert_lora_dropout"] = release.get("lora_dropout", 0.05)
    return UniMoeTextConfig(
        **kwargs,
        num_experts=num_experts,
        num_experts_per_tok=release.get("num_experts_per_tok", release.get("top_k_experts", 2)),
        moe_layers=moe_layers,
    )


# release multimodal key prefixes -> ours; first match wins (longest prefixes first)
_MULTIMODAL_PREFIXES = (
    ("model.mm_audio_aligner.decoder.audio_decoder.", "model.speech_connector.decoder."),
    ("model.mm_audio_aligner.qformer.qformer.", "model.audio_connector.qformer."),
    ("model.mm_audio_aligner.query_tokens", "model.audio_connector.query_tokens"),
    ("mm_audio_aligner.query_tokens", "model.audio_connector.query_tokens"),
    ("model.query_tokens", "model.speech_connector.query_tokens"),
    ("model.mm_projector.", "model.image_projector."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def convert_release_multimodal_state_dict(
    state_dict: dict[str, torch.Tensor], consume: bool = False
) -> dict[str, torch.Tensor]:
    """Maps a release multimodal state dict (the LLM with experts, ``mm_projector``, ``mm_audio_aligner``,
    query tokens; PEFT prefixes allowed) to ``UniMoeForConditionalGeneration`` keys.

    ``model.mm_audio_aligner.projector.*`` is the speech connector's projection in the speech variant
    and the audio connector's in the audio (Q-Former) variant; the presence of Q-Former keys decides.
    Encoder weights are not part of the release files (they load from CLIP/Whisper/BEATs checkpoints).
    ``consume``: see ``convert_release_state_dict``.
    """
    lm = convert_release_state_dict(state_dict, consume)
    has_qformer = any(".qformer.qformer." in k for k in lm)
    aligner = "model.audio_connector.projector." if has_qformer else "model.speech_connector.projector."
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lm.items():
        if key.startswith("model.mm_audio_aligner.projector."):
            out[aligner + key[len("model.mm_audio_aligner.projector.") :]] = tensor
            continue
        for old, new in _MULTIMODAL_PREFIXES:
            if key.startswith(old):
                out[new + key[len(old) :]] = tensor
                break
        else:
            out[key] = tensor
    return out
