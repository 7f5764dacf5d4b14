"""Running the released Uni-MoE checkpoints: their directories in, one standard model directory out.

A release model is two directories. ``*-base`` holds the LLM with its experts and the connectors as
sharded ``pytorch_model*.bin``; ``*-e2`` (stage 3) holds a PEFT LoRA adapter and the files written on
top of the merged model. The release's loader builds the model from the e2 ``config.json`` and then
loads, each overwriting the last:

1. the base directory's weight shards;
2. e2 ``non_lora_trainables.bin`` (keys ``base_model.model.model.*``: ``base_model.`` and ``model.``
   stripped);
3. the PEFT LoRA adapter, merged: ``W += (lora_alpha / r) * B @ A``;
4. e2 ``mm_audio_aligner.bin``;
5. e2 ``mlp_gates.bin`` (the routers, keys holding ``mlp.gate.``).

The encoders come from their own files: CLIP and Whisper from transformers-format directories, BEATs
from its official checkpoint. Paths written in the release's configs are never followed.

This module covers the v1 layouts (4 experts on every layer: the speech variant with Whisper, the
audio variant with BEATs and a Q-Former) and the interval (``dp``) variant with MoE on even layers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UniMoeConfigError, UniMoeInputError
from .modalities import media
from .modeling.configuration_unimoe import UniMoeConfig
from .modeling.conversion import convert_release_multimodal_state_dict, release_text_config
from .modeling.modeling_unimoe import UniMoeForConditionalGeneration

logger = logging.getLogger(__name__)

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")
_V1_MOE_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.(experts\.|gate\.weight$)")
_EXPERT_PROJ = re.compile(r"^(gate|up|down)_proj(_lora_[AB])?$")
# The stage-2 FFN each of the 8 experts starts from, by global expert id (the release's own list).
EXPERT_FFN_FILES = (
    "mlp_audiocap",
    "mlp_basev",
    "mlp_base",
    "mlp_base1",
    "mlp_base4",
    "mlp_base7",
    "mlp_base",
    "mlp_base7",
)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, read without unpickling code."""
    if not path.is_file():
        raise UniMoeInputError(f"release file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise UniMoeInputError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict):
        raise UniMoeInputError(f"{path} does not hold a state dict")
    return state


def _base_shards(base: Path) -> list[Path]:
    index = base / "pytorch_model.bin.index.json"
    if index.is_file():
        return [base / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    shards = sorted(base.glob("pytorch_model*.bin"))
    if not shards:
        raise UniMoeInputError(f"{base}: no pytorch_model*.bin shards (expected a release *-base directory)")
    return shards


def _strip_non_lora(key: str) -> str:
    """The release's rule for ``non_lora_trainables.bin`` keys: drop ``base_model.``, then ``model.``."""
    key = key.removeprefix("base_model.")
    return key.removeprefix("model.")


def _read_adapter(e2: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, Path]:
    """``{target weight key: (A, B)}`` of the e2 PEFT adapter, its scale ``lora_alpha / r``, its path."""
    config_file = e2 / "adapter_config.json"
    if not config_file.is_file():
        raise UniMoeInputError(f"release file not found: {config_file}")
    config = json.loads(config_file.read_text())
    halves: dict[str, dict[str, torch.Tensor]] = {}
    adapter = e2 / "adapter_model.bin"
    for key, tensor in _load_bin(adapter).items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise UniMoeInputError(f"{adapter}: {key} is not a LoRA weight")
        halves.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = tensor
    pairs = {}
    for target, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise UniMoeInputError(f"{adapter}: {target} has only lora_{''.join(pair)}")
        pairs[target] = (pair["A"], pair["B"])
    return pairs, config["lora_alpha"] / config["r"], adapter


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, key: str, adapter: Path):
    delta = b.float() @ a.float()  # [out, r] @ [r, in]
    if delta.shape != weight.shape:
        raise UniMoeInputError(
            f"{adapter}: LoRA for {key} is {tuple(delta.shape)}, the weight {tuple(weight.shape)}"
        )
    return (weight.float() + scale * delta).to(weight.dtype)


def release_config(base: str | Path, e2: str | Path, experts: str | Path | None = None) -> tuple[dict, Path]:
    """The release ``config.json`` the model is built from, and its path: e2's for v1; for the 8-expert
    model the base's ``8config.json`` (the release has it copied over the base ``config.json``), else e2's.
    """
    base, e2 = Path(base), Path(e2)
    candidates = [e2 / "config.json"]
    if experts is not None:
        candidates.insert(0, base / "8config.json")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UniMoeInputError(f"release file not found: {candidates[-1]}")
    try:
        return json.loads(path.read_text()), path
    except json.JSONDecodeError as err:
        raise UniMoeInputError(f"{path} is not valid JSON: {err}") from err


def _expert_weights(e2: Path, experts: Path, moe_layers: set[int]) -> dict[str, torch.Tensor]:
    """The 8-expert model's expert weights under DeepSpeed-MoE keys: per global expert id, e2's
    ``{g}_mlp_experts.bin`` and then the stage-2 FFN file over it. As in the release, a key's layer is
    its third dotted field and its projection its second-to-last; layers without MoE are not read."""
    out: dict[str, torch.Tensor] = {}
    for g, ffn_name in enumerate(EXPERT_FFN_FILES):
        for path in (e2 / f"{g}_mlp_experts.bin", experts / f"{ffn_name}.bin"):
            local = set()  # the rank-local expert index in saved keys: one expert per file
            for key, tensor in _load_bin(path).items():
                fields = key.split(".")
                if "deepspeed_experts" in fields[:-3]:
                    local.add(fields[fields.index("deepspeed_experts") + 1])
                if (
                    len(fields) < 5
                    or fields[1] != "layers"
                    or not fields[2].isdigit()
                    or fields[-1] != "weight"
                ):
                    raise UniMoeInputError(f"{path}: {key} is not a per-layer expert weight")
                if not _EXPERT_PROJ.match(fields[-2]):
                    raise UniMoeInputError(f"{path}: {key} is not a gate/up/down projection (or its LoRA)")
                if int(fields[2]) in moe_layers:
                    prefix = f"model.layers.{fields[2]}.mlp.deepspeed_moe.experts.deepspeed_experts"
                    out[f"{prefix}.{g}.{fields[-2]}.weight"] = tensor
            if len(local) > 1:
                raise UniMoeInputError(f"{path} holds experts {sorted(local)}; expected one expert per file")
    return out


def _moe_layers_8e(config: dict, source: Path) -> set[int]:
    """The layers the 8-expert model builds as MoE: every layer (``moe_type`` dense), or every
    ``moe_stride``-th (sparse)."""
    layers = range(config["num_hidden_layers"])
    kind = config.get("moe_type", "dense")
    if kind == "dense":
        return set(layers)
    if kind == "sparse":
        return {i for i in layers if i % config.get("moe_stride", 2) == 0}
    raise UniMoeConfigError(f"{source}: unknown moe_type {kind!r}")


def load_release_state(
    base: str | Path, e2: str | Path, experts: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The release's language model and connectors as its loader assembles them (module docstring),
    still under the release's key names. ``experts``: the 8-expert model's stage-2 FFN directory
    (``Uni_MoE_8e_Experts``); None for v1. Streams the base shards: each weight gets its e2 updates
    in the release's order as its shard is read, so one copy of the weights is held, plus one shard."""
    base, e2 = Path(base), Path(e2)
    eight = experts is not None
    non_lora_file, aligner_file, gates_file = (
        e2 / n for n in ("non_lora_trainables.bin", "mm_audio_aligner.bin", "mlp_gates.bin")
    )
    if eight and (e2 / "fm_adapter.bin").is_file():
        raise UniMoeInputError(f"{e2 / 'fm_adapter.bin'}: the MoEFm variant is not supported")
    non_lora = {_strip_non_lora(k): v for k, v in _load_bin(non_lora_file).items()}
    lora, scale, adapter = _read_adapter(e2)
    aligner = _load_bin(aligner_file) if aligner_file.is_file() else {}
    gates = {  # v1's loader keeps the ``mlp.gate.`` keys; the 8-expert one loads the whole file
        k.removeprefix("base_model.model."): v
        for k, v in _load_bin(gates_file).items()
        if eight or "mlp.gate." in k
    }
    merge = None  # marks the LoRA merge's place in the order
    if eight:
        config, config_file = release_config(base, e2, experts)
        num_experts = config.get("num_experts", len(EXPERT_FFN_FILES))
        if num_experts != len(EXPERT_FFN_FILES):
            raise UniMoeConfigError(
                f"{config_file}: the 8-expert layout has {len(EXPERT_FFN_FILES)} experts; the config says {num_experts}"
            )
        if config.get("num_experts_per_tok", 2) != 2:  # DeepSpeed's top-1 gate weighs differently
            raise UniMoeConfigError(f"{config_file}: only top-2 routing is supported at 8 experts")
        for key, value in gates.items():
            if key.endswith(".gate.wg.weight") and value.shape[0] != num_experts:
                raise UniMoeInputError(
                    f"{gates_file}: {key} routes to {value.shape[0]} experts; {config_file} says {num_experts}"
                )
        expert_state = _expert_weights(e2, Path(experts), _moe_layers_8e(config, config_file))
        order = [(non_lora, non_lora_file), (gates, gates_file), (merge, adapter), (aligner, aligner_file)]
    else:
        if (e2 / "0_mlp_experts.bin").is_file():
            raise UniMoeConfigError(
                f"{e2} is an 8-expert release: give its stage-2 expert directory (experts)"
            )
        expert_state = {}
        order = [(non_lora, non_lora_file), (merge, adapter), (aligner, aligner_file), (gates, gates_file)]

    def finish(key: str, tensor: torch.Tensor | None) -> torch.Tensor:
        """``tensor`` (None: not in the base) after the e2 files, in the release's order."""
        for update, source in order:
            if update is merge:
                if key in lora:
                    if tensor is None:
                        raise UniMoeInputError(
                            f"{adapter}: LoRA for {key}, which the base model does not have"
                        )
                    tensor = _merged(tensor, *lora[key], scale, key, adapter)
            elif key in update:
                tensor = _checked(update[key], tensor, key, source)
        return tensor

    state: dict[str, torch.Tensor] = {}
    dropped = 0
    for shard in _base_shards(base):
        for key, tensor in _load_bin(shard).items():
            if eight and _V1_MOE_KEY.match(key):  # v1 experts and routers: no such modules at 8 experts
                dropped += 1
                continue
            state[key] = finish(key, tensor)
    for key, tensor in expert_state.items():
        state[key] = finish(key, tensor)
    for key in [*non_lora, *lora, *aligner, *gates]:  # weights only the e2 files hold
        if key not in state:
            state[key] = finish(key, None)
    logger.info(
        "assembled %s + %s: %d tensors, %d LoRA weights merged, %d base tensors of the v1 MoE left out",
        base,
        e2,
        len(state),
        len(lora),
        dropped,
    )
    return state


def _checked(new: torch.Tensor, old: torch.Tensor | None, key: str, source: Path) -> torch.Tensor:
    if old is not None and old.shape != new.shape:
        raise UniMoeInputError(
            f"{source}: {key} has shape {tuple(new.shape)}, the base has {tuple(old.shape)}"
        )
    return new


def _qformer_config(state: dict[str, torch.Tensor]) -> dict:
    """The audio Q-Former's shape, read off its weights; heads of BLIP-2's size 64 (as released: 12 at 768)."""
    prefix = "model.audio_connector.qformer.encoder.layer."
    layers = sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})
    cross = [i for i in layers if f"{prefix}{i}.crossattention.attention.key.weight" in state]
    hidden = state["model.audio_connector.query_tokens"].shape[-1]
    return dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=state[f"{prefix}0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else 1,
        encoder_hidden_size=state[f"{prefix}{cross[0]}.crossattention.attention.key.weight"].shape[1],
    )


