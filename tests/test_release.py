"""Converting tiny checkpoints written in the release's layouts (v1 speech, v1 audio, interval MoE).

Each test writes a ``*-base`` and a ``*-e2`` directory the way the release stores them, every e2 file
changing what it covers (a LoRA adapter with non-zero B, new connector and router weights), and checks
the converted model against one assembled by hand from our own keys, step by step in the release's
loading order.
"""

import json

import pytest
import torch
from release_layout import (
    assert_converted_matches,
    prompt_inputs,
    release_config,
    release_key,
    release_state,
    write_base,
    write_encoders,
)

from unimoe import UniMoeForConditionalGeneration, UniMoeInputError
from unimoe.presets import tiny
from unimoe.release import convert_release

LORA_R, LORA_ALPHA = 4, 8
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.experts.1.up_proj", "mlp.down_proj")


def variant_config(variant: str):
    config = tiny(moe_layers="even" if variant == "interval" else "all")
    if variant == "audio":
        config.speech_config = None
        config.audio_qformer_config.num_attention_heads = 1  # BLIP-2's head size 64: one head below 128
    else:
        config.audio_config = config.audio_qformer_config = None
    return config


def write_release(tmp_path, variant: str):
    """Writes base, e2 and encoder files; returns them and the model assembled by hand."""
    torch.manual_seed(0)
    config = variant_config(variant)
    source = UniMoeForConditionalGeneration(config).eval()
    ours = {k: v.clone() for k, v in source.state_dict().items()}
    qformer = variant == "audio"
    base, e2 = tmp_path / "base", tmp_path / "e2"
    write_base(base, release_state(ours, qformer))
    e2.mkdir()
    (e2 / "config.json").write_text(json.dumps(release_config(config)))
    text = config.text_config
    expected = dict(ours)

    # 2. non_lora_trainables.bin: the image projector, under PEFT's prefix
    non_lora = {}
    for key in [k for k in ours if k.startswith("model.image_projector.")]:
        value = torch.randn_like(ours[key])
        non_lora["base_model.model." + release_key(key, qformer)] = value
        expected[key] = value
    torch.save(non_lora, e2 / "non_lora_trainables.bin")

    # 3. the PEFT adapter: W += (alpha / r) B @ A, B non-zero
    adapter = {}
    scale = LORA_ALPHA / LORA_R
    for layer in range(text.num_hidden_layers):
        for target in LORA_TARGETS:
            module, expert = target, None
            if target.startswith("mlp.experts."):
                if layer not in text.moe_layer_indices():
                    continue
                expert = int(target.split(".")[2])
            elif target.startswith("mlp.") and layer in text.moe_layer_indices():
                continue  # dense FFN only on the layers without experts
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            ours_key = (
                f"model.language_model.layers.{layer}.mlp.experts.up_proj"
                if expert is not None
                else f"model.language_model.layers.{layer}.{module}.weight"
            )
            weight = expected[ours_key][expert] if expert is not None else expected[ours_key]
            a = torch.randn(LORA_R, weight.shape[1]) * 0.1
            b = torch.randn(weight.shape[0], LORA_R) * 0.1
            adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = a, b
            merged = weight + scale * (b @ a)
            if expert is not None:
                expected[ours_key] = expected[ours_key].clone()
                expected[ours_key][expert] = merged
            else:
                expected[ours_key] = merged
    torch.save(adapter, e2 / "adapter_model.bin")
    (e2 / "adapter_config.json").write_text(json.dumps({"r": LORA_R, "lora_alpha": LORA_ALPHA}))

    # 4. mm_audio_aligner.bin: the audio or speech connector's projection
    connector = "model.audio_connector" if qformer else "model.speech_connector"
    aligner = {}
    for key in [k for k in ours if k.startswith(f"{connector}.projector.")]:
        value = torch.randn_like(ours[key])
        aligner[release_key(key, qformer)] = value
        expected[key] = value
    torch.save(aligner, e2 / "mm_audio_aligner.bin")

    # 5. mlp_gates.bin: the routers
    gates = {}
    for layer in text.moe_layer_indices():
        key = f"model.language_model.layers.{layer}.mlp.gate.weight"
        value = torch.randn_like(ours[key])
        gates[f"base_model.model.model.layers.{layer}.mlp.gate.weight"] = value
        expected[key] = value
    torch.save(gates, e2 / "mlp_gates.bin")

    encoder_files = write_encoders(tmp_path, source)
    reference = UniMoeForConditionalGeneration(config).eval()
    reference.load_state_dict(expected)
    return base, e2, encoder_files, reference


