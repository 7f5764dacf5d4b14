"""BEATs audio encoder (Chen et al. 2022, arXiv 2212.09058), the frozen encoder of Uni-MoE's audio branch.

A 16x16 patch embedding of the 128-bin fbank "image", a convolutional positional embedding and a
post-LN (DeepNorm) transformer whose self-attention adds a gated, bucketed relative position bias.
Module names follow the official checkpoints' state-dict keys, so those load as they are.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from unimoe.errors import UniMoeInputError

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


class BEATsConfig(PreTrainedConfig):
    """BEATs sizes and switches, under the names of the official `cfg` dict.

    The architecture defaults are those of BEATs iter3+ (the checkpoint Uni-MoE uses); dropouts
    default to 0 as the encoder is frozen. `encoder_layerdrop` and `layer_wise_gradient_decay_ratio`
    are kept for round trips of official configs; they only matter for pre-training and are not
    applied here.
    """

    model_type = "unimoe_beats"

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    dropout_input: float = 0.0
    encoder_layerdrop: float = 0.0
    layer_wise_gradient_decay_ratio: float = 1.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    initializer_range: float = 0.02


# The fields written to / read from the `cfg` dict of an official checkpoint.
_OFFICIAL_CFG_FIELDS = (
    "input_patch_size", "embed_dim", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn", "layer_norm_first", "deep_norm",
    "dropout", "attention_dropout", "activation_dropout", "dropout_input", "encoder_layerdrop",
    "layer_wise_gradient_decay_ratio", "conv_pos", "conv_pos_groups", "relative_position_embedding",
    "num_buckets", "max_distance", "gru_rel_pos",
)  # fmt: skip


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5-style buckets of key-minus-query offsets: [length, length] int64.

    Half the buckets per direction; within a half, small distances get their own bucket and the
    rest are log-spaced up to `max_distance`.
    """
    offset = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # [query, key]
    half = num_buckets // 2
    max_exact = half // 2
    distance = offset.abs()
    log_bucket = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (half - max_exact)
    ).to(torch.long)
    log_bucket = log_bucket.clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < max_exact, distance, log_bucket)


class BEATsPositionalConv(nn.Conv1d):
    """Grouped 1-D convolution over time, weight-normalised over the kernel axis: torch's weight-norm
    parametrization (``parametrizations.weight.original0`` / ``original1``, the official checkpoints'
    ``weight_g`` / ``weight_v``)."""

    def __init__(self, dim: int, kernel_size: int, groups: int) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=groups)
        weight_norm(self, name="weight", dim=2)  # g: [1, 1, kernel]

    @property
    def weight_g(self) -> nn.Parameter:
        return self.parametrizations.weight.original0

    @property
    def weight_v(self) -> nn.Parameter:
        return self.parametrizations.weight.original1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, dim, time]
        out = super().forward(x)
        return out[..., :-1] if self.kernel_size[0] % 2 == 0 else out  # keep the input length


