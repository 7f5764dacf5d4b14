"""Our state-dict keys written the release's way (per-expert modules, ``mm_projector``,
``mm_audio_aligner``), for tests that build release-format checkpoints."""

import json

import torch
from transformers import AutoTokenizer, CLIPVisionModel, WhisperModel

from unimoe.modeling.beats import save_official_checkpoint
from unimoe.processing.processor import TINY_TOKENIZER


def release_key(key: str, qformer: bool) -> str | None:
    """Our key (one expert's slice handled by the caller) under the release's name; None for encoders."""
    for ours, theirs in (
        ("lm_head.", "lm_head."),
        ("model.language_model.", "model."),
        ("model.image_projector.", "model.mm_projector."),
        ("model.speech_connector.decoder.", "model.mm_audio_aligner.decoder.audio_decoder."),
        ("model.speech_connector.query_tokens", "model.query_tokens"),
        ("model.audio_connector.qformer.", "model.mm_audio_aligner.qformer.qformer."),
        ("model.audio_connector.query_tokens", "mm_audio_aligner.query_tokens"),
        (
            "model.audio_connector.projector." if qformer else "model.speech_connector.projector.",
            "model.mm_audio_aligner.projector.",
        ),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def release_state(state: dict, qformer: bool) -> dict:
    out = {}
    for key, value in state.items():
        if ".mlp.experts." in key:  # stacked [E, out, in] -> one module per expert
            prefix, proj = key.rsplit(".", 1)
            for i in range(value.shape[0]):
                out[release_key(f"{prefix}.{i}.{proj}.weight", qformer)] = value[i].clone()
        elif (name := release_key(key, qformer)) is not None:
            out[name] = value.clone()
    return out


def write_base(base, release: dict) -> None:
    """A ``*-base`` directory: ``release`` in two ``pytorch_model`` shards with an index, and a tokenizer."""
    base.mkdir()
    keys = sorted(release)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: release[k] for k in part}, base / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    AutoTokenizer.from_pretrained(str(TINY_TOKENIZER), tokenizer_class="LlamaTokenizer").save_pretrained(base)


def release_config(config, **extra) -> dict:
    """A release ``config.json`` for our ``UniMoeConfig``: the LLaMA shape, paths it never follows."""
    text = config.text_config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    out = {k: getattr(text, k) for k in (*keys, "rms_norm_eps", "max_position_embeddings")}
    out.update(mm_vision_select_layer=-2, mm_vision_tower="/path/to/clip-vit-large-patch14-336")
    return {**out, **extra}


def write_encoders(tmp_path, source) -> dict:
    """CLIP (and Whisper, or the official BEATs file) of model ``source`` in their own formats."""
    config = source.config
    clip = CLIPVisionModel(config.vision_config)
    clip.load_state_dict(source.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    files = {"clip": tmp_path / "clip"}
    if config.speech_config is None:
        save_official_checkpoint(source.model.audio_encoder, tmp_path / "beats.pt")
        files["beats"] = tmp_path / "beats.pt"
    else:
        whisper = WhisperModel(config.speech_config)
        whisper.encoder.load_state_dict(source.model.speech_encoder.state_dict())
        whisper.save_pretrained(tmp_path / "whisper")
        files["whisper"] = tmp_path / "whisper"
    return files


def prompt_inputs(processor, fixtures_dir, variant):
    media = {"type": "speech", "path": str(fixtures_dir / "speech.wav")}
    if variant == "audio":
        media = {"type": "audio", "path": str(fixtures_dir / "sound.wav")}
    content = [
        {"type": "image", "path": str(fixtures_dir / "photo.jpg")},
        media,
        {"type": "text", "text": "Hi?"},
    ]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def assert_converted_matches(model, reference, inputs, directory) -> None:
    """A converted model against the one assembled by hand: equal logits and greedy tokens, and a
    ``save_pretrained`` / ``from_pretrained`` round trip (of ``directory``) that changes nothing."""
    import torch

    from unimoe import UniMoeForConditionalGeneration

    greedy = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
        generated = model.generate(**inputs, **greedy)
        assert torch.equal(generated, reference.generate(**inputs, **greedy))
        loaded = UniMoeForConditionalGeneration.from_pretrained(directory).eval()
        assert torch.equal(loaded.generate(**inputs, **greedy), generated)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
