import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from unimoe import UniMoeForCausalLM, UniMoeTextConfig
from unimoe.compat import enable_activation_checkpointing
from unimoe.modeling.conversion import convert_release_state_dict, load_release_language_model
from unimoe.modeling.upcycling import extract_ffn_state_dict, upcycle_llama, widen_ffn

SHAPE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def dense_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()


def tiny_moe(seed: int = 0, **kw) -> UniMoeForCausalLM:
    torch.manual_seed(seed)
    return UniMoeForCausalLM(UniMoeTextConfig(**{**SHAPE, **kw})).eval()


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("moe_layers", ["all", "even"])
def test_upcycled_copies_equal_dense(router, moe_layers):
    dense = dense_llama()
    moe = upcycle_llama(dense, num_experts=4, router=router, moe_layers=moe_layers).eval()
    with torch.no_grad():  # random routers: any routing must give the dense FFN back
        for layer in moe.config.moe_layer_indices():
            moe.model.layers[layer].mlp.gate.weight.normal_(std=1.0)
    ids = torch.randint(3, 96, (2, 11))
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max()
    assert diff < 1e-4


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_widened_ffn_computes_the_same_function(factor):
    dense = tiny_moe(moe_layers="none")
    wide = widen_ffn(dense, factor).eval()
    layer = wide.model.layers[1].mlp
    assert layer.gate_proj.weight.shape == (factor * SHAPE["intermediate_size"], SHAPE["hidden_size"])
    assert layer.down_proj.weight.shape == (SHAPE["hidden_size"], factor * SHAPE["intermediate_size"])
    assert wide.config.intermediate_size == factor * SHAPE["intermediate_size"]
    assert dense.config.intermediate_size == SHAPE["intermediate_size"]  # the source is left alone
    ids = torch.randint(3, 96, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dense model"):
        widen_ffn(tiny_moe(), 2)
    with pytest.raises(ValueError, match="factor"):
        widen_ffn(dense, 0)


def test_matches_transformers_mixtral():
    moe = tiny_moe(router="topk_softmax", num_experts=4)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.1)
    cfg = MixtralConfig(
        **{k: v for k, v in SHAPE.items()},
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    mixtral = MixtralForCausalLM(cfg).eval()
    state = {}
    for key, value in moe.state_dict().items():
        if key.endswith("mlp.experts.gate_proj"):
            up = moe.state_dict()[key.replace("gate_proj", "up_proj")]
            state[key.replace("gate_proj", "gate_up_proj")] = torch.cat([value, up], dim=1)
        elif key.endswith("mlp.experts.up_proj"):
            continue
        else:
            state[key] = value
    missing, unexpected = mixtral.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, mixtral(ids).logits, atol=1e-4, rtol=1e-4)


