import pytest
import torch
from release_layout import release_state

from unimoe import UniMoeForConditionalGeneration, UniMoeInputError
from unimoe.presets import build_tiny
from unimoe.processing.processor import UniMoeProcessor


@pytest.fixture(scope="module")
def tiny():
    return build_tiny(seed=0)


def record(rid, prompt, answer="a red circle", **media):
    return {
        "id": rid,
        **media,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
    }


def mixed_records(fx):
    return [
        record("text", "Say something."),
        record("image", "<image>\nWhat is this?", image=str(fx / "photo.jpg")),
        record("video", "<video>\nWhat happens?", video=str(fx / "clip.mp4")),
        record("speech", "<speech>\nWhat is said?", speech=[str(fx / "speech.wav")]),
        record("audio", "<audio>\nWhat sound?", audio=[str(fx / "sound.wav")]),
    ]


def test_token_counts_per_encoder(tiny, fixtures_dir):
    model, proc = tiny
    cfg = model.config
    batch = proc(mixed_records(fixtures_dir))
    ids = batch["input_ids"]
    assert (ids == cfg.image_token_id).sum() == cfg.image_num_tokens() == 16  # (32 / 8) ** 2 patches
    assert (ids == cfg.video_token_id).sum() == cfg.video_num_tokens() == 16  # frames mean-pooled
    # speech.wav and sound.wav are 1-2.5 s: one or two 2 s chunks of 8 query tokens each
    n_speech = batch["speech_features"].shape[0]
    assert (ids == cfg.speech_token_id).sum() == 8 * n_speech
    assert (ids == cfg.audio_token_id).sum() == 8 * batch["audio_features"].shape[0]
    assert batch["pixel_values_videos"].shape == (1, 8, 3, 32, 32)
    assert batch["speech_features"].shape[1:] == (80, 200)
    assert batch["audio_features"].shape[1:] == (198, 128)
    with torch.no_grad():
        assert model.model.image_embeddings(batch["pixel_values"]).shape == (16, 64)
        assert model.model.video_embeddings(batch["pixel_values_videos"]).shape == (16, 64)
        assert model.model.speech_embeddings(batch["speech_features"]).shape == (8 * n_speech, 64)
        audio = model.model.audio_embeddings(batch["audio_features"], batch["audio_padding_mask"])
        assert audio.shape == (8 * batch["audio_features"].shape[0], 64)


def test_long_audio_is_chunked_and_capped(tiny):
    _, proc = tiny
    wave = torch.randn(16000 * 5).numpy() * 0.1  # 5 s -> chunks of 2 + 2 + 1 s
    sample = proc.encode_messages([{"role": "user", "content": [{"type": "audio", "audio": wave}]}])
    assert sample.media["audio"][0].shape[0] == 3 and sample.modality_tokens["audio"] == 24
    proc.settings.max_chunks = 2
    try:
        sample = proc.encode_messages([{"role": "user", "content": [{"type": "speech", "speech": wave}]}])
    finally:
        proc.settings.max_chunks = 20
    assert sample.media["speech"][0].shape[0] == 2 and sample.modality_tokens["speech"] == 16


def test_mixed_batch_forward_backward(tiny, fixtures_dir):
    model, proc = tiny
    model.train()
    try:
        batch = proc(mixed_records(fixtures_dir))
        out = model(**batch)
        out.loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    for name in ("image_projector", "speech_connector", "audio_connector"):
        grads = [p.grad for p in getattr(model.model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
    for encoder in model.model.encoders():
        assert all(not p.requires_grad and p.grad is None for p in encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_text_only_batch_runs_no_encoder(tiny):
    model, proc = tiny
    calls = []
    hooks = [
        m.register_forward_hook(lambda *a: calls.append(1))
        for m in model.model.encoders() + model.model.connectors()
    ]
    try:
        batch = proc([record("a", "Hello there."), record("b", "Two plus two?")])
        with torch.no_grad():
            model(**batch)
        model.generate(
            **proc.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True),
            max_new_tokens=3,
            do_sample=False,
        )
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def multimodal_messages(fx):
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(fx / "photo.jpg")},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "speech", "path": str(fx / "speech.wav")},
                    {"type": "video", "path": str(fx / "clip.mp4")},
                    {"type": "text", "text": "Describe both, please."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "path": str(fx / "sound.wav")},
                    {"type": "text", "text": "Sound?"},
                ],
            }
        ],
    ]


