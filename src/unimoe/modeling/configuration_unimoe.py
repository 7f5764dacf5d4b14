"""Composite configuration of the multimodal Uni-MoE model."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Blip2QFormerConfig, CLIPVisionConfig, PreTrainedConfig, WhisperConfig
from transformers.configuration_utils import SubConfigSpec

from ..modalities import MODALITIES, media
from .beats import BEATsConfig
from .configuration_unimoe_text import UniMoeTextConfig

VIDEO_POOLINGS = ("mean", "concat")


@strict
class UniMoeConfig(PreTrainedConfig):
    r"""Uni-MoE: a Mixture-of-Experts LLM fed by frozen encoders through trainable connectors.

    Every encoder is optional: a model without ``speech_config`` has no speech branch, and so on.

    Args:
        text_config: the MoE language model (``UniMoeTextConfig``).
        vision_config: CLIP vision tower for images and video frames (``CLIPVisionConfig``).
        speech_config: Whisper, whose encoder reads speech and whose decoder runs on learnable queries
            as the speech connector (``WhisperConfig``).
        audio_config: BEATs audio encoder (``BEATsConfig``); ``audio_qformer_config`` its Q-Former connector.
        image_token_id / video_token_id / speech_token_id / audio_token_id: placeholder token ids; each
            placeholder is expanded by the processor to as many tokens as its media yields features.
        vision_feature_layer: CLIP hidden state used (``-2``: the penultimate layer, CLS dropped).
        video_num_frames: frames sampled evenly from a video. ``video_pooling``: ``"mean"`` over frames
            (the release: one image's worth of tokens) or ``"concat"`` (tokens of every frame).
        speech_num_queries / audio_num_queries: connector queries, i.e. LLM tokens per 30 s chunk.
        audio_max_chunks: chunks kept per audio file (later audio is dropped).
        chunk_seconds: audio chunk length (30 s for Whisper and BEATs as released; the Whisper encoder's
            ``max_source_positions`` must equal ``50 * chunk_seconds``).
        freeze_encoders: keep CLIP, the Whisper encoder and BEATs frozen (all three release stages do).
    """

    model_type = "unimoe"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(UniMoeTextConfig),
        "vision_config": SubConfigSpec(CLIPVisionConfig, optional=True),
        "speech_config": SubConfigSpec(WhisperConfig, optional=True),
        "audio_config": SubConfigSpec(BEATsConfig, optional=True),
        "audio_qformer_config": SubConfigSpec(Blip2QFormerConfig, optional=True),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    speech_config: dict | PreTrainedConfig | None = None
    audio_config: dict | PreTrainedConfig | None = None
    audio_qformer_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    video_token_id: int = 32001
    speech_token_id: int = 32002
    audio_token_id: int = 32003
    vision_feature_layer: int = -2
    video_num_frames: int = 8
    video_pooling: str = "mean"
    speech_num_queries: int = 50
    audio_num_queries: int = 50
    audio_max_chunks: int = 20
    chunk_seconds: float = 30.0
    freeze_encoders: bool = True
    tie_word_embeddings: bool = False

    def validate_architecture(self):
        """Checks that the connector settings fit the encoders."""
        if self.video_pooling not in VIDEO_POOLINGS:
            raise ValueError(f"video_pooling must be one of {VIDEO_POOLINGS}, got {self.video_pooling!r}")
        if (self.audio_config is None) != (self.audio_qformer_config is None):
            raise ValueError("audio_config and audio_qformer_config go together")
        if (
            self.speech_config is not None
            and self.speech_config.max_source_positions != 50 * self.chunk_seconds
        ):
            raise ValueError(
                f"speech_config.max_source_positions ({self.speech_config.max_source_positions}) must be "
                f"50 * chunk_seconds ({50 * self.chunk_seconds:g})"
            )
        ids = list(self.placeholder_ids().values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"placeholder token ids must differ, got {ids}")

    @property
    def modalities(self) -> list[str]:
        """The media this model reads, besides text: those with an encoder config and a placeholder id."""
        ids = self.placeholder_ids()
        return [m.name for m in media() if getattr(self, m.config_key) is not None and m.name in ids]

    def placeholder_ids(self) -> dict[str, int]:
        """Placeholder token id per modality (modalities this config gives no id are left out)."""
        ids = {m.name: getattr(self, m.token_id_key, None) for m in media()}
        return {name: token_id for name, token_id in ids.items() if token_id is not None}

    def num_tokens(self, modality: str) -> int:
        """LLM tokens per item (image, video kinds) or per audio chunk (speech, audio kinds)."""
        kind = MODALITIES[modality].kind
        if kind == "image":
            return self.image_num_tokens()
        if kind == "video":
            return self.video_num_tokens()
        return self.speech_num_queries if kind == "speech" else self.audio_num_queries

    def image_num_tokens(self) -> int:
        """LLM tokens per image: one per CLIP patch."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    def video_num_tokens(self) -> int:
        """LLM tokens per video."""
        frames = 1 if self.video_pooling == "mean" else self.video_num_frames
        return frames * self.image_num_tokens()
