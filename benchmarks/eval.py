"""Evaluation throughput: ``unimoe eval`` against the release's way of evaluating, on one fixture.

The fixture is ``--items`` OK-VQA-style records in the release's eval format (an image, a question,
ten human answers), the images real photos. Both methods read the same file and media, generate
up to ``--new-tokens`` greedy tokens per item (both stop at end-of-sequence) and
score with the official VQA rule:

- ``release``: the release's ``eval.py``: one sample at a time, no KV cache: every decoding step runs
  the full model over the whole sequence, media included (so the encoders run again at every step).
  The release also encodes a dummy image and 8 dummy video frames for every sample; that is left out,
  so this baseline is faster than the release.
- ``unimoe eval``: ``unimoe.evaluation.runner.run_eval`` at ``--batch`` (KV cache, media encoded once
  per item in the prefill), writing predictions and scores as the command does.

Each round runs both once in rotating order; medians over ``--repeats`` rounds. Reported: items per
second and the ratio (target: at least 10x). Shapes: the tiny preset and a mid-size CPU shape (text
hidden 512, 4 layers, 4 experts; CLIP hidden 256, 4 layers at 64 px).

Run: ``python benchmarks/eval.py [--quick] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    Case,
    environment,
    format_table,
    interleaved_medians,
    select_device,
    select_dtype,
    write_json,
)
from generate import build_engine, mid_config, release_generate

from unimoe.evaluation.benchmarks import BENCHMARKS
from unimoe.evaluation.runner import EvalSettings, load_items, run_eval
from unimoe.presets import tiny

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
RESULT_KEYS = ("shape", "method", "items", "batch", "new_tokens", "ms", "items_per_s", "speedup")


def write_fixture(root: Path, count: int) -> Path:
    """``count`` release-format VQA records, each with its own copy of a real photo."""
    records = []
    for i in range(count):
        image = root / f"img{i}.jpg"
        shutil.copy(FIXTURES / "photo.jpg", image)
        question = f"What is the {['colour', 'shape', 'name', 'size'][i % 4]} of object {i}?"
        records.append(
            {
                "question_id": i,
                "image": image.name,
                "text": question,
                "gt": ["red"] * 6 + ["blue"] * 4,
                "conversations": [
                    {
                        "from": "human",
                        "value": f"<image>\n{question}\nAnswer the question using a single word or phrase.",
                    },
                    {"from": "gpt", "value": ""},
                ],
            }
        )
    path = root / "okvqa.json"
    path.write_text(json.dumps(records))
    return path


def release_eval(engine, settings: EvalSettings, new_tokens: int) -> dict:
    """The release's loop: per item, encode and decode without a cache; then the same scorer."""
    items = load_items(settings)
    answers = []
    for item in items:
        sample = engine.encode(item["record"], settings.media_root)
        ids = release_generate(engine, sample, new_tokens, stop_at_eos=True)
        answers.append(engine.processor.decode(ids))
    spec = BENCHMARKS[settings.benchmark]
    return spec.scorer([i["target"] for i in items], answers, spec.rules[0])


def measure(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    config = tiny() if shape == "tiny" else mid_config()
    engine = build_engine(config, device, dtype)
    root = Path(tempfile.mkdtemp(prefix="unimoe-eval-bench-"))
    try:
        data = write_fixture(root, args.items)
        out = root / "run"
        settings = EvalSettings(
            "okvqa", data, out=out, media_root=root, max_new_tokens=args.new_tokens, batch_size=args.batch
        )

        def fresh() -> None:
            shutil.rmtree(out, ignore_errors=True)

        cases = [
            Case("release", lambda: release_eval(engine, settings, args.new_tokens)),
            Case("unimoe eval", lambda: run_eval(engine, settings, progress=False), reset=fresh),
        ]
        medians = interleaved_medians(cases, args.repeats, args.warmup, device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for name, batch in (("release", 1), ("unimoe eval", args.batch)):
        ms = medians[name]
        rows.append(
            dict(
                shape=shape,
                method=name,
                items=args.items,
                batch=batch,
                new_tokens=args.new_tokens,
                ms=ms,
                items_per_s=args.items / (ms / 1000),
                speedup=medians["release"] / ms,
            )
        )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "mid"], choices=["tiny", "mid"])
    parser.add_argument("--quick", action="store_true", help="tiny shape, few items and tokens (for tests)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.new_tokens, args.batch, args.repeats, args.warmup, args.shapes = (
            4,
            4,
            4,
            1,
            0,
            ["tiny"],
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    torch.manual_seed(0)
    results = [row for shape in args.shapes for row in measure(shape, args, device, dtype)]
    print(format_table(RESULT_KEYS, [[r[k] for k in RESULT_KEYS] for r in results]))
    summary = {
        f"{r['shape']}_eval_over_release": r["speedup"] for r in results if r["method"] == "unimoe eval"
    }
    print("summary:", json.dumps(summary))
    if args.json:
        write_json(
            args.json,
            {"environment": environment(device, dtype, args.threads), "results": results, "summary": summary},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
