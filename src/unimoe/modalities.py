"""The one table of media modalities. Every list of modalities, input keys, encoders and connectors in
the package reads from it, so a modality is added by adding one entry.

An entry names what the rest of the system calls it: the placeholder ``<name>`` in prompts and the
chat-message part type ``name``; the model input that carries its features; the ``UniMoeModel``
attributes of its encoder and connector; the ``UniMoeConfig`` sub-config whose presence enables it
and the config field of its placeholder token id. ``kind`` picks how its media are featurised and
encoded, from the kinds the processor and model implement:

- ``image``: one picture -> CLIP pixels ``[3, H, W]``; one LLM token per patch.
- ``video``: frames sampled evenly -> ``[F, 3, H, W]``; frames mean-pooled (or concatenated).
- ``speech``: 16 kHz audio in chunks -> Whisper log-mel ``[chunks, 80, T]``; queries per chunk.
- ``audio``: 16 kHz audio in chunks -> Kaldi fbank ``[chunks, T, 128]`` + padding mask; queries per chunk.

Two modalities may share a kind, an encoder and a connector (``image`` and ``video`` share CLIP and the
projector).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TEXT = "text"
KINDS = ("image", "video", "speech", "audio")


@dataclass(frozen=True)
class Modality:
    """One media modality (see the module docstring)."""

    name: str
    kind: str
    input_key: str
    encoder: str
    connector: str
    config_key: str
    mask_key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def placeholder(self) -> str:
        """The prompt placeholder, e.g. ``<image>``."""
        return f"<{self.name}>"

    @property
    def token_id_key(self) -> str:
        """The ``UniMoeConfig`` field holding the placeholder's token id."""
        return f"{self.name}_token_id"

    @property
    def chunked(self) -> bool:
        """Whether an item is a batch of chunks (joined along dim 0 in a batch) rather than one tensor."""
        return self.kind in ("speech", "audio")

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The model inputs this modality fills."""
        return (self.input_key,) if self.mask_key is None else (self.input_key, self.mask_key)


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("image", "image", "pixel_values", "vision_tower", "image_projector", "vision_config"),
        Modality("video", "video", "pixel_values_videos", "vision_tower", "image_projector", "vision_config"),
        Modality(
            "speech", "speech", "speech_features", "speech_encoder", "speech_connector", "speech_config"
        ),
        Modality(
            "audio",
            "audio",
            "audio_features",
            "audio_encoder",
            "audio_connector",
            "audio_config",
            mask_key="audio_padding_mask",
        ),
    )
}


def media() -> list[Modality]:
    """Every media modality, in table order."""
    return list(MODALITIES.values())


def media_names() -> list[str]:
    """Media modality names in table order."""
    return list(MODALITIES)


def token_groups() -> list[str]:
    """Modalities a token can belong to, text first: the index order of routing statistics."""
    return [TEXT, *MODALITIES]


def media_input_keys() -> list[str]:
    """Every model input that carries media."""
    return [key for m in MODALITIES.values() for key in m.input_keys]


def connector_names() -> list[str]:
    """``UniMoeModel`` attributes of the connectors, each once."""
    return list(dict.fromkeys(m.connector for m in MODALITIES.values()))


def encoder_names() -> list[str]:
    """``UniMoeModel`` attributes of the encoders, each once."""
    return list(dict.fromkeys(m.encoder for m in MODALITIES.values()))


def placeholder_pattern() -> re.Pattern[str]:
    """Matches any media placeholder; group 1 is the modality name."""
    return re.compile("<(" + "|".join(re.escape(name) for name in MODALITIES) + ")>")
