"""Constants and helpers shared by the training tests (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from unimoe.training import TrainResult

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny"
ABLATION = RECIPES / "ablation"
QUIET = ["train.progress=false", "train.tensorboard=false"]
OVERFIT = ["optim.scheduler=constant", "optim.warmup_ratio=0", "train.shuffle=false"]


@dataclass
class Pipeline:
    """The outputs of stage 1, stage 2, upcycling and stage 3 on the tiny model."""

    root: Path
    data: Path
    stage1: TrainResult
    stage2: TrainResult
    upcycled: Path
    stage3: TrainResult


def run_cli(
    args: list[str], launcher: list[str] | None = None, timeout: int = 240
) -> subprocess.CompletedProcess:
    """Runs ``python -m unimoe.cli_training ARGS`` (optionally under ``launcher``, e.g. torchrun) with one
    thread per process; fails the test with the output when it exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*(launcher or [sys.executable]), "-m", "unimoe.cli_training", *args]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def torchrun(nproc: int = 2) -> list[str]:
    """The torchrun launcher of this interpreter's environment (single node, a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
