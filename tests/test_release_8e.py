"""Converting a tiny 8-expert release (``Uni-MoE-speech-base`` + ``Uni_MoE_8e_Experts`` + ``Uni_MoE_8e_e2``).

The test writes the three directories the way the release stores them: the shared speech base with its
v1 routers and 4 experts (which the 8-expert model does not read), ``8config.json``, the stage-2 FFN
files named by the release's expert list (two of them used by two experts each), per-expert LoRA files
by global expert id whose base weights the FFN files overwrite, routers in both
``non_lora_trainables.bin`` and ``mlp_gates.bin`` (the latter wins), and a PEFT adapter with non-zero B
on a weight that ``non_lora_trainables.bin`` also sets (the merge comes after it).
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

from unimoe import UniMoeConfigError, UniMoeForConditionalGeneration, UniMoeInputError
from unimoe.presets import tiny
from unimoe.release import EXPERT_FFN_FILES, convert_release

RANK, ALPHA = 2, 6.0  # in-expert LoRA (8config.json's lora_r, lora_alpha)
PEFT_R, PEFT_ALPHA = 4, 8
PROJS = ("gate_proj", "up_proj", "down_proj")


def eight_expert_config():
    config = tiny(
        num_experts=8,
        router="softmax_topk",
        router_noise="gumbel",
        expert_lora_rank=RANK,
        expert_lora_alpha=ALPHA,
    )
    config.audio_config = config.audio_qformer_config = None
    return config


def write_8e_release(tmp_path):
    """Writes base, experts, e2 and encoder files; returns them and the model assembled by hand."""
    torch.manual_seed(0)
    config = eight_expert_config()
    text = config.text_config
    source = UniMoeForConditionalGeneration(config).eval()
    ours = {k: v.clone() for k, v in source.state_dict().items()}
    layers = range(text.num_hidden_layers)
    mlp = "model.language_model.layers.{}.mlp"
    for layer in layers:  # non-zero in-expert LoRA B; experts sharing a stage-2 FFN share its weights
        for proj in PROJS:
            ours[f"{mlp.format(layer)}.experts.{proj}_lora_B"] = torch.randn_like(
                ours[f"{mlp.format(layer)}.experts.{proj}_lora_B"]
            )
            weights = ours[f"{mlp.format(layer)}.experts.{proj}"]
            for g, name in enumerate(EXPERT_FFN_FILES):
                weights[g] = weights[EXPERT_FFN_FILES.index(name)]
    expected = dict(ours)

    # base: Uni-MoE-speech-base, whose MoE is v1's (4 experts, mlp.gate) and is not read here
    base_state = release_state({k: v for k, v in ours.items() if ".mlp." not in k}, qformer=False)
    for layer in layers:
        base_state[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(4, text.hidden_size)
        for i in range(4):
            for proj in PROJS:
                shape = ours[f"{mlp.format(layer)}.experts.{proj}"].shape[1:]
                base_state[f"model.layers.{layer}.mlp.experts.{i}.{proj}.weight"] = torch.randn(shape)
    base, experts, e2 = tmp_path / "base", tmp_path / "experts", tmp_path / "e2"
    write_base(base, base_state)
    (base / "config.json").write_text(json.dumps(release_config(config, num_experts=4)))
    eight = release_config(
        config,
        num_experts=8,
        num_experts_per_tok=2,
        moe_type="dense",
        lora_r=RANK,
        lora_alpha=ALPHA,
        ep_size=1,
    )
    (base / "8config.json").write_text(json.dumps(eight))

    # Uni_MoE_8e_Experts: one dense FFN per file, every layer
    experts.mkdir()
    for g, name in enumerate(EXPERT_FFN_FILES):
        ffn = {
            f"model.layers.{layer}.mlp.{proj}.weight": ours[f"{mlp.format(layer)}.experts.{proj}"][g].clone()
            for layer in layers
            for proj in PROJS
        }
        torch.save(ffn, experts / f"{name}.bin")

    # e2: per-expert LoRA (by global id; the release saves them under local expert 0), base weights
    # there too that the FFN files replace
    e2.mkdir()
    (e2 / "config.json").write_text(json.dumps(eight))
    for g in range(8):
        per_expert = {}
        for layer in layers:
            prefix = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.0"
            for proj in PROJS:
                ours_key = f"{mlp.format(layer)}.experts.{proj}"
                per_expert[f"{prefix}.{proj}.weight"] = torch.randn_like(ours[ours_key][g])
                for half in ("lora_A", "lora_B"):
                    per_expert[f"{prefix}.{proj}_{half}.weight"] = ours[f"{ours_key}_{half}"][g].clone()
        torch.save(per_expert, e2 / f"{g}_mlp_experts.bin")

    def router(layer):
        return f"base_model.model.model.layers.{layer}.mlp.deepspeed_moe.gate.wg.weight"

    # non_lora_trainables.bin: the image projector, an attention weight, and routers mlp_gates.bin replaces
    non_lora, gates = {}, {}
    o_proj = "model.language_model.layers.0.self_attn.o_proj.weight"
    for key in [k for k in ours if k.startswith("model.image_projector.")] + [o_proj]:
        expected[key] = torch.randn_like(ours[key])
        non_lora["base_model.model." + release_key(key, False)] = expected[key]
    for layer in layers:
        key = f"{mlp.format(layer)}.gate.weight"
        non_lora[router(layer)] = torch.randn_like(ours[key])
        expected[key] = gates[router(layer).removeprefix("base_model.model.")] = torch.randn_like(ours[key])
    torch.save(non_lora, e2 / "non_lora_trainables.bin")
    torch.save(gates, e2 / "mlp_gates.bin")

    # the PEFT adapter on attention, merged after non_lora_trainables.bin
    adapter = {}
    for layer in layers:
        for module in ("q_proj", "v_proj", "o_proj"):
            key = f"model.language_model.layers.{layer}.self_attn.{module}.weight"
            a, b = (
                torch.randn(PEFT_R, expected[key].shape[1]) * 0.1,
                torch.randn(expected[key].shape[0], PEFT_R) * 0.1,
            )
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = a, b
            expected[key] = expected[key] + PEFT_ALPHA / PEFT_R * (b @ a)
    torch.save(adapter, e2 / "adapter_model.bin")
    (e2 / "adapter_config.json").write_text(json.dumps({"r": PEFT_R, "lora_alpha": PEFT_ALPHA}))

    aligner = {}
    for key in [k for k in ours if k.startswith("model.speech_connector.projector.")]:
        expected[key] = torch.randn_like(ours[key])
        aligner[release_key(key, False)] = expected[key]
    torch.save(aligner, e2 / "mm_audio_aligner.bin")

    reference = UniMoeForConditionalGeneration(config).eval()
    reference.load_state_dict(expected)
    return dict(base=base, e2=e2, experts=experts, **write_encoders(tmp_path, source)), reference


@pytest.fixture
def release_8e(tmp_path):
    return write_8e_release(tmp_path)


def test_8_expert_release_with_expert_lora_kept(release_8e, tmp_path, fixtures_dir):
    files, reference = release_8e
    model, processor = convert_release(**files, out=tmp_path / "converted")
    text = model.config.text_config
    assert (text.num_experts, text.router, text.expert_lora_rank, text.expert_lora_alpha) == (
        8,
        "softmax_topk",
        RANK,
        ALPHA,
    )
    for key, value in reference.state_dict().items():
        if key != "model.speech_connector.decoder.embed_tokens.weight":  # never read
            assert torch.equal(model.state_dict()[key], value), key
    assert_converted_matches(
        model, reference, prompt_inputs(processor, fixtures_dir, "speech"), tmp_path / "converted"
    )


def test_8_expert_release_with_expert_lora_merged_by_the_command(release_8e, tmp_path, fixtures_dir):
    from unimoe.cli import main

    files, reference = release_8e
    args = ["convert", "--merge-expert-lora", "--out", str(tmp_path / "merged")]
    for name in ("base", "e2", "experts", "clip", "whisper"):
        args += [f"--{name}", str(files[name])]
    assert main(args) == 0
    model = UniMoeForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert model.config.text_config.expert_lora_rank == 0
    assert not [k for k in model.state_dict() if "lora" in k]
    for layer in reference.model.language_model.layers:
        layer.mlp.experts.merge_lora()  # our module's own merge: an independent reference
    for key, value in reference.state_dict().items():
        if key != "model.speech_connector.decoder.embed_tokens.weight":
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    from unimoe.processing.processor import UniMoeProcessor

    inputs = prompt_inputs(UniMoeProcessor.from_pretrained(tmp_path / "merged"), fixtures_dir, "speech")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)


def _break(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_8_expert_errors_name_the_file(release_8e, tmp_path):
    files, _ = release_8e
    e2 = files["e2"]
    (e2 / "3_mlp_experts.bin").rename(tmp_path / "moved.bin")
    with pytest.raises(UniMoeInputError, match=r"3_mlp_experts\.bin"):
        convert_release(**files, out=tmp_path / "out")
    (tmp_path / "moved.bin").rename(e2 / "3_mlp_experts.bin")

    first = "model.layers.0.mlp.deepspeed_moe.gate.wg.weight"
    good = torch.load(e2 / "mlp_gates.bin", weights_only=True)
    _break(e2 / "mlp_gates.bin", lambda s: s.update({first: s[first][:7]}))
    with pytest.raises(UniMoeInputError, match=r"mlp_gates\.bin.*7 experts"):
        convert_release(**files, out=tmp_path / "out")
    torch.save(good, e2 / "mlp_gates.bin")

    good = torch.load(e2 / "5_mlp_experts.bin", weights_only=True)
    twice = {k.replace("experts.0.", "experts.1."): v for k, v in good.items()}
    _break(e2 / "5_mlp_experts.bin", lambda s: s.update(twice))
    with pytest.raises(UniMoeInputError, match=r"5_mlp_experts\.bin holds experts \['0', '1'\]"):
        convert_release(**files, out=tmp_path / "out")
    torch.save(good, e2 / "5_mlp_experts.bin")

    _break(files["experts"] / "mlp_base.bin", lambda s: s.update({"model.norm.weight": torch.ones(1)}))
    with pytest.raises(UniMoeInputError, match=r"mlp_base\.bin: model\.norm\.weight"):
        convert_release(**files, out=tmp_path / "out")

    with pytest.raises(UniMoeConfigError, match="8-expert release"):
        convert_release(**{**files, "experts": None}, out=tmp_path / "out")

    config = json.loads((files["base"] / "8config.json").read_text())
    (files["base"] / "8config.json").write_text(json.dumps({**config, "num_experts": 6}))
    with pytest.raises(UniMoeConfigError, match="8 experts; the config says 6"):
        convert_release(**files, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