def _build_config(
    release: dict, state: dict[str, torch.Tensor], clip: Path, whisper: Path | None, beats_cfg, first_id: int
) -> UniMoeConfig:
    """``first_id``: the id the first placeholder token gets in the tokenizer (its length)."""
    from transformers import CLIPVisionConfig, WhisperConfig

    prefix = "model.language_model."
    lm = {"model." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}  # a view
    text = release_text_config(release, lm)
    kwargs: dict = dict(
        text_config=text.to_dict(), vision_config=CLIPVisionConfig.from_pretrained(clip).to_dict()
    )
    if whisper is not None:
        speech = WhisperConfig.from_pretrained(whisper)
        kwargs["speech_config"] = speech.to_dict()
        kwargs["speech_num_queries"] = state["model.speech_connector.query_tokens"].shape[1]
        kwargs["chunk_seconds"] = speech.max_source_positions / 50  # 1500 encoder frames per 30 s
    else:
        kwargs["audio_config"] = beats_cfg.to_dict()
        kwargs["audio_qformer_config"] = _qformer_config(state)
        kwargs["audio_num_queries"] = state["model.audio_connector.query_tokens"].shape[1]
    ids = {m.token_id_key: first_id + i for i, m in enumerate(media())}  # as the processor adds them
    select = release.get("mm_vision_select_layer", -2)
    return UniMoeConfig(**kwargs, **ids, vision_feature_layer=select)


