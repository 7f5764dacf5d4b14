"""Sparse Mixture-of-Experts FFN: router, grouped experts, dropless sort-based dispatch, router losses.

Shapes: T tokens, D hidden, I expert FFN width, E experts, k experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init

from .configuration_unimoe_text import UniMoeTextConfig


def route(
    logits: torch.Tensor, top_k: int, router: str, noise: str | None = None, training: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chooses ``top_k`` experts per token from fp32 router logits ``[T, E]``.

    Returns ``(weights [T, k] fp32, experts [T, k] long)``. The first choice is always the clean
    argmax; with ``noise="gumbel"`` and ``training=True`` the later choices are drawn from the logits
    plus Gumbel noise (the 8-expert release's second-expert sampling). Inference is deterministic.
    """
    logits = logits.float()
    if noise == "gumbel" and training and top_k > 1:
        first = logits.argmax(dim=-1, keepdim=True)  # [T, 1]
        gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)).clamp_min(1e-20))
        noisy = (logits + gumbel).scatter(-1, first, float("-inf"))
        rest = noisy.topk(top_k - 1, dim=-1).indices  # [T, k-1]
        experts = torch.cat([first, rest], dim=-1)
    else:
        experts = logits.topk(top_k, dim=-1).indices  # [T, k]
    if router == "topk_softmax":
        weights = logits.gather(-1, experts).softmax(dim=-1)
    elif router == "softmax_topk":
        weights = logits.softmax(dim=-1).gather(-1, experts)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown router {router!r}")
    return weights, experts


def _flatten_mask(logits: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    if token_mask is None:
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return token_mask.reshape(-1).to(device=logits.device, dtype=torch.bool)


def load_balancing_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """GShard/Switch load-balancing loss of one layer: ``E * sum_e(f_e * P_e)``.

    ``f_e`` is the fraction of (unmasked) tokens whose first choice is expert e, ``P_e`` the mean
    router probability of e. Equals the release's ``E^2 * mean_e(P_e * f_e)``; 1.0 when balanced.
    ``router_logits``: ``[T, E]``; ``token_mask``: ``[T]`` (or any shape with T elements), True = real token.
    """
    logits = router_logits.float()
    mask = _flatten_mask(logits, token_mask)
    num_experts = logits.shape[-1]
    probs = logits[mask].softmax(dim=-1)  # [T', E]
    if probs.shape[0] == 0:
        return logits.sum() * 0.0
    top1 = F.one_hot(probs.argmax(dim=-1), num_experts).float()  # [T', E]
    return num_experts * (top1.mean(dim=0) * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss of one layer: mean over tokens of ``logsumexp(logits)^2``."""
    logits = router_logits.float()
    mask = _flatten_mask(logits, token_mask)
    if not mask.any():
        return logits.sum() * 0.0
    return torch.logsumexp(logits[mask], dim=-1).square().mean()


def expert_token_counts(
    expert_indices: torch.Tensor, num_experts: int, groups: torch.Tensor | None = None, num_groups: int = 1
) -> torch.Tensor:
    """Token-slot counts per group and expert, ``[num_groups, E]``.

    ``expert_indices``: ``[T, k]`` chosen experts; ``groups``: ``[T]`` group id per token (e.g. the
    modality), negative ids are ignored (padding). Without groups all tokens count in group 0.
    """
    t, k = expert_indices.shape
    if groups is None:
        groups = torch.zeros(t, dtype=torch.long, device=expert_indices.device)
    groups = groups.reshape(-1).to(expert_indices.device).long()
    keep = groups >= 0
    flat = groups[keep].unsqueeze(1) * num_experts + expert_indices[keep]  # [T', k]
    counts = torch.bincount(flat.reshape(-1), minlength=num_groups * num_experts)
    return counts.view(num_groups, num_experts)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for this tensor's device and dtype in this torch build."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``_grouped_mm`` needs every row stride to be a multiple of 16 bytes."""
    size = x.element_size()
    return (weight.shape[1] * size) % 16 == 0 and (weight.shape[2] * size) % 16 == 0


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool
) -> torch.Tensor:
    """``x[rows of expert e] @ weight[e].T`` for every expert, rows of ``x`` sorted by expert.

    ``x``: ``[N, in]``; ``weight``: ``[E, out, in]``; ``counts``: ``[E]`` rows per expert.
    """
    if use_grouped_mm and _aligned(x, weight):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offs)  # [N, out]
    # unbind once: indexing weight[e] per expert would send E full-size gradients through backward
    chunks = x.split(counts.tolist())
    out = [xe @ we.T for xe, we in zip(chunks, weight.unbind(0))]
    return torch.cat(out) if out else x.new_zeros(0, weight.shape[1])


