import math

import pytest
import torch
import torch.nn.functional as F

from unimoe import UniMoeTextConfig
from unimoe.modeling.moe import (
    UniMoeSparseMoeBlock,
    expert_token_counts,
    grouped_linear,
    load_balancing_loss,
    route,
    router_z_loss,
)


def tiny_config(**kw) -> UniMoeTextConfig:
    base = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    return UniMoeTextConfig(**{**base, **kw})


def reference_moe(block: UniMoeSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The release's design: a Python loop over experts with torch.where, per-token weights."""
    t = x.reshape(-1, x.shape[-1])
    logits = t.float() @ block.gate.weight.float().T
    weights, experts = route(logits, block.top_k, block.router)
    out = torch.zeros_like(t)
    ex = block.experts
    for e in range(block.num_experts):
        tok, slot = torch.where(experts == e)
        h = F.silu(t[tok] @ ex.gate_proj[e].T) * (t[tok] @ ex.up_proj[e].T)
        out.index_add_(0, tok, (h @ ex.down_proj[e].T) * weights[tok, slot, None])
    return out.view_as(x)


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk"])
@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
def test_block_matches_per_expert_loop(router, dispatch):
    torch.manual_seed(0)
    block = UniMoeSparseMoeBlock(tiny_config(router=router, moe_dispatch=dispatch, num_experts=4))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 5, 32)
    y, logits, experts = block(x)
    assert logits.shape == (15, 4) and experts.shape == (15, 2)
    torch.testing.assert_close(y, reference_moe(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop"])
def test_padding_tokens_reach_no_expert(dispatch):
    """With a token mask, real tokens get the reference output, padding tokens zero, and the experts see
    only the real tokens' slots; router logits and choices cover every token."""
    torch.manual_seed(0)
    block = UniMoeSparseMoeBlock(tiny_config(num_experts=4, num_experts_per_tok=2, moe_dispatch=dispatch))
    x = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    rows = []
    hook = block.experts.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    out, logits, experts = block(x, mask)
    hook.remove()
    real = mask.bool()
    torch.testing.assert_close(out[real], reference_moe(block, x)[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))
    assert rows == [2 * int(real.sum())]
    assert logits.shape == (21, 4) and experts.shape == (21, 2)
    full_out, full_logits, full_experts = block(x)
    torch.testing.assert_close(logits, full_logits)
    assert torch.equal(experts, full_experts)


def test_routers_agree_for_top2_and_differ_in_normalisation():
    # with k=2 the softmax over the 2 chosen logits equals the renormalised full softmax
    logits = torch.randn(50, 8)
    w1, e1 = route(logits, 2, "topk_softmax")
    w2, e2 = route(logits, 2, "softmax_topk")
    assert torch.equal(e1, e2)
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(w1.sum(-1), torch.ones(50))
    # hand-computed case
    w, e = route(torch.tensor([[0.0, 1.0, 3.0, 2.0]]), 2, "topk_softmax")
    assert e.tolist() == [[2, 3]]
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))]]))


def test_gumbel_noise_only_in_training_and_first_choice_clean():
    torch.manual_seed(0)
    logits = torch.randn(400, 8)
    clean_w, clean_e = route(logits, 2, "softmax_topk", noise="gumbel", training=False)
    assert torch.equal(clean_e, route(logits, 2, "softmax_topk")[1])
    _, noisy_e = route(logits, 2, "softmax_topk", noise="gumbel", training=True)
    assert torch.equal(noisy_e[:, 0], logits.argmax(-1))
    assert (noisy_e[:, 1] != clean_e[:, 1]).any()
    assert (noisy_e[:, 0] != noisy_e[:, 1]).all()


