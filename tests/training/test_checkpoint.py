"""Checkpoints are atomic, and a run killed after a checkpoint resumes to the uninterrupted run's losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import QUIET, ROOT, TINY, Pipeline

from unimoe.training import RecipeError, train
from unimoe.training.checkpoint import (
    STATE_FILE,
    atomic_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    remove_stale,
    write_json,
)


def _save(root: Path, step: int, fail: bool = False, keep: int = 5) -> None:
    with atomic_checkpoint(root, step, True, lambda: None, keep) as tmp:
        (tmp / "weights.bin").write_bytes(bytes([step]) * 1000)
        if fail:
            raise RuntimeError("killed while saving")
        write_json(tmp / STATE_FILE, {"step": step})


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    with pytest.raises(RuntimeError):
        _save(tmp_path, 2, fail=True)
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert read_state(latest_checkpoint(tmp_path)) == {"step": 1}
    assert (latest_checkpoint(tmp_path) / "weights.bin").read_bytes() == bytes([1]) * 1000
    assert (tmp_path / ".tmp-step-00000002").is_dir()
    remove_stale(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_resume_true_without_a_checkpoint_refuses(pipeline: Pipeline, tmp_path: Path) -> None:
    overrides = [f"data.train={pipeline.data}", f"train.output_dir={tmp_path}", "train.resume=true", *QUIET]
    with pytest.raises(RecipeError, match="no checkpoint"):
        train(TINY / "stage1.yaml", overrides)


def _stage3_args(pipeline: Pipeline, out: Path) -> list[str]:
    return [
        f"data.train={pipeline.data}",
        f"model.path={pipeline.upcycled}",
        f"train.output_dir={out}",
        "data.tasks=[image_shape, speech_word]",
        "train.batch_size=2",
        "train.max_steps=24",
        "train.save_every=3",
        "train.log_every=1",
        *QUIET,
    ]


def test_killed_run_resumes_to_the_same_losses(pipeline: Pipeline, tmp_path: Path) -> None:
    # 8 samples in batches of 2: checkpoints at steps 3 and 6 fall mid-epoch, dropout (LoRA 0.05) and
    # shuffling are on, so data position, RNG, optimizer and scheduler state must all be restored
    killed = tmp_path / "killed"
    args = _stage3_args(pipeline, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "unimoe.cli_training", "train", str(TINY / "stage3.yaml"), *args]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step-00000006"
    deadline = time.monotonic() + 180
    while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.is_dir() and not (killed / "final").exists(), "the run was not killed mid-way"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process, so that float results match bit for bit
    try:
        resumed = train(TINY / "stage3.yaml", [*args, "train.resume=auto"])
        reference = train(TINY / "stage3.yaml", _stage3_args(pipeline, tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed_from is not None and resumed.resumed_from >= 6
    assert len(resumed.losses) == len(reference.losses) == 24
    torch.testing.assert_close(
        torch.tensor(resumed.losses), torch.tensor(reference.losses), rtol=1e-6, atol=0
    )
    logged = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if line]
    assert len(logged) == 24  # steps logged after the last checkpoint and then redone appear once
