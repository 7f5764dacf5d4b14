"""The multimodal Uni-MoE model: frozen encoders, trainable connectors, and the MoE language model."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..compat import pop_cache
from ..errors import UniMoeInputError
from ..modalities import MODALITIES, connector_names, encoder_names, media, media_input_keys, token_groups
from .beats import BEATsModel
from .configuration_unimoe import UniMoeConfig
from .connectors import MlpProjector, QFormerConnector, WhisperQueryConnector
from .feature_cache import FrozenFeatureCache
from .modeling_unimoe_text import (
    UniMoeCausalLMOutput,
    UniMoeForCausalLM,
    UniMoeModelOutput,
    UniMoeTextModel,
    causal_lm_output,
)

# Checkpoints saved before ``UniMoeModel`` existed held the language model as a whole causal LM at the top
# level and the encoders and connectors beside it. transformers applies these renamings on load.
LEGACY_KEY_RENAMES = (
    (r"^language_model\.lm_head", "lm_head"),
    (r"^language_model\.model", "model.language_model"),
    *((rf"^{name}", f"model.{name}") for name in encoder_names() + connector_names()),
)


def is_frozen(module: nn.Module) -> bool:
    """Whether none of ``module``'s parameters trains."""
    return not any(p.requires_grad for p in module.parameters())


class UniMoePreTrainedModel(PreTrainedModel):
    config_class = UniMoeConfig
    config: UniMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UniMoeDecoderLayer", "CLIPEncoderLayer", "WhisperEncoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (WhisperQueryConnector, QFormerConnector)):
            init.normal_(module.query_tokens, std=self.config.text_config.initializer_range)