def test_load_balancing_loss_hand_computed():
    logits = torch.log(
        torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]]) + 1e-12
    )
    mask = torch.tensor([1, 1, 1, 0])
    # top-1 fractions over 3 real tokens: e0 2/3, e1 0, e2 1/3; mean probs: e0 1.4/3, e1 0.6/3, e2 1.0/3
    expected = 3 * (2 / 3 * 1.4 / 3 + 0.0 * 0.6 / 3 + 1 / 3 * 1.0 / 3)
    torch.testing.assert_close(load_balancing_loss(logits, mask), torch.tensor(expected), atol=1e-5, rtol=0)
    # perfectly balanced uniform router gives 1
    torch.testing.assert_close(load_balancing_loss(torch.zeros(4, 4).fill_diagonal_(1e-3)), torch.tensor(1.0))
    z = router_z_loss(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(z, torch.tensor((math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2))


def test_capacity_drops_later_choices_first():
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=2, num_experts_per_tok=1, capacity_factor=0.5)
    block = UniMoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(1, 8, 32).abs()
    y, _, experts = block(x)
    # capacity = ceil(0.5 * 8 * 1 / 2) = 2: only the first two tokens reach expert 0
    assert (experts == 0).all()
    assert (y[0, :2].abs().sum(-1) > 0).all() and (y[0, 2:] == 0).all()
    dropless = UniMoeSparseMoeBlock(tiny_config(num_experts=2, num_experts_per_tok=1))
    dropless.load_state_dict(block.state_dict())
    assert (dropless(x)[0].abs().sum(-1) > 0).all()
    # padding takes no capacity: 4 real tokens of 8, capacity ceil(0.5 * 4 * 1 / 2) = 1
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 0]])
    y, _, _ = block(x, mask)
    assert (y[0, 1].abs().sum() > 0) and (y[0, [0, 2, 3, 4, 5, 6, 7]] == 0).all()


def test_grouped_linear_empty_groups_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 6, 5, requires_grad=True)
    x = torch.randn(9, 5, requires_grad=True)
    counts = torch.tensor([3, 0, 6, 0])
    g = torch.randn(9, 6)
    y1 = grouped_linear(x, w, counts, use_grouped_mm=True)
    (y1 * g).sum().backward()
    gw, gx = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    y2 = grouped_linear(x, w, counts, use_grouped_mm=False)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gx, x.grad)
    assert (w.grad[1] == 0).all() and (w.grad[3] == 0).all()


def test_expert_token_counts_per_group():
    experts = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 0]])
    groups = torch.tensor([0, 1, 1, -1])
    counts = expert_token_counts(experts, 4, groups, num_groups=2)
    assert counts.tolist() == [[1, 1, 0, 0], [1, 1, 2, 0]]