def convert_release(
    base: str | Path,
    e2: str | Path,
    *,
    experts: str | Path | None = None,
    clip: str | Path,
    whisper: str | Path | None = None,
    beats: str | Path | None = None,
    out: str | Path | None = None,
    dtype: torch.dtype | None = None,
    merge_expert_lora: bool = False,
    max_shard_size: str | int = "5GB",
):
    """The released model in ``base`` + ``e2`` as a ``UniMoeForConditionalGeneration`` and its processor.

    ``experts``: the 8-expert model's stage-2 FFN directory (``Uni_MoE_8e_Experts``; ``e2`` is then
    ``Uni_MoE_8e_e2``), None for v1. ``clip``: a transformers CLIP vision directory; ``whisper`` (speech
    variant) a transformers Whisper directory, or ``beats`` (audio variant) the official BEATs
    checkpoint. ``dtype``: the model's dtype (default: as stored). ``merge_expert_lora``: fold the
    8-expert model's in-expert LoRA into the expert weights instead of keeping it as adapters. With
    ``out``, the standard model directory is written there (safetensors shards of ``max_shard_size``
    with an index, ``config.json``, processor, tokenizer and chat template), atomically.
    """

    options = dict(
        experts=experts,
        clip=clip,
        whisper=whisper,
        beats=beats,
        dtype=dtype,
        merge_expert_lora=merge_expert_lora,
        max_shard_size=max_shard_size,
    )
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model" if out is None else Path(out)
        write_release_directory(base, e2, target, **options)
        return _load(target)


