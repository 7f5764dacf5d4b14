"""Which experts each modality's tokens go to: counts from forward passes, and the routing figure."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..modalities import token_groups
from ..modeling.moe import expert_token_counts


@torch.no_grad()
def routing_counts(
    model, batches: Iterable[dict[str, torch.Tensor]], first_choice_only: bool = False
) -> np.ndarray:
    """Token-slot counts ``[moe_layers, modalities, experts]`` over ``batches`` of model inputs
    (padding excluded; modalities in ``token_groups()`` order, text first). ``first_choice_only``
    counts each token once, at its top-1 expert."""
    text_config = model.config.text_config
    num_experts = text_config.num_experts
    total = np.zeros((len(text_config.moe_layer_indices()), len(token_groups()), num_experts), dtype=np.int64)
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, output_router_logits=True)
        groups = model.token_modalities(batch["input_ids"], batch.get("attention_mask")).reshape(-1)
        for layer, experts in enumerate(out.expert_indices):
            experts = experts[:, :1] if first_choice_only else experts  # column 0: the top-1 choice
            counts = expert_token_counts(experts, num_experts, groups, len(token_groups()))
            total[layer] += counts.cpu().numpy()
    return total


def plot_routing(
    counts: np.ndarray,
    path: str | Path,
    layer_ids: list[int] | None = None,
    expert_names: list[str] | None = None,
) -> None:
    """Heat maps, one per MoE layer: share of each modality's tokens routed to each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [i for i in range(counts.shape[1]) if counts[:, i].sum() > 0]
    shares = counts[:, present] / np.maximum(counts[:, present].sum(-1, keepdims=True), 1)
    layers = counts.shape[0]
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers + 1, 0.5 * len(present) + 1.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        image = ax.imshow(shares[i], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"MoE layer {layer_ids[i] if layer_ids else i}")
        names = expert_names or [f"E{e}" for e in range(counts.shape[2])]
        ax.set_xticks(range(counts.shape[2]), names, rotation=45 if expert_names else 0)
        ax.set_yticks(range(len(present)), [token_groups()[m] for m in present] if i == 0 else [])
        for (r, c), v in np.ndenumerate(shares[i]):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the modality's token slots")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_losses(curves: dict[str, list[float]], path: str | Path) -> None:
    """Training loss per step (faint) and its running mean, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(curves) :]:
        ax.set_visible(False)
    for ax, (name, losses) in zip(axes.flat, curves.items()):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, lw=0.6, alpha=0.35, color="C0")
        window = max(1, len(losses) // 20)
        if len(losses) >= window:
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.5, color="C0", label=f"mean of {window}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    for row in axes:
        row[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