def test_expert_lora_trains_adapters_only():
    torch.manual_seed(0)
    block = UniMoeSparseMoeBlock(tiny_config(expert_lora_rank=4, expert_lora_dropout=0.0))
    for name, p in block.experts.named_parameters():
        torch.nn.init.normal_(p, std=0.1) if "lora_A" in name or "lora" not in name else None
    base = {k: v.detach().clone() for k, v in block.experts.named_parameters() if "lora" not in k}
    trainable = [n for n, p in block.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(
        ["gate.weight"]
        + [f"experts.{p}_lora_{ab}" for p in ("gate_proj", "up_proj", "down_proj") for ab in "AB"]
    )
    x = torch.randn(2, 6, 32)
    y0 = block(x)[0].detach()
    opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        block(x)[0].pow(2).mean().backward()
        opt.step()
    y1 = block(x)[0].detach()
    assert not torch.allclose(y0, y1)
    for k, v in block.experts.named_parameters():
        if "lora" not in k:
            assert torch.equal(v, base[k]), k
    block.experts.merge_lora()
    torch.testing.assert_close(block(x)[0], y1, atol=1e-5, rtol=1e-5)


def _loop_and_grouped_blocks(num_experts: int = 4) -> tuple[UniMoeSparseMoeBlock, UniMoeSparseMoeBlock]:
    torch.manual_seed(0)
    loop = UniMoeSparseMoeBlock(tiny_config(moe_dispatch="loop", num_experts=num_experts))
    for p in loop.parameters():
        torch.nn.init.normal_(p, std=0.2)
    grouped = UniMoeSparseMoeBlock(tiny_config(moe_dispatch="grouped_mm", num_experts=num_experts))
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def _step(block: UniMoeSparseMoeBlock, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """One forward and backward; returns the output and every gradient (cloned)."""
    x = x.clone().requires_grad_(True)
    out = block(x)[0]
    out.backward(grad_out)
    ex = block.experts
    grads = [x.grad, block.gate.weight.grad, ex.gate_proj.grad, ex.up_proj.grad, ex.down_proj.grad]
    return [out.detach()] + [g.clone() for g in grads]


def test_per_expert_swiglu_gradients_match_autograd_across_steps():
    # the loop's hand-written backward against autograd through grouped GEMM; the second step reuses
    # the first step's gradient memory and routes no token to expert 2, whose rows must come out zero
    loop, grouped = _loop_and_grouped_blocks()
    x1, g1 = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    x2, g2 = torch.rand(2, 4, 32), torch.randn(2, 4, 32)  # positive inputs: a negative router row never wins
    with torch.no_grad():
        for block in (loop, grouped):
            block.gate.weight[2] = -block.gate.weight[2].abs() - 1.0
    for x, g in ((x1, g1), (x2, g2)):
        for block in (loop, grouped):
            block.zero_grad(set_to_none=True)
        got, want = _step(loop, x, g), _step(grouped, x, g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (loop.experts.down_proj.grad[2] == 0).all() and (loop.experts.gate_proj.grad[2] == 0).all()


def test_per_expert_swiglu_gradcheck():
    from unimoe.modeling.moe import _ExpertSwiGLU

    torch.manual_seed(0)
    block = UniMoeSparseMoeBlock(tiny_config(moe_dispatch="loop", num_experts=3)).double()
    ex = block.experts
    x = torch.randn(7, 32, dtype=torch.double, requires_grad=True)
    weights = [p.detach().clone().requires_grad_(True) for p in (ex.gate_proj, ex.up_proj, ex.down_proj)]
    sizes = [3, 0, 4]
    assert torch.autograd.gradcheck(lambda *t: _ExpertSwiGLU.apply(*t, sizes, ex), (x, *weights))


def test_gradient_memory_reused_only_when_nothing_can_see_it():
    loop, grouped = _loop_and_grouped_blocks()
    x, g = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    ex = loop.experts
    first = _step(loop, x, g)
    address = ex.down_proj.grad.data_ptr()

    # zero_grad(set_to_none=True): the next step writes into the same memory
    loop.zero_grad(set_to_none=True)
    _step(loop, x, g)
    assert ex.down_proj.grad.data_ptr() == address

    # a caller holding the old gradient keeps its values; the step gets new memory
    held = ex.down_proj.grad
    loop.zero_grad(set_to_none=True)
    second = _step(loop, 2 * x, g)
    torch.testing.assert_close(held, first[5])
    assert ex.down_proj.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(second[5], _step(grouped, 2 * x, g)[5], atol=1e-5, rtol=1e-5)

    # gradient accumulation: a kept .grad (now the kept memory) is added to, never overwritten
    _step(loop, x, g)
    torch.testing.assert_close(ex.down_proj.grad, second[5] + first[5], atol=1e-5, rtol=1e-5)

    # frozen experts: no weight gradient is made; copies of the module start without kept memory
    import copy

    for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
        p.requires_grad_(False)
        p.grad = None
    out = loop(x.clone().requires_grad_(True))[0]
    out.backward(g)
    assert ex.down_proj.grad is None
    assert copy.deepcopy(ex).gradient_memory._memory == {}


def test_auto_dispatch_loops_on_cpu_for_many_rows_without_lora_only():
    from unimoe.modeling.moe import LOOP_MIN_ACTIVATIONS, grouped_mm_supported

    rows = LOOP_MIN_ACTIVATIONS // 48  # intermediate_size 48
    few, many = torch.randn(rows - 1, 32), torch.randn(rows + 1, 32)
    plain = UniMoeSparseMoeBlock(tiny_config(num_experts=4)).experts
    assert not plain.uses_grouped_mm(many)
    assert plain.uses_grouped_mm(few) == grouped_mm_supported(few)
    with_lora = UniMoeSparseMoeBlock(tiny_config(num_experts=4, expert_lora_rank=4)).experts
    assert with_lora.uses_grouped_mm(many) == grouped_mm_supported(many)


def test_per_expert_path_under_autocast_matches_grouped_path():
    # autocast runs the expert matmuls in bf16; the per-expert path casts as autocast would and must
    # agree with the grouped path to bf16 rounding (relative error of the whole tensor, measured
    # about 6e-3; elementwise, values near zero differ by more) and give fp32 weight gradients
    loop, grouped = _loop_and_grouped_blocks()
    x, g = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    results = []
    for block in (loop, grouped):
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)[0]
        out.float().backward(g)
        results.append((out.float(), block.experts.down_proj.grad, block.experts.gate_proj.grad))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert ((a - b).norm() / b.norm()).item() < 1e-2  # two bf16 roundings of one function
    assert results[0][1].dtype == torch.float32
