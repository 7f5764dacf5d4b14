"""Cost of one training step on a mixed-modality batch: Uni-MoE as built here against the release's way.

The batch holds the same number of image, video, speech and audio samples (real media from the
synthetic data set). One step is forward, backward and an AdamW update of everything but the frozen
encoders, under the given dtype (bf16 autocast on CUDA by default).

- ``ours``: only the media present in the batch are encoded.
- ``release``: as the released code does, every sample also fills the image slot and the 8 video-frame
  slots it does not use with dummy inputs: samples without an image pass a zero image, samples without
  a video pass 8 zero frames, through CLIP and the projector, their features entering the loss with
  weight 0. Per batch of B that is B images + 8B frames through CLIP, whatever the batch holds.

Reported per shape (``tiny`` preset and a mid-size CPU shape): median milliseconds per step over
``--repeats`` interleaved rounds, tokens per second (non-padding tokens, media placeholders included),
peak memory of one step, and the release/ours time ratio. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` above the memory held before the step; on CPU the peak of torch's
own allocations during the step, from the profiler's memory timeline (RSS and tracemalloc do not see
torch's allocator correctly).

``--demo-steps`` measures instead the demo's stage-3 and stage-0 CLIP steps before and after their
speed work (``demo_steps.py``; with ``--profile``, the top operators of each).

Run: ``python benchmarks/train_step.py [--quick] [--json results.json]``, or
``python benchmarks/train_step.py --demo-steps [--profile] [--quick] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from common import Case, environment, format_table, interleaved_times, select_device, select_dtype, write_json

from unimoe.demo.synth import synthesize
from unimoe.modeling.configuration_unimoe import UniMoeConfig
from unimoe.modeling.modeling_unimoe import UniMoeForConditionalGeneration
from unimoe.presets import tiny
from unimoe.processing.processor import UniMoeProcessor

TASKS = ("image_shape", "video_direction", "speech_word", "audio_sound")


def mid_config() -> UniMoeConfig:
    """A mid-size shape a CPU trains in about a second per step: LLM width 512, 4 layers, 4 experts."""
    config = tiny(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
    data = config.to_dict()
    data["vision_config"].update(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
    )
    data["speech_config"].update(
        d_model=256, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=1024, decoder_ffn_dim=1024
    )
    data["speech_config"].update(encoder_attention_heads=4, decoder_attention_heads=4)
    data["audio_config"].update(
        embed_dim=256, encoder_embed_dim=256, encoder_ffn_embed_dim=1024, encoder_layers=2
    )
    data["audio_qformer_config"].update(
        hidden_size=256, intermediate_size=1024, encoder_hidden_size=256, num_attention_heads=4
    )
    return UniMoeConfig(**{k: v for k, v in data.items() if k not in ("transformers_version", "model_type")})


SHAPES = {"tiny": tiny, "mid": mid_config}


def make_batch(processor: UniMoeProcessor, data_dir: Path, batch_size: int) -> dict[str, torch.Tensor]:
    """``batch_size`` samples, an equal share of each task in ``TASKS``, collated."""
    records = json.loads((data_dir / "train.json").read_text())
    per_task = batch_size // len(TASKS)
    chosen = [r for t in TASKS for r in [r for r in records if r["task"] == t][:per_task]]
    return dict(processor.collate([processor.encode_record(r, data_dir) for r in chosen]))


class TrainStep:
    """One optimizer step on a fixed batch, the release's dummy media passes optional."""

    def __init__(
        self, model: UniMoeForConditionalGeneration, batch: dict, device: torch.device, dtype, release: bool
    ):
        self.model, self.device, self.release = model, device, release
        self.batch = {k: v.to(device) for k, v in batch.items()}
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        low = dtype != torch.float32
        self.autocast = torch.autocast(device.type, dtype=dtype) if low else nullcontext()
        size = model.config.vision_config.image_size
        samples = self.batch["input_ids"].shape[0]
        images = self.batch.get("pixel_values", torch.empty(0)).shape[0]
        videos = self.batch.get("pixel_values_videos", torch.empty(0)).shape[0]
        self.dummy_images = torch.zeros(samples - images, 3, size, size, device=device)
        frames = model.config.video_num_frames
        self.dummy_videos = torch.zeros(samples - videos, frames, 3, size, size, device=device)

    def __call__(self) -> None:
        with self.autocast:
            loss = self.model(**self.batch).loss
            if self.release:
                extra = self.model.model.image_embeddings(self.dummy_images).sum()
                extra = extra + self.model.model.video_embeddings(self.dummy_videos).sum()
                loss = loss + 0.0 * extra
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def peak_memory_mb(step: TrainStep, device: torch.device) -> float:
    """Peak memory of one step above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # deprecated for CUDA only; the CPU timeline has no successor
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max((sum(row) for row in sizes), default=0) / 2**20


def run_shape(name: str, args: argparse.Namespace, data_dir: Path, device: torch.device, dtype) -> list[dict]:
    """Both methods on one shape: timings, tokens per second and peak memory."""
    torch.manual_seed(0)
    config = SHAPES[name]()
    processor = UniMoeProcessor.for_config(config)
    model = UniMoeForConditionalGeneration(config).to(device=device, dtype=torch.float32).train()
    batch = make_batch(processor, data_dir, args.batch_size)
    tokens = int(batch["attention_mask"].sum())
    steps = {m: TrainStep(model, batch, device, dtype, release=m == "release") for m in ("ours", "release")}
    cases = [Case(m, step) for m, step in steps.items()]
    times = interleaved_times(cases, args.repeats, args.warmup, device)
    rows = []
    for method, step in steps.items():
        ms = sorted(times[method])[len(times[method]) // 2]
        rows.append(
            {
                "shape": name,
                "method": method,
                "batch_size": args.batch_size,
                "tokens": tokens,
                "step_ms": ms,
                "tokens_per_s": tokens / (ms / 1e3),
                "peak_mb": peak_memory_mb(step, device),
                "samples_ms": times[method],
            }
        )
    ratio = rows[1]["step_ms"] / rows[0]["step_ms"]
    for row in rows:
        row["release_over_ours"] = ratio
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape only, few repeats")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per batch (a multiple of 4)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or (["tiny"] if args.quick else ["tiny", "mid"])
    args.repeats = args.repeats or (2 if args.quick else 7)
    if args.batch_size % len(TASKS):
        parser.error(f"--batch-size must be a multiple of {len(TASKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--demo-steps" in argv:
        import demo_steps

        return demo_steps.main([a for a in argv if a != "--demo-steps"])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        synthesize(data_dir, seed=0, n_train=args.batch_size // len(TASKS), n_heldout=0, tasks=list(TASKS))
        for shape in args.shapes:
            rows += run_shape(shape, args, data_dir, device, dtype)
    headers = ["shape", "method", "tokens", "ms/step", "tokens/s", "peak MB", "release/ours"]
    table = [
        [
            r["shape"],
            r["method"],
            r["tokens"],
            r["step_ms"],
            r["tokens_per_s"],
            r["peak_mb"],
            r["release_over_ours"],
        ]
        for r in rows
    ]
    sys.stdout.write(format_table(headers, table) + "\n")
    if args.json:
        payload = {
            **environment(device, dtype, torch.get_num_threads()),
            "repeats": args.repeats,
            "results": rows,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