def _load(directory: Path):
    from .processing.processor import UniMoeProcessor

    model = UniMoeForConditionalGeneration.from_pretrained(directory, dtype="auto").eval()
    return model, UniMoeProcessor.from_pretrained(directory)


def write_release_directory(
    base: str | Path,
    e2: str | Path,
    out: Path,
    *,
    experts: str | Path | None = None,
    clip: str | Path,
    whisper: str | Path | None = None,
    beats: str | Path | None = None,
    dtype: torch.dtype | None = None,
    merge_expert_lora: bool = False,
    max_shard_size: str | int = "5GB",
) -> None:
    """Writes the converted model directory (see ``convert_release``) without building the model: the
    weights go from the release's shards to ours holding one copy at a time."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer, CLIPVisionModel, WhisperModel

    from .modeling.beats import BEATsModel
    from .processing.processor import UniMoeProcessor

    if (whisper is None) == (beats is None):
        raise UniMoeConfigError("give exactly one of whisper (speech variant) and beats (audio variant)")
    if out.exists():
        raise UniMoeConfigError(f"{out} exists; choose a new output directory")
    base, e2, clip = Path(base), Path(e2), Path(clip)
    for folder in (base, e2, clip, *(Path(f) for f in (whisper, experts) if f)):
        if not folder.is_dir():
            raise UniMoeInputError(f"directory not found: {folder}")
    release, _ = release_config(base, e2, experts)
    state = convert_release_multimodal_state_dict(load_release_state(base, e2, experts), consume=True)
    beats_model = BEATsModel.from_official_checkpoint(beats) if beats else None
    tokenizer = AutoTokenizer.from_pretrained(base)
    speech = Path(whisper) if whisper else None
    config = _build_config(release, state, clip, speech, beats_model and beats_model.config, len(tokenizer))
    encoders = {"model.vision_tower.": CLIPVisionModel.from_pretrained(clip).state_dict()}
    if whisper:
        encoders["model.speech_encoder."] = WhisperModel.from_pretrained(whisper).encoder.state_dict()
    else:
        encoders["model.audio_encoder."] = beats_model.state_dict()
    if merge_expert_lora:
        _merge_expert_lora(state, config.text_config)
    stored = state["model.language_model.embed_tokens.weight"].dtype
    for prefix, part in encoders.items():
        state.update({prefix + k: v.to(stored) for k, v in part.items()})
    with torch.device("meta"):  # names and shapes only
        expected = UniMoeForConditionalGeneration(config).state_dict()
    _check_fits(expected, state, base, e2)
    target = dtype or stored
    for key in state:
        state[key] = state[key].to(target)
    config.dtype = target
    processor = UniMoeProcessor.for_config(config, tokenizer=tokenizer)
    processor.settings.pad_to_square = release.get("image_aspect_ratio") == "pad"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
        config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", out)


def _merge_expert_lora(state: dict[str, torch.Tensor], text_config) -> None:
    """Folds in-expert LoRA into the stacked expert weights, ``W += (alpha / r) B @ A`` per expert
    (in fp32), and sets the config's expert LoRA rank to 0."""
    if not text_config.expert_lora_rank:
        return
    scale = text_config.expert_lora_alpha / text_config.expert_lora_rank
    for key in [k for k in state if k.endswith("_lora_A") and ".mlp.experts." in k]:
        name = key.removesuffix("_lora_A")
        a, b = state.pop(key), state.pop(f"{name}_lora_B")
        weight = state[name]
        state[name] = (weight.float() + scale * torch.bmm(b.float(), a.float())).to(weight.dtype)
    text_config.expert_lora_rank = 0


def _check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], base: Path, e2: Path) -> None:
    """Raises unless ``state`` has exactly the keys and shapes of ``own`` (fills the one weight the
    release may leave out)."""
    unused = "model.speech_connector.decoder.embed_tokens.weight"  # the query connector reads no tokens
    if unused in own and unused not in state:
        state[unused] = torch.zeros(own[unused].shape, dtype=next(iter(state.values())).dtype)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {keys[:5]}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise UniMoeInputError(f"{base} + {e2} do not make a Uni-MoE model ({details})")
