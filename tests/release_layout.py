"""Our state-dict keys written the release's way (per-expert modules, ``mm_projector``,
``mm_audio_aligner``), for tests that build release-format checkpoints."""


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
