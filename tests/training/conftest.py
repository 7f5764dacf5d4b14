"""Shared fixtures: a small synthetic data set and the tiny three-stage pipeline, run once per session.

The recipes overfit a handful of samples with a constant, fairly large learning rate, so that a few
steps reliably lower the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from training_helpers import OVERFIT, QUIET, TINY, Pipeline

from unimoe.demo.synth import synthesize
from unimoe.training import train, upcycle


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny models gain nothing from two, and on a busy machine two-thread
    parallel regions wait for each other and stretch every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four training samples per task (28 records) with real media files."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, n_train=4, n_heldout=1)
    return out


@pytest.fixture(scope="session")
def pipeline(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp("pipeline")
    data = synth_dir / "train.json"
    common = [f"data.train={data}", *QUIET, *OVERFIT, "train.batch_size=4"]
    stage1 = train(
        TINY / "stage1.yaml",
        [
            *common,
            f"train.output_dir={root / 's1'}",
            "train.max_steps=6",
            "optim.lr=1e-2",
            "data.tasks=[image_shape]",
        ],
    )
    stage2 = train(
        TINY / "stage2.yaml",
        [
            *common,
            f"model.path={stage1.final_dir}",
            f"train.output_dir={root / 's2'}",
            "train.max_steps=4",
            "optim.lr=3e-3",
            "data.max_samples=4",
        ],
    )
    upcycled = upcycle(stage1.final_dir, stage2.expert_files, root / "up", connectors=stage2.connector_files)
    stage3 = train(
        TINY / "stage3.yaml",
        [
            *common,
            f"model.path={upcycled}",
            f"train.output_dir={root / 's3'}",
            "train.max_steps=6",
            "optim.lr=1e-2",
            "data.tasks=[image_shape, speech_word]",
            "data.group_by_modality=false",
            "train.tensorboard=true",
            "train.save_every=3",
            "train.log_every=1",
        ],
    )
    return Pipeline(root, data, stage1, stage2, upcycled, stage3)
