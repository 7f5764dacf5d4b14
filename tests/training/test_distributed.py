"""Two processes (torchrun, gloo) with DDP, FSDP2 and DeepSpeed ZeRO-2 train to the one-process losses.

Same global batch in every case: one process with batch 4, or two with batch 2 each (the sampler cuts
the same global batches, and the loss is normalised by the target tokens of the whole step). Dropout
is off (LoRA dropout set to 0; audio, whose Q-Former connector has dropout, is left out) and the
load-balancing loss coefficient is 0, because the aux loss is a per-micro-batch statistic: it
legitimately differs between one batch of 4 and two batches of 2. Everything else is
the same computation in fp32, summed in a different order (gradient all-reduce, per-process padding),
so after a few AdamW steps the losses agree to about 1e-7 relative; rtol 1e-5 leaves headroom without
hiding a real difference (a wrong normalisation or a missed gradient shows up at 1e-3 or more).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from training_helpers import QUIET, TINY, Pipeline, run_cli, torchrun

from unimoe.training import train

STEPS = 4


def _args(pipeline: Pipeline, out: Path, batch_size: int) -> list[str]:
    return [
        f"data.train={pipeline.data}",
        f"model.path={pipeline.upcycled}",
        f"train.output_dir={out}",
        "data.tasks=[image_shape, speech_word, cross_speech_image]",
        "data.group_by_modality=false",  # mixed batches: processes use different connectors per step
        f"train.batch_size={batch_size}",
        f"train.max_steps={STEPS}",
        "unified.aux_loss_coef=0",
        "unified.lora.dropout=0",
        "unified.expert_lora.dropout=0",
        *QUIET,
    ]


@pytest.fixture(scope="module")
def single(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    out = tmp_path_factory.mktemp("single")
    return train(TINY / "stage3.yaml", _args(pipeline, out, 4)).losses


def _distributed_losses(pipeline: Pipeline, out: Path, *overrides: str) -> list[float]:
    args = ["train", str(TINY / "stage3.yaml"), *_args(pipeline, out, 2), *overrides]
    run_cli(args, launcher=torchrun(2))
    return json.loads((out / "summary.json").read_text())["losses"]


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_two_processes_match_one(
    backend: str, pipeline: Pipeline, single: list[float], tmp_path: Path
) -> None:
    losses = _distributed_losses(pipeline, tmp_path, f"train.distributed={backend}")
    assert len(losses) == len(single) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=1e-5, atol=0)
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.slow  # the first DeepSpeed start on a machine compiles its CPU communication op (~3 min)
def test_deepspeed_zero2_matches_one_process(pipeline: Pipeline, single: list[float], tmp_path: Path) -> None:
    losses = _distributed_losses(
        pipeline, tmp_path, "train.deepspeed_config=recipes/deepspeed/zero2.json", "train.save_every=2"
    )
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=1e-5, atol=0)
    assert (tmp_path / "checkpoints" / "step-00000004" / "deepspeed").is_dir()