class UniMoeModel(UniMoePreTrainedModel):
    """The encoders, their connectors and the MoE decoder (``language_model``), without an LM head.

    Placeholder tokens in ``input_ids`` (one per feature vector, as the processor expands them) are
    replaced by the connector outputs of the media passed alongside, in order; the sequence then
    runs through the decoder. Only the modalities present in a batch are encoded.
    """

    def __init__(self, config: UniMoeConfig):
        super().__init__(config)
        width = config.text_config.hidden_size
        self.language_model = UniMoeTextModel(config.text_config)
        if config.vision_config is not None:
            self.vision_tower = CLIPVisionModel(config.vision_config)
            self.image_projector = MlpProjector(config.vision_config.hidden_size, width)
        if config.speech_config is not None:
            self.speech_encoder = WhisperEncoder(config.speech_config)
            self.speech_connector = WhisperQueryConnector(
                config.speech_config, config.speech_num_queries, width
            )
        if config.audio_config is not None:
            self.audio_encoder = BEATsModel(config.audio_config)
            self.audio_connector = QFormerConnector(
                config.audio_qformer_config, config.audio_num_queries, width
            )
        self.feature_cache: FrozenFeatureCache | None = None  # see ``media_embeddings``
        self.post_init()
        if config.freeze_encoders:
            for encoder in self.encoders():
                encoder.requires_grad_(False)

    def encoders(self) -> list[nn.Module]:
        """The media encoders this model has (CLIP, Whisper encoder, BEATs)."""
        return [getattr(self, n) for n in encoder_names() if hasattr(self, n)]

    def connectors(self) -> list[nn.Module]:
        """The trainable connectors this model has."""
        return [getattr(self, n) for n in connector_names() if hasattr(self, n)]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def _encoder_context(self, encoder: nn.Module):
        return torch.no_grad() if is_frozen(encoder) else contextlib.nullcontext()

    def _parts(self, modality: str) -> tuple[nn.Module, nn.Module]:
        """The encoder and connector of ``modality``."""
        m = MODALITIES[modality]
        if not hasattr(self, m.encoder):
            raise UniMoeInputError(f"{modality} input given, but this model has no {modality} encoder")
        return getattr(self, m.encoder), getattr(self, m.connector)

    def encode_images(self, pixel_values: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """``[N, 3, H, W]`` -> CLIP patch features of ``vision_feature_layer``, CLS dropped: ``[N, P, Dv]``."""
        tower, _ = self._parts(modality)
        layers = tower.encoder.layers
        depth = self.config.vision_feature_layer % (len(layers) + 1)  # hidden state k: after k layers
        with self._encoder_context(tower):
            # the tower's own forward up to that layer: the layers after it cannot change the features
            hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(self.dtype)))
            for layer in layers[:depth]:
                hidden = layer(hidden, None)
            return hidden[:, 1:]

    def encode_media(
        self, modality: str, features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A modality's encoder output, before its connector: one row per image, clip or chunk, each
        row computed from its own input alone, and the output padding mask where the encoder has one.

        - image ``[N, 3, H, W]`` -> ``[N, P, Dv]``;
        - video ``[N, F, 3, H, W]`` -> ``[N, P, Dv]`` (frames mean-pooled) or ``[N, F * P, Dv]`` (concat);
        - speech, Whisper log-mel chunks ``[C, 80, 3000]`` -> ``[C, 1500, d]``;
        - audio, BEATs fbank chunks ``[C, T, 128]`` (+ padding mask ``[C, T]``) -> ``[C, T', d]`` (+ mask).
        """
        kind = MODALITIES[modality].kind
        if kind == "image":
            return self.encode_images(features, modality), None
        if kind == "video":
            n, f = features.shape[:2]
            feats = self.encode_images(features.flatten(0, 1), modality)  # [N*F, P, Dv]
            feats = feats.view(n, f, *feats.shape[1:])  # [N, F, P, Dv]
            return (feats.mean(dim=1) if self.config.video_pooling == "mean" else feats.flatten(1, 2)), None
        encoder, _ = self._parts(modality)
        with self._encoder_context(encoder):
            if kind == "speech":
                return encoder(features.to(self.dtype)).last_hidden_state, None
            return encoder(features.to(self.dtype), mask)

    def connect_media(
        self, modality: str, encoded: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``encode_media``'s output through the modality's connector: ``[tokens, D]`` LLM inputs."""
        _, connector = self._parts(modality)
        out = connector(encoded) if MODALITIES[modality].mask_key is None else connector(encoded, mask)
        return out.flatten(0, 1)

    def image_embeddings(self, pixel_values: torch.Tensor, modality: str = "image") -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N * P, D]`` LLM inputs."""
        return self.connect_media(modality, *self.encode_media(modality, pixel_values))

    def video_embeddings(self, pixel_values_videos: torch.Tensor, modality: str = "video") -> torch.Tensor:
        """``[N, F, 3, H, W]`` -> ``[N * P, D]`` (frames mean-pooled) or ``[N * F * P, D]`` (concat)."""
        return self.connect_media(modality, *self.encode_media(modality, pixel_values_videos))

    def speech_embeddings(self, speech_features: torch.Tensor, modality: str = "speech") -> torch.Tensor:
        """Whisper log-mel chunks ``[C, 80, 3000]`` -> ``[C * Q, D]``."""
        return self.connect_media(modality, *self.encode_media(modality, speech_features))

    def audio_embeddings(
        self,
        audio_features: torch.Tensor,
        audio_padding_mask: torch.Tensor | None = None,
        modality: str = "audio",
    ) -> torch.Tensor:
        """BEATs fbank chunks ``[C, T, 128]`` (+ padding mask ``[C, T]``) -> ``[C * Q, D]``."""
        return self.connect_media(modality, *self.encode_media(modality, audio_features, audio_padding_mask))

    def _cacheable(self, modality: str) -> bool:
        """Whether ``feature_cache`` may keep the encoder's outputs: frozen, in eval mode (no dropout)."""
        encoder, _ = self._parts(modality)
        return not encoder.training and is_frozen(encoder)

    def media_embeddings(self, **inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Connector outputs ``[tokens, D]`` per modality for the media inputs given (keyed by input name,
        e.g. ``pixel_values``); nothing else is encoded. With a ``feature_cache`` that holds the current
        batch's items, frozen encoders run only on the items it has not seen."""
        out = {}
        cache = self.feature_cache
        for m in media():
            features = inputs.get(m.input_key)
            if features is None or not features.numel():
                continue
            mask = inputs.get(m.mask_key) if m.mask_key else None
            if cache is not None and cache.has_items(m.name) and self._cacheable(m.name):
                encoded = cache.encode(m.name, features, mask, partial(self.encode_media, m.name))
            else:
                encoded = self.encode_media(m.name, features, mask)
            out[m.name] = self.connect_media(m.name, *encoded)
        return out

    def embed_inputs(self, input_ids: torch.LongTensor, **media: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with every placeholder run replaced by its media's connector output."""
        placeholders = self.config.placeholder_ids()
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in placeholders.values():
            is_placeholder |= input_ids == token_id
        embeds = self.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))  # [B, S, D]
        if not is_placeholder.any() and not any(v is not None and v.numel() for v in media.values()):
            return embeds
        features = self.media_embeddings(**media)
        positions, rows = [], []
        for modality, token_id in placeholders.items():
            where = (input_ids == token_id).flatten().nonzero().squeeze(1)  # row-major, as the media come
            feats = features.get(modality)
            count = 0 if feats is None else feats.shape[0]
            if len(where) != count:
                raise UniMoeInputError(
                    f"{modality}: {len(where)} placeholder tokens in the prompt but {count} feature vectors from the media"
                )
            if count:
                positions.append(where)
                rows.append(feats.to(embeds.dtype))
        if positions:  # one scatter for all modalities (its backward: one gather)
            embeds = embeds.flatten(0, 1).index_copy(0, torch.cat(positions), torch.cat(rows)).view_as(embeds)
        return embeds

    def token_modalities(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Modality index per token (``token_groups()`` order: text 0, image 1, ...); -1 on padding."""
        groups = torch.zeros_like(input_ids)
        names = token_groups()
        for modality, token_id in self.config.placeholder_ids().items():
            groups[input_ids == token_id] = names.index(modality)
        if attention_mask is not None:
            groups[attention_mask == 0] = -1
        return groups

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        speech_features: torch.FloatTensor | None = None,
        audio_features: torch.FloatTensor | None = None,
        audio_padding_mask: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> UniMoeModelOutput:
        media_inputs = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "speech_features": speech_features,
            "audio_features": audio_features,
            "audio_padding_mask": audio_padding_mask,
        }
        media_inputs.update({k: kwargs.pop(k) for k in media_input_keys() if k in kwargs})
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_inputs(input_ids, **media_inputs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pop_cache(cache, kwargs),
            use_cache=use_cache,
            **kwargs,
        )


class UniMoeForConditionalGeneration(UniMoePreTrainedModel, GenerationMixin):
    """Text, images, video, speech and audio in; text out: ``UniMoeModel`` (``.model``) and ``.lm_head``."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: UniMoeConfig):
        super().__init__(config)
        self.model = UniMoeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def token_modalities(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None):
        """Modality index per token (see ``UniMoeModel.token_modalities``)."""
        return self.model.token_modalities(input_ids, attention_mask)

    def text_model(self) -> UniMoeForCausalLM:
        """The language model alone as a ``UniMoeForCausalLM`` sharing this model's decoder and LM head
        (changes to one are changes to the other): for loading a LLaMA into it, upcycling, FFN export."""
        return UniMoeForCausalLM.from_parts(self.model.language_model, self.lm_head)

    def set_text_model(self, text_model: UniMoeForCausalLM) -> None:
        """Replaces the decoder and LM head (e.g. by an upcycled MoE language model)."""
        self.model.language_model = text_model.model
        self.lm_head = text_model.lm_head
        self.config.text_config = text_model.config

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        speech_features: torch.FloatTensor | None = None,
        audio_features: torch.FloatTensor | None = None,
        audio_padding_mask: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_at_labels: bool = False,
        **kwargs,
    ) -> UniMoeCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pop_cache(cache, kwargs),
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            speech_features=speech_features,
            audio_features=audio_features,
            audio_padding_mask=audio_padding_mask,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        return causal_lm_output(
            self,
            outputs,
            labels=labels,
            attention_mask=attention_mask,
            output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep,
            logits_at_labels=logits_at_labels,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for name in media_input_keys():  # decode steps never re-enter the media path
                inputs.pop(name, None)
        return inputs
