"""Named model shapes: the released Uni-MoE variants and a tiny one for tests, docs and the demo.

``get_config(name)`` returns a ``UniMoeConfig``; ``build_tiny(seed)`` a random-initialised tiny model and
its processor, built in seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .modeling.configuration_unimoe import UniMoeConfig
from .seeding import seed_everything

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
WHISPER_SMALL = dict(
    d_model=768,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=12,
    decoder_attention_heads=12,
    encoder_ffn_dim=3072,
    decoder_ffn_dim=3072,
    num_mel_bins=80,
    vocab_size=51865,
)
QFORMER_AUDIO = dict(
    hidden_size=768, num_hidden_layers=12, cross_attention_frequency=2, encoder_hidden_size=768
)
PLACEHOLDERS = dict(image_token_id=32000, video_token_id=32001, speech_token_id=32002, audio_token_id=32003)


def uni_moe_v1_speech() -> UniMoeConfig:
    """The released 4-expert model with CLIP and a Whisper-small speech branch (top-2, every layer MoE)."""
    return UniMoeConfig(
        text_config=dict(**LLAMA2_7B, num_experts=4, num_experts_per_tok=2, router="topk_softmax"),
        vision_config=CLIP_L14_336,
        speech_config=WHISPER_SMALL,
        **PLACEHOLDERS,
    )


def uni_moe_v1_audio() -> UniMoeConfig:
    """The released 4-expert model with CLIP and a BEATs + Q-Former audio branch."""
    return UniMoeConfig(
        text_config=dict(**LLAMA2_7B, num_experts=4, num_experts_per_tok=2, router="topk_softmax"),
        vision_config=CLIP_L14_336,
        audio_config={},
        audio_qformer_config=QFORMER_AUDIO,
        **PLACEHOLDERS,
    )


def uni_moe_8e() -> UniMoeConfig:
    """The 8-expert model: softmax-then-top-2 routing with Gumbel noise on the second choice in training,
    LoRA inside each expert, load-balancing loss 0.01; CLIP, Whisper-small and BEATs."""
    return UniMoeConfig(
        text_config=dict(
            **LLAMA2_7B,
            num_experts=8,
            num_experts_per_tok=2,
            router="softmax_topk",
            router_noise="gumbel",
            router_aux_loss_coef=0.01,
            expert_lora_rank=8,
            expert_lora_alpha=16.0,
            expert_lora_dropout=0.05,
        ),
        vision_config=CLIP_L14_336,
        speech_config=WHISPER_SMALL,
        audio_config={},
        audio_qformer_config=QFORMER_AUDIO,
        **PLACEHOLDERS,
    )


TINY_VOCAB = 512  # the shipped tiny tokenizer; placeholders take ids 512..515


def tiny(**text_overrides) -> UniMoeConfig:
    """A few-hundred-thousand-parameter model with every branch, for tests and the demo."""
    text = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    return UniMoeConfig(
        text_config={**text, **text_overrides},
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,  # features come from the second-to-last layer: two layers of mixing
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        speech_config=dict(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=80,
            vocab_size=64,
            max_target_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            max_source_positions=100,  # 2 s chunks: 200 mel frames
        ),
        audio_config=dict(
            embed_dim=32,
            encoder_layers=1,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=64,
            encoder_attention_heads=2,
            conv_pos=16,
            conv_pos_groups=4,
            num_buckets=32,
            max_distance=64,
        ),
        audio_qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            encoder_hidden_size=32,
        ),
        image_token_id=TINY_VOCAB,
        video_token_id=TINY_VOCAB + 1,
        speech_token_id=TINY_VOCAB + 2,
        audio_token_id=TINY_VOCAB + 3,
        speech_num_queries=8,
        audio_num_queries=8,
        chunk_seconds=2.0,
    )


PRESETS: dict[str, Callable[[], UniMoeConfig]] = {
    "uni-moe-v1-speech": uni_moe_v1_speech,
    "uni-moe-v1-audio": uni_moe_v1_audio,
    "uni-moe-8e": uni_moe_8e,
    "tiny": tiny,
}


def get_config(name: str) -> UniMoeConfig:
    """The configuration of a named preset."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def build_model(config: UniMoeConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-initialised ``UniMoeForConditionalGeneration`` of ``config``: the one builder behind
    ``build_tiny``, ``--model tiny`` and recipes with ``model.preset``.

    The speech encoder gets variance-preserving weights. With the usual std 0.02, a random Whisper
    encoder's output is almost all sinusoidal position embedding: two different spoken words differ by
    well under 1% of its magnitude, so a frozen random encoder passes next to nothing on. Unit-gain
    weights keep the audio in the features. (Pretrained encoders replace these weights anyway.)
    """
    from .modeling.modeling_unimoe import UniMoeForConditionalGeneration

    seed_everything(seed)
    model = UniMoeForConditionalGeneration._from_config(config, dtype=dtype)
    if hasattr(model.model, "speech_encoder"):
        _variance_preserving_init(model.model.speech_encoder)
    return model


def build_tiny(seed: int = 0, **text_overrides):
    """A random-initialised tiny ``UniMoeForConditionalGeneration`` and its ``UniMoeProcessor``."""
    from .processing.processor import UniMoeProcessor

    config = tiny(**text_overrides)
    return build_model(config, seed).eval(), UniMoeProcessor.for_config(config)


@torch.no_grad()
def _variance_preserving_init(module: torch.nn.Module) -> None:
    """He-normal weights for the linear and conv layers of ``module``."""
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
            fan_in = layer.weight[0].numel()
            torch.nn.init.normal_(layer.weight, std=(2.0 / fan_in) ** 0.5)