def test_generate_with_and_without_cache_batched():
    moe = tiny_moe(num_experts=4, moe_layers=[0, 2])
    ids = torch.randint(3, 96, (3, 8))
    mask = torch.ones_like(ids)
    ids[0, :3] = 0  # left padding
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = moe.generate(ids, use_cache=True, **kw)
    uncached = moe.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    alone = moe.generate(
        ids[1:2], attention_mask=mask[1:2], max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    assert torch.equal(alone[0], cached[1])


def test_right_padded_batch_equals_each_sample_alone():
    """Loss terms and logits at real positions of a right-padded training batch are those of each
    sample run alone (no padding): padding tokens, which skip the experts, change nothing real."""
    moe = tiny_moe(num_experts=4).train()
    torch.manual_seed(1)
    lengths = [8, 5, 3]
    ids = torch.randint(3, 96, (3, 8))
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    batched = moe(input_ids=ids, attention_mask=mask, labels=labels)
    for row, n in enumerate(lengths):
        alone = moe(input_ids=ids[row : row + 1, :n], labels=labels[row : row + 1, :n])
        torch.testing.assert_close(batched.logits[row, :n], alone.logits[0], rtol=1e-5, atol=1e-5)
    tokens = sum(n - 1 for n in lengths)  # the mean loss over all predicted tokens
    per_sample = [
        moe(input_ids=ids[r : r + 1, :n], labels=labels[r : r + 1, :n]).lm_loss for r, n in enumerate(lengths)
    ]
    expected = sum(loss * (n - 1) for loss, n in zip(per_sample, lengths)) / tokens
    torch.testing.assert_close(batched.lm_loss, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_gradients_equal_each_sample_alone(padding_side, attn, monkeypatch):
    """Every gradient of a padded training batch's summed loss equals the sum over its samples run alone.
    A right-padded batch reaches attention with no padding mask (causal attention alone covers its
    real tokens); a left-padded one keeps its mask."""
    import unimoe.modeling.modeling_unimoe_text as text_module

    seen = []
    create = text_module.create_causal_mask

    def spy(**kwargs):
        seen.append(kwargs["attention_mask"])
        return create(**kwargs)

    monkeypatch.setattr(text_module, "create_causal_mask", spy)
    moe = tiny_moe(num_experts=4).train()
    moe.set_attn_implementation(attn)
    torch.manual_seed(2)
    lengths = [7, 4, 2]
    real = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    if padding_side == "left":
        real = real.flip(1)
    ids = torch.randint(3, 96, (3, 7)).masked_fill(~real, 0)
    # a sample alone never predicts its first token; after left padding a padding position would
    labels = ids.masked_fill(~real, -100)
    labels[torch.arange(3), real.long().argmax(1)] = -100

    def gradients(**inputs) -> dict[str, torch.Tensor]:
        moe.zero_grad(set_to_none=True)
        moe(**inputs, num_items_in_batch=100.0).lm_loss.backward()
        return {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}

    batched = gradients(input_ids=ids, attention_mask=real.long(), labels=labels)
    assert (seen[0] is None) == (padding_side == "right")
    if padding_side == "left":
        assert torch.equal(seen[0], real.long())
    alone = [
        gradients(input_ids=ids[r : r + 1, real[r]], labels=labels[r : r + 1, real[r]]) for r in range(3)
    ]
    assert set(batched) == set(alone[0])
    for name, grad in batched.items():
        expected = sum(g.get(name, torch.zeros_like(grad)) for g in alone)
        torch.testing.assert_close(
            grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_save_load_round_trip_and_auto_class(tmp_path):
    moe = tiny_moe(router="softmax_topk", num_experts=8, moe_layers="even", expert_lora_rank=4)
    moe.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, UniMoeForCausalLM)
    assert loaded.config.moe_layer_indices() == [0, 2]
    a, b = moe.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_includes_weighted_aux_loss():
    moe = tiny_moe(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = moe(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 3 and out.router_logits[0].shape == (20, 4)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss + 0.1 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


@pytest.mark.parametrize("num_items", [None, 7.0])
def test_logits_at_labels_give_the_same_loss_and_gradients(num_items):
    # the head only where a next-token label is set, against the full [B, L, V] head and transformers' loss
    moe = tiny_moe().train()
    ids = torch.randint(3, 96, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]
    labels[1, 11] = ids[1, 11]  # only the position before it predicts it
    labels[2, 2:] = ids[2, 2:]
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    results = []
    for at_labels in (False, True):
        moe.zero_grad(set_to_none=True)
        out = moe(ids, labels=labels, logits_at_labels=at_labels, **kwargs)
        out.lm_loss.backward()
        grads = [p.grad.clone() for p in moe.parameters() if p.grad is not None]
        results.append((out, grads))
    (full, full_grads), (sparse, sparse_grads) = results
    assert sparse.logits.shape == (4 + 1 + 10, 96)
    torch.testing.assert_close(sparse.lm_loss, full.lm_loss)
    assert len(full_grads) == len(sparse_grads)
    for a, b in zip(sparse_grads, full_grads):
        torch.testing.assert_close(a, b)
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(sparse.logits, full.logits[targets != -100])


def test_release_v1_keys_load(tmp_path):
    moe = tiny_moe(num_experts=4)
    release = {}
    for key, value in moe.state_dict().items():
        if ".mlp.experts." in key:
            prefix, proj = key.rsplit(".", 1)
            for i in range(value.shape[0]):
                release[f"{prefix}.{i}.{proj}.weight"] = value[i].clone()
        else:
            release[key] = value.clone()
    converted = convert_release_state_dict(release)
    fresh = tiny_moe(seed=1, num_experts=4)
    fresh.load_state_dict(converted, strict=True)
    # the same through a release-style checkpoint directory with a config.json
    torch.save(release, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(moe.config.to_json_string())
    loaded = load_release_language_model(tmp_path)
    ids = torch.randint(3, 96, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(fresh(ids).logits, moe(ids).logits, atol=0, rtol=0)


def test_release_8e_deepspeed_keys_convert():
    moe = tiny_moe(num_experts=8, router="softmax_topk", expert_lora_rank=4)
    release = {}
    for key, value in moe.state_dict().items():
        if ".mlp.gate." in key:
            release[key.replace(".mlp.gate.", ".mlp.deepspeed_moe.gate.wg.")] = value
        elif ".mlp.experts." in key:
            prefix, name = key.rsplit(".experts.", 1)
            for i in range(value.shape[0]):
                release[f"{prefix}.deepspeed_moe.experts.deepspeed_experts.{i}.{name}.weight"] = value[i]
        else:
            release["base_model.model." + key] = value
    converted = convert_release_state_dict(release)
    assert converted.keys() == moe.state_dict().keys()
    for k, v in moe.state_dict().items():
        assert torch.equal(converted[k], v), k


def test_upcycle_from_expert_sources():
    dense = dense_llama()
    donors = [dense_llama(seed=s) for s in (1, 2)]
    sources = [extract_ffn_state_dict(d) for d in donors]
    moe = upcycle_llama(dense, num_experts=3, ffn_sources=[sources[0], sources[1], sources[0]])
    w = moe.model.layers[1].mlp.experts.gate_proj
    assert torch.equal(w[0], donors[0].model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(w[1], donors[1].model.layers[1].mlp.gate_proj.weight)
    assert torch.equal(w[2], w[0])
    assert torch.equal(
        moe.model.layers[1].self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight
    )


def test_gradient_checkpointing_same_gradients():
    moe = tiny_moe(router_noise="gumbel", router="softmax_topk").train()
    ids = torch.randint(3, 96, (2, 10))

    def grads():
        moe.zero_grad()
        torch.manual_seed(3)
        moe(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}

    plain = grads()
    enable_activation_checkpointing(moe, {"use_reentrant": False})
    assert moe.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(plain[k], checkpointed[k], atol=1e-6, rtol=1e-5)


def test_sdpa_equals_eager():
    moe = tiny_moe()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        moe.set_attn_implementation("eager")
        eager = moe(ids).logits
        moe.set_attn_implementation("sdpa")
        sdpa = moe(ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_peft_lora_on_attention_trains():
    from peft import LoraConfig, get_peft_model

    moe = tiny_moe().train()
    peft_model = get_peft_model(moe, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 10))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in peft_model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, UniMoeForCausalLM)
