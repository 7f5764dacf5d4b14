import math
from pathlib import Path

import numpy as np
import pytest
import torch

from unimoe.errors import UniMoeInputError
from unimoe.modeling.beats import (
    BEATsConfig,
    BEATsModel,
    reduce_padding_mask,
    relative_position_buckets,
    save_official_checkpoint,
    to_official_state_dict,
)

TINY = dict(
    encoder_layers=2,
    encoder_embed_dim=64,
    encoder_attention_heads=4,
    encoder_ffn_embed_dim=128,
    embed_dim=32,
    conv_pos=16,
    conv_pos_groups=4,
    num_buckets=32,
    max_distance=64,
)

# An official-format `cfg` (all keys of the public BEATs config, a fine-tuned model with a head).
GOLDEN_CFG = dict(
    input_patch_size=16, embed_dim=16, conv_bias=False, encoder_layers=2, encoder_embed_dim=32,
    encoder_ffn_embed_dim=64, encoder_attention_heads=4, activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0,
    layer_norm_first=False, deep_norm=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, conv_pos=16, conv_pos_groups=4, relative_position_embedding=True,
    num_buckets=32, max_distance=64, gru_rel_pos=True, finetuned_model=True, predictor_dropout=0.0,
    predictor_class=5,
)  # fmt: skip
GOLDEN_FILE = Path(__file__).parents[1] / "fixtures" / "beats_official_golden.npz"


def tiny_model(**overrides) -> BEATsModel:
    torch.manual_seed(0)
    return BEATsModel(BEATsConfig(**{**TINY, **overrides})).eval()


def deterministic(shape: tuple[int, ...], seed: int, scale: float, offset: float = 0.0) -> torch.Tensor:
    """Platform-independent pseudo-random values (no RNG): offset + scale * sin(...)."""
    n = math.prod(shape)
    values = offset + scale * torch.sin(torch.arange(n, dtype=torch.float64) * 0.6180339887 + 1.37 * seed)
    return values.to(torch.float32).reshape(shape)


