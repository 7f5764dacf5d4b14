"""Training telemetry: a JSONL log, TensorBoard scalars, a progress bar, and per-modality routing counts.

``metrics.jsonl`` holds one JSON object per logged step: ``step``, ``epoch``, ``loss``, ``lm_loss``,
``aux_loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``skipped`` (samples dropped so far) and, for MoE
models, ``expert_tokens``: ``{"layer_L": {"text": [count per expert], "image": [...], ...}}``, the token
slots each expert of MoE layer L received from each modality during the logging window.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..modalities import token_groups
from ..modeling.moe import expert_token_counts


class RoutingStats:
    """Accumulates ``[moe layer, modality, expert]`` token-slot counts over a logging window."""

    def __init__(self, layer_indices: list[int], num_experts: int):
        self.layer_indices = layer_indices
        self.num_experts = num_experts
        self.counts = torch.zeros(len(layer_indices), len(token_groups()), num_experts, dtype=torch.long)

    @property
    def active(self) -> bool:
        """Whether the model has MoE layers to count."""
        return bool(self.layer_indices)

    def update(self, expert_indices: tuple[torch.Tensor, ...], modalities: torch.Tensor) -> None:
        """Adds one batch: ``expert_indices[i]`` ``[B*S, k]`` of MoE layer i, ``modalities`` ``[B, S]``
        (modality index per token, -1 on padding)."""
        groups = modalities.reshape(-1)
        for i, chosen in enumerate(expert_indices):
            counts = expert_token_counts(chosen.detach(), self.num_experts, groups, len(token_groups()))
            self.counts[i] += counts.cpu()

    def reduce_and_reset(self, engine) -> dict[str, dict[str, list[int]]]:
        """The window's counts summed over processes, as ``{"layer_L": {modality: [per expert]}}``."""
        total = engine.all_reduce_sum(self.counts.to(engine.device, copy=True)).cpu()
        self.counts.zero_()
        return {
            f"layer_{layer}": {m: total[i, j].tolist() for j, m in enumerate(token_groups())}
            for i, layer in enumerate(self.layer_indices)
        }


class MetricsLogger:
    """Writes logged steps to ``metrics.jsonl`` and TensorBoard and drives the progress bar (main
    process only; other processes get a silent logger)."""

    def __init__(
        self,
        output_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        tag: str | None = None,
    ):
        self.enabled = enabled
        self.tag = tag
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        self.rate = 0.0
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tb" / tag) if tag else str(output_dir / "tb"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=tag or "train", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """Drops logged lines past ``step`` (what an interrupted run logged after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("expert") != self.tag or entry["step"] <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def advance(self, loss: float, aux_loss: float, tokens_per_s: float | None) -> None:
        """Moves the progress bar one optimizer step (``tokens_per_s`` None: keep the last rate shown)."""
        if self.bar is None:
            return
        if tokens_per_s is not None:
            self.rate = tokens_per_s
        self.bar.set_postfix(loss=f"{loss:.4f}", aux=f"{aux_loss:.4f}", tok_s=f"{self.rate:,.0f}")
        self.bar.update(1)

    def log(self, entry: dict[str, Any]) -> None:
        """Appends one step's entry to the JSONL log and its scalars to TensorBoard."""
        if not self.enabled:
            return
        if self.tag is not None:
            entry = {"expert": self.tag, **entry}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            step = entry["step"]
            for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "skipped"):
                value = entry.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)
            self._log_routing(entry.get("expert_tokens"), step)

    def _log_routing(self, routing: dict | None, step: int) -> None:
        """Per layer and expert, the share of all token slots it received in the window."""
        for layer, per_modality in (routing or {}).items():
            per_expert = [sum(col) for col in zip(*per_modality.values())]
            total = sum(per_expert) or 1
            for e, count in enumerate(per_expert):
                self.writer.add_scalar(f"routing/{layer}/expert_{e}", count / total, step)

    def close(self) -> None:
        """Flushes and closes the writers."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


class Throughput:
    """Tokens per second over the current logging window."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        """Counts processed (non-padding) tokens."""
        self.tokens += tokens

    def rate_and_reset(self, total_tokens: int | None = None) -> float:
        """Tokens per second since the last reset (``total_tokens``: the all-process count)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (self.tokens if total_tokens is None else total_tokens) / elapsed
        self.start, self.tokens = time.perf_counter(), 0
        return rate
