"""Speed of one sparse MoE layer: Uni-MoE's block against other dispatch designs and a dense floor.

Implementations, all on the same weights (every one but ``dense_floor`` is checked to give the same
output and the same input and router gradients before anything is timed):

- ``unimoe``: ``UniMoeSparseMoeBlock`` (sort-based dropless dispatch, grouped GEMM where supported).
- ``transformers_mixtral``: transformers' ``MixtralSparseMoeBlock`` as installed, with the experts
  implementation a ``MixtralForCausalLM`` gets by default (``grouped_mm``; see ``--mixtral-experts``).
- ``reference_loop``: the Uni-MoE release's design: a Python loop over per-expert SwiGLU modules,
  ``torch.where`` to find each expert's tokens, top-k of the logits then softmax over the k.
- ``capacity_einsum``: GShard-style one-hot dispatch/combine tensors ``[T, E, C]`` with C the
  largest expert load (nothing dropped), einsum dispatch, ``bmm`` over stacked weights, einsum combine.
- ``dense_floor``: one dense SwiGLU FFN of the expert's size applied ``top_k`` times to every token:
  the same FLOPs as the experts without any routing, the floor a sparse layer can reach.

Inputs are N(0, 1). The router weights are drawn with std ``1/sqrt(D)`` so that the logits have unit
variance: the softmax weights are neither flat nor one-hot, and since the router directions are random
the expected load of every expert is equal (the measured loads are written to the JSON under
``expert_tokens``). Expert weights use std ``1/sqrt(fan_in)``.

"fwd" is an inference forward under ``torch.no_grad``; "fwd+bwd" is a training forward plus the
backward of ``(out * g).sum()`` for a fixed random ``g``, through the input and all parameters, with
gradients set to None (untimed) before every run. Each round times every implementation once, in a
rotating order; the medians over ``--repeats`` rounds are reported, and every timing is kept in the
JSON under ``samples_ms`` (on a shared machine, a median far from the others' shows up there).

On CPU, glibc hands every freed block above its mmap threshold (32 MB at most) back to the OS, so
a tensor that large is page-faulted in again each time it is allocated: the ``[T*k, H]`` expert
activations of the implementations that run all experts' rows at once, and the ``[E, H, D]`` weight
gradients of the stacked-weight ones (about 600 MB a step at E=8, a sixth of the step in kernel
time). Uni-MoE's block avoids both without allocator settings: on CPU it runs one expert's rows at a
time and keeps its weight-gradient memory across steps (``unimoe.modeling.moe``). Per-expert modules
and the dense floor allocate blocks small enough for glibc to reuse. The JSON records the
``MALLOC_*`` variables under ``env``; ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296`` keeps
freed memory in the process for every implementation and times the compute alone. Wall time on a
machine shared with other jobs swings by 2x between rounds; ``--threads 1 --clock cpu`` measures
CPU time instead and stays within a few percent.

Peak memory is measured in a fresh process per implementation: on CPU the resident-set high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs``) of two forward (+backward) steps above the
resident set with the weights and inputs in place, so memory an allocator keeps counts; on CUDA the
peak of ``torch.cuda.max_memory_allocated`` above the allocated memory before the steps.

Run: ``python benchmarks/moe_layer.py [--quick] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import (
    CLOCKS,
    Case,
    environment,
    format_table,
    interleaved_times,
    select_device,
    select_dtype,
    synchronize,
    write_json,
)
from torch import nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from unimoe import UniMoeTextConfig
from unimoe.modeling.moe import UniMoeSparseMoeBlock

IMPLS = ("unimoe", "transformers_mixtral", "reference_loop", "capacity_einsum", "dense_floor")
SPARSE_IMPLS = IMPLS[:-1]
FULL_SHAPE = {"batch_size": 1, "seq_len": 2048, "hidden": 1024, "ffn": 2816}
QUICK_SHAPE = {"batch_size": 1, "seq_len": 64, "hidden": 64, "ffn": 128}


@dataclass
class ExpertWeights:
    """One MoE layer's weights in Uni-MoE's layout: router ``[E, D]``, experts ``[E, H, D]``/``[E, D, H]``."""

    router: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    @classmethod
    def random(cls, experts: int, hidden: int, ffn: int, seed: int) -> ExpertWeights:
        """Router std ``1/sqrt(D)`` (unit-variance logits), expert std ``1/sqrt(fan_in)``."""
        g = torch.Generator().manual_seed(seed)
        return cls(
            router=torch.randn(experts, hidden, generator=g) / hidden**0.5,
            gate_proj=torch.randn(experts, ffn, hidden, generator=g) / hidden**0.5,
            up_proj=torch.randn(experts, ffn, hidden, generator=g) / hidden**0.5,
            down_proj=torch.randn(experts, hidden, ffn, generator=g) / ffn**0.5,
        )


class SwiGLU(nn.Module):
    """A LLaMA MLP: ``down(silu(gate(x)) * up(x))`` with separate bias-free linears."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits ``[T, E]``, softmax over the k: ``(weights [T, k] fp32, experts [T, k])``."""
    top, experts = logits.topk(top_k, dim=-1)
    return top.float().softmax(dim=-1), experts


