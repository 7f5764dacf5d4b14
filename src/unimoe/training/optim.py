"""The optimiser and learning-rate schedule of every stage: AdamW with warmup and decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from .recipe import OptimSpec

FUSED_DEVICES = ("cpu", "cuda")


def plain_tensors_on(params: list[torch.Tensor], devices: tuple[str, ...]) -> bool:
    """Whether every tensor is an ordinary floating tensor (not a DTensor) on one of ``devices``."""
    return all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in devices for p in params
    )


def build_optimizer(params: list[nn.Parameter], spec: OptimSpec) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on biases, norms or query vectors); fused where
    ``spec.fused`` asks or (None) every parameter allows it."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = spec.fused if spec.fused is not None else plain_tensors_on(params, FUSED_DEVICES)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=fused or None)


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over ``params``, with the multi-tensor kernels where every gradient allows
    them (torch picks them by itself only on accelerators)."""
    grads = [p.grad for p in params if p.grad is not None]
    foreach = True if grads and plain_tensors_on(grads, FUSED_DEVICES) else None
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int):
    """Linear warmup (``warmup_steps`` or ``warmup_ratio`` of the run), then cosine/linear decay to 0
    or a constant rate."""
    warmup = (
        spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total_steps)
    )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if spec.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