# [N, I] activation elements from which "auto" loops over experts on CPU: measured in fp32 on 2 cores
# (benchmarks/moe_layer.py shapes), grouped GEMM wins below about 2^18 and the loop above
LOOP_MIN_ACTIVATIONS = 2**18


def _storage_uses(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s memory (plus the probe's own reference)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class GradientMemory:
    """Memory for the stacked expert weight gradients that survives ``zero_grad(set_to_none=True)``.

    On CPU, glibc hands every freed block above its mmap threshold (32 MB at most) back to the OS,
    so a stacked ``[E, I, D]`` gradient is page-faulted in afresh every step: 276 MB at E=8, I=2816,
    D=1024 in fp32, about 5% of the layer's step. ``take`` gives back the previous step's memory when
    nothing can observe it: no tensor but this cache shares it. Otherwise (a ``.grad`` that is kept
    for accumulation, a caller holding the old gradient) it allocates anew.
    CUDA's caching allocator reuses memory by itself, so off the CPU this always allocates.
    Copies of the module start empty.
    """

    def __init__(self) -> None:
        self._memory: dict[str, tuple[torch.Tensor, int]] = {}

    def take(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like ``weight`` for its gradient, as a fresh view.

        A fresh view is referenced by nobody else, so autograd adopts it as ``.grad`` without a copy.
        """
        if weight.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty_like(weight, memory_format=torch.contiguous_format)
        cached = self._memory.get(name)
        if (
            cached is not None
            and cached[0].shape == weight.shape
            and cached[0].dtype == weight.dtype
            and _storage_uses(cached[0]) == cached[1]
        ):
            return cached[0].view_as(cached[0])
        memory = torch.empty_like(weight, memory_format=torch.contiguous_format)
        self._memory[name] = (memory, _storage_uses(memory))
        return memory.view_as(memory)

    def __deepcopy__(self, memo: dict) -> GradientMemory:
        return GradientMemory()

    def __getstate__(self) -> dict:
        return {"_memory": {}}


def _swiglu_rows(
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    sizes: list[int],
    keep: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """SwiGLU experts on expert-sorted rows, one expert at a time; appends ``(g, u)`` to ``keep``."""
    out = x.new_empty(x.shape[0], down.shape[1])  # [N, D]
    for e, (xe, oe) in enumerate(zip(x.split(sizes), out.split(sizes))):
        g = xe @ gate[e].T  # [n_e, I]
        u = xe @ up[e].T  # [n_e, I]
        torch.mm(F.silu(g).mul_(u), down[e].T, out=oe)
        if keep is not None:
            keep += (g, u)
    return out


class _ExpertSwiGLU(torch.autograd.Function):
    """SwiGLU experts on expert-sorted rows, with temporaries of one expert's rows at a time.

    Autograd on whole ``[N, I]`` tensors keeps four of them (gate, its SiLU, up, their product) and
    allocates as many again in the backward; above glibc's mmap threshold each one is page-faulted
    in every step. This keeps only the gate and up projections per expert, recomputes the rest in
    the backward, and writes the weight gradients straight into their stacked tensors.
    """

    @staticmethod
    def forward(ctx, x, gate, up, down, sizes, experts):
        acts: list[torch.Tensor] = []
        out = _swiglu_rows(x, gate, up, down, sizes, keep=acts)
        ctx.sizes, ctx.experts = sizes, experts
        ctx.save_for_backward(x, gate, up, down, *acts)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gate, up, down, *acts = ctx.saved_tensors
        sizes, experts = ctx.sizes, ctx.experts
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = [
            experts.gradient_memory.take(name, weight) if needed else None
            for name, weight, needed in zip(experts.projections, (gate, up, down), ctx.needs_input_grad[1:4])
        ]
        grad_gate, grad_up, grad_down = grad_w
        grad_rows = grad_x.split(sizes) if grad_x is not None else [None] * len(sizes)
        rows = zip(x.split(sizes), grad_out.split(sizes), grad_rows, acts[0::2], acts[1::2])
        for e, (xe, dy, dxe, g, u) in enumerate(rows):
            s = torch.sigmoid(g)
            silu = g * s
            if grad_down is not None:
                torch.mm(dy.T, silu * u, out=grad_down[e])
            dh = dy @ down[e]  # [n_e, I]
            dsilu = torch.sub(1, s).mul_(g).add_(1).mul_(s)  # silu'(g) = s * (1 + g * (1 - s))
            du = silu.mul_(dh)
            dg = dh.mul_(u).mul_(dsilu)
            if grad_up is not None:
                torch.mm(du.T, xe, out=grad_up[e])
            if grad_gate is not None:
                torch.mm(dg.T, xe, out=grad_gate[e])
            if dxe is not None:
                torch.mm(du, up[e], out=dxe)
                dxe.addmm_(dg, gate[e])
        return grad_x, grad_gate, grad_up, grad_down, None, None


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, optionally with LoRA adapters inside each expert.

    Parameters: ``gate_proj``/``up_proj`` ``[E, I, D]``, ``down_proj`` ``[E, D, I]``; with LoRA also
    ``{name}_lora_A [E, r, in]`` and ``{name}_lora_B [E, out, r]`` (B starts at zero).
    """

    projections = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config: UniMoeTextConfig):
        super().__init__()
        e, d, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.dispatch = config.moe_dispatch
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.lora_rank = config.expert_lora_rank
        if self.lora_rank:
            r = self.lora_rank
            for name, (out_dim, in_dim) in {
                "gate_proj": (i, d),
                "up_proj": (i, d),
                "down_proj": (d, i),
            }.items():
                self.register_parameter(f"{name}_lora_A", nn.Parameter(torch.empty(e, r, in_dim)))
                self.register_parameter(f"{name}_lora_B", nn.Parameter(torch.zeros(e, out_dim, r)))
                getattr(self, name).requires_grad_(False)
            self.lora_scaling = config.expert_lora_alpha / r
            self.lora_dropout = nn.Dropout(config.expert_lora_dropout)
        self.act_fn = nn.SiLU()
        self.gradient_memory = GradientMemory()
        self.reset_parameters(config.initializer_range)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The in-expert LoRA factors (empty without LoRA)."""
        if not self.lora_rank:
            return []
        names = ("gate_proj", "up_proj", "down_proj")
        return [getattr(self, f"{name}_{half}") for name in names for half in ("lora_A", "lora_B")]

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) expert weights; LoRA as PEFT initialises it."""
        for name in self.projections:
            init.normal_(getattr(self, name), mean=0.0, std=std)
        if self.lora_rank:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Kaiming-uniform A and zero B, as PEFT initialises LoRA."""
        for name in self.projections:
            a = getattr(self, f"{name}_lora_A")
            bound = 1.0 / math.sqrt(a.shape[-1])  # kaiming_uniform with a=sqrt(5) on [r, in]
            init.uniform_(a, -bound, bound)
            init.zeros_(getattr(self, f"{name}_lora_B"))

    def _project(self, name: str, x: torch.Tensor, counts: torch.Tensor, use_gmm: bool) -> torch.Tensor:
        out = grouped_linear(x, getattr(self, name), counts, use_gmm)
        if self.lora_rank:
            low = grouped_linear(self.lora_dropout(x), getattr(self, f"{name}_lora_A"), counts, use_gmm)
            out = (
                out
                + grouped_linear(low, getattr(self, f"{name}_lora_B"), counts, use_gmm) * self.lora_scaling
            )
        return out

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through ``torch._grouped_mm`` rather than a loop over experts.

        ``"auto"`` loops on the CPU for experts without LoRA once the ``[N, I]`` activations reach
        ``LOOP_MIN_ACTIVATIONS`` elements: the loop's per-expert temporaries stay below glibc's mmap
        threshold (see ``_ExpertSwiGLU``), while for fewer rows its extra operator calls cost more
        than they save. Otherwise it takes grouped GEMM where the build supports it.
        """
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        large = x.shape[0] * self.gate_proj.shape[1] >= LOOP_MIN_ACTIVATIONS
        if x.device.type == "cpu" and not self.lora_rank and large:
            return False
        return grouped_mm_supported(x)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x``: ``[N, D]`` token slots sorted by expert; ``counts``: ``[E]``. Returns ``[N, D]``."""
        use_gmm = self.uses_grouped_mm(x)
        if not use_gmm and not self.lora_rank:
            weights = (self.gate_proj, self.up_proj, self.down_proj)
            sizes = counts.tolist()
            device = x.device.type
            if not torch.is_autocast_enabled(device):
                return self._loop(x, weights, sizes)
            # under autocast: cast as autocast would for a matmul, then run in that one dtype
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return self._loop(x.to(dtype), tuple(w.to(dtype) for w in weights), sizes)
        hidden = self.act_fn(self._project("gate_proj", x, counts, use_gmm))
        hidden = hidden * self._project("up_proj", x, counts, use_gmm)  # [N, I]
        return self._project("down_proj", hidden, counts, use_gmm)

    def _loop(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...], sizes: list[int]) -> torch.Tensor:
        """The per-expert path: the autograd function when a gradient is wanted, else a plain loop."""
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            return _ExpertSwiGLU.apply(x, *weights, sizes, self)
        return _swiglu_rows(x, *weights, sizes)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Folds the LoRA adapters into the base weights and removes them."""
        if not self.lora_rank:
            return
        for name in self.projections:
            a = getattr(self, f"{name}_lora_A")
            b = getattr(self, f"{name}_lora_B")
            base = getattr(self, name)
            base.add_((b @ a) * self.lora_scaling)  # [E, out, r] @ [E, r, in]
            base.requires_grad_(True)
            delattr(self, f"{name}_lora_A")
            delattr(self, f"{name}_lora_B")
        self.lora_rank = 0


class UniMoeSparseMoeBlock(nn.Module):
    """Router + experts. Dropless by default: every token reaches all its top-k experts."""

    def __init__(self, config: UniMoeTextConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = config.router
        self.router_noise = config.router_noise
        self.capacity_factor = config.capacity_factor
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = GroupedExperts(config)

    def capacity(self, num_tokens: int) -> int | None:
        """Token slots each expert accepts, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``hidden_states``: ``[B, S, D]``. Returns ``(output [B, S, D], router_logits [T, E],
        experts [T, k])`` with T = B * S.

        ``token_mask`` (``[B, S]``, 0 on padding): padding tokens are routed (their router logits and
        choices are returned) but reach no expert, and their output is zero. No real token can see
        them (the attention mask hides them), so this only skips work."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # x: [T, D]
        num_tokens = x.shape[0]
        logits = F.linear(x.float(), self.gate.weight.float())  # [T, E], routed in fp32
        weights, experts = route(logits, self.top_k, self.router, self.router_noise, self.training)

        # slot j * T + t is token t's j-th choice: sorting by expert keeps first choices first
        flat_experts = experts.t().reshape(-1)  # [k*T]
        order = torch.argsort(flat_experts, stable=True)  # [k*T]
        routed = flat_experts
        if token_mask is not None:
            real = token_mask.reshape(-1).to(torch.bool)  # [T]
            order = order[real.repeat(self.top_k)[order]]  # the slots of real tokens, still sorted
            routed = flat_experts[order]
            if self.capacity_factor is not None:  # capacity counts real tokens only
                num_tokens = int(real.sum())
        counts = torch.bincount(routed, minlength=self.num_experts)  # [E]
        capacity = self.capacity(num_tokens)
        if capacity is not None:
            starts = counts.cumsum(0) - counts
            position = torch.arange(order.numel(), device=x.device) - starts[flat_experts[order]]
            order = order[position < capacity]
            counts = counts.clamp(max=capacity)
        token = order % x.shape[0]  # [N]
        slot_weights = weights.t().reshape(-1)[order]  # [N]

        # index_select: its backward is an index_add_, cheaper than x[token]'s accumulating index_put_
        out = self.experts(x.index_select(0, token), counts)  # [N, D]
        out = out * slot_weights.unsqueeze(-1).to(out.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))  # [T, D]
        return y.view(shape), logits, experts