def test_batched_generation_equals_alone_and_cache_equals_no_cache(tiny, fixtures_dir):
    model, proc = tiny
    convs = multimodal_messages(fixtures_dir)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = proc.apply_chat_template(convs, add_generation_prompt=True)
    width = batch["input_ids"].shape[1]
    batched = model.generate(**batch, **kw)[:, width:]
    uncached = model.generate(**batch, use_cache=False, **kw)[:, width:]
    assert torch.equal(batched, uncached)
    for row, conv in enumerate(convs):
        alone = proc.apply_chat_template(conv, add_generation_prompt=True)
        out = model.generate(**alone, **kw)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(out[0], batched[row]), row


def test_decode_steps_do_not_reencode_media(tiny, fixtures_dir):
    model, proc = tiny
    calls = []
    hook = model.model.vision_tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        inputs = proc.apply_chat_template(multimodal_messages(fixtures_dir)[0], add_generation_prompt=True)
        model.generate(**inputs, max_new_tokens=5, do_sample=False)
    finally:
        hook.remove()
    assert len(calls) == 1


def test_placeholder_feature_mismatch_raises(tiny, fixtures_dir):
    model, proc = tiny
    batch = proc([record("img", "<image>\nWhat?", image=str(fixtures_dir / "photo.jpg"))])
    with pytest.raises(UniMoeInputError, match="image: 16 placeholder tokens .* 32 feature vectors"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(UniMoeInputError, match="image"):
        model(input_ids=batch["input_ids"])


def test_media_features_land_on_their_placeholders_in_order(tiny, monkeypatch):
    """Each modality's feature rows fill its placeholders in row-major order, whatever the interleaving
    across samples; gradients reach the features. Reference: a loop over positions."""
    model, _ = tiny
    inner = model.model
    ids = inner.config.placeholder_ids()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (3, 20), generator=generator)
    layout = {(0, 2): "image", (0, 3): "image", (0, 9): "audio", (1, 0): "audio", (1, 5): "image"}
    layout |= {(2, 7): "speech", (2, 8): "speech", (2, 19): "image", (1, 19): "video"}
    for (row, col), modality in layout.items():
        input_ids[row, col] = ids[modality]
    width = inner.config.text_config.hidden_size
    features = {}
    for modality in ids:
        count = sum(m == modality for m in layout.values())
        features[modality] = torch.randn(count, width, generator=generator, requires_grad=True)
    monkeypatch.setattr(inner, "media_embeddings", lambda **media: features)
    embeds = inner.embed_inputs(input_ids)
    expected = inner.get_input_embeddings()(input_ids.clamp(max=499)).detach().clone()
    seen = dict.fromkeys(ids, 0)
    for (row, col), modality in sorted(layout.items()):
        expected[row, col] = features[modality][seen[modality]].detach()
        seen[modality] += 1
    torch.testing.assert_close(embeds, expected, rtol=0, atol=0)
    weights = torch.randn(embeds.shape, generator=generator)
    (embeds * weights).sum().backward()
    for (row, col), modality in sorted(layout.items()):
        index = sorted(p for p, m in layout.items() if m == modality).index((row, col))
        torch.testing.assert_close(features[modality].grad[index], weights[row, col])


