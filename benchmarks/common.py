"""Shared helpers for the benchmark scripts: device/dtype choice, interleaved median timing, output.

Benchmarks time several implementations against each other. Machine noise (another process on the
same cores, frequency changes) drifts over seconds, so every implementation is timed once per round,
in a rotating order, and the median over rounds is reported: the noise falls on all of them alike.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# "cpu" counts the CPU time of this process (all its threads): unlike wall time it barely moves when
# other processes take the cores, which makes single-thread runs on a shared machine comparable.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# environment variables that change CPU speed: thread pools and the allocator (glibc's MALLOC_*
# settings decide whether large tensors are re-faulted from the OS on every allocation)
RECORDED_ENV_PREFIXES = ("OMP_", "MKL_", "MALLOC_", "THP_", "LD_PRELOAD")


def select_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` picks bfloat16 on CUDA and float32 elsewhere; otherwise a key of ``DTYPES``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Waits for queued kernels so that wall-clock time covers them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One timed workload: ``run`` is timed, ``reset`` (untimed) runs before each call."""

    name: str
    run: Callable[[], object]
    reset: Callable[[], None] | None = None


def time_once(case: Case, device: torch.device, clock: str = "wall") -> float:
    """Milliseconds of one call of ``case.run`` on ``clock`` (a key of ``CLOCKS``), after its ``reset``."""
    if clock != "wall" and device.type != "cpu":
        raise ValueError(f"clock {clock!r} only measures CPU work; use 'wall' on {device.type}")
    now = CLOCKS[clock]
    if case.reset is not None:
        case.reset()
    synchronize(device)
    start = now()
    case.run()
    synchronize(device)
    return (now() - start) * 1e3


def interleaved_times(
    cases: Sequence[Case], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, list[float]]:
    """Milliseconds per case and round over ``repeats`` rounds, each round timing every case once.

    ``warmup`` untimed rounds come first. The starting case rotates from round to round so that no
    case always follows the same neighbour (cache and allocator state left by the previous case).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {case.name: [] for case in cases}
    for round_index in range(warmup + repeats):
        shift = round_index % len(cases)
        for case in [*cases[shift:], *cases[:shift]]:
            elapsed = time_once(case, device, clock)
            if round_index >= warmup:
                times[case.name].append(elapsed)
    return times


def interleaved_medians(
    cases: Sequence[Case], repeats: int, warmup: int, device: torch.device, clock: str = "wall"
) -> dict[str, float]:
    """Median milliseconds per case of ``interleaved_times``."""
    times = interleaved_times(cases, repeats, warmup, device, clock)
    return {name: statistics.median(values) for name, values in times.items()}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def environment(device: torch.device, dtype: torch.dtype, threads: int) -> dict[str, Any]:
    """The run conditions every benchmark JSON records next to its results."""
    info: dict[str, Any] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "torch": torch.__version__,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)},
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
