"""Atomic training checkpoints: a checkpoint either exists completely or not at all.

A checkpoint is written into ``checkpoints/.tmp-step-N``, every file is fsynced, and the folder is
renamed to ``checkpoints/step-N`` (``os.replace`` is atomic on POSIX), then the parent folder is
fsynced. A process killed while saving leaves only a ``.tmp-*`` folder, which is ignored and
removed by the next run; the previous ``step-*`` checkpoint stays intact.

Contents: the backend's weights/optimizer/scheduler files (``Engine.save``), ``rng-{rank}.pt``
(Python, NumPy and torch generator states of every process) and ``trainer_state.json`` (step, epoch,
data position, loss history, skipped-sample count).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step ``step``."""
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_stale(root: Path) -> None:
    """Deletes leftovers of interrupted saves (``.tmp-*`` folders)."""
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def fsync_tree(path: Path) -> None:
    """Flushes every file under ``path``, then the folders themselves, to disk."""
    for folder, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_checkpoint(root: Path, step: int, is_main: bool, barrier, keep: int):
    """Yields a temporary folder to write step ``step``'s checkpoint into; on a clean exit publishes it
    as ``root/step-N`` and keeps only the newest ``keep`` checkpoints. Every process enters it;
    ``barrier`` synchronises them."""
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    yield tmp
    barrier()
    if is_main:
        final = root / checkpoint_name(step)
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def rng_state() -> dict[str, Any]:
    """Every random generator's state of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: Path, rank: int) -> None:
    """Writes this process's generator states."""
    torch.save(rng_state(), directory / f"rng-{rank}.pt")


def load_rng(directory: Path, rank: int) -> None:
    """Restores this process's generator states (if the checkpoint has them for ``rank``)."""
    path = directory / f"rng-{rank}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=False))