class BEATsSelfAttention(nn.Module):
    """Multi-head self-attention with a gated relative position bias (GRU-style gates per query)."""

    def __init__(self, config: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        if self.head_dim * self.num_heads != dim:
            raise ValueError(f"encoder_embed_dim {dim} is not a multiple of {self.num_heads} heads")
        self.dropout = config.attention_dropout
        self.num_buckets, self.max_distance = config.num_buckets, config.max_distance
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, self.num_heads)
        self.gru_rel_pos = config.gru_rel_pos
        if self.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1))

    def compute_bias(self, length: int) -> torch.Tensor:
        """The relative position bias of a length-`length` sequence: [heads, length, length]."""
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets.to(self.relative_attention_bias.weight.device)).permute(
            2, 0, 1
        )

    def forward(
        self, x: torch.Tensor, position_bias: torch.Tensor | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        bias = None
        if position_bias is not None:
            bias = position_bias.unsqueeze(0).to(q.dtype)  # [1, H, T, T]
            if self.gru_rel_pos:
                gates = self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1).sigmoid()
                gate_a, gate_b = gates.chunk(2, dim=-1)  # [B, H, T, 1] each
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias  # [B, H, T, T]
        if padding_mask is not None:
            key_mask = padding_mask[:, None, None, :]  # [B, 1, 1, T], True = padding
            if bias is None:
                bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(key_mask, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)  # [B, H, T, hd]
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class BEATsEncoderLayer(nn.Module):
    """Self-attention and GELU feed-forward blocks, post-LN with DeepNorm residual scaling by default."""

    def __init__(self, config: BEATsConfig, has_relative_attention_bias: bool) -> None:
        super().__init__()
        if config.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"unsupported BEATs activation_fn {config.activation_fn!r}")
        dim = config.encoder_embed_dim
        self.self_attn = BEATsSelfAttention(config, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[config.activation_fn]
        self.layer_norm_first = config.layer_norm_first
        self.residual_scale = (2.0 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(x), self.dropout, self.training)

    def forward(
        self, x: torch.Tensor, position_bias: torch.Tensor | None, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.layer_norm_first:
            attn = self.self_attn(self.self_attn_layer_norm(x), position_bias, padding_mask)
            x = x + F.dropout(attn, self.dropout, self.training)
            return x + self._feed_forward(self.final_layer_norm(x))
        attn = self.self_attn(x, position_bias, padding_mask)
        x = self.self_attn_layer_norm(x * self.residual_scale + F.dropout(attn, self.dropout, self.training))
        return self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))


class BEATsEncoder(nn.Module):
    """Convolutional positional embedding followed by the transformer layers."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.pos_conv = nn.Sequential(
            BEATsPositionalConv(dim, config.conv_pos, config.conv_pos_groups), nn.GELU()
        )
        # Only the first layer owns the relative position bias table; every layer reuses its output.
        self.layers = nn.ModuleList(
            BEATsEncoderLayer(
                config, has_relative_attention_bias=config.relative_position_embedding and i == 0
            )
            for i in range(config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = config.layer_norm_first
        self.relative_position_embedding = config.relative_position_embedding
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        # x: [batch, time, dim]; padding_mask: [batch, time], True = padding
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)
        position_bias = (
            self.layers[0].self_attn.compute_bias(x.shape[1]) if self.relative_position_embedding else None
        )
        for layer in self.layers:
            x = layer(x, position_bias, padding_mask)
        return self.layer_norm(x) if self.layer_norm_first else x


class BEATsPreTrainedModel(PreTrainedModel):
    config_class = BEATsConfig
    base_model_prefix = "beats"
    main_input_name = "fbank"
    _no_split_modules = ["BEATsEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, BEATsPositionalConv):  # its weight is computed from g and v
            std = math.sqrt(4.0 / (module.kernel_size[0] * module.weight_v.shape[0]))
            init.normal_(module.weight_v, mean=0.0, std=std)
            init.copy_(module.weight_g, torch.linalg.vector_norm(module.weight_v, dim=(0, 1), keepdim=True))
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, BEATsSelfAttention) and module.gru_rel_pos:
            init.ones_(module.grep_a)


def reduce_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Shrink a [batch, time] padding mask to [batch, length] as the official BEATs does.

    Trailing steps that do not fill a group are dropped; each output step covers `time // length`
    consecutive input steps and is padding when all of them are. With time-major patches and the
    suffix padding of audio chunks, this marks the patches of padded time blocks.
    """
    extra = padding_mask.shape[1] % length
    if extra:
        padding_mask = padding_mask[:, :-extra]
    return padding_mask.view(padding_mask.shape[0], length, -1).all(-1)  # [batch, length]