@pytest.mark.parametrize("variant", ["speech", "audio", "interval"])
def test_converted_release_equals_the_model_assembled_by_hand(variant, tmp_path, fixtures_dir):
    base, e2, encoders, reference = write_release(tmp_path, variant)
    model, processor = convert_release(base, e2, out=tmp_path / "converted", **encoders)
    assert model.config.text_config.moe_layer_indices() == reference.config.text_config.moe_layer_indices()
    for key, value in reference.state_dict().items():
        if key != "model.speech_connector.decoder.embed_tokens.weight":  # never read
            assert torch.equal(model.state_dict()[key], value), key
    assert_converted_matches(
        model, reference, prompt_inputs(processor, fixtures_dir, variant), tmp_path / "converted"
    )


def test_batched_generation_on_a_converted_model_equals_one_by_one(tmp_path, fixtures_dir):
    from unimoe.inference import GenerationParams, UniMoeEngine

    base, e2, encoders, _ = write_release(tmp_path, "speech")
    convert_release(base, e2, out=tmp_path / "converted", **encoders)
    engine = UniMoeEngine.load(str(tmp_path / "converted"), device="cpu", dtype="float32")
    image = {"type": "image", "path": str(fixtures_dir / "photo.jpg")}
    speech = {"type": "speech", "path": str(fixtures_dir / "speech.wav")}
    prompts = [
        [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [speech, {"type": "text", "text": "Say it again, please."}]}],
        [{"role": "user", "content": "Hello."}],
    ]
    params = GenerationParams(max_new_tokens=5, temperature=0.0)
    batched = [r.token_ids for r in engine.generate(prompts, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert batched == alone


def test_conversion_errors_name_the_file_and_leave_no_output(tmp_path):
    base, e2, encoders, _ = write_release(tmp_path, "speech")
    adapter = torch.load(e2 / "adapter_model.bin", weights_only=True)
    key = next(k for k in adapter if k.endswith("q_proj.lora_B.weight"))
    good = adapter[key]
    adapter[key] = torch.randn(good.shape[0] + 1, LORA_R)
    torch.save(adapter, e2 / "adapter_model.bin")
    with pytest.raises(UniMoeInputError, match=r"adapter_model\.bin.*q_proj"):
        convert_release(base, e2, out=tmp_path / "out", **encoders)
    adapter[key] = good
    torch.save(adapter, e2 / "adapter_model.bin")
    (e2 / "mlp_gates.bin").unlink()
    with pytest.raises(UniMoeInputError, match=r"mlp_gates\.bin"):
        convert_release(base, e2, out=tmp_path / "out", **encoders)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_convert_command(tmp_path):
    from unimoe.cli import main

    base, e2, encoders, reference = write_release(tmp_path, "interval")
    args = ["convert", "--base", str(base), "--e2", str(e2), "--out", str(tmp_path / "out")]
    args += ["--clip", str(encoders["clip"]), "--whisper", str(encoders["whisper"]), "--dtype", "float32"]
    assert main(args) == 0
    loaded = UniMoeForConditionalGeneration.from_pretrained(tmp_path / "out")
    key = "model.language_model.layers.0.mlp.gate.weight"
    assert torch.equal(loaded.state_dict()[key], reference.state_dict()[key])
    assert main(args) == 2  # the output exists: a configuration error, nothing overwritten