class ReferenceLoopMoe(nn.Module):
    """The release's MoE layer: per-expert modules and a Python loop with ``torch.where``."""

    def __init__(self, weights: ExpertWeights, top_k: int):
        super().__init__()
        num_experts, ffn, hidden = weights.gate_proj.shape
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(hidden, ffn) for _ in range(num_experts))
        with torch.no_grad():
            self.gate.weight.copy_(weights.router)
            for e, expert in enumerate(self.experts):
                expert.gate_proj.weight.copy_(weights.gate_proj[e])
                expert.up_proj.weight.copy_(weights.up_proj[e])
                expert.down_proj.weight.copy_(weights.down_proj[e])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # x: [T, D]
        weights, experts = _route(self.gate(x), self.top_k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, choice = torch.where(experts == e)  # [n_e], [n_e]
            if token.numel() == 0:
                continue
            y = expert(x[token]) * weights[token, choice, None].to(x.dtype)  # [n_e, D]
            out.index_add_(0, token, y)
        return out.view_as(hidden_states)


class CapacityEinsumMoe(nn.Module):
    """GShard-style dispatch: one-hot ``[T, E, C]`` tensors, einsum in and out, bmm over experts.

    The capacity C is the largest expert load of the batch, so no token is dropped; every expert
    computes C rows, padding included.
    """

    def __init__(self, weights: ExpertWeights, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.num_experts = weights.router.shape[0]
        self.gate = nn.Linear(weights.router.shape[1], self.num_experts, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(weights.router)
        self.gate_proj = nn.Parameter(weights.gate_proj.clone())  # [E, H, D]
        self.up_proj = nn.Parameter(weights.up_proj.clone())  # [E, H, D]
        self.down_proj = nn.Parameter(weights.down_proj.clone())  # [E, D, H]

    def dispatch_combine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dispatch, combine)``, both ``[T, E, C]``: 0/1 slot assignment and its routing weight."""
        num_tokens = x.shape[0]
        weights, experts = _route(self.gate(x), self.top_k)  # [T, k]
        # choices ordered k-major: every first choice takes its slot before any second choice
        chosen = F.one_hot(experts.t().reshape(-1), self.num_experts)  # [k*T, E]
        position = ((chosen.cumsum(0) - 1) * chosen).sum(-1)  # [k*T] slot within the expert
        capacity = int(chosen.sum(0).max())
        slot = F.one_hot(position, capacity)  # [k*T, C]
        assign = (chosen.unsqueeze(-1) * slot.unsqueeze(1)).to(x.dtype)  # [k*T, E, C]
        assign = assign.view(self.top_k, num_tokens, self.num_experts, capacity)  # [k, T, E, C]
        scale = weights.t().to(x.dtype)[:, :, None, None]  # [k, T, 1, 1]
        return assign.sum(0), (assign * scale).sum(0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])  # x: [T, D]
        dispatch, combine = self.dispatch_combine(x)  # [T, E, C]
        expert_in = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, D]
        hidden = F.silu(torch.bmm(expert_in, self.gate_proj.transpose(1, 2)))  # [E, C, H]
        hidden = hidden * torch.bmm(expert_in, self.up_proj.transpose(1, 2))
        expert_out = torch.bmm(hidden, self.down_proj.transpose(1, 2))  # [E, C, D]
        out = torch.einsum("tec,ecd->td", combine, expert_out)  # [T, D]
        return out.view_as(hidden_states)


class DenseFloor(nn.Module):
    """One dense SwiGLU FFN of an expert's size applied ``top_k`` times to every token."""

    def __init__(self, weights: ExpertWeights, top_k: int):
        super().__init__()
        _, ffn, hidden = weights.gate_proj.shape
        self.top_k = top_k
        self.mlp = SwiGLU(hidden, ffn)
        with torch.no_grad():
            self.mlp.gate_proj.weight.copy_(weights.gate_proj[0])
            self.mlp.up_proj.weight.copy_(weights.up_proj[0])
            self.mlp.down_proj.weight.copy_(weights.down_proj[0])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.mlp(hidden_states)
        for _ in range(self.top_k - 1):
            out = out + self.mlp(hidden_states)
        return out


class UniMoeOutputOnly(UniMoeSparseMoeBlock):
    """``UniMoeSparseMoeBlock`` returning only its output, like the other implementations."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states)[0]

    def chosen_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The experts ``[T, k]`` each token is routed to."""
        return super().forward(hidden_states)[2]


def build_unimoe(weights: ExpertWeights, top_k: int, dispatch: str) -> UniMoeOutputOnly:
    """Our block with ``weights`` copied in."""
    num_experts, ffn, hidden = weights.gate_proj.shape
    config = UniMoeTextConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        num_hidden_layers=1,
        num_attention_heads=1,
        vocab_size=32,
        moe_dispatch=dispatch,
    )
    block = UniMoeOutputOnly(config)
    with torch.no_grad():
        block.gate.weight.copy_(weights.router)
        block.experts.gate_proj.copy_(weights.gate_proj)
        block.experts.up_proj.copy_(weights.up_proj)
        block.experts.down_proj.copy_(weights.down_proj)
    return block


def build_mixtral(weights: ExpertWeights, top_k: int, experts_implementation: str) -> MixtralSparseMoeBlock:
    """transformers' Mixtral block with ``weights`` copied into its fused expert tensors."""
    num_experts, ffn, hidden = weights.gate_proj.shape
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        experts_implementation=experts_implementation,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(weights.router)
        block.experts.gate_up_proj.copy_(torch.cat([weights.gate_proj, weights.up_proj], dim=1))
        block.experts.down_proj.copy_(weights.down_proj)
    return block


BUILDERS = {
    "unimoe": lambda weights, top_k, args: build_unimoe(weights, top_k, args.unimoe_dispatch),
    "transformers_mixtral": lambda weights, top_k, args: build_mixtral(weights, top_k, args.mixtral_experts),
    "reference_loop": lambda weights, top_k, args: ReferenceLoopMoe(weights, top_k),
    "capacity_einsum": lambda weights, top_k, args: CapacityEinsumMoe(weights, top_k),
    "dense_floor": lambda weights, top_k, args: DenseFloor(weights, top_k),
}


def build_all(weights: ExpertWeights, top_k: int, args: argparse.Namespace) -> dict[str, nn.Module]:
    """Every implementation of ``IMPLS``, in fp32 on the CPU, on the same weights."""
    return {name: build(weights, top_k, args) for name, build in BUILDERS.items()}


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer input and the fixed output gradient, ``[B, S, D]`` each, fp32 on ``args.device``."""
    shape = (args.batch_size, args.seq_len, args.hidden)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(shape, generator=g).to(args.device)
    return x, torch.randn(shape, generator=g).to(args.device)


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory above a baseline: the CPU's resident set or CUDA's allocated memory, in MB."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        self.base = self._current()

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kb("VmRSS") * 1024

    def reset(self) -> None:
        """Starts a new high-water mark from the present memory."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        """The high-water mark since ``reset``, minus the baseline."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kb("VmHWM") * 1024
        return (peak - self.base) / 2**20


def measure_peak(name: str, num_experts: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak MB of two inference forwards and of two training steps of one implementation, alone."""
    weights = ExpertWeights.random(num_experts, args.hidden, args.ffn, seed=args.seed)
    module = BUILDERS[name](weights, args.top_k, args).to(args.device, args.dtype)
    del weights
    x, grad_out = (t.to(args.dtype) for t in make_inputs(args))
    x_train = x.detach().requires_grad_(True)
    memory = PeakMemory(args.device)
    memory.reset()
    with torch.no_grad():
        for _ in range(2):
            module(x)
    synchronize(args.device)
    peaks = {"fwd_peak_mb": memory.peak_mb()}
    memory.reset()
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        x_train.grad = None
        module(x_train).backward(grad_out)
    synchronize(args.device)
    peaks["fwd_bwd_peak_mb"] = memory.peak_mb()
    return peaks


def peak_in_child(name: str, num_experts: int, args: argparse.Namespace) -> dict[str, float]:
    """``measure_peak`` in a fresh process, so no other implementation's memory is counted."""
    options = {
        "--batch-size": args.batch_size,
        "--seq-len": args.seq_len,
        "--hidden": args.hidden,
        "--ffn": args.ffn,
        "--top-k": args.top_k,
        "--threads": args.threads,
        "--device": args.device,
        "--dtype": str(args.dtype).removeprefix("torch."),
        "--seed": args.seed,
        "--unimoe-dispatch": args.unimoe_dispatch,
        "--mixtral-experts": args.mixtral_experts,
        "--experts": num_experts,
        "--peak-of": name,
    }
    command = [sys.executable, __file__, *(str(part) for item in options.items() for part in item)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _output_and_grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = module(x)
    out.backward(grad_out)
    return [out.detach(), x.grad, module.gate.weight.grad]


def check_equivalence(modules: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """Asserts that the sparse implementations agree with ``unimoe``: output, input and router grads.

    Run in fp32: in bf16 a near-tie between two logits may route a token differently in two correct
    implementations. The tolerance covers fp32 summation-order differences only: the router gradient
    sums over all tokens (entries in the hundreds at T=2048), so the absolute tolerance scales with
    the largest entry. Measured differences stay below 1e-6 of it; scaling one expert's weights by
    1.01 is caught.
    """
    expected = _output_and_grads(modules["unimoe"], x, grad_out)
    for name in SPARSE_IMPLS[1:]:
        actual = _output_and_grads(modules[name], x, grad_out)
        for what, a, e in zip(("output", "input grad", "router grad"), actual, expected):
            try:
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())
            except AssertionError as err:
                raise AssertionError(f"{name} differs from unimoe in its {what}:\n{err}") from None
    for module in modules.values():
        module.zero_grad(set_to_none=True)


def make_cases(modules: dict[str, nn.Module], x: torch.Tensor, grad_out: torch.Tensor) -> list[Case]:
    """A forward case ``{impl}/fwd`` and a forward+backward case ``{impl}/fwd_bwd`` per implementation."""
    x_train = x.detach().requires_grad_(True)
    cases = []
    for name, module in modules.items():

        def forward(module: nn.Module = module) -> None:
            with torch.no_grad():
                module(x)

        def forward_backward(module: nn.Module = module) -> None:
            module(x_train).backward(grad_out)

        def reset(module: nn.Module = module) -> None:
            module.zero_grad(set_to_none=True)
            x_train.grad = None

        cases.append(Case(f"{name}/fwd", forward))
        cases.append(Case(f"{name}/fwd_bwd", forward_backward, reset))
    return cases


@dataclass
class ExpertCountRun:
    """One expert count's medians (``results`` rows), per-expert token slots and raw timings."""

    results: list[dict[str, Any]]
    expert_tokens: list[int]
    samples_ms: dict[str, list[float]]


def bench_experts(num_experts: int, args: argparse.Namespace) -> ExpertCountRun:
    """Checks, then times, every implementation for one expert count."""
    device, dtype = args.device, args.dtype
    weights = ExpertWeights.random(num_experts, args.hidden, args.ffn, seed=args.seed)
    x, grad_out = make_inputs(args)
    modules = {name: m.to(device) for name, m in build_all(weights, args.top_k, args).items()}
    check_equivalence(modules, x, grad_out)
    with torch.no_grad():
        chosen = modules["unimoe"].chosen_experts(x)  # [T, k]
    load = torch.bincount(chosen.reshape(-1), minlength=num_experts).tolist()

    modules = {name: m.to(dtype) for name, m in modules.items()}
    cases = make_cases(modules, x.to(dtype), grad_out.to(dtype))
    samples = interleaved_times(cases, args.repeats, args.warmup, device, args.clock)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    del modules, cases
    peaks = {name: peak_in_child(name, num_experts, args) if args.memory else {} for name in IMPLS}
    results = [
        {
            "impl": name,
            "experts": num_experts,
            "tokens": args.batch_size * args.seq_len,
            "hidden": args.hidden,
            "ffn": args.ffn,
            "top_k": args.top_k,
            "fwd_ms": medians[f"{name}/fwd"],
            "fwd_bwd_ms": medians[f"{name}/fwd_bwd"],
            **peaks[name],
        }
        for name in IMPLS
    ]
    return ExpertCountRun(results, load, samples)


def format_results(results: list[dict[str, Any]]) -> str:
    """The table: time and peak memory per implementation and expert count, time against ``dense_floor``."""
    floor = {r["experts"]: r for r in results if r["impl"] == "dense_floor"}
    rows = [
        [
            r["impl"],
            r["experts"],
            r["fwd_ms"],
            r["fwd_bwd_ms"],
            f"{r['fwd_ms'] / floor[r['experts']]['fwd_ms']:.2f}x",
            f"{r['fwd_bwd_ms'] / floor[r['experts']]['fwd_bwd_ms']:.2f}x",
            r.get("fwd_peak_mb", "-"),
            r.get("fwd_bwd_peak_mb", "-"),
        ]
        for r in results
    ]
    headers = ["impl", "E", "fwd ms", "fwd+bwd ms", "fwd / dense", "fwd+bwd / dense", "fwd MB", "fwd+bwd MB"]
    return format_table(headers, rows)


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per expert count: ours against the dense floor, and every peer's time over ours (>1: ours faster)."""
    summary = {}
    for num_experts in sorted({r["experts"] for r in results}):
        rows = {r["impl"]: r for r in results if r["experts"] == num_experts}
        ours = rows["unimoe"]
        entry = {
            "unimoe_fwd_over_dense": ours["fwd_ms"] / rows["dense_floor"]["fwd_ms"],
            "unimoe_fwd_bwd_over_dense": ours["fwd_bwd_ms"] / rows["dense_floor"]["fwd_bwd_ms"],
        }
        for peer in SPARSE_IMPLS[1:]:
            entry[f"{peer}_over_unimoe_fwd"] = rows[peer]["fwd_ms"] / ours["fwd_ms"]
            entry[f"{peer}_over_unimoe_fwd_bwd"] = rows[peer]["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        summary[f"E={num_experts}"] = entry
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; shape options left unset take the full or the ``--quick`` defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (T=64, D=64, H=128), seconds")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8], help="expert counts E")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help=f"default {FULL_SHAPE['batch_size']}")
    parser.add_argument("--seq-len", type=int, help=f"default {FULL_SHAPE['seq_len']}")
    parser.add_argument("--hidden", type=int, help=f"D, default {FULL_SHAPE['hidden']}")
    parser.add_argument("--ffn", type=int, help=f"expert FFN width H, default {FULL_SHAPE['ffn']}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), float32, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=sorted(CLOCKS),
        help="wall time, or CPU time of this process (CPU only; steadier on a shared machine with --threads 1)",
    )
    parser.add_argument(
        "--unimoe-dispatch", default="auto", choices=["auto", "grouped_mm", "loop"], help="moe_dispatch"
    )
    parser.add_argument(
        "--mixtral-experts",
        default="grouped_mm",
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers experts implementation (grouped_mm: what a Mixtral model picks by default)",
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument(
        "--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes"
    )
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # child mode: one implementation's peak memory
    args = parser.parse_args(argv)
    for key, value in (QUICK_SHAPE if args.quick else FULL_SHAPE).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = select_device(args.device)
    args.dtype = select_dtype(args.dtype, args.device)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints the table and optionally writes the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        print(json.dumps(measure_peak(args.peak_of, args.experts[0], args)))
        return 0
    runs = {str(num_experts): bench_experts(num_experts, args) for num_experts in args.experts}
    results = [row for run in runs.values() for row in run.results]
    print(format_results(results))
    if args.json:
        payload = {
            "summary": summarize(results),
            "results": results,
            **environment(args.device, args.dtype, args.threads),
            "clock": args.clock,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "unimoe_dispatch": args.unimoe_dispatch,
            "mixtral_experts": args.mixtral_experts,
            "expert_tokens": {e: run.expert_tokens for e, run in runs.items()},
            "samples_ms": {e: run.samples_ms for e, run in runs.items()},
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
