"""Trainable connectors from frozen encoders into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder


class MlpProjector(nn.Sequential):
    """``mlp2x_gelu``: Linear(in, out), GELU, Linear(out, out) (keys ``0.*`` and ``2.*`` as in the release)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    @property
    def input_width(self) -> int:
        """Width of the encoder features it reads."""
        return self[0].in_features


class WhisperQueryConnector(nn.Module):
    """A Whisper decoder run on learnable query embeddings, cross-attending to the Whisper encoder output,
    then a linear map to the LLM width: ``num_queries`` LLM tokens per 30 s chunk."""

    def __init__(self, config: WhisperConfig, num_queries: int, out_dim: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.d_model))
        self.decoder = WhisperDecoder(config)
        self.decoder.embed_tokens.requires_grad_(False)  # queries replace token embeddings: never used
        self.projector = nn.Linear(config.d_model, out_dim)

    @property
    def input_width(self) -> int:
        """Width of the encoder features it reads."""
        return self.decoder.config.d_model

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """``encoder_states``: ``[N, frames, d_model]`` -> ``[N, num_queries, out_dim]``."""
        queries = self.query_tokens.expand(encoder_states.shape[0], -1, -1).to(encoder_states.dtype)
        hidden = self.decoder(
            inputs_embeds=queries, encoder_hidden_states=encoder_states, use_cache=False
        ).last_hidden_state
        return self.projector(hidden)


class QFormerConnector(nn.Module):
    """A BLIP-2 Q-Former with learnable queries over the audio encoder output, then a linear map."""

    def __init__(self, config: Blip2QFormerConfig, num_queries: int, out_dim: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.hidden_size))
        self.qformer = Blip2QFormerModel(config)
        self.projector = nn.Linear(config.hidden_size, out_dim)

    @property
    def input_width(self) -> int:
        """Width of the encoder features it reads."""
        return self.qformer.config.encoder_hidden_size

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``features``: ``[N, T, enc_dim]``, ``padding_mask``: ``[N, T]`` (True = padding)
        -> ``[N, num_queries, out_dim]``."""
        queries = self.query_tokens.expand(features.shape[0], -1, -1).to(features.dtype)
        encoder_mask = None if padding_mask is None else (~padding_mask.bool()).long()
        hidden = self.qformer(
            query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=encoder_mask
        ).last_hidden_state
        return self.projector(hidden[:, : queries.shape[1]])
