"""Configuration of the Uni-MoE language model: a LLaMA decoder whose FFNs are sparse MoE blocks."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ROUTERS = ("topk_softmax", "softmax_topk")
ROUTER_NOISES = (None, "gumbel")
DISPATCHES = ("auto", "grouped_mm", "loop")


@strict
class UniMoeTextConfig(LlamaConfig):
    r"""A LLaMA configuration plus the Mixture-of-Experts settings of Uni-MoE.

    Args:
        num_experts: experts per MoE layer (E).
        num_experts_per_tok: experts each token is sent to (top-k).
        moe_layers: which layers carry an MoE FFN: ``"all"``, ``"even"`` (the release's v1.5 layout,
            layers 0, 2, 4, ...), ``"odd"``, ``"none"`` or an explicit list of layer indices. Others are dense.
        router: ``"topk_softmax"`` (v1: top-k of the logits, softmax over the k chosen) or
            ``"softmax_topk"`` (8-expert: softmax over all experts, top-k, renormalised).
        router_noise: ``None`` or ``"gumbel"``: Gumbel noise on the choices after the first,
            applied in training only.
        router_aux_loss_coef: weight of the GShard/Switch load-balancing loss added to the LM loss.
        router_z_loss_coef: weight of the router z-loss (0 disables it).
        capacity_factor: ``None`` for dropless routing; otherwise each expert takes at most
            ``ceil(capacity_factor * tokens * top_k / num_experts)`` token slots, first choices first.
        moe_dispatch: ``"grouped_mm"`` (``torch._grouped_mm``), ``"loop"`` (one expert at a time) or
            ``"auto"``: the loop on CPU for experts without LoRA, else grouped GEMM where supported.
        expert_lora_rank: rank of the LoRA adapters inside each expert (0: none). With LoRA the base
            expert weights are frozen.
        expert_lora_alpha, expert_lora_dropout: LoRA scaling numerator and dropout.
        output_router_logits: return the router logits of every MoE layer by default.
    """

    model_type = "unimoe_text"

    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_layers: str | list[int] = "all"
    router: str = "topk_softmax"
    router_noise: str | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    moe_dispatch: str = "auto"
    expert_lora_rank: int = 0
    expert_lora_alpha: float = 16.0
    expert_lora_dropout: float = 0.05
    output_router_logits: bool = False

    def validate_architecture(self):
        """Checks the MoE settings on top of LLaMA's own checks."""
        super().validate_architecture()
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.router_noise not in ROUTER_NOISES:
            raise ValueError(f"router_noise must be one of {ROUTER_NOISES}, got {self.router_noise!r}")
        if self.moe_dispatch not in DISPATCHES:
            raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {self.moe_dispatch!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")
        self.moe_layer_indices()

    def moe_layer_indices(self) -> list[int]:
        """The indices of the layers whose FFN is a Mixture-of-Experts block."""
        n = self.num_hidden_layers
        spec = self.moe_layers
        if isinstance(spec, str):
            choices = {
                "all": range(n),
                "even": range(0, n, 2),
                "odd": range(1, n, 2),
                "none": range(0),
            }
            if spec not in choices:
                raise ValueError(
                    f"moe_layers must be one of {sorted(choices)} or a list of ints, got {spec!r}"
                )
            return list(choices[spec])
        bad = [i for i in spec if not 0 <= i < n]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for {n} layers")
        return sorted(set(spec))
