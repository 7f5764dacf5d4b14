"""Correctness of the CUDA paths against float64 references, before any CUDA timing is trusted.

Checks, each on fresh random inputs with the relative error ``||out - ref|| / ||ref||``:

- the MoE block in bf16 with grouped GEMM (``torch._grouped_mm``) and with the per-expert loop, output
  and the input, router and expert-weight gradients, against the same block in float64 on the CPU
  (bf16 operands land between 1e-3 and 1e-2; both route in float32 or better from the same
  bf16-valued inputs and weights, so only a tie closer than float32 rounding could route differently);
- the tiny Uni-MoE model's logits in bf16 on CUDA against float32 on the CPU, and greedy generation
  with the KV cache against the same model without a cache on CUDA;
- training: the loss with the LM head at labelled positions only against the full head (bf16
  autocast), and 30 steps of fused AdamW with multi-tensor clipping that must lower the loss.

Prints one line per check and exits non-zero when an error is above its bound.
Run: ``python benchmarks/cuda_check.py`` on a machine with a CUDA GPU.
"""

from __future__ import annotations

import math
import sys

import torch

from unimoe import UniMoeTextConfig
from unimoe.modeling.moe import UniMoeSparseMoeBlock

BOUNDS = {"bf16": 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives infinity."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def block_outputs(
    block: UniMoeSparseMoeBlock, x: torch.Tensor, grad_out: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Output and gradients of one forward and backward."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = block(x)[0]
    out.backward(grad_out)
    ex = block.experts
    return {
        "output": out,
        "input grad": x.grad,
        "router grad": block.gate.weight.grad,
        "gate_proj grad": ex.gate_proj.grad,
        "up_proj grad": ex.up_proj.grad,
        "down_proj grad": ex.down_proj.grad,
    }


def check_moe_block(dispatch: str, num_experts: int, failures: list[str]) -> None:
    """The bf16 CUDA block against float64 on the CPU, same weights and inputs."""

    def config(moe_dispatch: str) -> UniMoeTextConfig:
        return UniMoeTextConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_experts=num_experts,
            num_experts_per_tok=2,
            num_hidden_layers=1,
            num_attention_heads=8,
            vocab_size=32,
            moe_dispatch=moe_dispatch,
        )

    torch.manual_seed(num_experts)
    block = UniMoeSparseMoeBlock(config(dispatch))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    block = block.to(torch.bfloat16)
    reference = UniMoeSparseMoeBlock(config("loop")).double()  # grouped GEMM has no float64
    reference.load_state_dict(block.state_dict())
    x = torch.randn(4, 1024, 1024, dtype=torch.bfloat16)
    grad_out = torch.randn(4, 1024, 1024, dtype=torch.bfloat16)
    want = block_outputs(reference, x.double(), grad_out.double())
    got = block_outputs(block.cuda(), x.cuda(), grad_out.cuda())
    for name, ref in want.items():
        error = relative_error(got[name], ref)
        ok = error < BOUNDS["bf16"]
        print(
            f"moe block {dispatch:10s} E={num_experts} bf16 {name:15s} rel err {error:.2e} {'ok' if ok else 'FAIL'}"
        )
        if not ok:
            failures.append(f"moe {dispatch} E={num_experts} {name}")


def check_model(failures: list[str]) -> None:
    """Tiny model: bf16 CUDA logits against fp32 CPU; cached greedy decoding against uncached."""
    from unimoe.presets import build_tiny

    model, processor = build_tiny(seed=0)
    model.eval()
    ids = torch.randint(3, model.config.text_config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        gpu = model.to("cuda", torch.bfloat16)
        got = gpu(input_ids=ids.cuda()).logits
    error = relative_error(got, ref)
    ok = error < BOUNDS["bf16"]
    print(f"tiny model bf16 logits rel err {error:.2e} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("tiny model logits")
    gpu = gpu.float()
    with torch.no_grad():
        cached = gpu.generate(input_ids=ids.cuda(), max_new_tokens=16, do_sample=False)
        uncached = gpu.generate(input_ids=ids.cuda(), max_new_tokens=16, do_sample=False, use_cache=False)
    same = torch.equal(cached, uncached)
    print(f"tiny model greedy with KV cache equals without (fp32): {'ok' if same else 'FAIL'}")
    if not same:
        failures.append("greedy cache")


def check_training(failures: list[str]) -> None:
    """The training loop's pieces on CUDA: the loss at labelled positions only against the full LM
    head (bf16 autocast), then fused AdamW with multi-tensor clipping lowering the loss."""
    from unimoe.presets import build_tiny
    from unimoe.training.optim import build_optimizer, clip_gradients
    from unimoe.training.recipe import OptimSpec

    model, _ = build_tiny(seed=0)
    model = model.cuda().train()
    ids = torch.randint(3, model.config.text_config.vocab_size, (4, 32), device="cuda")
    labels = torch.full_like(ids, -100)
    labels[:, 20:] = ids[:, 20:]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(input_ids=ids, labels=labels).lm_loss
        sparse = model(input_ids=ids, labels=labels, logits_at_labels=True).lm_loss
    full, sparse = full.item(), sparse.item()
    error = abs(full - sparse) / abs(full)
    ok = error < BOUNDS["bf16"]
    print(
        f"labelled-logits loss against the full head (bf16 autocast): rel err {error:.2e} {'ok' if ok else 'FAIL'}"
    )
    if not ok:
        failures.append("labelled logits")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimSpec(lr=3e-3))
    fused = optimizer.defaults.get("fused")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels, logits_at_labels=True).lm_loss
        loss.backward()
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ok = bool(fused) and all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]
    print(f"30 steps, fused AdamW {fused}: loss {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("training steps")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(torch.cuda.get_device_name(), torch.__version__)
    failures: list[str] = []
    for dispatch in ("grouped_mm", "loop"):
        for num_experts in (4, 8):
            check_moe_block(dispatch, num_experts, failures)
    check_model(failures)
    check_training(failures)
    print("FAILED: " + ", ".join(failures) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