class BEATsModel(BEATsPreTrainedModel):
    """The BEATs encoder without its classification head: normalised fbank in, patch features out."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__(config)
        patch = config.input_patch_size
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.encoder = BEATsEncoder(config)
        self.post_init()

    def forward(
        self, fbank: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of normalised fbank features.

        fbank: [B, T, mel_bins]; padding_mask: [B, T], True on padded frames, or None.
        Returns features [B, T', D] with T' = (T // patch) * (mel_bins // patch) time-major patches
        and their padding mask [B, T'] (all False when no mask is given).
        """
        x = fbank.unsqueeze(1).to(self.patch_embedding.weight.dtype)  # [B, 1, T, mel_bins]
        x = self.patch_embedding(x)  # [B, C, T // patch, mel_bins // patch]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # [B, T', C]
        mask = None if padding_mask is None else reduce_padding_mask(padding_mask.bool(), x.shape[1])
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = F.dropout(x, self.config.dropout_input, self.training)
        x = self.encoder(x, mask)
        if mask is None:
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask

    @classmethod
    def from_official_checkpoint(cls, source: str | os.PathLike | Mapping) -> BEATsModel:
        """Build a model from an official BEATs checkpoint (a path or the loaded `{"cfg", "model"}` dict).

        The classification head (`predictor.*`) of fine-tuned checkpoints is dropped. The model is
        returned in eval mode.
        """
        name = "<checkpoint dict>" if isinstance(source, Mapping) else str(source)
        if not isinstance(source, Mapping):
            if not os.path.isfile(source):
                raise UniMoeInputError(f"BEATs checkpoint not found: {name}")
            try:
                source = torch.load(source, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
                raise UniMoeInputError(f"cannot read BEATs checkpoint {name}: {exc}") from exc
        if not isinstance(source, Mapping) or "cfg" not in source or "model" not in source:
            raise UniMoeInputError(f"BEATs checkpoint {name} is not a {{'cfg': ..., 'model': ...}} dict")
        known = {field.name for field in dataclasses.fields(BEATsConfig)}
        config = BEATsConfig(**{k: v for k, v in dict(source["cfg"]).items() if k in known})
        model = cls(config)
        result = model.load_state_dict(_from_official_keys(source["model"], config), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UniMoeInputError(
                f"BEATs checkpoint {name} does not match its cfg: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        return model.eval()


# the official checkpoints' weight-norm spelling (torch.nn.utils.weight_norm) -> torch's parametrization
_WEIGHT_NORM_KEYS = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def _from_official_keys(state: Mapping[str, torch.Tensor], config: BEATsConfig) -> dict[str, torch.Tensor]:
    """Official BEATs state dict -> this module's: drop the head and the per-layer copies of the shared
    relative position table, and accept both weight-norm spellings (or a plain weight) of `pos_conv`."""
    prefix = "encoder.pos_conv.0."
    renames = {prefix + old: prefix + new for old, new in _WEIGHT_NORM_KEYS.items()}
    shared_copies = {
        f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"
        for i in range(1, config.encoder_layers)
    }
    out = {
        renames.get(key, key): value
        for key, value in state.items()
        if not key.startswith("predictor.") and key not in shared_copies
    }
    g, v = (prefix + _WEIGHT_NORM_KEYS[k] for k in ("weight_g", "weight_v"))
    if prefix + "weight" in out and v not in out:
        out[v] = out.pop(prefix + "weight")
        out[g] = torch.linalg.vector_norm(out[v], dim=(0, 1), keepdim=True)
    return out


def to_official_state_dict(model: BEATsModel) -> dict[str, torch.Tensor]:
    """``model``'s weights under the official key names (``weight_g``/``weight_v``, and the shared relative
    position table repeated in every layer)."""
    official = {
        f"encoder.pos_conv.0.{new}": f"encoder.pos_conv.0.{old}" for old, new in _WEIGHT_NORM_KEYS.items()
    }
    state = {official.get(k, k): v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if model.config.relative_position_embedding:
        table = state["encoder.layers.0.self_attn.relative_attention_bias.weight"]
        for i in range(1, model.config.encoder_layers):
            state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table.clone()
    return state


def save_official_checkpoint(model: BEATsModel, path: str | os.PathLike) -> None:
    """Write `model` in the official BEATs format: `torch.save({"cfg": {...}, "model": state_dict})`."""
    cfg = {name: getattr(model.config, name) for name in _OFFICIAL_CFG_FIELDS}
    cfg["finetuned_model"] = False
    torch.save({"cfg": cfg, "model": to_official_state_dict(model)}, path)