@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 0])
def test_image_features_are_the_towers_hidden_state(tiny, monkeypatch, feature_layer):
    """``encode_images`` stops the tower at its feature layer; the features are those of the whole
    tower's ``hidden_states[feature_layer]`` (transformers' own forward), CLS dropped."""
    model, _ = tiny
    inner = model.model
    monkeypatch.setattr(inner.config, "vision_feature_layer", feature_layer)
    size = inner.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        torch.testing.assert_close(inner.encode_images(pixels), expected, rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_with_processor(tiny, tmp_path, fixtures_dir):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    loaded = UniMoeForConditionalGeneration.from_pretrained(tmp_path).eval()
    proc2 = UniMoeProcessor.from_pretrained(tmp_path)
    recs = mixed_records(fixtures_dir)
    a, b = proc(recs), proc2(recs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**a).logits, rtol=0, atol=0)


def test_tiny_speech_encoder_output_depends_on_the_audio(tiny):
    model, _ = tiny
    torch.manual_seed(1)
    a, b = torch.randn(2, 80, 200).unbind(0)
    with torch.no_grad():
        out = model.model.speech_encoder(torch.stack([a, b])).last_hidden_state
    # the two inputs must differ by a sizeable fraction of the output, not only by round-off
    assert (out[0] - out[1]).abs().mean() > 0.05 * out.abs().mean()


def _release_keys(state: dict, qformer: bool) -> dict:
    """Our multimodal keys written the release's way, the image projector under PEFT's prefix."""
    return {
        ("base_model.model." if k.startswith("model.mm_projector.") else "") + k: v
        for k, v in release_state(state, qformer).items()
    }


def test_release_multimodal_keys_load(fixtures_dir):
    from unimoe import convert_release_multimodal_state_dict
    from unimoe.presets import tiny

    for variant in ("speech", "audio"):
        cfg = tiny()
        if variant == "speech":
            cfg.audio_config = cfg.audio_qformer_config = None
        else:
            cfg.speech_config = None
        torch.manual_seed(0)
        source = UniMoeForConditionalGeneration(cfg).eval()
        state = {
            k: v
            for k, v in source.state_dict().items()
            if not (variant == "audio" and k.startswith("model.speech_"))
        }
        converted = convert_release_multimodal_state_dict(_release_keys(state, qformer=variant == "audio"))
        torch.manual_seed(1)
        target = UniMoeForConditionalGeneration(cfg).eval()
        encoders = {
            k: v
            for k, v in source.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.speech_encoder.", "model.audio_encoder."))
        }
        missing, unexpected = target.load_state_dict({**converted, **encoders}, strict=False)
        assert not unexpected, unexpected[:5]
        assert not missing, missing[:5]
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def _old_layout_key(key: str) -> str:
    """Our key as checkpoints before ``UniMoeModel`` stored it: the language model a whole causal LM at
    the top level, encoders and connectors beside it, BEATs' weight norm as ``weight_g``/``weight_v``."""
    key = key.replace("parametrizations.weight.original0", "weight_g")
    key = key.replace("parametrizations.weight.original1", "weight_v")
    if key.startswith("lm_head."):
        return "language_model." + key
    if key.startswith("model.language_model."):
        return "language_model.model." + key.removeprefix("model.language_model.")
    return key.removeprefix("model.")


def test_checkpoint_in_the_old_layout_loads(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    state = model.state_dict()
    old = {_old_layout_key(k): v.contiguous() for k, v in state.items()}
    assert (
        "language_model.model.layers.0.mlp.gate.weight" in old and "vision_tower.post_layernorm.bias" in old
    )
    model.config.save_pretrained(tmp_path)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = UniMoeForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == state.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_layout_follows_transformers_v5():
    from unimoe import UniMoeModel
    from unimoe.modeling.modeling_unimoe_text import UniMoeTextModel
    from unimoe.presets import tiny

    model = UniMoeForConditionalGeneration(tiny())
    assert isinstance(model.model, UniMoeModel) and isinstance(model.model.language_model, UniMoeTextModel)
    assert model.get_output_embeddings() is model.lm_head
    text = model.text_model()  # a causal-LM view sharing the weights
    assert text.model is model.model.language_model and text.lm_head is model.lm_head