def official_state_dict(cfg: dict) -> dict[str, torch.Tensor]:
    """A state dict under the key names and shapes of the public BEATs code, written out by hand."""
    embed, dim, ffn = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    heads, patch, kernel = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]
    shapes: dict[str, tuple[tuple[int, ...], float, float]] = {  # key -> (shape, scale, offset)
        "patch_embedding.weight": ((embed, 1, patch, patch), 1 / patch, 0.0),
        "layer_norm.weight": ((embed,), 0.1, 1.0),
        "layer_norm.bias": ((embed,), 0.05, 0.0),
        "post_extract_proj.weight": ((dim, embed), embed**-0.5, 0.0),
        "post_extract_proj.bias": ((dim,), 0.02, 0.0),
        "encoder.pos_conv.0.bias": ((dim,), 0.02, 0.0),
        "encoder.pos_conv.0.weight_g": ((1, 1, kernel), 0.3, 1.0),
        "encoder.pos_conv.0.weight_v": ((dim, dim // cfg["conv_pos_groups"], kernel), 0.1, 0.0),
        "encoder.layer_norm.weight": ((dim,), 0.1, 1.0),
        "encoder.layer_norm.bias": ((dim,), 0.05, 0.0),
        "predictor.weight": ((cfg["predictor_class"], dim), 0.1, 0.0),
        "predictor.bias": ((cfg["predictor_class"],), 0.1, 0.0),
    }
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = ((dim, dim), dim**-0.5, 0.0)
            shapes[p + f"self_attn.{proj}.bias"] = ((dim,), 0.02, 0.0)
        # The public code shares layer 0's table with every layer, so each layer's key holds a copy.
        shapes[p + "self_attn.relative_attention_bias.weight"] = ((cfg["num_buckets"], heads), 0.5, 0.0)
        shapes[p + "self_attn.grep_linear.weight"] = ((8, dim // heads), (dim // heads) ** -0.5, 0.0)
        shapes[p + "self_attn.grep_linear.bias"] = ((8,), 0.1, 0.0)
        shapes[p + "self_attn.grep_a"] = ((1, heads, 1, 1), 0.2, 1.0)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + f"{norm}.weight"] = ((dim,), 0.1, 1.0)
            shapes[p + f"{norm}.bias"] = ((dim,), 0.05, 0.0)
        shapes[p + "fc1.weight"] = ((ffn, dim), dim**-0.5, 0.0)
        shapes[p + "fc1.bias"] = ((ffn,), 0.02, 0.0)
        shapes[p + "fc2.weight"] = ((dim, ffn), ffn**-0.5, 0.0)
        shapes[p + "fc2.bias"] = ((dim,), 0.02, 0.0)
    state = {
        key: deterministic(shape, seed, scale, offset)
        for seed, (key, (shape, scale, offset)) in enumerate(shapes.items())
    }
    for i in range(1, cfg["encoder_layers"]):
        state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = state[
            "encoder.layers.0.self_attn.relative_attention_bias.weight"
        ].clone()
    return state


def golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """fbank [2, 64, 128] and a frame padding mask [2, 64] (the second item padded from frame 40)."""
    t = torch.arange(64, dtype=torch.float64)[:, None]
    f = torch.arange(128, dtype=torch.float64)[None, :]
    first = torch.sin(0.3 * t + 0.11 * f) + 0.5 * torch.cos(0.07 * t * f / 8)
    second = torch.cos(0.21 * t - 0.05 * f) * torch.sin(0.013 * f + 1.0)
    fbank = torch.stack([first, second]).to(torch.float32)
    padding_mask = torch.zeros(2, 64, dtype=torch.bool)
    padding_mask[1, 40:] = True
    return fbank, padding_mask


@torch.no_grad()
def test_forward_shapes():
    model = tiny_model()
    features, mask = model(torch.randn(2, 100, 128))
    assert features.shape == (2, (100 // 16) * (128 // 16), 64)
    assert mask.shape == (2, 48) and mask.dtype == torch.bool and not mask.any()
    features, mask = model(torch.randn(1, 2998, 128), torch.zeros(1, 2998, dtype=torch.bool))
    assert features.shape == (1, 187 * 8, 64) and mask.shape == (1, 1496)


def test_official_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "BEATs_tiny.pt"
    save_official_checkpoint(model, path)

    saved = torch.load(path, weights_only=True)
    assert saved["cfg"]["encoder_embed_dim"] == 64 and saved["cfg"]["deep_norm"] is True
    assert "encoder.pos_conv.0.weight_g" in saved["model"] and "encoder.pos_conv.0.weight_v" in saved["model"]
    assert "encoder.layers.1.self_attn.relative_attention_bias.weight" in saved["model"]

    loaded = BEATsModel.from_official_checkpoint(path)
    assert not loaded.training
    fbank, mask = torch.randn(2, 64, 128), torch.zeros(2, 64, dtype=torch.bool)
    mask[1, 32:] = True
    with torch.no_grad():
        expected, loaded_out = model(fbank, mask), loaded(fbank, mask)
    assert torch.equal(expected[0], loaded_out[0]) and torch.equal(expected[1], loaded_out[1])


def test_hand_built_official_state_dict_loads_every_key():
    state = official_state_dict(GOLDEN_CFG)
    model = BEATsModel.from_official_checkpoint({"cfg": GOLDEN_CFG, "model": state})
    loaded = to_official_state_dict(model)  # the shared position table comes back in every layer
    ignored = {k for k in state if k.startswith("predictor.")}
    assert set(loaded) == set(state) - ignored
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_parametrized_weight_norm_keys_load_the_same(tmp_path):
    state = official_state_dict(GOLDEN_CFG)
    # torch.nn.utils.parametrizations.weight_norm spells weight_g / weight_v like this.
    renamed = dict(state)
    renamed["encoder.pos_conv.0.parametrizations.weight.original0"] = renamed.pop(
        "encoder.pos_conv.0.weight_g"
    )
    renamed["encoder.pos_conv.0.parametrizations.weight.original1"] = renamed.pop(
        "encoder.pos_conv.0.weight_v"
    )
    fbank, mask = golden_inputs()
    with torch.no_grad():
        expected = BEATsModel.from_official_checkpoint({"cfg": GOLDEN_CFG, "model": state})(fbank, mask)[0]
        got = BEATsModel.from_official_checkpoint({"cfg": GOLDEN_CFG, "model": renamed})(fbank, mask)[0]
    assert torch.equal(expected, got)


def test_matches_golden_values_of_the_public_implementation():
    # Produced by tests/fixtures/make_beats_golden.py, which runs the public BEATs code on the same
    # hand-built checkpoint and inputs. Both sides compute in float32 with different op orders (the
    # public code rescales attention logits by 32 around a max subtraction); measured gap ~3e-6.
    golden = np.load(GOLDEN_FILE)
    fbank, mask = golden_inputs()
    model = BEATsModel.from_official_checkpoint({"cfg": GOLDEN_CFG, "model": official_state_dict(GOLDEN_CFG)})
    with torch.no_grad():
        features, out_mask = model(fbank, mask)
    np.testing.assert_array_equal(out_mask.numpy(), golden["padding_mask"])
    np.testing.assert_allclose(features.numpy(), golden["features"], atol=5e-5, rtol=0)


def test_bad_checkpoints_raise_input_error(tmp_path):
    with pytest.raises(UniMoeInputError, match="missing.pt"):
        BEATsModel.from_official_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UniMoeInputError, match="garbage.pt"):
        BEATsModel.from_official_checkpoint(garbage)
    state = official_state_dict(GOLDEN_CFG)
    del state["encoder.layers.1.fc1.weight"]
    with pytest.raises(UniMoeInputError, match=r"missing \['encoder.layers.1.fc1.weight'\]"):
        BEATsModel.from_official_checkpoint({"cfg": GOLDEN_CFG, "model": state})
    with pytest.raises(UniMoeInputError, match="cfg"):
        BEATsModel.from_official_checkpoint({"model": state})


def test_padding_mask_follows_the_official_reduction():
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[1, 40:] = True
    reduced = reduce_padding_mask(mask, 32)  # each patch index covers two consecutive frames
    assert reduced.shape == (2, 32) and not reduced[0].any()
    assert reduced[1].nonzero().flatten().tolist() == list(range(20, 32))
    odd = torch.zeros(1, 67, dtype=torch.bool)  # 3 trailing frames that fill no group are dropped
    odd[0, 64:] = True
    assert not reduce_padding_mask(odd, 32).any()


def test_padded_patches_do_not_change_the_real_ones():
    model = tiny_model()
    fbank = torch.randn(1, 64, 128)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 32:] = True  # the last two 16-frame time blocks: patches 16..31
    with torch.no_grad():
        features, out_mask = model(fbank, mask)
        other_padding = fbank.clone()
        other_padding[0, 32:] = torch.randn(32, 128) * 5
        features_other, _ = model(other_padding, mask)
        truncated, _ = model(fbank[:, :32])
    assert out_mask[0].nonzero().flatten().tolist() == list(range(16, 32))
    torch.testing.assert_close(features[:, :16], features_other[:, :16], rtol=0, atol=1e-5)
    # Zeroed padded positions look like the positional convolution's zero padding, and masked keys
    # drop out of attention: the real patches come out as if the padding were not there.
    torch.testing.assert_close(features[:, :16], truncated, rtol=0, atol=1e-5)
    unmasked, _ = model(other_padding)
    assert not torch.allclose(unmasked[:, :16], features[:, :16], atol=1e-3)


def test_relative_position_buckets():
    buckets = relative_position_buckets(1001, num_buckets=320, max_distance=800)
    # buckets[q, k] for offset k - q: 80 exact distances per direction, log-spaced beyond, capped.
    assert buckets[0, 0] == 0 and buckets[5, 0] == 5 and buckets[0, 5] == 165
    assert buckets[80, 0] == 80 and buckets[0, 80] == 240
    assert buckets[800, 0] == 159 and buckets[0, 1000] == 319
    assert buckets.min() == 0 and buckets.max() == 319
    assert torch.equal(buckets[10:20, 10:20], buckets[:10, :10])  # depends on the offset only


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(layer_norm_first=True, deep_norm=False, gru_rel_pos=False)
    model.save_pretrained(tmp_path)
    reloaded = BEATsModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_norm_first and reloaded.config.model_type == "unimoe_beats"
    fbank = torch.randn(1, 48, 128)
    with torch.no_grad():
        assert torch.equal(model(fbank)[0], reloaded(fbank)[0])


def test_config_defaults_are_beats_iter3_plus():
    config = BEATsConfig()
    assert (config.encoder_layers, config.encoder_embed_dim, config.encoder_attention_heads) == (12, 768, 12)
    assert (config.input_patch_size, config.embed_dim, config.conv_pos, config.conv_pos_groups) == (
        16,
        512,
        128,
        16,
    )
    assert config.deep_norm and config.gru_rel_pos and config.relative_position_embedding
    assert (config.num_buckets, config.max_distance) == (320, 800)
